"""First-run kit for an Ascend NPU: environment, correctness and timing of every Ascend C kernel.

Run it on an Atlas 800T A2 (Ascend 910B) or Atlas 200I A2 (Ascend 310B) right after
``pip install --no-build-isolation -e .`` with CANN and torch_npu installed, and paste its whole
output into the bug report::

    source /usr/local/Ascend/ascend-toolkit/set_env.sh
    python -m pangu_fastkd.ascend_smoke                   # full grid, with timing, on npu:0
    python -m pangu_fastkd.ascend_smoke --quick           # small grid (about a minute)
    python -m pangu_fastkd.ascend_smoke --no-timing       # correctness only
    python -m pangu_fastkd.ascend_smoke --json smoke.json --device npu:1

It prints the environment (pangu_fastkd version and ``build_info()``, torch, torch_npu, CANN
version, chip, device count, ``npu-smi info`` when that tool is there), then one markdown table
with a row per (op, case, dtype) and an overall ``PASS``/``FAIL`` line. Exit status: 0 when every
row passes, 1 when a row fails, 2 when it cannot run at all (no torch_npu, no NPU, or a build
without the Ascend C kernels; that is said in one line). Progress goes to stderr, one line per
row, so a hang shows which case it was in.

What is checked (the project's rule, as in tests/test_ascend_host*.py): each kernel's outputs
are compared with the PyTorch references of ``pangu_fastkd.ops`` run in float64 on the CPU on
the same (rounded) inputs. A row passes when, for each output, ``max |ours - exact|`` is at most
``2 x max |plain PyTorch - exact| + 1e-5 x max |exact|``, where plain PyTorch is the same math in
the row's dtype (for fp32 that is a tight bound). The ``worst`` column names the output closest
to (or furthest over) its bound.

- ``sparse_kd_fused``: ``torch.ops.pangu_fastkd.sparse_kd_fused`` (loss, per-row losses from its
  statistics, gradients of hidden, weight and bias) against ``sparse_kd_reference`` + autograd;
  timed against the reference's forward + backward on the same device.
- ``packed_attention fwd`` (out, lse) and ``packed_attention fwd+bwd`` (grads of q, k, v):
  ``packed_attention_fwd`` / ``_bwd`` against ``packed_attention_reference`` + autograd; timed
  against ``torch_npu.npu_fusion_attention`` in TND layout (the project's own fallback,
  ``pangu_fastkd.ops.packed_attention._npu_fusion_attention``) and the reference.

Times are medians of ``--reps`` calls after warmup, each call followed by a device
synchronisation; ``speedup`` is baseline time / our time (above 1: ours is faster).

The op calls go through a backend object: ``NpuBackend`` (the dispatcher ops on NPU tensors, the
real path) or ``TwinBackend`` (the same host code compiled for CPU, tests/ascend_host_build.py),
which is how tests/test_ascend_smoke.py runs this kit on a machine without an NPU.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import importlib.util
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any

import torch

from . import __version__, _native
from ._ascend_build import DEFAULT_CANN_PATH
from .ops.packed_attention import _npu_fusion_attention
from .ops.packed_attention_reference import cu_seqlens_from_lengths, packed_attention_reference
from .ops.sparse_kd_reference import sparse_kd_reference
from .ops.sparse_kd_targets import DIVERGENCES, MISSING_MASS_MODES, TopKTarget

__all__ = [
    "AttentionCase",
    "Backend",
    "BackendUnavailableError",
    "NpuBackend",
    "Row",
    "SparseKDCase",
    "TwinBackend",
    "attention_cases",
    "cann_version",
    "environment",
    "main",
    "markdown_table",
    "run_grid",
    "sparse_kd_cases",
]

PROG = "pangu_fastkd.ascend_smoke"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IGNORE = -100
# The absolute part of every bound, relative to the largest exact value: what fp32 round-off
# across a different summation order can reach, far below any bf16/fp16 error.
FLOOR = 1e-5
# Environment variables naming the CANN toolkit, in the order set_env.sh users have them.
CANN_ENV_VARS = ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME", "ASCEND_CANN_PACKAGE_PATH")
OPS = ("sparse_kd_fused", "packed_attention_fwd", "packed_attention_bwd")


# ---------------------------------------------------------------------------------------------
# Backends: where the op calls go


class BackendUnavailableError(RuntimeError):
    """The kit cannot run here; the message is the one line it prints."""


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
        return x.to(self.device) if isinstance(x, torch.Tensor) else x

    def synchronize(self) -> None:
        """Wait for the device; kernel errors of an asynchronous device surface here."""

    def sparse_kd_fused(self, *args: Any) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def packed_attention_fwd(self, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def packed_attention_bwd(self, *args: Any) -> tuple[torch.Tensor, ...]:
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
            raise BackendUnavailableError(f"import torch_npu failed: {_first_line(exc)}") from exc
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
            raise BackendUnavailableError(f"--device {device!r}: {_first_line(exc)}") from exc
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
        out, _ = _npu_fusion_attention(q, k, v, cu, scale, True, False)
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


# ---------------------------------------------------------------------------------------------
# Environment


def cann_version(
    env: Mapping[str, str] | None = None, default_root: str = DEFAULT_CANN_PATH
) -> tuple[str, str]:
    """The CANN toolkit version and the file it was read from, or ``"unknown"`` and why.

    Looks in ``$ASCEND_HOME_PATH``, ``$ASCEND_TOOLKIT_HOME``, ``$ASCEND_CANN_PACKAGE_PATH`` and
    ``default_root``, in that order, for the first file with a ``version=`` line among
    ``version.info``, ``*/ascend_toolkit_install.info`` (``<arch>-linux/`` in CANN 7/8),
    ``compiler/version.info`` and ``runtime/version.info``.

    Returns:
        ``(version, source)``: source is the file's path, or the reason when nothing was found.
    """
    env = os.environ if env is None else env
    roots = [env[name] for name in CANN_ENV_VARS if env.get(name)] + [default_root]
    tried = []
    for root in dict.fromkeys(roots):  # ordered, without repeats
        if not os.path.isdir(root):
            tried.append(f"{root} (no such directory)")
            continue
        tried.append(root)
        patterns = (
            "version.info",
            "*/ascend_toolkit_install.info",
            "compiler/version.info",
            "runtime/version.info",
        )
        for pattern in patterns:
            for path in sorted(glob.glob(os.path.join(root, pattern))):
                version = _read_version_line(path)
                if version:
                    return version, path
    return "unknown", "no version.info or ascend_toolkit_install.info with a version= line in " + (
        ", ".join(tried)
    )


def _read_version_line(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition("=")
                if sep and key.strip().lower() == "version" and value.strip():
                    return value.strip()
    except OSError:
        return None
    return None


def environment(backend: Backend) -> dict[str, Any]:
    """Everything a bug report needs about the machine, the build and the device."""
    torch_npu = sys.modules.get("torch_npu")
    version, source = cann_version()
    info: dict[str, Any] = {
        "pangu_fastkd": __version__,
        "build_info": _native.build_info(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_npu": getattr(torch_npu, "__version__", "not loaded") if torch_npu else "not loaded",
        "cann_version": version,
        "cann_version_source": source,
        "backend": backend.name,
    }
    try:
        info.update(backend.describe())
    except Exception as exc:
        info["describe_error"] = _first_line(exc)
    smi = _npu_smi()
    if smi:
        info["npu_smi"] = smi
    return info


def _npu_smi() -> str | None:
    """``npu-smi info`` when the tool is installed (optional: never needed, never fatal)."""
    if shutil.which("npu-smi") is None:
        return None
    try:
        done = subprocess.run(
            ["npu-smi", "info"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"npu-smi info failed: {_first_line(exc)}"
    return (done.stdout or done.stderr).rstrip()


def _environment_lines(env: Mapping[str, Any]) -> list[str]:
    lines = [f"## {PROG}", ""]
    skip = {"npu_smi", "build_info"}
    lines.append(f"- build_info: `{env['build_info']}`")
    lines += [f"- {key}: {value}" for key, value in env.items() if key not in skip]
    if "npu_smi" in env:
        lines += ["", "npu-smi info:", "```", env["npu_smi"], "```"]
    return lines


# ---------------------------------------------------------------------------------------------
# Cases


@dataclass(frozen=True)
class SparseKDCase:
    """One ``sparse_kd_fused`` problem (option names as in ``fused_linear_sparse_kd``)."""

    name: str
    n: int
    vocab: int
    d: int
    k: int = 8
    target: bool = True  # a TopKTarget; False: cross-entropy only (kd_weight must be 0)
    bias: bool = False
    kd_weight: float = 0.7
    divergence: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    cache_temperature: float = 1.0
    missing_mass: str = "tail"
    include_label: bool = True
    z_loss: float = 0.0
    chunk_rows: int = 0
    seed: int = 0


@dataclass(frozen=True)
class AttentionCase:
    """One packed-attention problem: document lengths, query and kv heads, head dim."""

    name: str
    lengths: tuple[int, ...]
    hq: int
    hkv: int
    d: int
    seed: int = 0


def sparse_kd_cases(quick: bool) -> list[SparseKDCase]:
    """Odd vocabularies (not a multiple of any tile), ignored rows, a label outside the top-K."""
    cases = [
        SparseKDCase("fkl-tail-label", n=37, vocab=1271, d=64, bias=True),
        SparseKDCase(
            "rkl-renorm",
            n=29,
            vocab=999,
            d=48,
            k=16,
            kd_weight=1.0,
            divergence="reverse_kl",
            temperature=2.0,
            missing_mass="renorm",
            include_label=False,
            seed=1,
        ),
        SparseKDCase("ce-only", n=33, vocab=1001, d=40, target=False, kd_weight=0.0, z_loss=1e-3),
    ]
    if not quick:
        cases += [
            SparseKDCase(
                "jsd-tail-chunks",
                n=256,
                vocab=4099,
                d=256,
                k=20,
                divergence="jsd",
                beta=0.3,
                chunk_rows=64,
                seed=2,
            ),
            SparseKDCase("fkl-tail-1k-rows", n=1024, vocab=16001, d=512, k=32, kd_weight=0.5),
            SparseKDCase(
                "ce-only-32k", n=512, vocab=32003, d=256, target=False, kd_weight=0.0, seed=3
            ),
        ]
    return cases


def attention_cases(quick: bool) -> list[AttentionCase]:
    """Ragged documents with a length-1 one; GQA and MHA; head dims 64 and 128."""
    cases = [
        AttentionCase("gqa42-d64", (1, 150, 13, 5), hq=4, hkv=2, d=64),
        AttentionCase("mha22-d128", (77, 1, 64), hq=2, hkv=2, d=128, seed=1),
    ]
    if not quick:
        cases += [
            AttentionCase("mqa81-d64-1k", (1, 600, 3, 420), hq=8, hkv=1, d=64, seed=2),
            AttentionCase("gqa82-d128-2k", (1, 1000, 517, 30, 500), hq=8, hkv=2, d=128, seed=3),
        ]
    return cases


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class Row:
    """One line of the table: an (op, case, dtype) and how it went."""

    op: str
    case: str
    dtype: str
    passed: bool = False
    worst: str = ""  # the output with the largest error / allowed ratio
    error: float | None = None
    allowed: float | None = None
    ours_ms: float | None = None
    baseline: str = ""
    baseline_ms: float | None = None
    reference_ms: float | None = None  # attention only: the reference besides the baseline
    note: str = ""
    outputs: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        if self.ours_ms and self.baseline_ms:
            return self.baseline_ms / self.ours_ms
        return None


@dataclass(frozen=True)
class _Output:
    """One compared output: our error, plain PyTorch's error, both against the exact result."""

    name: str
    error: float
    pytorch_error: float
    scale: float

    @property
    def allowed(self) -> float:
        return 2 * self.pytorch_error + FLOOR * self.scale


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.detach().cpu().double() - b.detach().cpu().double()).abs().max().item()


