"""Stage checkpoints: the student as an HF-style directory plus optimizer and loop state.

A checkpoint is a directory written in full under a temporary name and then renamed into place,
so a kill at any moment leaves a complete checkpoint at one of the two names below::

    <stage dir>/checkpoint/model/          the student as a Hugging Face directory (config.json,
                                           model.safetensors), on either backend
    <stage dir>/checkpoint/optimizer.pt    AdamW state
    <stage dir>/checkpoint/state.json      next step, total steps, RNG state, sha256 of every
                                           file; sealed by its own checksum
    <stage dir>/checkpoint.old/            the previous checkpoint, kept as a fallback

Nothing is trusted on load: ``state.json``'s checksum, the files the code requires (the model's
config and weights, the optimizer state; not the ones the record happens to list), every
file's sha256, the RNG state. A newest checkpoint that fails any check is passed over for
``checkpoint.old`` (the caller warns and sets the damaged one aside with
``set_aside_damaged``); with no good one the error names every file that failed.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import pickle
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..backends import CausalLM, load_model_dir, save_model_dir
from ..durable import atomic_write, atomic_write_text, fsync_dir
from .integrity import IntegrityError, digest_files, files_under, read_sealed, seal, verify_files

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "load_checkpoint",
    "save_checkpoint",
    "set_aside_damaged",
]

CHECKPOINT = "checkpoint"
PREVIOUS = f"{CHECKPOINT}.old"
DAMAGED = f"{CHECKPOINT}.damaged"
STATE_NAME = "state.json"
MODEL_DIR = "model"
OPTIMIZER_NAME = "optimizer.pt"
# Version of state.json's layout; a checkpoint of another version is not resumed from.
FORMAT_VERSION = 2


class CheckpointError(IntegrityError):
    """A stage has checkpoints but none passes its checks; the message names each failure."""


@dataclass(frozen=True)
class Checkpoint:
    """What a resumed stage needs, and the newer checkpoints passed over to reach it."""

    directory: Path
    model_dir: Path
    optimizer_state: dict
    next_step: int
    total_steps: int
    passed_over: tuple[str, ...] = ()  # why each newer checkpoint was not used


def save_checkpoint(
    stage_dir: Path,
    model: CausalLM,
    optimizer_state: dict,
    *,
    next_step: int,
    total_steps: int,
) -> Path:
    """Writes a checkpoint of a stage atomically; returns its directory. The checkpoint it
    replaces becomes ``checkpoint.old``.

    ``model`` (a ``DecoderLM`` or an ``HFCausalLM``) holds full (unsharded) weights, written by
    ``backends.save_model_dir``; ``optimizer_state`` is the optimizer's state dict
    (for FSDP2, the full state dict keyed by parameter name).

    Raises:
        ValueError: a weight of ``model`` is NaN or infinite (such a checkpoint would replace a
            good one with weights no resume can train from).
    """
    _check_finite_weights(model, stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    tmp = stage_dir / f"{CHECKPOINT}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model_dir(model, tmp / MODEL_DIR)
    atomic_write(tmp / OPTIMIZER_NAME, lambda path: torch.save(optimizer_state, path))
    state = {
        "format_version": FORMAT_VERSION,
        "next_step": next_step,
        "total_steps": total_steps,
        "torch_rng": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "files": digest_files(tmp, files_under(tmp)),
    }
    atomic_write_text(tmp / STATE_NAME, _json(seal(state)))
    final, previous = stage_dir / CHECKPOINT, stage_dir / PREVIOUS
    # Two renames (POSIX cannot rename over a non-empty directory); between them only
    # checkpoint.old is there, and load_checkpoint takes it.
    if final.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.rename(final, previous)
    os.rename(tmp, final)
    fsync_dir(stage_dir)
    return final


def load_checkpoint(stage_dir: Path) -> Checkpoint | None:
    """The stage's newest checkpoint that passes every check, with the RNG state it saved
    restored; None if the stage has no checkpoint.

    Raises:
        CheckpointError: there are checkpoints but none is good; names each one's problem.
    """
    problems: list[str] = []
    for name in (CHECKPOINT, PREVIOUS):
        directory = stage_dir / name
        if not directory.exists():
            continue
        try:
            checkpoint, rng = _load_verified(directory)
        except IntegrityError as err:
            problems.append(str(err))
            continue
        torch.set_rng_state(rng)
        return replace(checkpoint, passed_over=tuple(problems))
    if problems:
        raise CheckpointError(
            f"{stage_dir}: no usable checkpoint: {'; '.join(problems)}. Delete "
            f"{stage_dir / CHECKPOINT} and {stage_dir / PREVIOUS} to train the stage from its "
            "start"
        )
    return None


def set_aside_damaged(stage_dir: Path, checkpoint: Checkpoint) -> None:
    """After ``load_checkpoint`` passed over a damaged newest checkpoint, renames it to
    ``checkpoint.damaged`` (kept for a look, replacing an older one), so the next save does
    not push the good one it fell back to out of ``checkpoint.old``. Rank 0 only."""
    newest = stage_dir / CHECKPOINT
    if checkpoint.directory == newest or not newest.exists():
        return
    damaged = stage_dir / DAMAGED
    shutil.rmtree(damaged, ignore_errors=True)
    os.rename(newest, damaged)
    fsync_dir(stage_dir)


def load_model(model_dir: Path, dtype: torch.dtype, backend: str = "embedded") -> CausalLM:
    """A model directory written by a stage, on ``backend`` (``"embedded"``/``"transformers"``)."""
    return load_model_dir(model_dir, backend, dtype)


def _load_verified(directory: Path) -> tuple[Checkpoint, torch.Tensor]:
    """The checkpoint in ``directory`` and its RNG state, or IntegrityError naming the file."""
    state_path = directory / STATE_NAME
    if not state_path.is_file():
        raise IntegrityError(f"{state_path} is missing (an incomplete checkpoint)")
    state = read_sealed(state_path)
    if state.get("format_version") != FORMAT_VERSION:
        raise IntegrityError(
            f"{state_path}: format_version {state.get('format_version')!r} is not "
            f"{FORMAT_VERSION} (a checkpoint of another version)"
        )
    next_step, total_steps = state.get("next_step"), state.get("total_steps")
    if not (
        isinstance(next_step, int)
        and isinstance(total_steps, int)
        and 0 <= next_step <= total_steps
    ):
        raise IntegrityError(
            f"{state_path}: next_step {next_step!r} is not in [0, total_steps {total_steps!r}]"
        )
    verify_files(
        directory, state.get("files"), state_path, required=[OPTIMIZER_NAME], model_dirs=[MODEL_DIR]
    )
    rng = _decode_rng(state.get("torch_rng"), state_path)
    optimizer_path = directory / OPTIMIZER_NAME
    try:
        optimizer_state = torch.load(optimizer_path, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise IntegrityError(f"{optimizer_path} cannot be loaded: {err}") from None
    checkpoint = Checkpoint(
        directory=directory,
        model_dir=directory / MODEL_DIR,
        optimizer_state=optimizer_state,
        next_step=next_step,
        total_steps=total_steps,
    )
    return checkpoint, rng


def _decode_rng(encoded: object, source: Path) -> torch.Tensor:
    """The torch CPU RNG state saved as base64, checked by setting it on a scratch generator."""
    try:
        if not isinstance(encoded, str):
            raise ValueError("not a string")
        raw = base64.b64decode(encoded, validate=True)
        rng = torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()
        torch.Generator().set_state(rng)
    except (ValueError, RuntimeError, binascii.Error) as err:
        raise IntegrityError(f"{source}: torch_rng is not a torch RNG state ({err})") from None
    return rng


def _check_finite_weights(model: CausalLM, stage_dir: Path) -> None:
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"{stage_dir}: not writing a checkpoint whose weight {name} is NaN or "
                "infinite; the last good checkpoint is kept"
            )


def _json(data: dict) -> str:
    return json.dumps(data, indent=1, allow_nan=False)
