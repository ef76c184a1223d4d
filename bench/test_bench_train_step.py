"""The training-step benchmark at tiny shapes: both providers compute the same step, and the
worker, the driver and the report work.

    cd /work/main && PYTHONPATH=. pytest bench/test_bench_train_step.py

The figures that count come from bench/bench_train_step.py at the embedded and openPangu-1B
shapes; these tests check that the two providers it compares train the same model on the same
batch to the same loss and gradients, and that the report says what was measured.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from bench_train_step import (
    SHAPES,
    Config,
    main,
    run_worker,
    table_lines,
    target_lines,
    to_rows,
)
from train_step_baselines import (
    PROVIDERS,
    PlainDecoderLM,
    TrainBatch,
    build_model,
    document_lengths,
    make_optimizer,
    make_train_batch,
    random_topk_target,
    train_step,
)

from pangu_fastkd.model import ModelConfig
from pangu_fastkd.ops.sparse_kd_reference import validate_target

VOCAB = 263  # the byte tokenizer's: not a multiple of K = 16, a ragged last stratum
KD_WEIGHT = 0.5


def _model_config(variant: str) -> ModelConfig:
    """The tiny preset, and variants with openPangu's features (tied head, biases) and qk-norm."""
    config = ModelConfig.preset("tiny", VOCAB)
    if variant == "pangu_like":
        return dataclasses.replace(
            config, tie_word_embeddings=True, attention_bias=True, o_proj_bias=True
        )
    if variant == "qk_norm":
        return dataclasses.replace(config, qk_norm=True)
    return config


def _batch(seed: int = 0) -> TrainBatch:
    """T = 97 in 3 documents of mixed lengths."""
    return make_train_batch(97, 3, VOCAB, 16, seed=seed)


def _loss_and_grads(
    provider: str, model: torch.nn.Module, batch: TrainBatch
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss, {parameter name: grad})`` of one forward+backward, in float64."""
    loss = PROVIDERS[provider](model, batch, KD_WEIGHT)
    loss.backward()
    grads = {name: p.grad.double() for name, p in model.named_parameters()}
    return loss.detach().double(), grads


def _max_rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()


# ---------------------------------------------------------------------------------------------
# Both providers compute the same step


# float64: what is left is the float32 RoPE and RMSNorm of both models, rounded differently.
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-6), (torch.float32, 2e-5)])
@pytest.mark.parametrize("variant", ["llama", "pangu_like", "qk_norm"])
def test_providers_same_loss_and_grads(variant: str, dtype: torch.dtype, tol: float) -> None:
    config, batch = _model_config(variant), _batch()
    want_loss, want = _loss_and_grads("plain", build_model("plain", config, dtype), batch)
    got_loss, got = _loss_and_grads(
        "pangu_fastkd", build_model("pangu_fastkd", config, dtype), batch
    )
    assert math.isfinite(want_loss.item()) and want_loss.item() > 0
    torch.testing.assert_close(got_loss, want_loss, rtol=tol, atol=0)
    assert got.keys() == want.keys()
    for name in want:
        assert want[name].abs().max() > 0, f"{name} has no gradient"
        error = _max_rel_error(got[name], want[name])
        assert error <= tol, f"{variant} {dtype} {name}: relative error {error:.2e} > {tol:.0e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_checkpointed_provider_computes_the_same_step(dtype: torch.dtype) -> None:
    """pangu_fastkd+ckpt recomputes the layers in backward: the same loss and gradients (the
    recompute runs the same kernels on the same inputs), only less kept in between."""
    config, batch = _model_config("pangu_like"), _batch()
    want_loss, want = _loss_and_grads(
        "pangu_fastkd", build_model("pangu_fastkd", config, dtype), batch
    )
    model = build_model("pangu_fastkd+ckpt", config, dtype)
    assert model.training and all(layer.activation_checkpointing for layer in model.layers)
    got_loss, got = _loss_and_grads("pangu_fastkd+ckpt", model, batch)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=0)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("variant", ["llama", "pangu_like"])
def test_bf16_error_within_twice_plain(variant: str) -> None:
    """flash-attention's rule: against a float64 run of the same bf16 weights, the project's
    error is at most twice plain PyTorch's own bf16 error."""
    config, batch = _model_config(variant), _batch(seed=1)
    oracle_model = build_model("plain", config, torch.bfloat16).double()
    oracle_loss, oracle = _loss_and_grads("plain", oracle_model, batch)
    errors = {}
    for provider in PROVIDERS:
        model = build_model(provider, config, torch.bfloat16)
        loss, grads = _loss_and_grads(provider, model, batch)
        flat = torch.cat([(grads[n] - oracle[n]).flatten() for n in oracle])
        errors[provider] = {
            "loss": abs(loss - oracle_loss).item(),
            "grads": (
                flat.norm() / torch.cat([g.flatten() for g in oracle.values()]).norm()
            ).item(),
            **{n: _max_rel_error(grads[n], oracle[n]) for n in oracle},
        }
    plain, ours = errors["plain"], errors["pangu_fastkd"]
    assert plain["grads"] > 0  # bf16 does round: the comparison is not vacuous
    for key, base in plain.items():
        floor = 1e-4 if key == "loss" else 1e-3  # float32 loss arithmetic; bf16 ulp of small grads
        assert ours[key] <= 2 * base + floor, f"{key}: {ours[key]:.2e} vs plain {base:.2e}"


