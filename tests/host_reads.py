"""Count the reads of tensor values back to the host (``tolist``, ``item``, ``cpu``, ``int()``,
``bool()``, ``float()``) a call makes: on an NPU each one waits for the device stream."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

_READS = ("tolist", "item", "cpu", "__int__", "__bool__", "__float__", "__index__")


def count_host_reads(monkeypatch: pytest.MonkeyPatch, call: Callable[[], object]) -> int:
    """How many host reads ``call()`` makes (the patches are undone before returning)."""
    count = 0

    def spy(real: Callable[..., object]) -> Callable[..., object]:
        def read(self: torch.Tensor, *args: object, **kwargs: object) -> object:
            nonlocal count
            count += 1
            return real(self, *args, **kwargs)

        return read

    with monkeypatch.context() as patch:
        for name in _READS:
            patch.setattr(torch.Tensor, name, spy(getattr(torch.Tensor, name)))
        call()
    return count
