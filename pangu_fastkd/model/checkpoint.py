"""Hugging Face-style checkpoint directories: ``config.json`` and safetensors with Llama names.

A directory written by ``save_pretrained`` loads in ``transformers`` (``LlamaForCausalLM``), and a
local checkpoint of the Llama / Qwen2 / Qwen3 / openPangu-Embedded families loads here without
``transformers``. Tensor names::

    model.embed_tokens.weight
    model.layers.{i}.input_layernorm.weight
    model.layers.{i}.self_attn.{q,k,v}_proj.weight   (+ .bias with attention_bias)
    model.layers.{i}.self_attn.o_proj.weight         (+ .bias with o_proj_bias)
    model.layers.{i}.self_attn.{q,k}_norm.weight     (qk_norm, Qwen3)
    model.layers.{i}.post_attention_layernorm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight
    model.norm.weight
    lm_head.weight                                   (absent when tied)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..durable import atomic_write
from .config import ModelConfig
from .modeling import DecoderLM

__all__ = [
    "CONFIG_NAME",
    "INDEX_NAME",
    "WEIGHTS_NAME",
    "expected_tensor_shapes",
    "load_pretrained",
    "save_pretrained",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# Older HF checkpoints saved RoPE's inverse frequencies; they follow from the config.
_DERIVED_SUFFIX = "rotary_emb.inv_freq"
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_LIST_LIMIT = 20


def hf_name(name: str) -> str:
    """The checkpoint name of a ``DecoderLM`` state-dict entry."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def model_name(name: str) -> str:
    """The ``DecoderLM`` state-dict name of a checkpoint tensor."""
    return name.removeprefix("model.")


def expected_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of ``config`` holds, by checkpoint name, with its shape."""
    with torch.device("meta"):
        skeleton = DecoderLM(config)
    return {hf_name(name): tuple(t.shape) for name, t in skeleton.state_dict().items()}


def save_pretrained(
    model: DecoderLM, directory: str | Path, *, dtype: torch.dtype | None = None
) -> None:
    """Write ``config.json`` and ``model.safetensors`` into ``directory``, each atomically.

    Args:
        model: the model to save.
        directory: created if missing; existing files of the same names are replaced.
        dtype: floating dtype of the saved tensors; None keeps each parameter's dtype.
    """
    if not isinstance(model, DecoderLM):
        raise TypeError(f"model must be a DecoderLM, got {type(model).__name__}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        hf_name(name): t.detach().to(device="cpu", dtype=dtype or t.dtype).contiguous()
        for name, t in model.state_dict().items()
    }
    saved_dtype = dtype or model.output_weight.dtype
    hf_config = model.config.to_hf_dict(torch_dtype=str(saved_dtype).removeprefix("torch."))
    config_text = json.dumps(hf_config, indent=2, sort_keys=True) + "\n"

    atomic_write(
        directory / WEIGHTS_NAME,
        lambda path: save_file(tensors, str(path), metadata={"format": "pt"}),
    )
    atomic_write(directory / CONFIG_NAME, lambda path: path.write_text(config_text))


def load_pretrained(directory: str | Path, *, dtype: torch.dtype = torch.float32) -> DecoderLM:
    """Load a checkpoint directory (single ``model.safetensors`` or sharded with an index).

    Every expected tensor must be present with its expected shape and a floating dtype; RoPE
    ``inv_freq`` buffers are skipped, and a tied model's ``lm_head.weight`` is accepted only
    when it equals the embedding.

    Args:
        directory: holds ``config.json`` and ``model.safetensors`` or
            ``model.safetensors.index.json`` with its shards.
        dtype: floating dtype of the returned model's parameters.

    Returns:
        The ``DecoderLM`` on the CPU.

    Raises:
        FileNotFoundError: the directory, its config or its weights are missing.
        ValueError: unsupported config features, or missing / unexpected / mis-shaped tensors
            (all of them listed).
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    config = ModelConfig.from_hf_dict(_read_json(directory / CONFIG_NAME))
    sources = _tensor_sources(directory)  # checkpoint name -> safetensors file

    expected = expected_tensor_shapes(config)
    found: dict[str, tuple[tuple[int, ...], str]] = {}  # name -> (shape, safetensors dtype)
    for path, names in _group_by_file(sources).items():
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                tensor_slice = f.get_slice(name)
                found[name] = (tuple(tensor_slice.get_shape()), tensor_slice.get_dtype())
    found = {n: v for n, v in found.items() if not n.endswith(_DERIVED_SUFFIX)}
    tied_head = config.tie_word_embeddings and "lm_head.weight" in found
    if tied_head:
        expected_with_head = {**expected, "lm_head.weight": (config.vocab_size, config.hidden_size)}
    else:
        expected_with_head = expected
    _check_tensor_inventory(directory, expected_with_head, found)

    state: dict[str, torch.Tensor] = {}
    for path, names in _group_by_file(sources).items():
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                if name in expected_with_head:
                    state[name] = f.get_tensor(name).to(dtype)
    if tied_head:
        head = state.pop("lm_head.weight")
        if not torch.equal(head, state["model.embed_tokens.weight"]):
            raise ValueError(
                f"{directory}: config.json ties the embeddings (tie_word_embeddings) but "
                "lm_head.weight differs from model.embed_tokens.weight"
            )
    with torch.device("meta"):
        model = DecoderLM(config)
    model.load_state_dict({model_name(n): t for n, t in state.items()}, strict=True, assign=True)
    return model