def test_both_models_hold_the_same_weights() -> None:
    config = _model_config("pangu_like")
    ours = build_model("pangu_fastkd", config, torch.float32, seed=3)
    plain = build_model("plain", config, torch.float32, seed=3)
    assert isinstance(plain, PlainDecoderLM)
    assert ours.state_dict().keys() == plain.state_dict().keys()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, plain.state_dict()[name]), name
    assert plain.output_weight is plain.embed_tokens.weight  # the tie survives the hand-over
    other_seed = build_model("plain", config, torch.float32, seed=4)
    assert not torch.equal(other_seed.embed_tokens.weight, plain.embed_tokens.weight)


def test_no_attention_across_documents() -> None:
    """Changing the second document's tokens leaves the first document's hidden states alone."""
    batch = _batch()
    first_end = int(batch.packed.cu_seqlens[1])
    changed_ids = batch.packed.input_ids.clone()
    changed_ids[first_end:] = (changed_ids[first_end:] + 1) % VOCAB
    for provider in PROVIDERS:
        model = build_model(provider, _model_config("llama"), torch.float64)
        cu = batch.packed.cu_seqlens
        with torch.no_grad():
            before = model.hidden_states(batch.packed.input_ids, cu)
            after = model.hidden_states(changed_ids, cu)
        torch.testing.assert_close(after[:first_end], before[:first_end], rtol=0, atol=0)
        assert not torch.allclose(after[first_end:], before[first_end:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_train_step_updates_every_parameter(dtype: torch.dtype) -> None:
    config, batch = _model_config("pangu_like"), _batch()
    losses = {}
    for provider in PROVIDERS:
        model = build_model(provider, config, dtype)
        # lr 1e-2: the first AdamW step moves every weight by about lr, more than half a bf16 ulp
        # of the RMSNorm weights (1.0), so that a bf16 update shows too.
        optimizer = make_optimizer(model, lr=1e-2)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        losses[provider] = train_step(provider, model, optimizer, batch, KD_WEIGHT)
        for name, p in model.named_parameters():
            assert p.grad is not None and p.dtype == dtype, name
            assert not torch.equal(p.detach(), before[name]), f"{provider}: {name} not updated"
        state = optimizer.state[next(model.parameters())]
        assert state["exp_avg"].dtype == dtype  # bf16 parameters keep bf16 AdamW moments
    torch.testing.assert_close(losses["pangu_fastkd"], losses["plain"], rtol=1e-4, atol=0)


# ---------------------------------------------------------------------------------------------
# Batch and target


def test_packed_batch_layout() -> None:
    batch = make_train_batch(256, 8, VOCAB, 16, seed=2)
    packed = batch.packed
    lengths = (packed.cu_seqlens[1:] - packed.cu_seqlens[:-1]).tolist()
    assert packed.num_tokens == 256 and len(lengths) == 8 and sum(lengths) == 256
    assert max(lengths) >= 2 * min(lengths)  # mixed lengths, not 8 equal documents
    ends = packed.cu_seqlens[1:].long() - 1
    assert (packed.labels[ends] == -100).all()  # no token predicts the next document
    starts = packed.cu_seqlens[:-1].long()
    assert (packed.labels[starts] == -100).all()  # the prompt is not supervised
    assert torch.equal(batch.rows, (packed.labels != -100).nonzero().squeeze(1))
    assert 0.3 < batch.rows.numel() / 256 < 0.8
    assert torch.equal(batch.labels, packed.labels[batch.rows])
    assert batch.target.ids.shape == (batch.rows.numel(), 16)
    assert make_train_batch(256, 8, VOCAB, 16, seed=2).packed.input_ids.equal(packed.input_ids)


def test_random_target_is_valid() -> None:
    labels = torch.randint(0, VOCAB, (500,), generator=torch.Generator().manual_seed(0))
    target = random_topk_target(labels, VOCAB, 16, seed=5)
    validate_target(target, VOCAB, torch.ones(500, dtype=torch.bool), labels)  # raises if invalid
    ids = target.ids.long()
    label_in = (ids == labels[:, None]).any(1)
    assert 0.3 < label_in.float().mean().item() < 0.7  # label conditioning takes both paths
    in_logit = target.logits.masked_fill(ids != labels[:, None], -math.inf).max(1).values
    assert torch.equal(target.label_logit[label_in], in_logit[label_in])
    support = torch.cat([target.logits, target.label_logit[:, None]], 1)
    support[:, -1] = support[:, -1].masked_fill(label_in, -math.inf)
    mass = (support - target.lse[:, None]).exp().sum(1)
    assert (mass > 0.6 - 1e-5).all() and (mass < 0.95 + 1e-5).all()


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="T >= 2 \\* n_docs"):
        document_lengths(7, 4, seed=0)
    with pytest.raises(ValueError, match="top_k"):
        make_train_batch(64, 2, VOCAB, VOCAB + 1)
    with pytest.raises(ValueError, match="labels must be \\[n\\]"):
        random_topk_target(torch.zeros(2, 3, dtype=torch.long), VOCAB, 4)
    with pytest.raises(ValueError, match="provider must be one of"):
        build_model("naive", _model_config("llama"), torch.float32)
    model = build_model("plain", _model_config("llama"), torch.float32)
    with pytest.raises(ValueError, match="provider must be one of"):
        train_step("naive", model, make_optimizer(model), _batch(), KD_WEIGHT)
    with pytest.raises(ValueError, match="cu_seqlens must be"):
        model.hidden_states(
            torch.zeros(8, dtype=torch.long), torch.tensor([0, 4], dtype=torch.int32)
        )
    with pytest.raises(ValueError, match="shape must be one of"):
        run_worker(Config("plain", "huge", "fp32", 64, 2, 16, 0.5, 1, 0, 0, 0))


# ---------------------------------------------------------------------------------------------
# Worker, report, driver


def _tiny_config(provider: str, **changes) -> Config:
    fields = dict(
        provider=provider, shape="tiny", dtype="fp32", t=64, n_docs=3, top_k=16, kd_weight=0.5,
        reps=1, threads=0, seed=0, mem_limit_bytes=0,
    )  # fmt: skip
    return Config(**{**fields, **changes})


META = {"cpu": "test cpu", "torch_version": torch.__version__, "date": "today"}


def test_worker_and_table() -> None:
    results = {p: run_worker(_tiny_config(p)) for p in ("plain", "pangu_fastkd")}
    for result in results.values():
        assert result["status"] == "ok", result.get("error")
        assert result["time_ms"]["p50"] > 0 and result["state_bytes"] > 0
        assert result["model"]["vocab_size"] == SHAPES["tiny"].vocab_size
    first = {p: r["first_loss"] for p, r in results.items()}
    assert first["pangu_fastkd"] == pytest.approx(first["plain"], rel=1e-5)

    rows = [row for r in results.values() for row in to_rows(r, META)]
    assert {row["metric"] for row in rows} == {
        "speed",
        "memory_peak_extra",
        "memory_above_grads",
    }
    lines = table_lines(rows, markdown=True)
    assert lines[0].startswith("| provider | shape | dtype | T | median ms |")
    assert lines[2].startswith("| plain | tiny | fp32 | 64 |") and "| 1.00x |" in lines[2]
    assert lines[3].startswith("| pangu_fastkd | tiny | fp32 | 64 |")
    ours_ms = results["pangu_fastkd"]["time_ms"]["p50"]
    speedup = results["plain"]["time_ms"]["p50"] / ours_ms
    assert f"| {64 / (ours_ms * 1e-3):.0f} | {speedup:.2f}x |" in lines[3]


def _synthetic_rows(
    plain_ms: float,
    ours_ms: float,
    plain_mib: float,
    ours_mib: float,
    ckpt: tuple[float, float] | None = None,
) -> list:
    """Rows of plain and pangu_fastkd (and pangu_fastkd+ckpt with ``ckpt = (ms, mib)``)."""
    measured = [("plain", plain_ms, plain_mib), ("pangu_fastkd", ours_ms, ours_mib)]
    if ckpt is not None:
        measured.append(("pangu_fastkd+ckpt", *ckpt))
    rows = []
    for provider, ms, mib in measured:
        result = {
            "config": dataclasses.asdict(_tiny_config(provider, shape="small", t=2048)),
            "status": "ok",
            "model": {"vocab_size": VOCAB, "hidden_size": 128, "layers": 4, "parameters": 10**6},
            "n_supervised": 1200,
            "state_bytes": 100 << 20,
            "grad_bytes": 4 << 20,
            "first_loss": 5.0,
            "time_ms": {"p20": ms, "p50": ms, "p80": ms},
            "peak_extra_mib": {"p20": mib, "p50": mib, "p80": mib},
            "above_grads_mib": {"p20": mib - 4, "p50": mib - 4, "p80": mib - 4},
        }
        rows += to_rows(result, META)
    return rows


def test_target_verdicts() -> None:
    met = target_lines(_synthetic_rows(3000.0, 1000.0, 400.0, 100.0))
    assert met[0].startswith("| provider | shape | dtype | T | tokens/s x plain (>= 1.5x) |")
    assert met[2] == "| pangu_fastkd | small | fp32 | 2048 | 3.00x: met | 0.25x: met | 0.40x | - |"
    missed = target_lines(_synthetic_rows(1400.0, 1000.0, 400.0, 300.0))
    assert missed[2] == (
        "| pangu_fastkd | small | fp32 | 2048 | 1.40x: **not met** | 0.75x: **not met** | "
        "0.80x | - |"
    )
    only_plain = [r for r in _synthetic_rows(1.0, 1.0, 1.0, 1.0) if r["provider"] == "plain"]
    assert "a provider failed or was not run" in target_lines(only_plain)[2]
    # The checkpointed provider: its own line, with its step time over pangu_fastkd's.
    with_ckpt = target_lines(_synthetic_rows(3000.0, 1000.0, 400.0, 100.0, ckpt=(1250.0, 60.0)))
    assert with_ckpt[3] == (
        "| pangu_fastkd+ckpt | small | fp32 | 2048 | 2.40x: met | 0.15x: met | 0.32x | 1.25x |"
    )


def test_driver_smoke(tmp_path, capsys) -> None:
    """A subprocess worker per provider, the JSON file and the Markdown report, then
    --from-json."""
    out = tmp_path / "train_step.json"
    argv = ["--shape", "tiny", "--dtype", "fp32", "--t", "48", "--n-docs", "3", "--reps", "1"]
    main([*argv, "--out", str(out), "--markdown"])
    report = capsys.readouterr().out
    for provider in PROVIDERS:
        assert f"| {provider} | tiny | fp32 | 48 |" in report
    assert "failed" not in report and "Against the issue's targets" in report
    saved = json.loads(out.read_text())
    assert {r["provider"] for r in saved["rows"]} == set(PROVIDERS)
    assert all(r["status"] == "ok" for r in saved["rows"])
    main(["--from-json", str(out), "--markdown"])
    assert capsys.readouterr().out.strip() == report.strip()
    with pytest.raises(SystemExit, match="--t must be at least"):
        main([*argv[:4], "--t", "5", "--out", str(out)])
