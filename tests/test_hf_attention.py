"""``attn_implementation="pangu_fastkd"`` on tiny random HF models against eager attention.

A packed row of documents run through our attention must give the logits (and gradients) that
transformers' eager attention gives on each document alone.
"""

from __future__ import annotations

import itertools
import math
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pangu_fastkd.hf.attention import (  # noqa: E402
    packed_attention_forward,
    packed_attention_mask,
    register_attention,
)

LENGTHS = (5, 1, 9)
VOCAB = 97
ARCHS = ("llama", "qwen2", "qwen3")


def _config(arch: str, **overrides):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }[arch]
    return cls(**common)


def _model(arch: str, **overrides):
    register_attention()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        _config(arch, **overrides), attn_implementation="eager", dtype=torch.float32
    )
    return model.eval()


def _documents(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in LENGTHS]


def _eager_per_document(model, docs: list[torch.Tensor]) -> torch.Tensor:
    """``[T, V]`` logits of each document run alone with eager attention, concatenated."""
    model.set_attn_implementation("eager")
    return torch.cat([model(input_ids=d[None]).logits[0] for d in docs])


def _packed(docs: list[torch.Tensor], flash_kwargs: bool) -> dict:
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)
    batch = collator([{"input_ids": d.tolist()} for d in docs])
    batch.pop("labels")
    return batch


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
def test_packed_logits_match_eager_per_document(arch: str, flash_kwargs: bool) -> None:
    model = _model(arch)
    docs = _documents()
    expected = _eager_per_document(model, docs)
    batch = _packed(docs, flash_kwargs)
    assert ("cu_seq_lens_q" in batch) == flash_kwargs
    model.set_attn_implementation("pangu_fastkd")
    assert model.config._attn_implementation == "pangu_fastkd"
    with torch.no_grad():
        got = model(**batch).logits[0]
        # The same row without boundaries is one long document: it must differ, or the test
        # above could not see a boundary being ignored.
        unpacked = model(input_ids=batch["input_ids"]).logits[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(unpacked[LENGTHS[0] :], expected[LENGTHS[0] :], atol=1e-3)


def test_sliding_window_maps_to_window() -> None:
    # Qwen2 with a window of 3 keys on every layer: document 3 (9 tokens) is longer than it.
    model = _model("qwen2", use_sliding_window=True, sliding_window=3, max_window_layers=0)
    assert model.model.layers[0].self_attn.sliding_window == 3
    docs = _documents(seed=2)
    expected = _eager_per_document(model, docs)
    model.set_attn_implementation("pangu_fastkd")
    with torch.no_grad():
        got = model(**_packed(docs, flash_kwargs=False)).logits[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_gradients_match_eager_per_document() -> None:
    model = _model("qwen3")
    docs = _documents(seed=3)
    g = torch.Generator().manual_seed(4)
    # A weighted sum rather than a mean, so grad_output is not uniform.
    weight = torch.randn(sum(LENGTHS), VOCAB, generator=g)

    model.zero_grad()
    (_eager_per_document(model, docs) * weight).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    model.set_attn_implementation("pangu_fastkd")
    (model(**_packed(docs, flash_kwargs=True)).logits[0] * weight).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-5, msg=name)
    assert any(p.grad.abs().sum() > 0 for p in model.model.layers[0].self_attn.parameters())


def test_unpadded_batch_rows_are_documents() -> None:
    model = _model("llama")
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (2, 6), generator=g)
    expected = torch.stack([_eager_per_document(model, [row]) for row in ids])
    model.set_attn_implementation("pangu_fastkd")
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def _qkv(T: int, seed: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q [1, 4, T, 8]``, ``k, v [1, 2, T, 8]`` in transformers' layout."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, 4, T, 8, generator=g),
        torch.randn(1, 2, T, 8, generator=g),
        torch.randn(1, 2, T, 8, generator=g),
    )