def _max_abs(t: torch.Tensor) -> float:
    return t.detach().abs().max().item() if t.numel() else 0.0


def _compare(
    name: str, ours: torch.Tensor, exact: torch.Tensor, plain: torch.Tensor, dtype: torch.dtype
) -> _Output:
    if tuple(ours.shape) != tuple(exact.shape):
        raise ValueError(f"{name} has shape {tuple(ours.shape)}, expected {tuple(exact.shape)}")
    if ours.dtype != dtype:
        raise TypeError(f"{name} is {ours.dtype}, expected {dtype}")
    return _Output(name, _max_err(ours, exact), _max_err(plain, exact), _max_abs(exact))


def _judge(row: Row, outputs: Sequence[_Output]) -> None:
    """Fill the row's verdict from its outputs; NaN errors fail (NaN <= x is False)."""

    def ratio(o: _Output) -> float:
        if math.isnan(o.error):
            return math.inf
        return o.error / o.allowed if o.allowed > 0 else (0.0 if o.error == 0 else math.inf)

    worst = max(outputs, key=ratio)
    row.worst, row.error, row.allowed = worst.name, worst.error, worst.allowed
    row.passed = all(o.error <= o.allowed for o in outputs)
    row.outputs = {
        o.name: {"error": o.error, "pytorch_error": o.pytorch_error, "allowed": o.allowed}
        for o in outputs
    }


