"""The trainer's progress line for one stage, on ``tqdm`` in a terminal, plain lines elsewhere."""

from __future__ import annotations

import math
import numbers
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TextIO

from tqdm import tqdm

__all__ = ["Progress"]


class _LineWriter(tqdm):
    """tqdm as the terminal writer of a line we format: no bar of its own, no monitor thread."""

    monitor_interval = 0  # tqdm's monitor thread only matters for bars updated by tqdm itself


class Progress:
    """The progress line of one stage::

        sft_fast  37/400 [#-------------------]  loss 1.234  5,120 tok/s  eta 1:05

    On a TTY, tqdm redraws the line in place at most every ``min_interval`` seconds (and
    ``tqdm.write`` from elsewhere prints above it); elsewhere (CI logs, files) a plain line is
    printed at most every ``min_interval * 20`` seconds, since a log wants lines, not the
    carriage returns of a bar. The final step is always shown. Tokens/s and the eta come from
    the last ``window`` updates, so they follow the current speed, not the average since the
    start.

    Args:
        total_steps: steps in the stage, at least 1.
        desc: the label at the start of the line (the stage name).
        stream: where to write (default: ``sys.stderr`` when the bar is made); its
            ``isatty()`` picks the mode.
        enabled: False on ranks other than 0: nothing is written.
        min_interval: seconds between two redraws on a TTY.
        clock: seconds as a float, monotonic; injectable for tests.
        initial_step: the step the stage starts (resumes) from, so the first rate is right.
        window: updates the rates are averaged over.
        bar_width: characters between the brackets.
    """

    def __init__(
        self,
        total_steps: int,
        desc: str,
        *,
        stream: TextIO | None = None,
        enabled: bool = True,
        min_interval: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        initial_step: int = 0,
        window: int = 20,
        bar_width: int = 20,
    ) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
        if not isinstance(desc, str):
            raise TypeError(f"desc must be a str, got {type(desc).__name__}")
        if not isinstance(min_interval, (int, float)) or not min_interval >= 0:
            raise ValueError(f"min_interval must be a number >= 0, got {min_interval!r}")
        if not isinstance(initial_step, int) or not 0 <= initial_step <= total_steps:
            raise ValueError(
                f"initial_step must be an int in [0, total_steps={total_steps}], got "
                f"{initial_step!r}"
            )
        for name, value in (("window", window), ("bar_width", bar_width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.total_steps = total_steps
        self.desc = desc
        self.enabled = bool(enabled)
        self._stream = sys.stderr if stream is None else stream
        self._tty = self.enabled and _isatty(self._stream)
        self._interval = float(min_interval) * (1 if self._tty else 20)
        self._clock = clock
        self._bar_width = bar_width
        # (time, step, tokens of that update); the first entry is the start, with no tokens.
        self._history: deque[tuple[float, int, int]] = deque(maxlen=window + 1)
        self._history.append((clock(), initial_step, 0))
        self._step = initial_step
        self._loss: float | None = None
        self._last_draw: float | None = None
        self._pending = False  # the latest update has not been drawn
        self._drawn = False  # a line is on screen (TTY), to end it on close
        self._closed = False
        # delay=inf: tqdm draws only when asked (refresh), never on its own or on close.
        self._writer = (
            _LineWriter(
                total=total_steps,
                file=self._stream,
                bar_format="{desc}",
                delay=math.inf,
                leave=True,
            )
            if self._tty
            else None
        )

    def update(self, step: int, tokens: int, loss: float | None = None) -> None:
        """Record that ``step`` steps are done; ``tokens`` were processed since the last update.

        Raises:
            ValueError: step outside ``[current step, total_steps]``, negative tokens, or the
                bar is closed.
        """
        if self._closed:
            raise ValueError(f"Progress {self.desc!r} is closed")
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        if not self._step <= step <= self.total_steps:
            raise ValueError(
                f"step must be in [{self._step}, {self.total_steps}] (it never goes back), "
                f"got {step}"
            )
        if isinstance(tokens, bool) or not isinstance(tokens, numbers.Integral) or tokens < 0:
            raise ValueError(f"tokens must be an int >= 0, got {tokens!r}")
        if loss is not None and (isinstance(loss, bool) or not isinstance(loss, numbers.Real)):
            raise TypeError(f"loss must be a number or None, got {type(loss).__name__}")
        now = self._clock()
        self._history.append((now, step, int(tokens)))
        self._step = step
        self._loss = None if loss is None else float(loss)
        self._pending = True
        if not self.enabled:
            return
        due = self._last_draw is None or now - self._last_draw >= self._interval
        if due or step == self.total_steps:
            self._draw(now)

    def close(self) -> None:
        """Show the latest state if it was throttled away and end the line. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        if self._pending:
            self._draw(self._clock())
        if self._writer is not None:
            self._writer.close()
            if self._drawn:
                self._stream.write("\n")
                self._stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def line(self) -> str:
        """The current progress line, without ``"\\r"`` or newline."""
        width = len(str(self.total_steps))
        filled = self._bar_width * self._step // self.total_steps
        bar = "#" * filled + "-" * (self._bar_width - filled)
        parts = [f"{self.desc} {self._step:>{width}}/{self.total_steps} [{bar}]"]
        if self._loss is not None:
            parts.append(f"loss {self._loss:.3f}")
        tokens_per_s, steps_per_s = self._rates()
        parts.append("? tok/s" if tokens_per_s is None else f"{tokens_per_s:,.0f} tok/s")
        remaining = self.total_steps - self._step
        if remaining == 0:
            eta = "0:00"
        elif steps_per_s:
            eta = _format_duration(remaining / steps_per_s)
        else:
            eta = "?"
        parts.append(f"eta {eta}")
        return "  ".join(parts)

    def _rates(self) -> tuple[float | None, float | None]:
        """(tokens/s, steps/s) over the window; None before any time has passed."""
        t_first, step_first, _ = self._history[0]
        t_last, step_last, _ = self._history[-1]
        elapsed = t_last - t_first
        if elapsed <= 0:
            return None, None
        # The oldest entry's tokens were processed before the window began.
        tokens = sum(t for _, _, t in list(self._history)[1:])
        return tokens / elapsed, (step_last - step_first) / elapsed

    def _draw(self, now: float) -> None:
        text = self.line()
        if self._writer is not None:
            # "\r" + text, padded over what is left of a longer line before it.
            self._writer.set_description_str(text, refresh=False)
            self._writer.refresh()
            self._drawn = True
        else:
            self._stream.write(text + "\n")
            self._stream.flush()
        self._last_draw = now
        self._pending = False


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _format_duration(seconds: float) -> str:
    """``m:ss`` below an hour, ``h:mm:ss`` above."""
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
