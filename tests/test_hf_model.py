"""HF models as teacher/student: the embedded loader on transformers checkpoints, ``HFCausalLM``,
``backends.save_model_dir`` and ``generate`` on HF models, all on tiny random models built from
configs.

References are transformers' own eager forward on each document alone and transformers' own
greedy ``generate``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from host_reads import count_host_reads
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from pangu_fastkd.backends import generate, save_model_dir  # noqa: E402
from pangu_fastkd.data.boundaries import cu_seqlens_from_lengths  # noqa: E402
from pangu_fastkd.hf.model import HFCausalLM, load_hf_causal_lm  # noqa: E402
from pangu_fastkd.model import (  # noqa: E402
    DecoderLM,
    GenerationConfig,
    load_pretrained,
)

VOCAB = 97
LENGTHS = (5, 1, 9)
ARCHS = ("llama", "qwen2", "qwen3")
ATOL = 1e-5


def _config(arch: str, **overrides):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        eos_token_id=3,
        bos_token_id=1,
    )
    common.update(overrides)
    cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }[arch]
    return cls(**common)


def _hf_model(arch: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        _config(arch, **overrides), attn_implementation="eager", dtype=torch.float32
    )
    with torch.no_grad():
        # Random (not zero) biases and norm weights, so every tensor's mapping is exercised.
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.add_(torch.randn(p.shape) * 0.1)
    return model.eval()


def _checkpoint(tmp_path: Path, arch: str, **overrides) -> tuple[Path, object]:
    model = _hf_model(arch, **overrides)
    directory = tmp_path / arch
    model.save_pretrained(str(directory))
    return directory, model


def _documents(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in LENGTHS]


def _eager_per_document(model, docs: list[torch.Tensor]) -> torch.Tensor:
    """``[T, V]`` transformers eager logits of each document alone, concatenated."""
    model.set_attn_implementation("eager")
    with torch.no_grad():
        return torch.cat([model(input_ids=d[None], use_cache=False).logits[0] for d in docs])


def _packed(docs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat(docs), cu_seqlens_from_lengths([len(d) for d in docs])


# ---------------------------------------------------------------------------------------------
# The embedded loader reads transformers checkpoints


@pytest.mark.parametrize("arch", ARCHS)
def test_load_pretrained_reads_transformers_checkpoint(tmp_path: Path, arch: str) -> None:
    directory, hf = _checkpoint(tmp_path, arch)
    docs = _documents()
    expected = _eager_per_document(hf, docs)
    ours = load_pretrained(directory)
    ids, cu = _packed(docs)
    with torch.no_grad():
        got = ours(ids, cu)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)


def test_load_pretrained_reads_tied_transformers_checkpoint(tmp_path: Path) -> None:
    directory, hf = _checkpoint(tmp_path, "qwen3", tie_word_embeddings=True)
    docs = _documents(2)
    ours = load_pretrained(directory)
    assert ours.lm_head is None
    with torch.no_grad():
        got = ours(*_packed(docs))
    torch.testing.assert_close(got, _eager_per_document(hf, docs), atol=ATOL, rtol=1e-4)


def test_load_pretrained_refuses_unmappable_tensor_by_name(tmp_path: Path) -> None:
    directory, _ = _checkpoint(tmp_path, "llama")
    weights = directory / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(4, 4)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected tensors: model\.layers\.0\.mlp\.extra_proj"):
        load_pretrained(directory)


# ---------------------------------------------------------------------------------------------
# HFCausalLM


@pytest.mark.parametrize("arch", ARCHS)
def test_hidden_states_and_head_match_eager_per_document(arch: str) -> None:
    hf = _hf_model(arch)
    docs = _documents()
    expected = _eager_per_document(hf, docs)
    model = HFCausalLM(hf)
    assert hf.config._attn_implementation == "pangu_fastkd"
    ids, cu = _packed(docs)
    with torch.no_grad():
        hidden = model.hidden_states(ids, cu)
    assert hidden.shape == (ids.shape[0], 64)
    logits = hidden @ model.output_weight.T
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=1e-4)
    # position_ids give the same row as cu_seqlens.
    positions = torch.cat([torch.arange(len(d)) for d in docs])
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids, position_ids=positions), expected, atol=ATOL, rtol=1e-4
        )
    assert model.config.vocab_size == VOCAB
    assert model.config.max_position_embeddings == 64
    assert model.config.eos_token_ids == (3,)
    assert model.output_bias is None and model.logit_softcap is None


def test_hidden_states_gradients_reach_the_wrapped_model() -> None:
    model = HFCausalLM(_hf_model("llama"))
    model.train()
    ids, cu = _packed(_documents())
    model(ids, cu).logsumexp(-1).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.hf_model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_boundaries_are_read_once_per_forward_not_once_per_layer(
    monkeypatch: pytest.MonkeyPatch, arch: str
) -> None:
    """HFCausalLM checks cu_seqlens once and hands every layer the checked documents, so the
    host reads of a forward do not grow with the number of layers."""
    ids, cu = _packed(_documents())
    reads = []
    for layers in (1, 3):
        model = HFCausalLM(_hf_model(arch, num_hidden_layers=layers))
        with torch.no_grad():
            reads.append(count_host_reads(monkeypatch, lambda m=model: m(ids, cu)))
    assert reads[0] == reads[1]


def test_hidden_states_refuses_bad_input() -> None:
    model = HFCausalLM(_hf_model("llama"))
    ids = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match=r"input_ids must be in \[0, 97\)"):
        model.hidden_states(torch.tensor([1, 97]))
    with pytest.raises(TypeError, match="cu_seqlens must be an int32 tensor"):
        model.hidden_states(ids, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="end at T = 3"):
        model.hidden_states(ids, torch.tensor([0, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        model.hidden_states(torch.zeros(65, dtype=torch.int64))
    with pytest.raises(TypeError, match="PreTrainedModel"):
        HFCausalLM(torch.nn.Linear(2, 2))


def test_weights_fingerprint_tracks_weights_not_attention() -> None:
    model = HFCausalLM(_hf_model("qwen3"))
    before = model.weights_fingerprint()
    assert before == HFCausalLM(_hf_model("qwen3")).weights_fingerprint()
    model.hf_model.set_attn_implementation("sdpa")
    assert model.weights_fingerprint() == before
    with torch.no_grad():
        model.hf_model.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    assert model.weights_fingerprint() != before


def test_load_hf_causal_lm(tmp_path: Path) -> None:
    directory, hf = _checkpoint(tmp_path, "qwen2")
    model = load_hf_causal_lm(directory)
    assert isinstance(model, HFCausalLM) and not model.training
    docs = _documents(3)
    with torch.no_grad():
        got = model(*_packed(docs))
    torch.testing.assert_close(got, _eager_per_document(hf, docs), atol=ATOL, rtol=1e-4)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_causal_lm(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_hf_causal_lm(tmp_path / "empty")
    (directory / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no weights"):
        load_hf_causal_lm(directory)


# ---------------------------------------------------------------------------------------------
# save_model_dir


def _tokenizer_dir(tmp_path: Path) -> Path:
    """A real (tiny word-level) tokenizer saved by transformers, plus a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="w3", bos_token="w1", unk_token="w0"
    )
    directory = tmp_path / "tokenizer"
    tokenizer.save_pretrained(str(directory))
    (directory / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    return directory


def _trained_student(seed: int = 0) -> DecoderLM:
    """An embedded student after a few optimiser steps (so no weight is at its init value)."""
    from pangu_fastkd.model import ModelConfig, init_weights

    config = ModelConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=3,
        bos_token_id=1,
    )
    model = DecoderLM(config)
    init_weights(model, seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids, cu = _packed(_documents(seed + 10))
    for _ in range(3):
        logits = model(ids, cu)
        loss = torch.nn.functional.cross_entropy(logits[:-1], ids[1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_saved_embedded_student_loads_and_generates_in_transformers(tmp_path: Path) -> None:
    student = _trained_student()
    target = tmp_path / "student"
    tokenizer_dir = _tokenizer_dir(tmp_path)
    save_model_dir(student, target, tokenizer_dir=tokenizer_dir)

    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (target / name).read_bytes() == (tokenizer_dir / name).read_bytes()
    assert json.loads((target / "generation_config.json").read_text())["eos_token_id"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(target), local_files_only=True, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    assert transformers.AutoTokenizer.from_pretrained(str(target), local_files_only=True)(
        "w5 w7"
    ).input_ids[-2:] == [5, 7]
    docs = _documents(4)
    with torch.no_grad():
        ours = student(*_packed(docs))
    torch.testing.assert_close(_eager_per_document(hf, docs), ours, atol=ATOL, rtol=1e-4)

    prompts = [d.tolist() for d in docs]
    config = GenerationConfig(max_new_tokens=6, temperature=0.0)
    expected = [g.tokens for g in generate(student, prompts, config)]
    for prompt, tokens in zip(prompts, expected, strict=True):
        out = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        assert out[0, len(prompt) :].tolist() == tokens


def test_saved_hf_student_round_trips_and_replaces_target(tmp_path: Path) -> None:
    model = HFCausalLM(_hf_model("qwen3", tie_word_embeddings=True))
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.bin").write_bytes(b"old")
    save_model_dir(model, target)
    assert not (target / "stale.bin").exists()  # the old directory is replaced as a whole
    config = json.loads((target / "config.json").read_text())
    assert "pangu_fastkd" not in json.dumps(config)
    assert (target / "model.safetensors").is_file()

    reloaded = load_hf_causal_lm(target)
    ids, cu = _packed(_documents(5))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, cu), model(ids, cu), atol=0, rtol=0)
    assert reloaded.weights_fingerprint() == model.weights_fingerprint()


def test_save_hf_student_refuses_bad_arguments(tmp_path: Path) -> None:
    student = _trained_student()
    with pytest.raises(TypeError, match="DecoderLM or an HFCausalLM"):
        save_model_dir(torch.nn.Linear(2, 2), tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="tokenizer_dir"):
        save_model_dir(student, tmp_path / "x", tokenizer_dir=tmp_path / "missing")
    (tmp_path / "no_tok").mkdir()
    with pytest.raises(ValueError, match=r"holds no tokenizer\.json"):
        save_model_dir(student, tmp_path / "x", tokenizer_dir=tmp_path / "no_tok")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        save_model_dir(student, tmp_path / "file")
    assert not (tmp_path / "x").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------
# generate on HFCausalLM


PROMPTS = [[5, 8, 13, 2], [7], [40, 41, 42, 43, 44, 45, 46], [11, 12]]


@pytest.mark.parametrize("arch", ("llama", "qwen3"))
def test_generate_hf_equals_transformers_greedy(arch: str) -> None:
    hf = _hf_model(arch, seed=3)
    model = HFCausalLM(hf)
    config = GenerationConfig(max_new_tokens=7, temperature=0.0)
    got = generate(model, PROMPTS, config, batch_size=3)
    hf.set_attn_implementation("eager")
    for prompt, generation in zip(PROMPTS, got, strict=True):
        out = hf.generate(
            torch.tensor([prompt]), max_new_tokens=7, do_sample=False, eos_token_id=None
        )
        assert generation.tokens == out[0, len(prompt) :].tolist()
        assert not generation.stopped
    # Batch size does not change greedy results; the wrapper is back on our attention.
    assert [g.tokens for g in generate(model, PROMPTS, config, batch_size=1)] == [
        g.tokens for g in got
    ]
    assert hf.config._attn_implementation == "eager"  # left as the caller set it
    model.hidden_states(torch.tensor([1, 2, 3]))
    assert hf.config._attn_implementation == "pangu_fastkd"


def test_generate_hf_honours_stop_tokens() -> None:
    model = HFCausalLM(_hf_model("llama", seed=3))
    free = generate(model, PROMPTS, GenerationConfig(max_new_tokens=8, temperature=0.0))
    # Stop on each prompt's third greedy token: output ends there, marked stopped.
    stops = tuple(sorted({g.tokens[2] for g in free}))
    stopped = generate(
        model, PROMPTS, GenerationConfig(max_new_tokens=8, temperature=0.0, stop_token_ids=stops)
    )
    for full, short in zip(free, stopped, strict=True):
        first = next(i for i, t in enumerate(full.tokens) if t in stops)
        assert short.tokens == full.tokens[: first + 1]
        assert short.stopped
    # Only config.stop_token_ids stop a sequence: the model's own eos ids (config and
    # generation_config.json) do not leak in.
    model.hf_model.config.eos_token_id = stops[0]
    model.hf_model.generation_config.eos_token_id = stops[0]
    again = generate(model, PROMPTS, GenerationConfig(max_new_tokens=8, temperature=0.0))
    assert [g.tokens for g in again] == [g.tokens for g in free]
    assert model.hf_model.generation_config.eos_token_id == stops[0]  # restored afterwards


def test_generate_hf_samples_like_the_embedded_model(tmp_path: Path) -> None:
    student = _trained_student(seed=1)
    save_model_dir(student, tmp_path / "student")
    model = load_hf_causal_lm(tmp_path / "student")
    config = GenerationConfig(max_new_tokens=6, temperature=1.0, top_p=0.8, seed=3)
    ours = generate(student, PROMPTS, config, batch_size=2)
    theirs = generate(model, PROMPTS, config, batch_size=3)
    assert [g.tokens for g in theirs] == [g.tokens for g in ours]


def test_generate_hf_sampling_is_seeded_per_prompt() -> None:
    model = HFCausalLM(_hf_model("qwen2", seed=4))
    config = GenerationConfig(max_new_tokens=6, temperature=1.5, top_p=0.9, seed=7)
    a = generate(model, PROMPTS, config, batch_size=4)
    b = generate(model, PROMPTS, config, batch_size=1)
    assert [g.tokens for g in a] == [g.tokens for g in b]
    c = generate(model, PROMPTS, GenerationConfig(max_new_tokens=6, temperature=1.5, seed=8))
    assert [g.tokens for g in a] != [g.tokens for g in c]
    greedy = generate(model, PROMPTS, GenerationConfig(max_new_tokens=6, temperature=0.0))
    assert [g.tokens for g in a] != [g.tokens for g in greedy]


def test_generate_refuses_other_models_and_long_prompts() -> None:
    model = HFCausalLM(_hf_model("llama"))
    with pytest.raises(TypeError, match="DecoderLM or an HFCausalLM"):
        generate(torch.nn.Linear(2, 2), PROMPTS, GenerationConfig())
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        generate(model, [[1] * 60], GenerationConfig(max_new_tokens=5))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [[97]], GenerationConfig(max_new_tokens=5))