# ---------------------------------------------------------------------------------------------
# sparse_kd_fused


def _sparse_kd_inputs(case: SparseKDCase) -> dict[str, torch.Tensor | None]:
    """float32 CPU inputs: hidden [N, d], weight [V, d], bias [V], labels [N], a top-K target.

    Rows 1 and 5 are ignored; every third row's label is the teacher's top-1 (inside the
    support), the others' a random token (usually outside it, so include_label adds a slot).
    The student logits have std ~3, so the tail bucket's student mass never underflows.
    """
    g = torch.Generator().manual_seed(case.seed)
    n, vocab, d = case.n, case.vocab, case.d
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(vocab, d, generator=g) * (3.0 / math.sqrt(d))
    bias = torch.randn(vocab, generator=g) if case.bias else None
    teacher = torch.randn(n, vocab, generator=g) * 2.0
    ids = teacher.topk(case.k, dim=1).indices
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::3] = ids[::3, 0]
    inputs: dict[str, torch.Tensor | None] = {
        "hidden": hidden,
        "weight": weight,
        "bias": bias,
        "labels": labels.clone().index_fill_(0, torch.tensor([1, 5]), IGNORE),
        "ids": None,
        "teacher_logits": None,
        "teacher_lse": None,
        "label_logit": None,
    }
    if case.target:
        inputs.update(
            ids=ids.to(torch.int32),
            teacher_logits=teacher.gather(1, ids),
            teacher_lse=torch.logsumexp(teacher / case.cache_temperature, dim=1),
            label_logit=teacher.gather(1, labels[:, None]).squeeze(1),
        )
    return inputs