# ---------------------------------------------------------------------------------------------
# Helpers


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _tensor_sources(directory: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file that holds it."""
    single = directory / WEIGHTS_NAME
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    index_path = directory / INDEX_NAME
    if not index_path.is_file():
        raise FileNotFoundError(
            f"{directory} has neither {WEIGHTS_NAME} nor {INDEX_NAME} (only safetensors "
            "checkpoints are read)"
        )
    weight_map = _read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index_path} has no 'weight_map' object")
    sources: dict[str, Path] = {}
    for shard_name in sorted(set(weight_map.values())):
        shard = directory / shard_name
        if not shard.is_file():
            raise FileNotFoundError(f"{index_path} lists shard {shard_name}, which is missing")
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                if name in sources:
                    raise ValueError(
                        f"tensor {name} is in two shards: {sources[name].name} and {shard_name}"
                    )
                sources[name] = shard
    misplaced = sorted(n for n, s in weight_map.items() if n not in sources or sources[n].name != s)
    if misplaced:
        raise ValueError(
            f"{index_path} maps tensors to shards that do not hold them: {_listing(misplaced)}"
        )
    return sources


def _group_by_file(sources: dict[str, Path]) -> dict[Path, list[str]]:
    grouped: dict[Path, list[str]] = {}
    for name, path in sources.items():
        grouped.setdefault(path, []).append(name)
    return grouped


def _check_tensor_inventory(
    directory: Path,
    expected: dict[str, tuple[int, ...]],
    found: dict[str, tuple[tuple[int, ...], str]],
) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(
        f"{n} {list(found[n][0])} (expected {list(expected[n])})"
        for n in set(expected) & set(found)
        if found[n][0] != expected[n]
    )
    not_float = sorted(
        f"{n} ({found[n][1]})"
        for n in set(expected) & set(found)
        if found[n][1] not in _FLOAT_DTYPES
    )
    problems = []
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_listing(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped tensors: {_listing(misshaped)}")
    if not_float:
        problems.append(f"tensors that are not floating point: {_listing(not_float)}")
    if problems:
        raise ValueError(
            f"checkpoint {directory} does not match its config.json; " + "; ".join(problems)
        )


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_LIST_LIMIT])
    more = len(items) - _LIST_LIMIT
    return f"{shown}, ... and {more} more" if more > 0 else shown
