"""KV-cache generation against step-by-step full recomputation, and its sampling rules.

The oracle of greedy decoding is the model's own full forward: at every step, recompute the
logits of prompt + tokens so far and take the argmax of the last row. Sampling is checked for
reproducibility, independence from batching, the nucleus rule and the distribution it draws
from.
"""

from __future__ import annotations

import math

import pytest
import torch

from pangu_fastkd.backends import generate
from pangu_fastkd.model import DecoderLM, Generation, GenerationConfig, ModelConfig

PROMPTS = [
    [5],
    [1, 2, 3, 4, 5, 6, 7],
    [9, 9],
    [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5],
    [40, 7, 33],
]


def make_model(seed: int = 0, **overrides) -> DecoderLM:
    """A small random model whose greedy continuations vary (weights ~ N(0, 1/fan_in))."""
    fields = dict(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=1000.0,
        max_position_embeddings=96,
    )
    fields.update(overrides)
    model = DecoderLM(ModelConfig(**fields))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.1 * noise)
            elif name == "embed_tokens.weight":
                # Small, so a tied head does not just copy the last token.
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[1]))
    return model


MODELS = {
    "gqa": dict(),
    "tied_bias_qk_norm": dict(
        tie_word_embeddings=True, attention_bias=True, o_proj_bias=True, qk_norm=True
    ),
    "qkv_bias_mha": dict(num_key_value_heads=4, attention_bias=True),
}


@torch.no_grad()
def greedy_by_recomputation(model: DecoderLM, prompt: list[int], steps: int) -> list[int]:
    tokens: list[int] = []
    for _ in range(steps):
        logits = model(torch.tensor(prompt + tokens))
        tokens.append(int(logits[-1].argmax()))
    return tokens


def last_logits(model: DecoderLM, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(ids))[-1]


# ---------------------------------------------------------------------------------------------
# Greedy decoding


@pytest.mark.parametrize("variant", sorted(MODELS))
def test_greedy_kv_cache_equals_full_recomputation(variant):
    model = make_model(**MODELS[variant])
    config = GenerationConfig(max_new_tokens=9, temperature=0.0)
    results = generate(model, PROMPTS, config, batch_size=3)
    assert len(results) == len(PROMPTS)
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert result.tokens == greedy_by_recomputation(model, prompt, 9), prompt
        assert result.stopped is False
    # Not a degenerate model that repeats one token: the comparison means something.
    assert len({t for r in results for t in r.tokens}) > 5


def test_long_generation_grows_the_cache():
    # 40 new tokens on a 2-token prompt outgrow the first cache allocation (prompt + 32).
    model = make_model(seed=3)
    result = generate(model, [[7, 8], [1]], GenerationConfig(max_new_tokens=40, temperature=0))
    assert result[0].tokens == greedy_by_recomputation(model, [7, 8], 40)
    assert result[1].tokens == greedy_by_recomputation(model, [1], 40)


def test_bf16_model_generates_from_its_own_prefill():
    model = make_model(seed=4).to(torch.bfloat16)
    results = generate(model, PROMPTS, GenerationConfig(max_new_tokens=4, temperature=0))
    for prompt, result in zip(PROMPTS, results, strict=True):
        # The first token comes from the packed prefill: exactly the full forward's argmax.
        assert result.tokens[0] == int(last_logits(model, prompt).argmax())
        assert len(result.tokens) == 4


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_results_do_not_depend_on_batch_size(temperature):
    model = make_model(seed=1)
    config = GenerationConfig(max_new_tokens=6, temperature=temperature, seed=11)
    reference = generate(model, PROMPTS, config, batch_size=1)
    for batch_size in (2, 3, 16):
        assert generate(model, PROMPTS, config, batch_size=batch_size) == reference


# ---------------------------------------------------------------------------------------------
# Stop tokens and lengths


def test_stop_tokens_end_a_sequence_and_are_kept():
    model = make_model(seed=1)
    free = generate(model, PROMPTS, GenerationConfig(max_new_tokens=10, temperature=0))
    # A token that first appears at step >= 2 of some prompt's continuation.
    which, step = next(
        (b, i)
        for b, r in enumerate(free)
        for i in range(2, len(r.tokens))
        if r.tokens[i] not in r.tokens[:i]
    )
    tokens = free[which].tokens
    stop = tokens[step]
    never = min(set(range(61)) - {t for r in free for t in r.tokens})  # a second, unused stop id
    config = GenerationConfig(max_new_tokens=10, temperature=0, stop_token_ids=(stop, never))
    stopped = generate(model, PROMPTS, config, batch_size=2)
    assert stopped[which] == Generation(tokens=tokens[: step + 1], stopped=True)
    for before, after in zip(free, stopped, strict=True):
        hits = [i for i, t in enumerate(before.tokens) if t == stop]
        if hits:
            assert after == Generation(tokens=before.tokens[: hits[0] + 1], stopped=True)
        else:
            assert after == Generation(tokens=before.tokens, stopped=False)
            assert len(after.tokens) == 10


def test_stop_token_as_first_token():
    model = make_model(seed=2)
    first = int(last_logits(model, PROMPTS[0]).argmax())
    config = GenerationConfig(max_new_tokens=5, temperature=0, stop_token_ids=[first])
    assert config.stop_token_ids == (first,)  # a list is normalised into the tuple
    assert generate(model, PROMPTS[:1], config)[0] == Generation(tokens=[first], stopped=True)


def test_prompt_plus_new_tokens_must_fit_max_positions():
    model = make_model(max_position_embeddings=12)
    result = generate(model, [[1] * 8], GenerationConfig(max_new_tokens=4, temperature=0))
    assert len(result[0].tokens) == 4  # exactly 12 positions is allowed
    with pytest.raises(ValueError, match=r"prompts\[1\] has 9 tokens.*max_position_embeddings"):
        generate(model, [[1], [1] * 9], GenerationConfig(max_new_tokens=4))


