"""Loads the compiled extension ``pangu_fastkd._C``, which registers ``torch.ops.pangu_fastkd``.

Without it (a source checkout that was never built) every op falls back to its PyTorch
reference, and ``require_native`` says how to build it.
"""

from __future__ import annotations

import importlib
from typing import Any

_IMPORT_ERROR: str | None = None
try:
    _C: Any = importlib.import_module("pangu_fastkd._C")
except ImportError as exc:  # pragma: no cover - depends on the build
    _C = None
    _IMPORT_ERROR = str(exc)


def native_available() -> bool:
    """True when the C++ extension is built and its ops are registered."""
    return _C is not None


def require_native() -> None:
    """Raise a RuntimeError that says how to build the extension when it is missing."""
    if _C is None:
        raise RuntimeError(
            "pangu_fastkd's C++ extension is not built (import failed: "
            f"{_IMPORT_ERROR}); run `pip install --no-build-isolation -e .`"
        )


def build_info() -> dict[str, Any]:
    """What this build contains: vector ISA, Ascend kernels, chunk memory budget."""
    if _C is None:
        return {"native": False, "error": _IMPORT_ERROR}
    return {"native": True, **_C.build_info()}
