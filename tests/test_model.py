"""The decoder against a plain-PyTorch reference, its config, and its checkpoints.

The oracle is ``reference_logits``: the same architecture written from Hugging Face tensor names
with plain ops, one document at a time, SDPA with ``is_causal=True`` and RoPE as a complex
rotation of the two half-heads computed in float64. Weights are random everywhere (norm weights
and biases too), so a forgotten bias or norm weight shows up as a mismatch.

Layout (pytorch/extension-cpp): builders and the reference at the top, private ``_check_*``
helpers, thin public tests.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from host_reads import count_host_reads
from safetensors import safe_open
from safetensors.torch import save_file

from pangu_fastkd.data.boundaries import cu_seqlens_from_lengths
from pangu_fastkd.model import (
    DecoderLM,
    GenerationConfig,
    ModelConfig,
    init_weights,
    load_pretrained,
    save_pretrained,
)
from pangu_fastkd.ops import TopKTarget, fused_linear_sparse_kd

# Awkward packed row: length-1 documents, odd sizes.
LENGTHS = [1, 7, 3, 12, 1, 5]

VARIANTS = {
    # GQA, untied, no bias.
    "gqa": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2),
    # Tied embeddings with Llama/openPangu bias on q, k, v and o.
    "tied_bias": dict(
        hidden_size=48,
        num_attention_heads=4,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        attention_bias=True,
        o_proj_bias=True,
    ),
    # Qwen2: bias on q, k, v only; plain multi-head attention.
    "qkv_bias_mha": dict(
        hidden_size=40, num_attention_heads=4, num_key_value_heads=4, attention_bias=True
    ),
    # Qwen3: q/k RMSNorm and a head dim unrelated to hidden_size / heads.
    "qk_norm_head_dim": dict(
        hidden_size=36,
        num_attention_heads=6,
        num_key_value_heads=3,
        head_dim=10,
        qk_norm=True,
        tie_word_embeddings=True,
    ),
}


def make_config(variant: str, **overrides) -> ModelConfig:
    fields = dict(
        vocab_size=97,
        intermediate_size=56,
        num_hidden_layers=2,
        rope_theta=500.0,  # small base: positions 0..11 turn the slow channels visibly too
        rms_norm_eps=1e-5,
        max_position_embeddings=64,
    )
    fields.update(VARIANTS[variant])
    fields.update(overrides)
    return ModelConfig(**fields)


def random_model(config: ModelConfig, seed: int = 0) -> DecoderLM:
    """Every parameter random: weights ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.1^2), biases
    ~ N(0, 0.1^2), the embedding ~ N(0, 1)."""
    model = DecoderLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if name.endswith("norm.weight"):
                value = 1 + 0.1 * noise
            elif name.endswith(".bias"):
                value = 0.1 * noise
            elif name == "embed_tokens.weight":
                value = noise
            else:
                value = noise / math.sqrt(p.shape[1])
            p.copy_(value)
    return model


def hf_state(model: DecoderLM) -> dict[str, torch.Tensor]:
    """The model's tensors under Hugging Face Llama names, detached copies."""
    return {
        (name if name.startswith("lm_head") else f"model.{name}"): t.detach().clone()
        for name, t in model.state_dict().items()
    }


def packed_ids(lengths, vocab_size, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (sum(lengths),), generator=gen)


# ---------------------------------------------------------------------------------------------
# The reference


