"""TensorBoard scalars of the training steps (``[logging] tensorboard = true``).

Every train record of ``metrics.jsonl`` goes to TensorBoard as scalars ``train/<key>`` (every
finite number of the record but ``step``) at the stage's step, in one event directory per stage,
``<run_dir>/tensorboard/<stage>`` (teachers trained here: ``tensorboard/teacher <name>``), so
``tensorboard --logdir <run_dir>`` shows each stage as a run. Only rank 0 writes.

The event files of a stage are a copy of its records in ``metrics.jsonl``. When a stage starts
(or resumes), its event directory is deleted and the records the metrics log holds for it are
written again before its first new step: the log has just been cut at the checkpoint the stage
resumes from, so a step redone after a resume never shows twice, and the events a killed run had
not flushed yet are back. The replayed events carry the replay's wall time.

``tensorboard`` is an optional dependency (the ``tensorboard`` extra); ``require_tensorboard``
fails before a run starts when it is asked for and missing.
"""

from __future__ import annotations

import math
import numbers
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "TENSORBOARD_DIR",
    "MissingTensorBoardError",
    "StageTensorBoard",
    "require_tensorboard",
]

TENSORBOARD_DIR = "tensorboard"
TENSORBOARD_HINT = (
    "pip install 'tensorboard>=2.14' (or the extra: pip install -e '.[tensorboard]'), or set "
    "logging.tensorboard = false"
)
# Seconds between flushes of the event file: a run watched live shows its steps this late.
FLUSH_SECS = 10


class MissingTensorBoardError(ImportError):
    """``[logging] tensorboard = true``, and the ``tensorboard`` package is not importable."""


def require_tensorboard() -> type:
    """``torch.utils.tensorboard.SummaryWriter``, or ``MissingTensorBoardError`` saying what to
    install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # not installed, or a broken install
        raise MissingTensorBoardError(
            f"[logging] tensorboard = true needs the tensorboard package, which is not "
            f"importable ({err}): {TENSORBOARD_HINT}"
        ) from err
    return SummaryWriter


class StageTensorBoard:
    """The TensorBoard event directory of one training stage.

    Args:
        log_dir: the stage's event directory (deleted and made again).
        replay: the stage's train records already in ``metrics.jsonl``, written first.
        enabled: False on ranks other than 0 (and with TensorBoard off): every method is then a
            no-op and nothing is imported or touched.

    Raises:
        MissingTensorBoardError: enabled, and ``tensorboard`` is not installed.
    """

    def __init__(
        self, log_dir: str | Path, *, replay: Iterable[dict[str, Any]] = (), enabled: bool = True
    ) -> None:
        self.log_dir = Path(log_dir)
        self._writer = None
        if not enabled:
            return
        writer_class = require_tensorboard()
        shutil.rmtree(self.log_dir, ignore_errors=True)
        self._writer = writer_class(str(self.log_dir), flush_secs=FLUSH_SECS)
        for record in replay:
            self.log(record)

    def log(self, record: dict[str, Any]) -> None:
        """Writes the finite numbers of a train record (``metrics.jsonl``'s form) at its step."""
        if self._writer is None:
            return
        for key, value in record.items():
            if key != "step" and _is_finite_number(value):
                self._writer.add_scalar(f"train/{key}", float(value), record["step"])

    def close(self) -> None:
        """Flushes and closes the event file. Closing twice is allowed."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _is_finite_number(value: Any) -> bool:
    # bool is an Integral; "skipped": true is not a curve. None is a non-finite float there.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return math.isfinite(value)