def _sparse_kd_args(case: SparseKDCase, x: Mapping[str, torch.Tensor | None]) -> list[Any]:
    """Positional arguments of ``torch.ops.pangu_fastkd.sparse_kd_fused`` (csrc/ops.cpp)."""
    return [
        x["hidden"],
        x["weight"],
        x["bias"],
        x["labels"],
        x["ids"],
        x["teacher_logits"],
        x["teacher_lse"],
        x["label_logit"],
        None,  # sample_weights: top-K targets only here
        case.kd_weight,
        DIVERGENCES.index(case.divergence),
        case.beta,
        case.temperature,
        case.cache_temperature,
        MISSING_MASS_MODES.index(case.missing_mass),
        case.include_label and case.target,
        IGNORE,
        0.0,  # softcap: not set
        case.z_loss,
        1,  # reduction: mean
        0.0,  # num_items: not set
        case.chunk_rows,
        True,  # need_grad_input
        True,  # need_grad_weight
        True,  # compute_stats
    ]


def _sparse_kd_reference(
    case: SparseKDCase, x: Mapping[str, torch.Tensor | None]
) -> tuple[torch.Tensor, ...]:
    """``sparse_kd_reference`` + autograd: (loss, grad_hidden, grad_weight, grad_bias, stats)."""
    hidden, weight = (x[name].detach().clone().requires_grad_() for name in ("hidden", "weight"))
    bias = x["bias"].detach().clone().requires_grad_() if x["bias"] is not None else None
    target = None
    if case.target:
        target = TopKTarget(
            x["ids"], x["teacher_logits"], x["teacher_lse"], x["label_logit"],
            case.cache_temperature,
        )  # fmt: skip
    loss, stats = sparse_kd_reference(
        hidden,
        weight,
        x["labels"],
        target,
        bias=bias,
        kd_weight=case.kd_weight,
        divergence=case.divergence,
        beta=case.beta,
        temperature=case.temperature,
        missing_mass=case.missing_mass,
        include_label=case.include_label if case.target else None,
        ignore_index=IGNORE,
        reduction="mean",
        z_loss=case.z_loss,
    )
    loss.backward()
    grad_bias = bias.grad if bias is not None else hidden.new_empty(0)
    return loss.detach(), hidden.grad, weight.grad, grad_bias, stats.detach()


