"""Where the smoke kit's op calls go: the NPU kernels, or the same host code compiled for CPU.

``NpuBackend`` is the real path (the dispatcher ops on NPU tensors); ``TwinBackend`` sends the
same calls to the CPU twin of the host code (tests/ascend_host_build.py), which is how
tests/test_ascend_smoke.py runs the kit on a machine without an NPU.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any

import torch

from .. import _native
from ..ops.packed_attention import _npu_fusion_attention
from .errors import BackendUnavailableError, first_line

# The dispatcher ops the kit checks (csrc/ops.cpp).
OPS = ("sparse_kd_fused", "packed_attention_fwd", "packed_attention_bwd")


class Backend:
    """Runs the three ops on one device; subclasses say which implementation.

    Every op method takes the positional arguments of its schema in csrc/ops.cpp, with tensors
    already on ``device``, and returns the schema's outputs on that device.
    """

    name = "backend"
    device = torch.device("cpu")

    def describe(self) -> dict[str, Any]:
        """Chip and device facts for the environment section."""
        return {}

    def to_device(self, x: Any) -> Any:
        """``x`` on ``device`` when it is a tensor; other arguments as they are."""
        return x.to(self.device) if isinstance(x, torch.Tensor) else x

    def synchronize(self) -> None:
        """Wait for the device; kernel errors of an asynchronous device surface here."""

    def sparse_kd_fused(self, *args: Any) -> tuple[torch.Tensor, ...]:
        """``(loss [], grad_hidden [N, d], grad_weight [V, d], grad_bias [V] or [0], stats)``.

        ``stats [N, 6]`` are KDStats' columns (docs/kd-losses.md).
        """
        raise NotImplementedError

    def packed_attention_fwd(self, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out [T, Hq, D], lse [Hq, T])``."""
        raise NotImplementedError

    def packed_attention_bwd(self, *args: Any) -> tuple[torch.Tensor, ...]:
        """``(grad_q [T, Hq, D], grad_k [T, Hkv, D], grad_v [T, Hkv, D])``."""
        raise NotImplementedError

    def has_fusion_attention(self) -> bool:
        """Whether ``fusion_attention`` (the vendor's fused attention, the baseline) exists here."""
        return False

    def fusion_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """``out [T, Hq, D]`` of the vendor's fused attention on the same packed inputs."""
        raise NotImplementedError


class NpuBackend(Backend):
    """The real path: ``torch.ops.pangu_fastkd.*`` on NPU tensors (the PrivateUse1 kernels)."""

    name = "npu"

    def __init__(self, device: str = "npu:0") -> None:
        """Refuse, with the one line the kit prints, unless the kernels can run on ``device``.

        Raises:
            BackendUnavailableError: no extension, no torch_npu, no Ascend kernels in the build,
                no NPU, or ``device`` is not a visible NPU.
        """
        if not _native.native_available():
            raise BackendUnavailableError(
                "the C++ extension pangu_fastkd._C is not built; run "
                "`pip install --no-build-isolation -e .`"
            )
        if importlib.util.find_spec("torch_npu") is None:
            raise BackendUnavailableError(
                "torch_npu is not installed, so there is no NPU to test "
                f"(torch {torch.__version__}; install the torch_npu of the same version)"
            )
        try:
            self.torch_npu = importlib.import_module("torch_npu")
        except Exception as exc:  # torch_npu raises all sorts when CANN or the driver is off
            raise BackendUnavailableError(f"import torch_npu failed: {first_line(exc)}") from exc
        info = _native.build_info()
        if not info.get("ascend"):
            raise BackendUnavailableError(
                "this build of pangu_fastkd does not include the Ascend C kernels "
                f"({info.get('ascend_skipped', 'no reason given')}); rebuild with "
                "`pip install --no-build-isolation -e .` after sourcing CANN's set_env.sh"
            )
        npu = getattr(torch, "npu", None)
        if npu is None or not npu.is_available() or npu.device_count() == 0:
            raise BackendUnavailableError(
                "torch_npu sees no NPU (torch.npu.is_available() is False); check `npu-smi info`"
                " and ASCEND_RT_VISIBLE_DEVICES"
            )
        try:
            self.device = torch.device(device)
        except RuntimeError as exc:
            raise BackendUnavailableError(f"--device {device!r}: {first_line(exc)}") from exc
        if self.device.type != "npu":
            raise BackendUnavailableError(f"--device must be an npu device, got {device!r}")
        index = self.device.index or 0
        if index >= npu.device_count():
            raise BackendUnavailableError(
                f"--device {device}: only {npu.device_count()} NPU(s) visible"
            )
        npu.set_device(self.device)

    def describe(self) -> dict[str, Any]:
        npu = torch.npu  # type: ignore[attr-defined]
        return {
            "device": str(self.device),
            "chip": npu.get_device_name(self.device.index or 0),
            "device_count": npu.device_count(),
            "registered_npu_kernels": [op for op in OPS if _native.npu_kernel_available(op)],
        }

    def synchronize(self) -> None:
        torch.npu.synchronize()  # type: ignore[attr-defined]

    def sparse_kd_fused(self, *args: Any) -> tuple[torch.Tensor, ...]:
        return tuple(torch.ops.pangu_fastkd.sparse_kd_fused(*args))

    def packed_attention_fwd(self, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = torch.ops.pangu_fastkd.packed_attention_fwd(*args)
        return out, lse

    def packed_attention_bwd(self, *args: Any) -> tuple[torch.Tensor, ...]:
        return tuple(torch.ops.pangu_fastkd.packed_attention_bwd(*args))

    def has_fusion_attention(self) -> bool:
        return hasattr(self.torch_npu, "npu_fusion_attention")

    def fusion_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float
    ) -> torch.Tensor:
        # pangu_fastkd's own npu_fusion_attention path (TND, sparse_mode 3, GQA via head_num).
        out, _ = _npu_fusion_attention(q, k, v, cu.tolist(), scale, True, False)
        return out


class TwinBackend(Backend):
    """The same host code and kernels compiled for CPU (tests/ascend_host_build.py::host_twin).

    ``module`` exposes ``sparse_kd_fused``, ``packed_attention_fwd`` and ``packed_attention_bwd``
    taking CPU tensors and the schema's arguments. Its times measure the CPU emulation, nothing
    about an NPU.
    """

    name = "twin"

    def __init__(self, module: ModuleType) -> None:
        self.module = module

    def describe(self) -> dict[str, Any]:
        info = dict(self.module.build_info())
        return {"device": "cpu", "chip": f"CPU twin of {info['soc_version']}", "twin": info}

    def sparse_kd_fused(self, *args: Any) -> tuple[torch.Tensor, ...]:
        return tuple(self.module.sparse_kd_fused(*args))

    def packed_attention_fwd(self, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = self.module.packed_attention_fwd(*args)
        return out, lse

    def packed_attention_bwd(self, *args: Any) -> tuple[torch.Tensor, ...]:
        return tuple(self.module.packed_attention_bwd(*args))
