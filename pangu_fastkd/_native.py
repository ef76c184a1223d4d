"""Loads the compiled extensions: ``pangu_fastkd._C``, which registers ``torch.ops.pangu_fastkd``
(schemas and CPU kernels), and, when built, ``pangu_fastkd._ascend`` (the NPU kernels).

Without ``_C`` (a source checkout that was never built) every op falls back to its PyTorch
reference, and ``require_native`` says how to build it. Without ``_ascend``, ``build_info()``
says why (see ``pangu_fastkd/_ascend_build.py`` and ``docs/ascend.md``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any

import torch

from . import _ascend_build

_IMPORT_ERROR: str | None = None
try:
    _C: Any = importlib.import_module("pangu_fastkd._C")
except ImportError as exc:  # pragma: no cover - depends on the build
    _C = None
    _IMPORT_ERROR = str(exc)

# Kernel sources of a source checkout, and the build directory where setup.py records why an
# optional Ascend build failed; absent in a wheel, where only the build's contents count.
_KERNEL_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "csrc", "ascend")
_BUILD_ROOT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "build")


def _load_ascend() -> tuple[Any, str]:
    """The ``_ascend`` module, or None and the reason this build has no Ascend kernels."""
    if _C is None:
        return None, "the C++ extension pangu_fastkd._C is not built"
    if importlib.util.find_spec("pangu_fastkd._ascend") is None:
        try:
            plan = _ascend_build.plan_ascend_build(
                kernel_dir=_KERNEL_DIR if os.path.isdir(_KERNEL_DIR) else None
            )
        except (ValueError, RuntimeError) as exc:
            return None, str(exc)
        if not plan.enabled:
            return None, plan.reason
        failed = _ascend_build.recorded_skip(_BUILD_ROOT)
        if failed is not None:
            return None, failed
        return None, "this build does not include them: rebuild with `pip install -e .`"
    try:
        # torch_npu registers the NPU device (PrivateUse1) that _ascend's kernels attach to.
        importlib.import_module("torch_npu")
        return importlib.import_module("pangu_fastkd._ascend"), ""
    except ImportError as exc:  # pragma: no cover - needs an Ascend build
        return None, f"pangu_fastkd._ascend failed to load: {exc}"


_ASCEND, _ASCEND_REASON = _load_ascend()


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


def npu_kernel_available(op: str) -> bool:
    """True when ``torch.ops.pangu_fastkd.<op>`` has an NPU (PrivateUse1) kernel registered.

    Asked of the dispatcher rather than of ``_ascend``, so it reflects what a call on an ``npu``
    tensor would actually run.
    """
    if _C is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"pangu_fastkd::{op}", "PrivateUse1")


def build_info() -> dict[str, Any]:
    """What this build contains: vector ISA, Ascend kernels, chunk memory budget.

    ``ascend`` is True when the Ascend C kernels are loaded (then ``ascend_soc_version`` and
    ``ascend_kernels`` say for which chip and which kernels); otherwise ``ascend_skipped`` says why.
    """
    if _C is None:
        return {"native": False, "error": _IMPORT_ERROR, "ascend": False,
                "ascend_skipped": _ASCEND_REASON}  # fmt: skip
    info: dict[str, Any] = {"native": True, **_C.build_info()}
    if _ASCEND is None:
        info.update(ascend=False, ascend_skipped=_ASCEND_REASON)
    else:  # pragma: no cover - needs an Ascend build
        ascend = _ASCEND.build_info()
        info.update(
            ascend=True,
            ascend_soc_version=ascend["soc_version"],
            ascend_kernels=list(ascend["kernels"]),
        )
    return info