def _ref_rms(x, weight, eps):
    x32 = x.float()
    return weight * (x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _ref_rope(x, theta):
    """Rotate ``x [H, L, D]``: pair channel i with i + D/2, angle pos * theta^(-2i/D)."""
    L, D = x.shape[1], x.shape[2]
    angle = torch.arange(L, dtype=torch.float64)[:, None] * theta ** (
        -2 * torch.arange(D // 2, dtype=torch.float64)[None, :] / D
    )
    z = torch.complex(x[..., : D // 2].double(), x[..., D // 2 :].double())
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


def reference_hidden(state, config: ModelConfig, input_ids, lengths):
    """Final-normed hidden states ``[T, hidden]``, document by document."""
    H, Hkv = config.num_attention_heads, config.num_key_value_heads
    eps = config.rms_norm_eps
    outs = []
    for doc in torch.split(input_ids, lengths):
        L = doc.shape[0]
        x = state["model.embed_tokens.weight"][doc]  # [L, hidden]
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}."

            def proj(name, h, p=p):
                return F.linear(h, state[p + name + ".weight"], state.get(p + name + ".bias"))

            h = _ref_rms(x, state[p + "input_layernorm.weight"], eps)
            q = proj("self_attn.q_proj", h).view(L, H, -1).transpose(0, 1)  # [H, L, D]
            k = proj("self_attn.k_proj", h).view(L, Hkv, -1).transpose(0, 1)
            v = proj("self_attn.v_proj", h).view(L, Hkv, -1).transpose(0, 1)
            if config.qk_norm:
                q = _ref_rms(q, state[p + "self_attn.q_norm.weight"], eps)
                k = _ref_rms(k, state[p + "self_attn.k_norm.weight"], eps)
            q, k = _ref_rope(q, config.rope_theta), _ref_rope(k, config.rope_theta)
            k = k.repeat_interleave(H // Hkv, dim=0)
            v = v.repeat_interleave(H // Hkv, dim=0)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [H, L, D]
            x = x + proj("self_attn.o_proj", a.transpose(0, 1).reshape(L, -1))
            h = _ref_rms(x, state[p + "post_attention_layernorm.weight"], eps)
            x = x + proj("mlp.down_proj", F.silu(proj("mlp.gate_proj", h)) * proj("mlp.up_proj", h))
        outs.append(_ref_rms(x, state["model.norm.weight"], eps))
    return torch.cat(outs)


def reference_head(state):
    return state.get("lm_head.weight", state["model.embed_tokens.weight"])


def reference_logits(state, config, input_ids, lengths):
    hidden = reference_hidden(state, config, input_ids, lengths)
    return F.linear(hidden, reference_head(state)).float()


def _max_rel_err(got, want):
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).abs().max() / want.abs().max())


# ---------------------------------------------------------------------------------------------
# Forward against the reference


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_reference(variant):
    config = make_config(variant)
    model = random_model(config)
    ids = packed_ids(LENGTHS, config.vocab_size)
    logits = model(ids, cu_seqlens_from_lengths(LENGTHS))
    assert logits.shape == (sum(LENGTHS), config.vocab_size)
    assert logits.dtype == torch.float32
    expected = reference_logits(hf_state(model), config, ids, LENGTHS)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("variant", ["gqa", "tied_bias"])
def test_bf16_error_is_within_2x_of_pytorch_bf16(variant):
    # flash-attention's rule: judge low precision by the error of plain PyTorch in that precision.
    config = make_config(variant)
    model = random_model(config)
    ids = packed_ids(LENGTHS, config.vocab_size, seed=3)
    state = hf_state(model)
    exact = reference_logits(state, config, ids, LENGTHS)
    ref_bf16 = reference_logits({n: t.bfloat16() for n, t in state.items()}, config, ids, LENGTHS)
    ours = model.to(torch.bfloat16)(ids, cu_seqlens_from_lengths(LENGTHS))
    assert ours.dtype == torch.float32
    assert model.hidden_states(ids).dtype == torch.bfloat16
    assert _max_rel_err(ours, exact) <= 2 * _max_rel_err(ref_bf16, exact)


def test_rope_follows_hf_rotate_half_with_theta():
    # A one-layer model whose attention output depends on RoPE; a wrong theta must change it.
    config = make_config("gqa", rope_theta=10000.0)
    model = random_model(config, seed=5)
    ids = packed_ids([11], config.vocab_size)
    state = hf_state(model)
    torch.testing.assert_close(
        model(ids), reference_logits(state, config, ids, [11]), rtol=1e-5, atol=2e-5
    )
    other = dataclasses.replace(config, rope_theta=50.0)
    assert not torch.allclose(model(ids), reference_logits(state, other, ids, [11]), atol=1e-3)


def test_position_ids_give_the_same_result_as_cu_seqlens():
    config = make_config("gqa")
    model = random_model(config)
    ids = packed_ids(LENGTHS, config.vocab_size)
    position_ids = torch.cat([torch.arange(n) for n in LENGTHS])
    by_cu = model.hidden_states(ids, cu_seqlens=cu_seqlens_from_lengths(LENGTHS))
    assert torch.equal(model.hidden_states(ids, position_ids=position_ids), by_cu)
    assert torch.equal(model.hidden_states(ids, position_ids=position_ids[None]), by_cu)
    # Neither: one document.
    one_doc = cu_seqlens_from_lengths([sum(LENGTHS)])
    assert torch.equal(model.hidden_states(ids), model.hidden_states(ids, one_doc))
    assert not torch.allclose(model.hidden_states(ids), by_cu)


def test_empty_documents_change_nothing():
    model = random_model(make_config("gqa"))
    ids = packed_ids([3, 2], 97)
    with_empty = model(ids, cu_seqlens_from_lengths([0, 3, 0, 2]))
    assert torch.equal(with_empty, model(ids, cu_seqlens_from_lengths([3, 2])))


def test_documents_do_not_see_each_other():
    config = make_config("tied_bias")
    model = random_model(config)
    cu = cu_seqlens_from_lengths(LENGTHS)
    ids = packed_ids(LENGTHS, config.vocab_size)
    changed = ids.clone()
    start, end = int(cu[3]), int(cu[4])  # the 12-token document
    changed[start:end] = (changed[start:end] + 1) % config.vocab_size
    before, after = model(ids, cu), model(changed, cu)
    outside = torch.ones(len(ids), dtype=torch.bool)
    outside[start:end] = False
    torch.testing.assert_close(after[outside], before[outside], rtol=0, atol=1e-6)
    assert not torch.allclose(after[start:end], before[start:end], atol=1e-3)


def _sparse_kd_inputs(config, lengths, seed=0):
    """Labels (next token inside each document, -100 at document ends) and a top-4 teacher."""
    gen = torch.Generator().manual_seed(seed)
    ids = packed_ids(lengths, config.vocab_size, seed=seed)
    labels = torch.full_like(ids, -100)
    cu = cu_seqlens_from_lengths(lengths).tolist()
    for start, end in itertools.pairwise(cu):
        labels[start : end - 1] = ids[start + 1 : end]
    teacher = 2 * torch.randn(len(ids), config.vocab_size, generator=gen)
    top_logits, top_ids = teacher.topk(4, dim=-1)
    target = TopKTarget(
        ids=top_ids.int(),
        logits=top_logits,
        lse=teacher.logsumexp(-1),
        label_logit=teacher.gather(1, labels.clamp(min=0)[:, None])[:, 0],
    )
    return ids, labels, target


def _reference_kd_loss(logits, labels, target, kd_weight):
    """docs/kd-losses.md by hand: renormalised top-K forward KL plus cross-entropy, mean."""
    keep = labels != -100
    logq = logits[keep].log_softmax(-1)
    p = target.logits[keep].softmax(-1)
    kl = (p * (p.log() - logq.gather(1, target.ids[keep].long()))).sum(-1)
    ce = -logq.gather(1, labels[keep][:, None])[:, 0]
    return (kd_weight * kl + (1 - kd_weight) * ce).mean()


@pytest.mark.parametrize("variant", ["gqa", "tied_bias"])
def test_gradients_through_hidden_states_and_fused_loss_match_reference(variant):
    config = make_config(variant, num_hidden_layers=1)
    model = random_model(config, seed=2)
    lengths = [4, 1, 6]
    ids, labels, target = _sparse_kd_inputs(config, lengths)

    hidden = model.hidden_states(ids, cu_seqlens_from_lengths(lengths))
    loss = fused_linear_sparse_kd(
        hidden,
        model.output_weight,
        labels,
        target,
        kd_weight=0.7,
        missing_mass="renorm",
        include_label=False,
    )
    loss.backward()

    state = {n: t.requires_grad_(True) for n, t in hf_state(model).items()}
    ref_logits = reference_logits(state, config, ids, lengths)
    ref_loss = _reference_kd_loss(ref_logits, labels, target, kd_weight=0.7)
    ref_loss.backward()

    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        ref_grad = state[name if name.startswith("lm_head") else f"model.{name}"].grad
        assert p.grad is not None, name
        assert float(p.grad.abs().max()) > 0, name
        torch.testing.assert_close(p.grad, ref_grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(ids=torch.tensor([1.0, 2.0])), TypeError, "int64 or int32"),
        (dict(ids=torch.tensor([[1, 2]])), ValueError, r"one non-empty packed row"),
        (dict(ids=torch.tensor([], dtype=torch.int64)), ValueError, "non-empty"),
        (dict(ids=torch.tensor([1, 97])), ValueError, r"\[0, 97\)"),
        (dict(ids=torch.tensor([-1, 2])), ValueError, r"\[0, 97\)"),
        (
            dict(cu_seqlens=torch.tensor([0, 3]), position_ids=torch.arange(3)),
            ValueError,
            "not both",
        ),
        (dict(cu_seqlens=torch.tensor([0, 3])), TypeError, "int32"),
        (dict(cu_seqlens=torch.tensor([0, 2], dtype=torch.int32)), ValueError, "end at T = 3"),
        (dict(cu_seqlens=torch.tensor([0, 2, 1, 3], dtype=torch.int32)), ValueError, "non-decr"),
        (dict(position_ids=torch.tensor([0, 1, 3])), ValueError, "count up by 1"),
        (dict(position_ids=torch.tensor([0, 1])), ValueError, "T = 3"),
        (dict(position_ids=torch.tensor([0.0, 1.0, 2.0])), TypeError, "integer"),
    ],
)
def test_forward_rejects_bad_input(kwargs, error, message):
    model = random_model(make_config("gqa"))
    ids = kwargs.pop("ids", torch.tensor([1, 2, 3]))
    with pytest.raises(error, match=message):
        model(ids, **kwargs)


def test_boundaries_are_read_once_per_forward_not_once_per_layer(monkeypatch):
    """The model checks cu_seqlens once at its entry; no layer reads a tensor back to the host
    (on an NPU that would stall the stream once per layer), so the reads do not grow with depth."""
    ids = packed_ids(LENGTHS, 97)
    cu = cu_seqlens_from_lengths(LENGTHS)
    greedy = GenerationConfig(max_new_tokens=3, temperature=0.0)
    reads = []
    for layers in (1, 4):
        model = random_model(make_config("gqa", num_hidden_layers=layers))
        with torch.no_grad():
            reads.append(count_host_reads(monkeypatch, lambda m=model: m(ids, cu)))
            reads.append(
                count_host_reads(monkeypatch, lambda m=model: m.generate([[1, 2]], greedy))
            )
    assert reads[0] == reads[2] and reads[1] == reads[3]


def test_forward_rejects_documents_longer_than_max_positions():
    model = random_model(make_config("gqa", max_position_embeddings=8))
    model(torch.arange(16), cu_seqlens_from_lengths([8, 8]))  # two documents of 8 are fine
    with pytest.raises(ValueError, match="9 tokens exceeds max_position_embeddings"):
        model(torch.arange(9))


# ---------------------------------------------------------------------------------------------
# Initialisation and fingerprints


def test_init_weights_is_deterministic_and_scaled():
    config = ModelConfig.preset("tiny", vocab_size=101)
    a, b, c = DecoderLM(config), DecoderLM(config), DecoderLM(config)
    init_weights(a, seed=7)
    init_weights(b, seed=7)
    init_weights(c, seed=8)
    assert a.weights_fingerprint() == b.weights_fingerprint()
    assert a.weights_fingerprint() != c.weights_fingerprint()
    residual_std = 0.02 / math.sqrt(2 * config.num_hidden_layers)
    assert abs(float(a.embed_tokens.weight.detach().std()) - 0.02) < 0.002
    assert abs(float(a.layers[0].mlp.down_proj.weight.detach().std()) - residual_std) < 0.002
    assert torch.equal(a.layers[1].input_layernorm.weight, torch.ones(config.hidden_size))
    # The same values whatever the model's dtype.
    d = DecoderLM(config).to(torch.bfloat16)
    init_weights(d, seed=7)
    assert torch.equal(d.embed_tokens.weight, a.embed_tokens.weight.bfloat16())


def test_init_weights_zeroes_biases():
    model = DecoderLM(make_config("tied_bias"))
    init_weights(model, seed=0)
    assert torch.equal(model.layers[0].self_attn.q_proj.bias, torch.zeros(48))
    assert model.layers[0].self_attn.o_proj.bias is not None
    with pytest.raises(TypeError, match="seed"):
        init_weights(model, seed=1.5)


def test_weights_fingerprint_tracks_every_byte_and_the_config():
    config = make_config("gqa")
    model = random_model(config)
    same = random_model(config)
    assert model.weights_fingerprint() == same.weights_fingerprint()
    with torch.no_grad():
        same.layers[1].mlp.up_proj.weight[3, 4] += 1e-6
    assert model.weights_fingerprint() != same.weights_fingerprint()
    longer = DecoderLM(dataclasses.replace(config, max_position_embeddings=128))
    longer.load_state_dict(model.state_dict())
    assert longer.weights_fingerprint() != model.weights_fingerprint()
    assert model.to(torch.bfloat16).weights_fingerprint() != same.weights_fingerprint()


# ---------------------------------------------------------------------------------------------
# Config


def test_presets():
    tiny = ModelConfig.preset("tiny", vocab_size=300)
    assert (tiny.hidden_size, tiny.num_hidden_layers, tiny.intermediate_size) == (64, 2, 128)
    assert (tiny.num_attention_heads, tiny.num_key_value_heads, tiny.resolved_head_dim) == (
        4,
        2,
        16,
    )
    small = ModelConfig.preset("small", vocab_size=300)
    assert (small.hidden_size, small.num_hidden_layers, small.intermediate_size) == (128, 4, 352)
    base = ModelConfig.preset("base", vocab_size=300)
    assert (base.hidden_size, base.num_hidden_layers, base.num_attention_heads) == (256, 6, 8)
    assert (base.num_key_value_heads, base.intermediate_size) == (4, 704)
    pangu = ModelConfig.preset("openpangu-1b", vocab_size=153376)
    assert (pangu.hidden_size, pangu.num_hidden_layers, pangu.intermediate_size) == (1536, 26, 6144)
    assert (pangu.num_attention_heads, pangu.num_key_value_heads, pangu.head_dim) == (12, 6, 128)
    assert pangu.rope_theta == 4e6 and pangu.tie_word_embeddings
    with torch.device("meta"):  # shapes only, no memory
        skeleton = DecoderLM(pangu)
    non_embedding = sum(
        p.numel() for name, p in skeleton.named_parameters() if name != "embed_tokens.weight"
    )
    assert 0.85e9 < non_embedding < 1.1e9  # the model card's "1B parameters (non-embedding)"
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        ModelConfig.preset("huge", vocab_size=10)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (dict(num_key_value_heads=3), ValueError, "multiple of num_key_value_heads"),
        (dict(hidden_size=50), ValueError, "multiple of num_attention_heads"),
        (dict(head_dim=7), ValueError, "even"),
        (dict(vocab_size=0), ValueError, "vocab_size must be >= 1"),
        (dict(num_hidden_layers=True), TypeError, "num_hidden_layers must be an int"),
        (dict(rope_theta=-1.0), ValueError, "rope_theta"),
        (dict(rms_norm_eps=float("nan")), ValueError, "rms_norm_eps"),
        (dict(eos_token_id=97), ValueError, "outside the vocabulary"),
        (dict(eos_token_id=[]), ValueError, "empty list"),
        (dict(o_proj_bias=True), ValueError, "needs attention_bias"),
        (dict(qk_norm=True, attention_bias=True), ValueError, "qk_norm"),
        (dict(tie_word_embeddings=1), TypeError, "tie_word_embeddings must be a bool"),
    ],
)
def test_config_rejects_bad_values(overrides, error, message):
    with pytest.raises(error, match=message):
        make_config("gqa", **overrides)


