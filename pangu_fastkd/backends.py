"""Model backends behind one protocol: the embedded ``DecoderLM`` or an ``HFCausalLM``.

Both implement ``CausalLM`` (packed-row hidden states, the LM head's parts, the config, a
weights fingerprint, ``generate``), so training, scoring, rollouts and eval take either without
asking which it is. This module decides which backend a checkpoint directory runs on, loads,
copies and saves models, and hands out the LM head's parts; it is the only place that names the
backend classes.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .durable import fsync_tree, replace_dir
from .model import DecoderLM, Generation, GenerationConfig, ModelConfig, load_pretrained
from .model.checkpoint import save_pretrained
from .pretrained import resolve_model_path

__all__ = [
    "TOKENIZER_FILES",
    "CausalLM",
    "backend_of",
    "copy_model",
    "generate",
    "head_parts",
    "load_model_dir",
    "load_model_spec",
    "reload_like",
    "resolve_backend",
    "save_model_dir",
]

# Copied from ``tokenizer_dir`` when present: the fast tokenizer and its config, plus the
# vocabulary files of slow / sentencepiece tokenizers (openPangu ships ``tokenizer.model``).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


@runtime_checkable
class CausalLM(Protocol):
    """What training, scoring, rollouts and eval use of a model (a ``torch.nn.Module``).

    ``logits = c * tanh((hidden_states(...) @ output_weight.T + output_bias) / c)`` with
    ``c = logit_softcap`` (no bias or softcap when they are None); ``config`` has ``vocab_size``,
    ``max_position_embeddings`` and ``eos_token_ids``.
    """

    backend: str  # "embedded" or "transformers": the loader's name for the backend
    config: object

    def hidden_states(self, input_ids: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
        """``[T, d]`` final-normed hidden states of a packed row ``input_ids [T]`` whose
        documents end at ``cu_seqlens [B + 1]``."""
        ...

    @property
    def output_weight(self) -> Tensor:
        """``[V, d]`` LM-head weight."""
        ...

    @property
    def output_bias(self) -> Tensor | None:
        """``[V]`` LM-head bias or None."""
        ...

    @property
    def logit_softcap(self) -> float | None:
        """Final-logit softcap or None."""
        ...

    def weights_fingerprint(self) -> str:
        """sha256 (hex) of the config and weights, the provenance of caches and rollouts."""
        ...

    def set_activation_checkpointing(self, every: int) -> None:
        """Recompute every ``every``-th decoder layer's activations in backward (0: none)."""
        ...

    def generate(
        self, prompts: Sequence[Sequence[int]], config: GenerationConfig, *, batch_size: int = 16
    ) -> list[Generation]:
        """One ``Generation`` per prompt, sampled by ``model.sampling``'s rules."""
        ...


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
    (``"auto"``: embedded when the embedded loader supports the config). ``path`` may name a
    shipped model (``"builtin:<name>"``)."""
    path = resolve_model_path(path)
    if backend not in ("auto", "embedded", "transformers"):
        raise ValueError(f"backend {backend!r} is not 'auto', 'embedded' or 'transformers'")
    if backend != "auto":
        return backend
    return "embedded" if embedded_unsupported(path) is None else "transformers"


def load_model_spec(path: str | Path, backend: str, dtype: torch.dtype) -> CausalLM:
    """Loads a model spec's checkpoint directory on its ``backend`` (``"auto"`` resolved here).

    ``path`` may name a shipped model (``"builtin:<name>"``, checked against its recipe).

    Raises:
        ValueError: with ``"auto"``, neither backend can load the directory (both reasons
            given), e.g. an architecture transformers does not know or no ``hf`` extra.
        PretrainedError: a shipped model that is unknown or fails its fingerprints.
    """
    path = resolve_model_path(path)
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


def load_model_dir(path: str | Path, backend: str, dtype: torch.dtype) -> CausalLM:
    """Loads a checkpoint directory on a resolved backend (``"embedded"`` / ``"transformers"``)."""
    if backend == "embedded":
        return load_pretrained(path, dtype=dtype)
    if backend == "transformers":
        from .hf.model import load_hf_causal_lm

        return load_hf_causal_lm(path, dtype=dtype)
    raise ValueError(f"backend {backend!r} is not 'embedded' or 'transformers'")


def backend_of(model: CausalLM) -> str:
    """``"embedded"`` or ``"transformers"``: the backend ``model`` was loaded on."""
    return model.backend


def generate(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    *,
    batch_size: int = 16,
) -> list[Generation]:
    """``model.generate(prompts, config, batch_size=batch_size)`` for any backend.

    Raises:
        TypeError: ``model`` does not implement ``CausalLM``.
    """
    if not isinstance(model, CausalLM):
        raise TypeError(f"model must be a DecoderLM or an HFCausalLM, got {type(model).__name__}")
    return model.generate(prompts, config, batch_size=batch_size)


def reload_like(model: CausalLM, path: str | Path) -> CausalLM:
    """A directory written by ``save_model_dir`` for ``model``, loaded on ``model``'s backend
    and in its dtype (resume and skipped stages)."""
    dtype = next(model.parameters()).dtype
    return load_model_dir(path, backend_of(model), dtype)


def copy_model(model: CausalLM) -> CausalLM:
    """An independent copy (same config and weights, same backend, training mode kept)."""
    if model.backend == "transformers":
        return copy.deepcopy(model)
    dtype = next(model.parameters()).dtype
    out = DecoderLM(model.config).to(dtype)
    out.load_state_dict(model.state_dict())
    return out


def save_model_dir(
    model: CausalLM, directory: str | Path, tokenizer_dir: str | Path | None = None
) -> None:
    """Write ``model`` as a directory ``AutoModelForCausalLM.from_pretrained`` loads.

    Everything is written into a temporary directory beside the target and fsynced, then moved
    into place by renames: an existing target is replaced as a whole (never mixed with new
    files). An interrupted save leaves the old target or the new one; only a crash between the
    two renames leaves the old one under a hidden ``.<name>.*.old`` beside the target.

    Args:
        model: a ``DecoderLM`` (``model.save_pretrained``'s files plus a
            ``generation_config.json`` holding its bos/eos/pad ids) or an ``HFCausalLM``
            (transformers' ``save_pretrained``, safetensors).
        directory: the target directory; its parent is created if missing.
        tokenizer_dir: a directory whose tokenizer files (``TOKENIZER_FILES`` that exist there)
            are copied; it must hold ``tokenizer.json`` or ``tokenizer_config.json``.

    Raises:
        TypeError: ``model`` is neither a ``DecoderLM`` nor an ``HFCausalLM``.
        FileNotFoundError: ``tokenizer_dir`` does not exist.
        ValueError: ``tokenizer_dir`` holds no tokenizer, or ``directory`` is an existing file.
    """
    write_files = _FILE_WRITERS.get(getattr(model, "backend", None))
    if write_files is None or not isinstance(model, CausalLM):
        raise TypeError(f"model must be a DecoderLM or an HFCausalLM, got {type(model).__name__}")
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a directory")
    tokenizer_files = _tokenizer_files(tokenizer_dir)
    target.parent.mkdir(parents=True, exist_ok=True)

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        # mkdtemp makes it private (0700); the result should look like any mkdir'd directory.
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        write_files(model, tmp)
        for path in tokenizer_files:
            shutil.copyfile(path, tmp / path.name)
        fsync_tree(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_embedded_files(model: DecoderLM, directory: Path) -> None:
    """``save_pretrained``'s config and weights, and the generation ids transformers reads."""
    save_pretrained(model, directory)
    generation = {
        key: getattr(model.config, key)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id")
        if getattr(model.config, key) is not None
    }
    if generation:
        (directory / "generation_config.json").write_text(
            json.dumps(generation, indent=2, sort_keys=True) + "\n"
        )


# How each backend writes its files into a fresh directory (HFCausalLM: its own method).
_FILE_WRITERS: dict[str | None, Callable[[CausalLM, Path], None]] = {
    "embedded": _write_embedded_files,
    "transformers": lambda model, directory: model.save_pretrained(directory),
}


def _tokenizer_files(tokenizer_dir: str | Path | None) -> list[Path]:
    if tokenizer_dir is None:
        return []
    source = Path(tokenizer_dir)
    if not source.is_dir():
        raise FileNotFoundError(f"tokenizer_dir {source} does not exist")
    files = [source / name for name in TOKENIZER_FILES if (source / name).is_file()]
    if not any(p.name in ("tokenizer.json", "tokenizer_config.json") for p in files):
        raise ValueError(f"tokenizer_dir {source} holds no tokenizer.json or tokenizer_config.json")
    return files


def head_parts(model: CausalLM) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
    """The LM head: ``weight [V, d]``, ``bias [V]`` or None, softcap ``c`` or None, such that
    ``logits = c * tanh((hidden @ weight.T + bias) / c)`` (the embedded model has neither)."""
    return model.output_weight, model.output_bias, model.logit_softcap