def _row_losses(case: SparseKDCase, stats: torch.Tensor) -> torch.Tensor:
    """Per-row losses from the ``[N, 6]`` statistics (KDStats' columns, docs/kd-losses.md)."""
    s = stats.detach().cpu().double()
    kd = case.kd_weight * case.temperature**2 * s[:, 0]
    return kd + (1 - case.kd_weight) * s[:, 1] + case.z_loss * s[:, 4] ** 2


def _cast(x: Mapping[str, torch.Tensor | None], dtype: torch.dtype) -> dict[str, Any]:
    """The floating inputs in ``dtype``; ids and labels as they are."""
    return {
        key: t.to(dtype) if t is not None and t.is_floating_point() else t for key, t in x.items()
    }


def _check_sparse_kd(
    backend: Backend, case: SparseKDCase, dtype: torch.dtype, row: Row
) -> list[Any]:
    """Compare our outputs with the float64 reference; returns the device arguments for timing."""
    x = _cast(_sparse_kd_inputs(case), dtype)
    # Exact: the reference in float64 on the rounded values; plain: the reference in dtype.
    exact = _sparse_kd_reference(case, _cast(x, torch.float64))
    plain = _sparse_kd_reference(case, x)
    device_args = [backend.to_device(a) for a in _sparse_kd_args(case, x)]
    ours = backend.sparse_kd_fused(*device_args)
    backend.synchronize()
    loss, grad_hidden, grad_weight, grad_bias, stats = (t.cpu() for t in ours)

    rows_exact, rows_plain = _row_losses(case, exact[4]), _row_losses(case, plain[4])
    supervised = int((x["labels"] != IGNORE).sum())
    # The scalar loss is one sample: plain PyTorch's budget is the mean of its row errors.
    loss_budget = (rows_plain - rows_exact).abs().sum().item() / max(supervised, 1)
    if stats.shape != exact[4].shape:
        raise ValueError(f"stats has shape {tuple(stats.shape)}, expected {tuple(exact[4].shape)}")
    outputs = [
        _Output("loss", _max_err(loss, exact[0]), loss_budget, _max_abs(exact[0])),
        _compare("row_loss", _row_losses(case, stats), rows_exact, rows_plain, torch.float64),
        _compare("grad_hidden", grad_hidden, exact[1], plain[1], dtype),
        _compare("grad_weight", grad_weight, exact[2], plain[2], dtype),
    ]
    if case.bias:
        outputs.append(_compare("grad_bias", grad_bias, exact[3], plain[3], dtype))
    _judge(row, outputs)
    return device_args