# ---------------------------------------------------------------------------------------------
# Sampling


def test_seeded_sampling_is_reproducible():
    model = make_model(seed=5)
    config = GenerationConfig(max_new_tokens=8, temperature=1.0, top_p=0.95, seed=123)
    first = generate(model, PROMPTS, config)
    assert generate(model, PROMPTS, config) == first
    other_seed = generate(model, PROMPTS, GenerationConfig(**{**config.__dict__, "seed": 124}))
    assert other_seed != first
    greedy = generate(model, PROMPTS, GenerationConfig(max_new_tokens=8, temperature=0))
    assert greedy != first


def test_tiny_top_p_is_greedy():
    model = make_model(seed=6)
    greedy = generate(model, PROMPTS, GenerationConfig(max_new_tokens=6, temperature=0))
    nucleus_of_one = GenerationConfig(max_new_tokens=6, temperature=1.5, top_p=1e-9, seed=3)
    assert generate(model, PROMPTS, nucleus_of_one) == greedy


def test_sampled_tokens_stay_inside_the_nucleus():
    model = make_model(seed=7)
    top_p, temperature = 0.5, 1.3
    config = GenerationConfig(max_new_tokens=8, temperature=temperature, top_p=top_p, seed=9)
    nucleus_sizes = []
    for prompt, result in zip(PROMPTS, generate(model, PROMPTS, config), strict=True):
        for step, token in enumerate(result.tokens):
            probs = torch.softmax(
                last_logits(model, prompt + result.tokens[:step]).double() / temperature, -1
            )
            sorted_p, order = probs.sort(descending=True, stable=True)
            nucleus = order[(sorted_p.cumsum(0) - sorted_p) < top_p].tolist()
            nucleus_sizes.append(len(nucleus))
            assert token in nucleus
    assert max(nucleus_sizes) > 1  # the rule was exercised, not only argmax


@pytest.mark.parametrize(("temperature", "top_p"), [(0.7, 1.0), (1.0, 0.6)])
def test_sampling_follows_the_distribution(temperature, top_p):
    # 3000 copies of one prompt: each copy has its own generator, so the first tokens are
    # independent draws from the (nucleus-truncated, renormalised) softmax.
    model = make_model(seed=8)
    prompt = [4, 2]
    n = 3000
    config = GenerationConfig(max_new_tokens=1, temperature=temperature, top_p=top_p, seed=1)
    drawn = torch.tensor(
        [r.tokens[0] for r in generate(model, [prompt] * n, config, batch_size=512)]
    )
    probs = torch.softmax(last_logits(model, prompt).double() / temperature, -1)
    sorted_p, order = probs.sort(descending=True, stable=True)
    kept = order[(sorted_p.cumsum(0) - sorted_p) < top_p]
    expected = torch.zeros_like(probs)
    expected[kept] = probs[kept] / probs[kept].sum()
    observed = torch.bincount(drawn, minlength=probs.numel()).double() / n
    assert observed[expected == 0].sum() == 0
    # Total variation: sampling noise here is about 0.03; a wrong sampler is far off.
    assert 0.5 * float((observed - expected).abs().sum()) < 0.06
    assert float(expected.max()) < 0.6  # a spread distribution, so the check has teeth


# ---------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(max_new_tokens=0), ValueError, "max_new_tokens must be >= 1"),
        (dict(max_new_tokens=2.0), TypeError, "max_new_tokens must be an int"),
        (dict(temperature=-0.1), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(temperature="hot"), TypeError, "temperature"),
        (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
        (dict(stop_token_ids=(-1,)), ValueError, "negative"),
        (dict(stop_token_ids=(1.5,)), TypeError, "integer token ids"),
        (dict(stop_token_ids=3), TypeError, "sequence of token ids"),
        (dict(seed=None), TypeError, "seed"),
    ],
)
def test_generation_config_rejects_bad_values(kwargs, error, message):
    with pytest.raises(error, match=message):
        GenerationConfig(**kwargs)


@pytest.mark.parametrize(
    ("prompts", "kwargs", "error", "message"),
    [
        ([[1], []], {}, ValueError, r"prompts\[1\] is empty"),
        ([[1, 61]], {}, ValueError, r"token id 61 outside the vocabulary \[0, 61\)"),
        ([[1, -2]], {}, ValueError, "negative token id"),
        ([[1, 2.0]], {}, TypeError, "integer token ids"),
        ([[True]], {}, TypeError, "integer token ids"),
        ("abc", {}, TypeError, "list of token-id lists"),
        ([[1]], dict(batch_size=0), ValueError, "batch_size"),
        ([[1]], dict(config=GenerationConfig(stop_token_ids=(61,))), ValueError, "stop token 61"),
        ([[1]], dict(config="greedy"), TypeError, "GenerationConfig"),
    ],
)
def test_generate_rejects_bad_input(prompts, kwargs, error, message):
    model = make_model()
    config = kwargs.pop("config", GenerationConfig(max_new_tokens=2))
    with pytest.raises(error, match=message):
        generate(model, prompts, config, **kwargs)


def test_no_prompts_no_work():
    assert generate(make_model(), [], GenerationConfig()) == []


def test_prompts_may_be_tensors_or_tuples():
    model = make_model(seed=2)
    config = GenerationConfig(max_new_tokens=3, temperature=0)
    as_lists = generate(model, [[1, 2, 3], [4]], config)
    assert generate(model, [torch.tensor([1, 2, 3]), (4,)], config) == as_lists