def _eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal GQA attention of one document, ``[1, H, L, D] -> [1, L, H, D]``."""
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    L = q.shape[2]
    scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def test_cu_seq_lens_take_precedence_over_position_ids() -> None:
    module = torch.nn.Module()
    q, k, v = _qkv(sum(LENGTHS))
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    expected = torch.cat(
        [
            _eager_attention(*(t[:, :, a:b] for t in (q, k, v)))
            for a, b in itertools.pairwise(cu.tolist())
        ],
        dim=1,
    )
    # position_ids say "one document"; the collator's cu_seq_lens are what flash-attn would use.
    out, weights = packed_attention_forward(
        module,
        q,
        k,
        v,
        None,
        position_ids=torch.arange(15)[None],
        cu_seq_lens_q=cu,
        cu_seq_lens_k=cu,
        max_length_q=9,
        max_length_k=9,
    )
    assert weights is None and out.shape == (1, 15, 4, 8)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_mask_function_builds_no_mask() -> None:
    assert packed_attention_mask(1, 7, 7) is None
    assert packed_attention_mask(2, 7, 7, attention_mask=torch.ones(2, 7, dtype=torch.bool)) is None
    padding = torch.ones(2, 7, dtype=torch.bool)
    padding[1, :2] = False
    assert torch.equal(packed_attention_mask(2, 7, 7, attention_mask=padding), padding)
    with pytest.raises(ValueError, match="custom mask function"):
        packed_attention_mask(1, 7, 7, use_vmap=True)


def test_register_is_idempotent_and_guards_other_names() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    register_attention()
    register_attention()
    assert (
        transformers.AttentionInterface._global_mapping["pangu_fastkd"] is packed_attention_forward
    )
    assert ALL_MASK_ATTENTION_FUNCTIONS["pangu_fastkd"] is packed_attention_mask
    with pytest.raises(ValueError, match="already has 'sdpa'"):
        register_attention("sdpa")
    with pytest.raises(ValueError, match="non-empty string"):
        register_attention("")


def test_model_level_bad_inputs_raise() -> None:
    model = _model("llama")
    model.set_attn_implementation("pangu_fastkd")
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(7))
    padding = torch.ones_like(ids)
    padding[0, :2] = 0
    with pytest.raises(ValueError, match="padded tokens"):
        model(input_ids=ids, attention_mask=padding)
    # Packed documents in a batch of 2 rows.
    with pytest.raises(ValueError, match="batch size 1"):
        model(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]] * 2))
    with pytest.raises(ValueError, match="position_ids must start at 0"):
        model(input_ids=ids[:1], position_ids=torch.tensor([[1, 2, 3, 0, 1, 2]]))
    # KV-cache decoding: one new query against the cached keys.
    with torch.no_grad():
        cache = model(input_ids=ids[:1], use_cache=True).past_key_values
        with pytest.raises(ValueError, match="KV-cache decoding"):
            model(input_ids=ids[:1, :1], cache=cache, use_cache=True)

    dropout_model = _model("llama", attention_dropout=0.1)
    dropout_model.set_attn_implementation("pangu_fastkd")
    dropout_model.train()
    with pytest.raises(ValueError, match="attention dropout"):
        dropout_model(input_ids=ids)


def test_function_level_bad_inputs_raise() -> None:
    module = torch.nn.Module()
    q, k, v = _qkv(6)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="softcapping"):
        packed_attention_forward(module, q, k, v, None, softcap=30.0)
    with pytest.raises(ValueError, match="cu_seq_lens_k must equal cu_seq_lens_q"):
        packed_attention_forward(
            module, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=torch.tensor([0, 3, 6])
        )
    with pytest.raises(ValueError, match="from 0 to the sequence length 6"):
        packed_attention_forward(module, q, k, v, None, cu_seq_lens_q=cu[:2], cu_seq_lens_k=cu[:2])
    with pytest.raises(ValueError, match="max_seqlen=3 is shorter"):
        packed_attention_forward(
            module, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=3
        )
    with pytest.raises(ValueError, match="sliding_window must be at least 1"):
        packed_attention_forward(module, q, k, v, None, sliding_window=0)
    with pytest.raises(ValueError, match=r"\[B, H, L, D\]"):
        packed_attention_forward(module, q[0], k[0], v[0], None)


def test_chunked_attention_is_refused() -> None:
    # Llama4-style chunked attention draws a mask this kernel does not: refusing beats ignoring.
    module = torch.nn.Module()
    module.config = types.SimpleNamespace(attention_chunk_size=4)
    q, k, v = _qkv(6)
    with pytest.raises(ValueError, match="chunked attention"):
        packed_attention_forward(module, q, k, v, None)
    module.config = types.SimpleNamespace(attention_chunk_size=None)
    out, _ = packed_attention_forward(module, q, k, v, None)
    assert out.shape == (q.shape[0], q.shape[2], q.shape[1], q.shape[3])