def test_fingerprint_is_canonical():
    config = make_config("gqa")
    assert config.fingerprint() == make_config("gqa").fingerprint()
    assert len(config.fingerprint()) == 64
    explicit = make_config("gqa", head_dim=12)  # 48 / 4: the same model
    assert explicit.fingerprint() == config.fingerprint()
    assert make_config("gqa", rms_norm_eps=1e-6).fingerprint() != config.fingerprint()


@pytest.mark.parametrize(
    ("variant", "model_type"),
    [
        ("gqa", "llama"),
        ("tied_bias", "llama"),
        ("qkv_bias_mha", "qwen2"),
        ("qk_norm_head_dim", "qwen3"),
    ],
)
def test_hf_dict_round_trip(variant, model_type):
    config = make_config(variant, bos_token_id=1, eos_token_id=[2, 3], pad_token_id=0)
    d = config.to_hf_dict(torch_dtype="bfloat16")
    assert d["model_type"] == model_type
    assert d["torch_dtype"] == "bfloat16"
    assert d["head_dim"] == config.resolved_head_dim
    json.dumps(d)  # serialisable
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing it writes is unknown to it
        back = ModelConfig.from_hf_dict(d)
    assert back.fingerprint() == config.fingerprint()


def test_from_hf_dict_reads_an_openpangu_embedded_config():
    # The fields of the released openPangu-Embedded-7B config.json (PanguEmbeddedForCausalLM).
    d = {
        "architectures": ["PanguEmbeddedForCausalLM"],
        "model_type": "PanguEmbedded",
        "auto_map": {"AutoConfig": "configuration_openpangu_dense.PanguEmbeddedConfig"},
        "bias": True,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "pad_token_id": 0,
        "eos_token_id": 45892,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 12800,
        "max_position_embeddings": 32768,
        "num_attention_heads": 32,
        "num_hidden_layers": 34,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 16000000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.53.2",
        "use_cache": True,
        "vocab_size": 153376,
    }
    config = ModelConfig.from_hf_dict(d)
    assert config.attention_bias and config.o_proj_bias and not config.qk_norm
    assert config.resolved_head_dim == 128
    assert (config.rope_theta, config.rms_norm_eps, config.eos_token_id) == (16e6, 1e-5, 45892)
    # Written back as Llama, whose attention_bias covers q, k, v and o.
    assert config.to_hf_dict()["model_type"] == "llama"
    assert config.to_hf_dict()["attention_bias"] is True


