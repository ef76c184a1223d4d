"""The Hugging Face benchmark at tiny shapes: the three providers compute the same step, and the
worker, the driver and the report work.

    cd /work/main && PYTHONPATH=. pytest bench/test_bench_hf.py

The figures that count come from bench/bench_hf.py at the small and openPangu-1B shapes; these
tests check that what it compares (padded batch, transformers' packing, pangu_fastkd) trains the
same model on the same documents to the same loss and gradients.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

pytest.importorskip("transformers")

from bench_hf import Config, main, run_worker, table_lines, to_rows
from hf_baselines import PROVIDERS, SHAPES, build_model, make_batch

from pangu_fastkd.model import ModelConfig

TINY = SHAPES["tiny"]


def _batch(seed: int = 0):
    """T = 61 in 3 documents of mixed lengths (odd T, awkward vocabulary 503)."""
    return make_batch(61, 3, TINY.vocab_size, seed)


def _loss_and_grads(provider: str, dtype: torch.dtype, batch) -> tuple[float, dict]:
    model = build_model(provider, TINY, dtype, seed=1)
    loss = PROVIDERS[provider](model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.double() for n, p in model.named_parameters()}


def _max_rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()


# ---------------------------------------------------------------------------------------------
# The three providers compute the same step


def test_providers_same_loss_and_grads_fp32() -> None:
    batch = _batch()
    want_loss, want = _loss_and_grads("hf_padded", torch.float32, batch)
    assert 5.0 < want_loss < 7.5  # about ln(503) = 6.2 for random weights
    for provider in ("hf_packed_sdpa", "pangu_fastkd"):
        loss, grads = _loss_and_grads(provider, torch.float32, batch)
        assert loss == pytest.approx(want_loss, rel=1e-5), provider
        assert grads.keys() == want.keys()
        for name in want:
            assert want[name].abs().max() > 0, f"{name} has no gradient"
            error = _max_rel_error(grads[name], want[name])
            assert error <= 1e-3, f"{provider} {name}: relative error {error:.2e}"


def test_providers_same_loss_bf16() -> None:
    """bf16 weights: the same loss within bf16 rounding of a ~6 loss (ulp 0.03 at 6)."""
    batch = _batch(seed=2)
    losses = {p: _loss_and_grads(p, torch.bfloat16, batch)[0] for p in PROVIDERS}
    for provider, loss in losses.items():
        assert loss == pytest.approx(losses["hf_padded"], abs=1e-2), (provider, losses)


def test_weights_identical_across_providers_and_seeded() -> None:
    a = build_model("hf_padded", TINY, torch.float32, seed=3)
    b = build_model("pangu_fastkd", TINY, torch.float32, seed=3)
    assert a.config._attn_implementation == "sdpa"
    assert b.config._attn_implementation == "pangu_fastkd"
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    c = build_model("hf_padded", TINY, torch.float32, seed=4)
    assert not torch.equal(c.lm_head.weight, a.lm_head.weight)


def _packed_logits_after_changing_first_document(provider: str, **kwargs) -> tuple:
    """``(logits before, logits after, first length)`` of the packed row ``[T, V]`` when the
    first document's tokens change. Causal attention alone keeps the first document from seeing
    later ones; only a document mask keeps the later documents from seeing the first."""
    batch = _batch()
    model = build_model(provider, TINY, torch.float32)
    first = batch.lengths[0]
    changed = batch.packed_ids.clone()
    changed[0, :first] = (changed[0, :first] + 1) % TINY.vocab_size
    with torch.no_grad():
        before, after = (
            model(input_ids=ids, position_ids=batch.position_ids, **kwargs).logits[0]
            for ids in (batch.packed_ids, changed)
        )
    return before, after, first


@pytest.mark.parametrize("provider", ["hf_packed_sdpa", "pangu_fastkd"])
def test_packed_documents_do_not_attend_to_each_other(provider: str) -> None:
    """With use_cache=False (what the loss calls pass), changing the first document leaves the
    later documents' logits alone."""
    before, after, first = _packed_logits_after_changing_first_document(provider, use_cache=False)
    torch.testing.assert_close(after[first:], before[first:], rtol=0, atol=0)
    assert not torch.allclose(after[:first], before[:first])