def _time_sparse_kd(
    backend: Backend, case: SparseKDCase, device_args: list[Any], timer: _Timer, row: Row
) -> None:
    row.ours_ms = timer(lambda: backend.sparse_kd_fused(*device_args))
    names = ("hidden", "weight", "bias", "labels", "ids", "teacher_logits", "teacher_lse")
    x = dict(zip((*names, "label_logit"), device_args[:8], strict=True))
    row.baseline = "reference"

    def reference() -> None:
        _sparse_kd_reference(case, x)

    row.baseline_ms = _time_baseline(timer, reference, row, "reference")


# ---------------------------------------------------------------------------------------------
# packed attention


def _attention_inputs(
    case: AttentionCase, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k/v [T, Hkv, D], grad_out [T, Hq, D] in ``dtype``; cu_seqlens [B + 1]."""
    g = torch.Generator().manual_seed(case.seed)
    t = sum(case.lengths)
    q = torch.randn(t, case.hq, case.d, generator=g).to(dtype)
    k = torch.randn(t, case.hkv, case.d, generator=g).to(dtype)
    v = torch.randn(t, case.hkv, case.d, generator=g).to(dtype)
    grad_out = torch.randn(t, case.hq, case.d, generator=g).to(dtype)
    return q, k, v, grad_out, cu_seqlens_from_lengths(case.lengths)


def _plain_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch attention with every product and the softmax in the inputs' dtype.

    ``packed_attention_reference`` computes in float32 whatever the inputs, so it cannot stand
    for "plain PyTorch in bf16"; this is the baseline of tests/test_ascend_host_attention.py.
    """
    group = q.shape[1] // k.shape[1]
    outs, lses = [], []
    for start, end in itertools.pairwise(cu.tolist()):
        qd = q[start:end].transpose(0, 1)  # [Hq, L, D]
        kd = k[start:end].repeat_interleave(group, dim=1).transpose(0, 1)
        vd = v[start:end].repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (qd @ kd.transpose(1, 2)) * scale  # [Hq, L, L]
        future = torch.ones(end - start, end - start, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(future, -math.inf)
        outs.append((torch.softmax(scores, dim=-1) @ vd).transpose(0, 1))
        lses.append(torch.logsumexp(scores, dim=-1).float())
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)


def _with_grads(
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor,
    cu: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, ...]:
    """(out, lse, grad_q, grad_k, grad_v) of ``fn`` by autograd."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v, cu, scale)
    out.backward(grad_out)
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def _reference_attention(q, k, v, cu, scale):
    return packed_attention_reference(q, k, v, cu, softmax_scale=scale)


def _check_attention(
    backend: Backend, case: AttentionCase, dtype: torch.dtype, fwd: Row, bwd: Row
) -> list[torch.Tensor]:
    """Forward (out, lse) into ``fwd``, then our backward on our forward's outputs into ``bwd``."""
    q, k, v, grad_out, cu = _attention_inputs(case, dtype)
    scale = 1.0 / math.sqrt(case.d)
    exact = _with_grads(_reference_attention, q.double(), k.double(), v.double(),
                        grad_out.double(), cu, scale)  # fmt: skip
    plain = _with_grads(_plain_attention, q, k, v, grad_out, cu, scale)
    dq, dk, dv, dgrad, dcu = (backend.to_device(t) for t in (q, k, v, grad_out, cu))
    try:
        out, lse = backend.packed_attention_fwd(dq, dk, dv, dcu, scale, True, -1)
        backend.synchronize()
        _judge(
            fwd,
            [
                _compare("out", out.cpu(), exact[0], plain[0], dtype),
                _compare("lse", lse.cpu(), exact[1], plain[1], torch.float32),
            ],
        )
    except Exception as exc:
        fwd.note = bwd.note = _first_line(exc)
        fwd.passed = bwd.passed = False
        bwd.note = f"forward failed: {bwd.note}"
        return []
    grads = backend.packed_attention_bwd(dgrad, dq, dk, dv, out, lse, dcu, scale, True, -1)
    backend.synchronize()
    names = ("grad_q", "grad_k", "grad_v")
    _judge(
        bwd,
        [
            _compare(name, g.cpu(), e, p, dtype)
            for name, g, e, p in zip(names, grads, exact[2:], plain[2:], strict=True)
        ],
    )
    return [dq, dk, dv, dgrad, dcu]


def _time_attention(
    backend: Backend,
    case: AttentionCase,
    device_tensors: list[torch.Tensor],
    timer: _Timer,
    fwd: Row,
    bwd: Row,
) -> None:
    q, k, v, grad_out, cu = device_tensors
    scale = 1.0 / math.sqrt(case.d)

    def ours_fwd() -> None:
        backend.packed_attention_fwd(q, k, v, cu, scale, True, -1)

    def ours_fwd_bwd() -> None:
        o, s = backend.packed_attention_fwd(q, k, v, cu, scale, True, -1)
        backend.packed_attention_bwd(grad_out, q, k, v, o, s, cu, scale, True, -1)

    fwd.ours_ms, bwd.ours_ms = timer(ours_fwd), timer(ours_fwd_bwd)

    def reference(backward: bool) -> Callable[[], None]:
        def call() -> None:
            if backward:
                _with_grads(_reference_attention, q, k, v, grad_out, cu, scale)
            else:
                _reference_attention(q, k, v, cu, scale)

        return call

    def fusion(backward: bool) -> Callable[[], None]:
        def call() -> None:
            if backward:
                qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
                backend.fusion_attention(qg, kg, vg, cu, scale).backward(grad_out)
            else:
                backend.fusion_attention(q, k, v, cu, scale)

        return call

    for row, backward in ((fwd, False), (bwd, True)):
        ref_ms = _time_baseline(timer, reference(backward), row, "reference")
        if backend.has_fusion_attention():
            row.baseline = "npu_fusion_attention"
            row.baseline_ms = _time_baseline(timer, fusion(backward), row, row.baseline)
            row.reference_ms = ref_ms
        else:
            row.baseline, row.baseline_ms = "reference", ref_ms


# ---------------------------------------------------------------------------------------------
# Timing and the grid


class _Timer:
    """Median milliseconds of ``reps`` calls after ``warmup``, each ended by a device sync."""

    def __init__(self, backend: Backend, reps: int, warmup: int) -> None:
        self.backend, self.reps, self.warmup = backend, reps, warmup

    def __call__(self, fn: Callable[[], Any]) -> float:
        for _ in range(self.warmup):
            fn()
        self.backend.synchronize()
        times = []
        for _ in range(self.reps):
            start = time.perf_counter()
            fn()
            self.backend.synchronize()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)


