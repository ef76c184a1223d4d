"""Stage checkpoints: the student as an HF-style directory plus optimizer and loop state.

A checkpoint is a directory written in full under a temporary name and then renamed into place,
so a kill at any moment leaves either the previous checkpoint or the new one, never a mix::

    <stage dir>/checkpoint/model/          the student as a Hugging Face directory (config.json,
                                           model.safetensors), on either backend
    <stage dir>/checkpoint/optimizer.pt    AdamW state
    <stage dir>/checkpoint/state.json      next step, total steps, RNG state, sha256 of the files

Replacing an existing checkpoint renames it to ``checkpoint.old`` first; a reader that finds
only ``checkpoint.old`` (a kill between the two renames) uses it.
"""

from __future__ import annotations

import base64
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..backends import CausalLM, load_model_dir, save_model_dir
from ..durable import atomic_write, atomic_write_text, replace_dir, sha256_file

__all__ = ["Checkpoint", "load_checkpoint", "save_checkpoint"]

CHECKPOINT = "checkpoint"


@dataclass(frozen=True)
class Checkpoint:
    """What a resumed stage needs."""

    model_dir: Path
    optimizer_state: dict
    next_step: int
    total_steps: int


def save_checkpoint(
    stage_dir: Path,
    model: CausalLM,
    optimizer_state: dict,
    *,
    next_step: int,
    total_steps: int,
) -> Path:
    """Writes a checkpoint of a stage atomically; returns its directory.

    ``model`` (a ``DecoderLM`` or an ``HFCausalLM``) holds full (unsharded) weights, written by
    ``backends.save_model_dir``; ``optimizer_state`` is the optimizer's state dict
    (for FSDP2, the full state dict keyed by parameter name)."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    tmp = stage_dir / f"{CHECKPOINT}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model_dir(model, tmp / "model")
    optimizer_path = tmp / "optimizer.pt"
    atomic_write(optimizer_path, lambda path: torch.save(optimizer_state, path))
    files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    state = {
        "next_step": next_step,
        "total_steps": total_steps,
        "torch_rng": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "files": files,
    }
    atomic_write_text(tmp / "state.json", json.dumps(state, indent=1))
    # load_checkpoint falls back to the .old name while the swap is under way.
    final = stage_dir / CHECKPOINT
    replace_dir(tmp, final, old=stage_dir / f"{CHECKPOINT}.old")
    return final


def load_checkpoint(stage_dir: Path) -> Checkpoint | None:
    """The stage's latest complete checkpoint, verified against its checksums; None if there is
    none. A checkpoint whose files do not match raises ValueError naming the file."""
    for name in (CHECKPOINT, f"{CHECKPOINT}.old"):
        directory = stage_dir / name
        if (directory / "state.json").is_file():
            break
    else:
        return None
    state = json.loads((directory / "state.json").read_text())
    for relative, digest in state["files"].items():
        path = directory / relative
        if not path.is_file() or sha256_file(path) != digest:
            raise ValueError(f"checkpoint file {path} is missing or damaged (sha256 mismatch)")
    rng = torch.frombuffer(bytearray(base64.b64decode(state["torch_rng"])), dtype=torch.uint8)
    torch.set_rng_state(rng.clone())
    optimizer_state = torch.load(directory / "optimizer.pt", weights_only=True)
    return Checkpoint(
        model_dir=directory / "model",
        optimizer_state=optimizer_state,
        next_step=int(state["next_step"]),
        total_steps=int(state["total_steps"]),
    )


def load_model(model_dir: Path, dtype: torch.dtype, backend: str = "embedded") -> CausalLM:
    """A model directory written by a stage, on ``backend`` (``"embedded"``/``"transformers"``)."""
    return load_model_dir(model_dir, backend, dtype)
