"""The fused loss on tiny random transformers causal-LM models equals transformers' own loss."""

from __future__ import annotations

import pytest
import torch

tf = pytest.importorskip("transformers")

from pangu_fastkd.hf.loss import (  # noqa: E402
    LMHead,
    causal_lm_loss,
    lm_head_parts,
    shift_causal_labels,
)
from pangu_fastkd.ops import TopKTarget, sparse_kd_reference  # noqa: E402

V, D = 97, 64
_SMALL = {
    "hidden_size": D,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": V,
}
# (config class, model class, extra config): Qwen2 has q/k/v biases; Qwen3 an explicit head_dim.
_ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3_tied": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        {"head_dim": 16, "tie_word_embeddings": True},
    ),
}


def _model(arch: str, dtype: torch.dtype = torch.float32, **extra: object) -> torch.nn.Module:
    """A seeded, randomly initialised tiny model built from its config (nothing downloaded)."""
    default = (f"{arch}Config", f"{arch}ForCausalLM", {})
    cfg_name, model_name, arch_extra = _ARCHS.get(arch, default)
    config = getattr(tf, cfg_name)(**{**_SMALL, **arch_extra, **extra})
    torch.manual_seed(0)
    model = getattr(tf, model_name)._from_config(config, attn_implementation="eager", dtype=dtype)
    return model.train()


def _batch(B: int = 2, S: int = 13) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, S]`` ids and labels with ``-100`` at a prompt prefix and a padded tail."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, S), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[-1, -3:] = -100
    return ids, labels