def test_sdpa_packing_needs_use_cache_false() -> None:
    """Why hf_packed_sdpa passes use_cache=False: with the config's default (a KV cache is made)
    transformers 5.24 ignores the position_ids when masking, and documents see each other."""
    before, after, first = _packed_logits_after_changing_first_document("hf_packed_sdpa")
    assert not torch.allclose(after[first:], before[first:])


def test_batch_layout() -> None:
    batch = _batch()
    lengths = batch.lengths
    assert sum(lengths) == 61 and len(lengths) == 3 and max(lengths) > min(lengths)
    assert batch.packed_ids.shape == batch.position_ids.shape == (1, 61)
    assert batch.padded_ids.shape == (3, max(lengths))
    assert batch.padded_mask.sum(1).tolist() == lengths
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
    assert (batch.position_ids[0, starts] == 0).all()
    assert (batch.packed_labels[0, starts] == -100).all()  # no prediction across documents
    for row, (start, n) in enumerate(zip(starts.tolist(), lengths, strict=True)):
        assert torch.equal(batch.padded_ids[row, :n], batch.packed_ids[0, start : start + n])
        padded = batch.padded_labels[row, 1:n]  # what the shifted padded loss supervises
        assert torch.equal(padded, batch.packed_labels[0, start + 1 : start + n])
        assert (batch.padded_labels[row, n:] == -100).all()
        assert batch.padded_labels[row, 0] == -100  # the prompt is unsupervised
    shifted_padded = (batch.padded_labels[:, 1:] != -100).sum().item()
    assert batch.num_supervised == shifted_padded and 0.3 * 61 < shifted_padded < 0.8 * 61


def test_openpangu_shape_follows_the_preset() -> None:
    preset = ModelConfig.preset("openpangu-1b", 153_376)
    shape = SHAPES["openpangu-1b-2l"]
    assert (shape.hidden_size, shape.intermediate_size, shape.num_layers) == (
        preset.hidden_size,
        preset.intermediate_size,
        2,
    )
    assert (shape.num_heads, shape.num_kv_heads, shape.head_dim) == (12, 6, 128)
    assert shape.vocab_size == 153_376 and shape.t == 4096
    config = shape.config()
    assert config.num_hidden_layers == 2 and config.head_dim == 128


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="provider must be one of"):
        build_model("naive", TINY, torch.float32)
    with pytest.raises(TypeError, match="shape must be an HFShape"):
        build_model("hf_padded", "tiny", torch.float32)
    with pytest.raises(ValueError, match="T >= 2 \\* n_docs"):
        make_batch(5, 3, TINY.vocab_size)
    with pytest.raises(ValueError, match="shape must be one of"):
        run_worker(Config("hf_padded", "huge", "fp32", 64, 2, 1, 0, 0, 0))
    with pytest.raises(ValueError, match="provider must be one of"):
        run_worker(Config("naive", "tiny", "fp32", 64, 2, 1, 0, 0, 0))


# ---------------------------------------------------------------------------------------------
# Worker, report, driver

META = {"cpu": "test cpu", "torch_version": torch.__version__, "date": "today"}


def _tiny_config(provider: str, **changes) -> Config:
    fields = dict(
        provider=provider, shape="tiny", dtype="fp32", t=48, n_docs=3, reps=1, threads=0,
        seed=0, mem_limit_bytes=0,
    )  # fmt: skip
    return Config(**{**fields, **changes})