def test_from_hf_dict_family_defaults_and_quirks():
    base = dict(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    llama = ModelConfig.from_hf_dict({"model_type": "llama", **base, "pad_token_id": -1})
    assert llama.num_key_value_heads == 4 and llama.pad_token_id is None  # -1 means "none"
    assert not llama.attention_bias and not llama.tie_word_embeddings
    qwen2 = ModelConfig.from_hf_dict(
        {"model_type": "qwen2", **base, "sliding_window": 4096, "use_sliding_window": False}
    )
    assert qwen2.attention_bias and not qwen2.o_proj_bias
    qwen3 = ModelConfig.from_hf_dict({"model_type": "qwen3", **base, "head_dim": 16})
    assert qwen3.qk_norm and qwen3.resolved_head_dim == 16
    v5 = ModelConfig.from_hf_dict(
        {
            "model_type": "llama",
            **base,
            "rope_parameters": {"rope_type": "default", "rope_theta": 7.0},
        }
    )
    assert v5.rope_theta == 7.0
    with pytest.warns(UserWarning, match="some_new_knob"):
        ModelConfig.from_hf_dict({"model_type": "llama", **base, "some_new_knob": 3})
    with pytest.raises(ValueError, match="required key 'hidden_size'"):
        ModelConfig.from_hf_dict({"model_type": "llama", **{**base, "hidden_size": None}})


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}}, "rope_parameters"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"sliding_window": 4096}, "sliding_window"),
        ({"use_sliding_window": True, "sliding_window": 4096}, "use_sliding_window"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
        ({"num_local_experts": 8}, "num_local_experts"),
        ({"num_experts": 64, "moe_intermediate_size": 128}, "num_experts"),
        ({"attention_dropout": 0.1}, "attention_dropout"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"model_type": "mixtral"}, "model_type"),
    ],
)
def test_from_hf_dict_rejects_unsupported_features(extra, key):
    d = {
        "model_type": "llama",
        "vocab_size": 50,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        **extra,
    }
    with pytest.raises(ValueError, match=key):
        ModelConfig.from_hf_dict(d)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _llama_names(config: ModelConfig) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config.tie_word_embeddings:
        names.add("lm_head.weight")
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        names |= {
            p + "input_layernorm.weight",
            p + "post_attention_layernorm.weight",
            *(p + f"self_attn.{x}_proj.weight" for x in "qkvo"),
            *(p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")),
        }
        if config.attention_bias:
            names |= {p + f"self_attn.{x}_proj.bias" for x in "qkv"}
        if config.o_proj_bias:
            names.add(p + "self_attn.o_proj.bias")
        if config.qk_norm:
            names |= {p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"}
    return names


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_save_load_round_trip(tmp_path, variant):
    config = make_config(variant)
    model = random_model(config)
    save_pretrained(model, tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["config.json", "model.safetensors"]  # no temp files left behind
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == _llama_names(config)
    loaded = load_pretrained(tmp_path / "ckpt")
    assert loaded.config.fingerprint() == config.fingerprint()
    assert loaded.weights_fingerprint() == model.weights_fingerprint()
    assert all(p.requires_grad for p in loaded.parameters())  # ready to train
    ids = packed_ids(LENGTHS, config.vocab_size)
    cu = cu_seqlens_from_lengths(LENGTHS)
    assert torch.equal(loaded(ids, cu), model(ids, cu))
    if config.tie_word_embeddings:
        assert loaded.lm_head is None and loaded.output_weight is loaded.embed_tokens.weight


def test_bf16_save(tmp_path):
    config = make_config("tied_bias")
    model = random_model(config)
    save_pretrained(model, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    ids = packed_ids(LENGTHS, config.vocab_size)
    cu = cu_seqlens_from_lengths(LENGTHS)
    as_bf16 = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert as_bf16.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(as_bf16(ids, cu), model.to(torch.bfloat16)(ids, cu))
    as_fp32 = load_pretrained(tmp_path)  # bf16 values, widened
    assert torch.equal(as_fp32(ids, cu), model.to(torch.float32)(ids, cu))


def _hand_made_checkpoint(directory: Path, *, bias: bool, seed: int = 0):
    """A Llama checkpoint written by hand, as another tool would: config.json with keys this
    package ignores, bf16 tensors, and a stale RoPE ``inv_freq`` buffer."""
    V, d, inter, L, H, Hkv, D = 67, 24, 40, 2, 4, 2, 6
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=None):
        scale = 1 / math.sqrt(shape[-1]) if scale is None else scale
        return (torch.randn(*shape, generator=gen) * scale).bfloat16()

    tensors = {"model.embed_tokens.weight": rnd(V, d, scale=1.0)}
    for i in range(L):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = 1 + rnd(d, scale=0.1)
        tensors[p + "self_attn.q_proj.weight"] = rnd(H * D, d)
        tensors[p + "self_attn.k_proj.weight"] = rnd(Hkv * D, d)
        tensors[p + "self_attn.v_proj.weight"] = rnd(Hkv * D, d)
        tensors[p + "self_attn.o_proj.weight"] = rnd(d, H * D)
        if bias:
            tensors[p + "self_attn.q_proj.bias"] = rnd(H * D, scale=0.1)
            tensors[p + "self_attn.k_proj.bias"] = rnd(Hkv * D, scale=0.1)
            tensors[p + "self_attn.v_proj.bias"] = rnd(Hkv * D, scale=0.1)
            tensors[p + "self_attn.o_proj.bias"] = rnd(d, scale=0.1)
        tensors[p + "self_attn.rotary_emb.inv_freq"] = torch.ones(D // 2)
        tensors[p + "post_attention_layernorm.weight"] = 1 + rnd(d, scale=0.1)
        tensors[p + "mlp.gate_proj.weight"] = rnd(inter, d)
        tensors[p + "mlp.up_proj.weight"] = rnd(inter, d)
        tensors[p + "mlp.down_proj.weight"] = rnd(d, inter)
    tensors["model.norm.weight"] = 1 + rnd(d, scale=0.1)
    tensors["lm_head.weight"] = rnd(V, d)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": V,
        "hidden_size": d,
        "intermediate_size": inter,
        "num_hidden_layers": L,
        "num_attention_heads": H,
        "num_key_value_heads": Hkv,
        "hidden_act": "silu",
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "rope_theta": 300.0,
        "rope_scaling": None,
        "attention_bias": bias,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.0",
        "use_cache": True,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return tensors


@pytest.mark.parametrize("bias", [False, True])
def test_hand_made_llama_checkpoint_loads(tmp_path, bias):
    tensors = _hand_made_checkpoint(tmp_path, bias=bias)
    model = load_pretrained(tmp_path)
    assert model.config.resolved_head_dim == 6 and model.config.o_proj_bias == bias
    state = {n: t.float() for n, t in tensors.items() if "inv_freq" not in n}
    lengths = [5, 1, 9]
    ids = packed_ids(lengths, 67)
    expected = reference_logits(state, model.config, ids, lengths)
    torch.testing.assert_close(
        model(ids, cu_seqlens_from_lengths(lengths)), expected, rtol=1e-5, atol=2e-5
    )


def test_sharded_checkpoint_loads(tmp_path):
    config = make_config("gqa")
    model = random_model(config)
    save_pretrained(model, tmp_path / "single")
    with safe_open(str(tmp_path / "single" / "model.safetensors"), framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((tmp_path / "single" / "config.json").read_text())
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, str(sharded / shard))
    weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    loaded = load_pretrained(sharded)
    assert loaded.weights_fingerprint() == model.weights_fingerprint()

    # An index that points a tensor at the wrong shard is an error, not a silent mismatch.
    moved = dict(weight_map)
    moved[names[0]] = "model-00002-of-00002.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": moved}))
    with pytest.raises(ValueError, match="do not hold them"):
        load_pretrained(sharded)


def _rewrite_tensors(directory: Path, edit) -> None:
    path = directory / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
            r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight",
        ),
        (
            lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": torch.zeros(48)}),
            r"unexpected tensors: model\.layers\.0\.self_attn\.o_proj\.bias",
        ),
        (
            lambda t: t.update({"model.norm.weight": torch.ones(47)}),
            r"mis-shaped tensors: model\.norm\.weight \[47\] \(expected \[48\]\)",
        ),
        (
            lambda t: t.update({"model.norm.weight": torch.ones(48, dtype=torch.int8)}),
            r"not floating point: model\.norm\.weight \(I8\)",
        ),
    ],
    ids=["missing", "unexpected", "misshaped", "integer"],
)
def test_bad_checkpoint_tensors_are_listed(tmp_path, edit, message):
    save_pretrained(random_model(make_config("gqa")), tmp_path)
    _rewrite_tensors(tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        load_pretrained(tmp_path)


def test_tied_checkpoint_with_a_copy_of_the_embedding_as_lm_head(tmp_path):
    save_pretrained(random_model(make_config("tied_bias")), tmp_path)
    _rewrite_tensors(
        tmp_path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()})
    )
    assert load_pretrained(tmp_path).lm_head is None
    _rewrite_tensors(tmp_path, lambda t: t["lm_head.weight"].mul_(2))
    with pytest.raises(ValueError, match=r"lm_head\.weight differs"):
        load_pretrained(tmp_path)


def test_unsupported_config_json_is_rejected(tmp_path):
    save_pretrained(random_model(make_config("gqa")), tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    d["rope_scaling"] = {"rope_type": "llama3", "factor": 32.0}
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="rope_scaling"):
        load_pretrained(tmp_path)


def test_missing_files_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(make_config("gqa").to_hf_dict()))
    with pytest.raises(FileNotFoundError, match=r"neither model\.safetensors"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_pretrained(tmp_path)


def test_save_replaces_an_existing_checkpoint(tmp_path):
    first, second = (
        random_model(make_config("gqa"), seed=1),
        random_model(make_config("gqa"), seed=2),
    )
    save_pretrained(first, tmp_path)
    save_pretrained(second, tmp_path)
    assert load_pretrained(tmp_path).weights_fingerprint() == second.weights_fingerprint()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    with pytest.raises(TypeError, match="floating"):
        save_pretrained(first, tmp_path, dtype=torch.int8)