def _loss_and_grads(model: torch.nn.Module, fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = fn()
    (loss * 0.7).backward()  # grad_output != 1: the loss is not the last op
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _assert_same(model, ours_fn, ref_fn, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    ours, g_ours = _loss_and_grads(model, ours_fn)
    ref, g_ref = _loss_and_grads(model, ref_fn)
    torch.testing.assert_close(ours, ref.float(), rtol=rtol, atol=atol)
    assert g_ours.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g_ours[name], g_ref[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("arch", list(_ARCHS))
def test_loss_and_grads_match_transformers(arch: str) -> None:
    model = _model(arch)
    ids, labels = _batch()
    _assert_same(
        model,
        lambda: causal_lm_loss(model, ids, labels),
        lambda: model(ids, labels=labels).loss,
    )


def test_tied_head_is_the_embedding() -> None:
    tied, untied = _model("llama_tied"), _model("llama")
    assert lm_head_parts(tied).weight is tied.get_input_embeddings().weight
    assert lm_head_parts(untied).weight is not untied.get_input_embeddings().weight
    assert lm_head_parts(untied) == LMHead(untied.lm_head.weight, None, None, None)


def test_packed_batch_from_data_collator_with_flattening() -> None:
    """Labels with -100 at document starts, position_ids restarting: same loss as transformers."""
    model = _model("qwen2")
    g = torch.Generator().manual_seed(2)
    docs = [torch.randint(0, V, (n,), generator=g).tolist() for n in (5, 8, 3)]
    batch = tf.DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": d} for d in docs])
    ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
    # use_cache=False: transformers detects packing from position_ids only without a cache (it
    # makes one by default, and then documents attend to each other); causal_lm_loss passes it.
    _assert_same(
        model,
        lambda: causal_lm_loss(model, ids, labels, position_ids=pos),
        lambda: model(ids, labels=labels, position_ids=pos, use_cache=False).loss,
    )
    # Plain labels (no separators): position_ids alone keep documents from predicting each other.
    plain = ids.clone()
    _assert_same(
        model,
        lambda: causal_lm_loss(model, ids, plain, position_ids=pos),
        lambda: model(ids, labels=labels, position_ids=pos, use_cache=False).loss,
    )


def test_shift_causal_labels_convention() -> None:
    labels = torch.tensor([[10, 11, 12, 13, 14, 15]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    assert shift_causal_labels(labels).tolist() == [[11, 12, 13, 14, 15, -100]]
    assert shift_causal_labels(labels, pos).tolist() == [[11, 12, -100, 14, -100, -100]]
    assert shift_causal_labels(labels, pos, ignore_index=-1).tolist() == [[11, 12, -1, 14, -1, -1]]


def test_lm_head_forward_is_never_called() -> None:
    model = _model("llama")
    ids, labels = _batch()
    calls = []
    handle = model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    try:
        causal_lm_loss(model, ids, labels).backward()
        assert calls == []
        model(ids, labels=labels)  # the hook does fire on transformers' own path
        assert calls == [1]
    finally:
        handle.remove()


@pytest.mark.parametrize(
    ("arch", "extra", "softcap", "scale"),
    [
        ("Gemma2", {"final_logit_softcapping": 3.0, "head_dim": 16}, 3.0, None),
        ("Gemma2", {"final_logit_softcapping": None, "head_dim": 16}, None, None),
        (
            "Cohere",
            {"logit_scale": 0.3, "eos_token_id": 2},
            None,
            0.3,
        ),  # not a power of two: the folded scale rounds
        ("Granite", {"logits_scaling": 3.0}, None, 1 / 3.0),  # Granite divides its logits
    ],
)
def test_softcap_and_logit_scale_heads(
    arch: str, extra: dict, softcap: float | None, scale: float | None
) -> None:
    model = _model(arch, **extra)
    head = lm_head_parts(model)
    assert head.softcap == softcap
    assert head.logit_scale == (pytest.approx(scale) if scale is not None else None)
    ids, labels = _batch()
    _assert_same(
        model,
        lambda: causal_lm_loss(model, ids, labels),
        lambda: model(ids, labels=labels).loss,
    )


def test_sparse_kd_target_matches_reference() -> None:
    model = _model("qwen3_tied")
    ids, labels = _batch()
    N, K = ids.numel(), 6
    shifted = shift_causal_labels(labels).reshape(-1)
    g = torch.Generator().manual_seed(3)
    teacher = torch.randn(N, V, generator=g) * 2
    top = teacher.topk(K, dim=1)
    target = TopKTarget(
        ids=top.indices.int(),
        logits=top.values,
        lse=teacher.logsumexp(dim=1),
        label_logit=teacher.gather(1, shifted.clamp(min=0)[:, None]).squeeze(1),
    )
    opts = {"kd_weight": 0.6, "temperature": 1.0}

    def reference() -> torch.Tensor:
        hidden = model.model(input_ids=ids).last_hidden_state.reshape(N, D)
        w = model.get_output_embeddings().weight
        return sparse_kd_reference(hidden, w, shifted, target, **opts)[0]

    _assert_same(
        model, lambda: causal_lm_loss(model, ids, labels, target=target, **opts), reference
    )


def test_bf16_error_at_most_twice_pytorch() -> None:
    """bf16 model: our loss and head gradient are within 2x plain PyTorch bf16's error of fp32."""
    model = _model("llama", dtype=torch.bfloat16)
    ids, labels = _batch(B=4, S=32)
    w = model.lm_head.weight
    hidden = model.model(input_ids=ids).last_hidden_state.detach()  # [B, S, d] bf16
    shifted = shift_causal_labels(labels).reshape(-1)

    def ce(logits: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits.float(), shifted, ignore_index=-100)

    w32 = w.detach().float().requires_grad_()
    exact = ce(hidden.reshape(-1, D).float() @ w32.T)
    (g_exact,) = torch.autograd.grad(exact, w32)

    def grad_w(fn) -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss = fn()
        loss.backward()
        return loss.detach().float(), w.grad.float()

    l_ours, g_ours = grad_w(lambda: causal_lm_loss(model, ids, labels))
    l_torch, g_torch = grad_w(lambda: model(ids, labels=labels).loss)
    # The floor (fp32 rounding level) only keeps an exactly-right PyTorch from demanding zero.
    assert (l_ours - exact).abs() <= 2 * (l_torch - exact).abs() + exact.abs() * 1e-6
    err_ours = (g_ours - g_exact).abs().max()
    err_torch = (g_torch - g_exact).abs().max()
    assert err_ours <= 2 * err_torch + g_exact.abs().max() * 1e-6


class _DoublingLlama(tf.LlamaForCausalLM):
    """A head the fused loss cannot express: the forward doubles the logits."""

    def forward(self, input_ids=None, labels=None, **kwargs):  # pragma: no cover - never run
        logits = self.lm_head(self.model(input_ids=input_ids).last_hidden_state)
        logits = logits * 2.0
        return logits


def test_bad_input_raises() -> None:
    model = _model("llama")
    ids, labels = _batch()
    with pytest.raises(ValueError, match="shape of input_ids"):
        causal_lm_loss(model, ids, labels[:, :-1])
    with pytest.raises(ValueError, match="exactly one of labels and shift_labels"):
        causal_lm_loss(model, ids, None)
    with pytest.raises(ValueError, match="exactly one of labels and shift_labels"):
        causal_lm_loss(model, ids, labels, shift_labels=labels)
    with pytest.raises(ValueError, match=r"input_ids must be a \[B, S\]"):
        causal_lm_loss(model, ids[0], labels[0])
    with pytest.raises(ValueError, match=r"position_ids must be \[B, S\]"):
        causal_lm_loss(model, ids, labels, position_ids=torch.arange(5)[None])
    with pytest.raises(ValueError, match="needs a teacher target"):
        causal_lm_loss(model, ids, labels, kd_weight=0.5)
    bad = TopKTarget(
        ids=torch.zeros(3, 2, dtype=torch.int32),
        logits=torch.zeros(3, 2),
        lse=torch.zeros(3),
        label_logit=torch.zeros(3),
    )
    with pytest.raises(ValueError, match=r"target has 3 rows; expected B\*S = 26"):
        causal_lm_loss(model, ids, labels, target=bad)
    with pytest.raises(ValueError, match="no output embeddings"):
        lm_head_parts(model.model)
    doubling = _DoublingLlama(model.config)
    with pytest.raises(ValueError, match=r"'logits \* 2\.0'"):
        lm_head_parts(doubling)