def test_worker_and_table() -> None:
    results = {p: run_worker(_tiny_config(p)) for p in PROVIDERS}
    for result in results.values():
        assert result["status"] == "ok", result.get("error")
        assert result["time_ms"]["p50"] > 0
        assert result["model"]["vocab_size"] == TINY.vocab_size
    first = {p: r["first_loss"] for p, r in results.items()}
    for provider in PROVIDERS:
        assert first[provider] == pytest.approx(first["hf_padded"], rel=1e-5)
    assert results["hf_padded"]["n_computed"] > 48 == results["pangu_fastkd"]["n_computed"]

    rows = [row for r in results.values() for row in to_rows(r, META)]
    assert {row["metric"] for row in rows} == {"speed", "memory_peak_extra", "memory_above_grads"}
    lines = table_lines(rows, markdown=True)
    assert lines[0].startswith("| provider | shape | dtype | T | positions | median ms |")
    assert lines[2].startswith("| hf_padded | tiny | fp32 | 48 |") and "| 1.00x |" in lines[2]
    assert lines[3].startswith("| hf_packed_sdpa | tiny | fp32 | 48 | 48 |")
    assert lines[4].startswith("| pangu_fastkd | tiny | fp32 | 48 | 48 |")
    ms = {p: r["time_ms"]["p50"] for p, r in results.items()}
    ratios = f"| {ms['hf_padded'] / ms['pangu_fastkd']:.2f}x | "
    ratios += f"{ms['hf_packed_sdpa'] / ms['pangu_fastkd']:.2f}x |"
    assert ratios in lines[4]


def test_table_ratios_on_synthetic_rows() -> None:
    rows = []
    for provider, ms, mib in (
        ("hf_padded", 4000.0, 800.0),
        ("hf_packed_sdpa", 3000.0, 400.0),
        ("pangu_fastkd", 1000.0, 100.0),
    ):
        result = {
            "config": dataclasses.asdict(_tiny_config(provider, shape="small", t=2048)),
            "status": "ok",
            "model": {"vocab_size": 32000, "hidden_size": 512, "layers": 4, "parameters": 10**6},
            "n_supervised": 1200,
            "n_computed": 2600 if provider == "hf_padded" else 2048,
            "grad_bytes": 4 << 20,
            "weight_bytes": 4 << 20,
            "first_loss": 10.5,
            "time_ms": {"p20": ms, "p50": ms, "p80": ms},
            "peak_extra_mib": {"p20": mib, "p50": mib, "p80": mib},
            "above_grads_mib": {"p20": mib - 4, "p50": mib - 4, "p80": mib - 4},
        }
        rows += to_rows(result, META)
    rows.append({**rows[-3], "provider": "pangu_fastkd", "status": "failed", "error": "boom"})
    rows[-1]["config"] = {**rows[-1]["config"], "dtype": "bf16"}
    lines = table_lines(rows, markdown=True)
    assert lines[4] == (
        "| pangu_fastkd | small | fp32 | 2048 | 2048 | 1000.0 | 1000.0-1000.0 | 2048 | 4.00x | "
        "3.00x | 100 | 96 | 0.12x | 0.25x | 10.500000 |"
    )
    assert lines[5].startswith("| pangu_fastkd | small | bf16 | 2048 | - | failed |")
    assert lines[-1] == "- pangu_fastkd small bf16 T=2048 failed: boom"


def test_driver_smoke(tmp_path, capsys) -> None:
    """One subprocess worker, the JSON file and the Markdown report, then --from-json."""
    out = tmp_path / "hf.json"
    argv = ["--shape", "tiny", "--dtype", "fp32", "--providers", "pangu_fastkd"]
    argv += ["--t", "32", "--n-docs", "2", "--reps", "1"]
    main([*argv, "--out", str(out), "--markdown"])
    report = capsys.readouterr().out
    assert "| pangu_fastkd | tiny | fp32 | 32 | 32 |" in report and "failed" not in report
    assert "Command: `PYTHONPATH=. python bench/bench_hf.py --shape tiny" in report
    saved = json.loads(out.read_text())
    assert {r["provider"] for r in saved["rows"]} == {"pangu_fastkd"}
    assert all(r["status"] == "ok" for r in saved["rows"])
    main(["--from-json", str(out), "--markdown"])
    assert capsys.readouterr().out.strip() == report.strip()
    with pytest.raises(SystemExit, match="--t must be at least"):
        main([*argv[:4], "--t", "3", "--out", str(out)])