def _time_baseline(timer: _Timer, fn: Callable[[], Any], row: Row, what: str) -> float | None:
    """A baseline's time, or None with a note: a failing baseline does not fail our kernel."""
    try:
        return timer(fn)
    except Exception as exc:
        row.note = "; ".join(filter(None, [row.note, f"{what}: {_first_line(exc)}"]))
        return None


def run_grid(
    backend: Backend,
    *,
    quick: bool = False,
    timing: bool = True,
    reps: int = 10,
    warmup: int = 3,
    dtypes: Sequence[str] = tuple(DTYPES),
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """Every (op, case, dtype) of the grid on ``backend``; an exception makes a FAIL row."""
    timer = _Timer(backend, reps, warmup)
    rows: list[Row] = []
    total = len(dtypes) * (len(sparse_kd_cases(quick)) + 2 * len(attention_cases(quick)))

    def report(row: Row) -> None:
        rows.append(row)
        if progress is not None:
            verdict = "PASS" if row.passed else "FAIL"
            note = f" ({row.note})" if row.note else ""
            progress(f"[{len(rows)}/{total}] {row.op} {row.case} {row.dtype}: {verdict}{note}")

    for case in sparse_kd_cases(quick):
        for dtype_name in dtypes:
            row = Row("sparse_kd_fused", case.name, dtype_name)
            try:
                device_args = _check_sparse_kd(backend, case, DTYPES[dtype_name], row)
                if timing:
                    _time_sparse_kd(backend, case, device_args, timer, row)
            except Exception as exc:
                what = "timing: " if row.error is not None else ""
                row.passed, row.note = False, what + _first_line(exc)
            report(row)
    for case in attention_cases(quick):
        for dtype_name in dtypes:
            fwd = Row("packed_attention fwd", case.name, dtype_name)
            bwd = Row("packed_attention fwd+bwd", case.name, dtype_name)
            try:
                tensors = _check_attention(backend, case, DTYPES[dtype_name], fwd, bwd)
            except Exception as exc:
                # The forward's own errors are caught inside; what lands here is the backward's,
                # or the references' (then neither row was judged).
                tensors = []
                for r in (fwd, bwd) if fwd.error is None and not fwd.note else (bwd,):
                    r.passed, r.note = False, _first_line(exc)
            if timing and tensors:
                try:
                    _time_attention(backend, case, tensors, timer, fwd, bwd)
                except Exception as exc:
                    for r in (fwd, bwd):
                        r.passed, r.note = False, f"timing: {_first_line(exc)}"
            report(fwd)
            report(bwd)
    return rows


# ---------------------------------------------------------------------------------------------
# Output


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown_table(rows: Sequence[Row]) -> str:
    """The pass/fail table, one row per (op, case, dtype), then the overall verdict line."""
    header = (
        "| op | case | dtype | result | worst | max error | allowed | ours (ms) | baseline "
        "| baseline (ms) | speedup | reference (ms) | note |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in rows:
        speedup = f"{r.speedup:.2f}x" if r.speedup is not None else ""
        cells = (
            r.op, r.case, r.dtype, "PASS" if r.passed else "**FAIL**", r.worst,
            _fmt(r.error, ".2e"), _fmt(r.allowed, ".2e"), _fmt(r.ours_ms, ".3f"), r.baseline,
            _fmt(r.baseline_ms, ".3f"), speedup, _fmt(r.reference_ms, ".3f"),
            r.note.replace("|", "\\|"),
        )  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    failed = sum(not r.passed for r in rows)
    if rows and not failed:
        lines += ["", f"PASS: all {len(rows)} rows passed"]
    else:
        lines += ["", f"FAIL: {failed} of {len(rows)} rows failed"]
    return "\n".join(lines)


def _jsonable(x: Any) -> Any:
    """``x`` with NaN and infinities as strings (strict JSON has neither) and odd types as str."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if x is None or isinstance(x, bool | int | float | str):
        return x
    return str(x)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m {PROG}",
        description="Check and time pangu_fastkd's Ascend C kernels on an NPU.",
    )
    parser.add_argument("--quick", action="store_true", help="the small grid only")
    parser.add_argument("--no-timing", action="store_true", help="correctness only")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--device", default="npu:0", help="the NPU to run on (default npu:0)")
    parser.add_argument("--reps", type=int, default=10, help="timed calls per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before them")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, backend: Backend | None = None) -> int:
    """The command line; ``backend`` replaces the NPU one (tests pass a ``TwinBackend``).

    Returns:
        0 when every row passes, 1 when one fails, 2 when the kit cannot run here.
    """
    args = parse_args(argv)
    if backend is None:
        try:
            backend = NpuBackend(args.device)
        except BackendUnavailableError as exc:
            print(f"{PROG}: cannot run: {exc}", file=sys.stderr)
            return 2
    env = environment(backend)
    print("\n".join(_environment_lines(env)), flush=True)
    print(flush=True)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    rows = run_grid(
        backend,
        quick=args.quick,
        timing=not args.no_timing,
        reps=args.reps,
        warmup=args.warmup,
        progress=progress,
    )
    print(markdown_table(rows), flush=True)
    passed = bool(rows) and all(r.passed for r in rows)
    if args.json:
        record = {
            "environment": env,
            "options": {"quick": args.quick, "timing": not args.no_timing, "reps": args.reps},
            "passed": passed,
            "rows": [{**asdict(r), "speedup": r.speedup} for r in rows],
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(_jsonable(record), f, indent=2, allow_nan=False)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
