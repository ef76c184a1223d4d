"""The pipeline's models on either backend: the embedded ``DecoderLM`` or an ``HFCausalLM``.

Both follow one protocol (``hidden_states(input_ids [T], cu_seqlens [B + 1]) -> [T, d]``,
``output_weight [V, d]``, ``config.vocab_size``, ``weights_fingerprint()``; an ``HFCausalLM``
adds ``output_bias [V]`` and ``logit_softcap``), so training, scoring, rollouts and eval take
either. This module decides which backend a checkpoint directory runs on, loads, copies and
saves models, and hands out the LM head's parts.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Union

import torch

from ..model import DecoderLM, ModelConfig, load_pretrained

if TYPE_CHECKING:
    from ..hf.model import HFCausalLM

__all__ = [
    "LMModel",
    "copy_model",
    "head_parts",
    "is_hf_model",
    "load_model_dir",
    "load_model_spec",
    "reload_like",
    "resolve_backend",
    "save_model_dir",
]

# Union, not "|": the HF member is a forward reference (transformers is optional).
LMModel = Union[DecoderLM, "HFCausalLM"]


def embedded_unsupported(directory: str | Path) -> str | None:
    """Why the embedded loader cannot take ``directory``'s ``config.json``; None when it can.

    Raises:
        FileNotFoundError: no ``config.json`` in ``directory``.
        ValueError: ``config.json`` is not a JSON object.
    """
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"model directory {directory} has no config.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object")
    try:
        ModelConfig.from_hf_dict(raw)
    except (ValueError, TypeError, KeyError) as err:
        return str(err)
    return None


def resolve_backend(path: str | Path, backend: str) -> str:
    """``"embedded"`` or ``"transformers"`` for a checkpoint directory and a spec's ``backend``
    (``"auto"``: embedded when the embedded loader supports the config)."""
    if backend not in ("auto", "embedded", "transformers"):
        raise ValueError(f"backend {backend!r} is not 'auto', 'embedded' or 'transformers'")
    if backend != "auto":
        return backend
    return "embedded" if embedded_unsupported(path) is None else "transformers"


def load_model_spec(path: str | Path, backend: str, dtype: torch.dtype) -> LMModel:
    """Loads a model spec's checkpoint directory on its ``backend`` (``"auto"`` resolved here).

    Raises:
        ValueError: with ``"auto"``, neither backend can load the directory (both reasons
            given), e.g. an architecture transformers does not know or no ``hf`` extra.
    """
    resolved = resolve_backend(path, backend)
    if backend != "auto" or resolved == "embedded":
        return load_model_dir(path, resolved, dtype)
    reason = embedded_unsupported(path)
    try:
        return load_model_dir(path, resolved, dtype)
    except (OSError, ValueError, TypeError, ImportError, KeyError) as err:
        raise ValueError(
            f"{path}: the embedded loader does not support this checkpoint ({reason}) and the "
            f"transformers backend cannot load it ({type(err).__name__}: {err})"
        ) from err


def load_model_dir(path: str | Path, backend: str, dtype: torch.dtype) -> LMModel:
    """Loads a checkpoint directory on a resolved backend (``"embedded"`` / ``"transformers"``)."""
    if backend == "embedded":
        return load_pretrained(path, dtype=dtype)
    if backend == "transformers":
        from ..hf.model import load_hf_causal_lm

        return load_hf_causal_lm(path, dtype=dtype)
    raise ValueError(f"backend {backend!r} is not 'embedded' or 'transformers'")


def is_hf_model(model: torch.nn.Module) -> bool:
    """True for an ``HFCausalLM`` (checked without importing transformers)."""
    if isinstance(model, DecoderLM):
        return False
    from ..hf.model import HFCausalLM

    return isinstance(model, HFCausalLM)


def backend_of(model: LMModel) -> str:
    return "transformers" if is_hf_model(model) else "embedded"


def reload_like(model: LMModel, path: str | Path) -> LMModel:
    """A directory written by ``save_model_dir`` for ``model``, loaded on ``model``'s backend
    and in its dtype (resume and skipped stages)."""
    dtype = next(model.parameters()).dtype
    return load_model_dir(path, backend_of(model), dtype)


def copy_model(model: LMModel) -> LMModel:
    """An independent copy (same config and weights, same backend, training mode kept)."""
    if is_hf_model(model):
        return copy.deepcopy(model)
    dtype = next(model.parameters()).dtype
    out = DecoderLM(model.config).to(dtype)
    out.load_state_dict(model.state_dict())
    return out


def save_model_dir(
    model: LMModel, directory: str | Path, tokenizer_dir: str | Path | None = None
) -> None:
    """``model`` as a Hugging Face directory (replaced atomically as a whole) that transformers'
    ``AutoModelForCausalLM`` loads, with the tokenizer files of ``tokenizer_dir`` when given."""
    from ..hf.model import save_hf_student

    save_hf_student(model, directory, tokenizer_dir=tokenizer_dir)


def head_parts(model: LMModel) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
    """The LM head: ``weight [V, d]``, ``bias [V]`` or None, softcap ``c`` or None, such that
    ``logits = c * tanh((hidden @ weight.T + bias) / c)`` (the embedded model has neither)."""
    return (
        model.output_weight,
        getattr(model, "output_bias", None),
        getattr(model, "logit_softcap", None),
    )
