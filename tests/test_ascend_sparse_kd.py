"""The Ascend C sparse-KD / CE epilogue (csrc/ascend/sparse_kd_epilogue.h) on the CPU twin.

tests/ascend_twin/sparse_kd_epilogue.cpp is compiled with g++ against the twin; every case below
is written to its own directory (logits, labels, a top-K or sampled teacher target, the options)
and the driver runs them all in one process. Its per-row loss, statistics and in-place gradient
are compared with ``sparse_kd_reference`` (the oracle): with ``weight = I`` the reference's
hidden states are the logits, so its gradient w.r.t. ``hidden`` is d(loss)/d(logits).
fp32 logits are held to a tight tolerance against a float64 oracle; for bf16 and fp16 logits the
gradient (written in the logits' dtype) may be at most 2x as far from the oracle as plain
PyTorch's gradient in that dtype (the reference run on the bf16 / fp16 logits: its LM-head matmul
in the input dtype, which torch computes for both on CPU, the rest in fp32, and the gradient
rounded once to the input dtype, as the kernel does). bf16 and fp16 share a size, so the driver
picks the kernel from the tiling's dtype code; fp16 gradients beyond 65504 saturate.
"""

from __future__ import annotations

import math
import re
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from twin_build import compile_program, needs_gxx

from pangu_fastkd.ops.sparse_kd_reference import sparse_kd_reference
from pangu_fastkd.ops.sparse_kd_targets import (
    DIVERGENCES,
    MISSING_MASS_MODES,
    SampledTarget,
    TopKTarget,
)

IGNORE = -100
DTYPE_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
STAT_NAMES = ("divergence", "cross_entropy", "student_mass", "teacher_mass", "lse", "correct")

pytestmark = needs_gxx


@dataclass(frozen=True)
class Spec:
    """One epilogue problem: shape, target kind, loss options and the tiling caps."""

    dtype: torch.dtype = torch.float32
    rows: int = 7
    vocab: int = 333
    k: int = 6
    target: str = "topk"  # "topk" | "sampled" (ignored when kd_weight == 0)
    kd_weight: float = 0.6
    temperature: float = 1.3
    cache_temperature: float | None = None  # None: the same as temperature
    divergence: str = "forward_kl"
    missing_mass: str = "tail"
    include_label: bool = True
    beta: float = 0.5
    softcap: float | None = None
    z_loss: float = 0.0
    scale: float = 0.25
    chip: str = "910b"
    max_blocks: int = 3
    max_chunk: int = 128
    ignored: tuple[int, ...] = (4,)
    seed: int = 0
    dtype_code: int | None = None  # written as SparseKdProblem::dtype over the one of `dtype`
    ub_slack: int | None = None  # run with the UB budget set to the tiling's ubBytes + slack
    ties: bool = False  # rows 0-3 get the label at the row maximum, some tied with another id
    weight_sum: float = 1.0  # sampled weights' row sum (the reference accepts 1 +- 1e-3)
    # When set, the cache's Lambda makes the stored support hold this much probability: just
    # over 1 (within the 1e-3 the op lets rounding through) the kernel must clamp p_rest to 0.
    support_mass: float | None = None


@dataclass
class Case:
    spec: Spec
    logits: torch.Tensor  # [N, V] fp32, bf16 or fp16
    labels: torch.Tensor  # [N]
    target: TopKTarget | SampledTarget | None
    directory: Path = field(default=Path())


@dataclass
class KernelRun:
    """What the driver reported and wrote: tiling, loss [N], stats [N, 6] f32, gradient [N, V]."""

    chunk: int
    block_dim: int
    ub_bytes: int
    budget: int
    loss: torch.Tensor
    stats: torch.Tensor
    grad: torch.Tensor


def _make_case(spec: Spec) -> Case:
    rows, vocab, k = spec.rows, spec.vocab, spec.k
    gen = torch.Generator().manual_seed(spec.seed * 7919 + rows * 131 + vocab)
    logits = (torch.randn(rows, vocab, generator=gen) * 3).to(spec.dtype)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    if spec.ties:
        _place_ties(logits, labels)
    target: TopKTarget | SampledTarget | None = None
    if spec.kd_weight > 0:
        # A teacher correlated with the student, so the divergence is neither 0 nor huge.
        teacher = logits.float() * 0.6 + torch.randn(rows, vocab, generator=gen) * 2
        if spec.target == "topk":
            tc = spec.cache_temperature or spec.temperature
            ids = teacher.topk(k, dim=1).indices
            t = teacher.gather(1, ids)
            if not spec.ties:  # label inside the top-K on even rows, usually outside on odd
                labels[::2] = ids[::2, 0]
            if k > 2 and vocab > k:
                ids[1::3, 1] = -1  # empty slots
                t[0, 2] = -math.inf  # an impossible token the cache kept
            label_logit = teacher.gather(1, labels[:, None]).squeeze(1)
            lam = torch.logsumexp(teacher / tc, dim=1)
            if spec.support_mass is not None:
                lam = _lambda_for_support_mass(ids, t, labels, label_logit, tc, spec.support_mass)
            target = TopKTarget(ids.int(), t, lam, label_logit, tc)
        else:
            # Ids drawn from the teacher without replacement, weights positive and summing to 1.
            ids = torch.multinomial(torch.softmax(teacher, dim=1), k, generator=gen)
            weights = torch.rand(rows, k, generator=gen) + 0.1
            if k > 2:
                ids[1::3, 1] = -1
                weights[1::3, 1] = 0.7  # an empty slot's weight is never read
            valid = ids >= 0
            row_sums = torch.where(valid, weights, 0).sum(dim=1, keepdim=True)
            weights = weights / row_sums * spec.weight_sum
            if not spec.ties:
                labels[::2] = ids[::2, 0]
            target = SampledTarget(ids.int(), weights)
    labels[list(spec.ignored)] = IGNORE
    return Case(spec, logits, labels, target)


def _lambda_for_support_mass(
    ids: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor,
    label_logit: torch.Tensor,
    tc: float,
    mass: float,
) -> torch.Tensor:
    """``[N]`` Lambda under which the stored logits (and the label's, when outside them) hold
    ``mass`` of the teacher's probability at ``tc``."""
    scaled = (t / tc).masked_fill(ids < 0, -math.inf)
    outside = ~(ids == labels[:, None]).any(dim=1)
    with_label = torch.logaddexp(scaled.logsumexp(dim=1), label_logit / tc)
    return torch.where(outside, with_label, scaled.logsumexp(dim=1)) - math.log(mass)


def _place_ties(logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Rows 0-3: the label holds the row maximum; argmax == label only where no earlier id ties.

    Row 0: unique maximum. Row 1: tied with an id in an earlier chunk (not argmax). Row 2: tied
    with a later id (argmax). Row 3: tied with the element just before it in its chunk.
    """
    vocab = logits.shape[1]
    plan = (
        (0, vocab - 3, None),
        (1, vocab - 2, 5),
        (2, 1, vocab - 1),
        (3, vocab // 2, vocab // 2 - 1),
    )
    for row, label, tie in plan:
        top = (logits[row].float().max() + 1).to(logits.dtype)
        logits[row, label] = top
        if tie is not None:
            logits[row, tie] = top
        labels[row] = label


def _write_case(case: Case, directory: Path) -> None:
    spec = case.spec
    directory.mkdir(parents=True)
    case.directory = directory
    raw = case.logits if spec.dtype == torch.float32 else case.logits.view(torch.int16)
    raw.contiguous().numpy().tofile(directory / "logits.bin")
    case.labels.int().numpy().tofile(directory / "labels.bin")
    target = case.target
    if isinstance(target, TopKTarget):
        target.logits.float().numpy().tofile(directory / "teacher_values.bin")
        target.lse.float().numpy().tofile(directory / "teacher_lse.bin")
        target.label_logit.float().numpy().tofile(directory / "label_logit.bin")
    elif isinstance(target, SampledTarget):
        target.weights.float().numpy().tofile(directory / "teacher_values.bin")
    if target is not None:
        target.ids.int().numpy().tofile(directory / "ids.bin")
    options = {
        "dtype": DTYPE_NAMES[spec.dtype],
        "rows": spec.rows,
        "vocab": spec.vocab,
        "k": spec.k if target is not None else 0,
        "target": spec.target,
        "kd_weight": spec.kd_weight,
        "temperature": spec.temperature,
        "cache_temperature": spec.cache_temperature or spec.temperature,
        "divergence": DIVERGENCES.index(spec.divergence),
        "missing_mass": MISSING_MASS_MODES.index(spec.missing_mass),
        "include_label": int(spec.include_label),
        "beta": spec.beta,
        "use_softcap": int(spec.softcap is not None),
        "softcap": spec.softcap or 0.0,
        "z_loss": spec.z_loss,
        "scale": spec.scale,
        "chip": spec.chip,
        "max_blocks": spec.max_blocks,
        "max_chunk": spec.max_chunk,
    }
    if spec.ub_slack is not None:
        options["ub_slack"] = spec.ub_slack
    if spec.dtype_code is not None:
        options["dtype_code"] = spec.dtype_code
    text = "".join(f"{key} {value}\n" for key, value in options.items())
    (directory / "case.txt").write_text(text)


def _read_run(case: Case) -> tuple[str, KernelRun | None]:
    line = (case.directory / "result.txt").read_text().strip()
    tiling = re.fullmatch(r"TILING chunk=(\d+) blockDim=(\d+) ubBytes=(\d+) budget=(\d+)", line)
    if tiling is None:
        return line, None
    rows, vocab = case.logits.shape
    is_f32 = case.spec.dtype == torch.float32
    raw = (case.directory / "out.bin").read_bytes()
    floats = np.frombuffer(raw[: 28 * rows], dtype=np.float32).copy()
    grad_raw = np.frombuffer(raw[28 * rows :], dtype=np.float32 if is_f32 else np.int16)
    grad = torch.from_numpy(grad_raw.copy())
    grad = (grad if is_f32 else grad.view(case.spec.dtype)).reshape(rows, vocab)
    loss = torch.from_numpy(floats[:rows])
    stats = torch.from_numpy(floats[rows:]).reshape(rows, 6)
    chunk, block_dim, ub_bytes, budget = map(int, tiling.groups())
    return line, KernelRun(chunk, block_dim, ub_bytes, budget, loss, stats, grad)


def _reference(case: Case, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row loss [N], stats [N, 6] and scaled gradient [N, V] of the reference."""
    spec = case.spec
    vocab = logits.shape[1]
    hidden = logits.detach().clone().requires_grad_(True)
    eye = torch.eye(vocab, dtype=logits.dtype)
    target = case.target
    if logits.dtype == torch.float64 and isinstance(target, TopKTarget):
        target = replace(
            target,
            logits=target.logits.double(),
            lse=target.lse.double(),
            label_logit=target.label_logit.double(),
        )
    elif logits.dtype == torch.float64 and isinstance(target, SampledTarget):
        target = replace(target, weights=target.weights.double())
    total, stats = sparse_kd_reference(
        hidden,
        eye,
        case.labels,
        target if spec.kd_weight > 0 else None,
        kd_weight=spec.kd_weight,
        divergence=spec.divergence,
        beta=spec.beta,
        temperature=spec.temperature,
        missing_mass=spec.missing_mass,
        include_label=spec.include_label if spec.target == "topk" else False,
        reduction="sum",
        num_items=1.0 / spec.scale,
        softcap=spec.softcap,
        z_loss=spec.z_loss,
    )
    total.backward()
    kd, T = spec.kd_weight, spec.temperature
    s = stats.double()
    loss = kd * T * T * s[:, 0] + (1 - kd) * s[:, 1] + spec.z_loss * s[:, 4] ** 2
    loss = torch.where(case.labels != IGNORE, loss, torch.zeros_like(loss))
    return loss, stats, hidden.grad


def _check_against_reference(case: Case, run: KernelRun) -> None:
    oracle_loss, oracle_stats, oracle_grad = _reference(case, case.logits.double())
    # Loss and statistics accumulate in fp32 from the exact input values, whatever the dtype.
    torch.testing.assert_close(run.loss.double(), oracle_loss, rtol=2e-5, atol=2e-5)
    for col, name in enumerate(STAT_NAMES):
        tol = 0.0 if name == "correct" else 2e-5
        torch.testing.assert_close(
            run.stats[:, col],
            oracle_stats[:, col],
            rtol=tol,
            atol=tol,
            msg=lambda m, name=name: f"stat {name}: {m}",
        )
    if case.spec.dtype == torch.float32:
        torch.testing.assert_close(run.grad.double(), oracle_grad, rtol=1e-4, atol=3e-7)
        return
    _, _, torch_grad = _reference(case, case.logits)
    kernel_err = (run.grad.double() - oracle_grad).abs().max().item()
    torch_err = (torch_grad.double() - oracle_grad).abs().max().item()
    assert kernel_err <= 2 * torch_err, (kernel_err, torch_err)


BF16 = torch.bfloat16
F16 = torch.float16

# Every divergence x missing mass x label conditioning, fp32, 7 x 333 (ragged 128-element chunks,
# 3 blocks). Tail needs T == T_c; renorm runs at T = 1.3 against a cache written at T_c = 1.
MATRIX = {
    f"{div}-{mm}-{'label' if label else 'nolabel'}": Spec(
        divergence=div,
        missing_mass=mm,
        include_label=label,
        beta=0.3 if div == "jsd" else 0.5,
        cache_temperature=1.0 if mm == "renorm" else None,
        seed=i,
    )
    for i, (div, mm, label) in enumerate(
        (d, m, lab) for d in DIVERGENCES for m in MISSING_MASS_MODES for lab in (True, False)
    )
}

CASES = {
    **MATRIX,
    # bf16 logits through each divergence, both chips.
    "bf16-forward-renorm-nolabel-310b": Spec(
        dtype=BF16, missing_mass="renorm", include_label=False, chip="310b", max_blocks=0
    ),
    "bf16-reverse-tail-910b": Spec(dtype=BF16, divergence="reverse_kl", rows=6, max_blocks=4),
    "bf16-jsd-renorm-310b": Spec(
        dtype=BF16, divergence="jsd", missing_mass="renorm", temperature=0.7, chip="310b"
    ),
    "bf16-jsd-tail-nolabel-910b": Spec(
        dtype=BF16, divergence="jsd", beta=0.8, include_label=False, vocab=500, max_chunk=192
    ),
    # fp16 logits through each divergence beside the bf16 cases, both chips.
    "f16-forward-renorm-nolabel-310b": Spec(
        dtype=F16, missing_mass="renorm", include_label=False, chip="310b", max_blocks=0
    ),
    "f16-reverse-tail-910b": Spec(dtype=F16, divergence="reverse_kl", rows=6, max_blocks=4),
    "f16-jsd-renorm-310b": Spec(
        dtype=F16, divergence="jsd", missing_mass="renorm", temperature=0.7, chip="310b"
    ),
    "f16-jsd-tail-nolabel-910b": Spec(
        dtype=F16, divergence="jsd", beta=0.8, include_label=False, vocab=500, max_chunk=192
    ),
    "f16-forward-tail-label-910b": Spec(dtype=F16, temperature=1.0, max_blocks=5, seed=4),
    # Sampled targets (forward KL only).
    "sampled-f32-910b": Spec(
        target="sampled", include_label=False, kd_weight=0.5, k=9, weight_sum=1.0008
    ),
    "sampled-f32-pure-kd-310b": Spec(
        target="sampled", include_label=False, kd_weight=1.0, temperature=2.0, chip="310b"
    ),
    "sampled-bf16-910b": Spec(
        dtype=BF16, target="sampled", include_label=False, kd_weight=0.3, temperature=0.8
    ),
    "sampled-f16-310b": Spec(
        dtype=F16, target="sampled", include_label=False, kd_weight=0.8, chip="310b", k=9
    ),
    "sampled-softcap-zloss": Spec(
        target="sampled", include_label=False, softcap=6.0, z_loss=1e-3, ignored=(0, 6)
    ),
    # The argmax statistic with tied maxima, and a cache whose Lambda gives P_S > 1.
    "ties-ce-f32": Spec(kd_weight=0.0, ties=True),
    "ties-forward-tail-bf16": Spec(dtype=BF16, ties=True, softcap=9.0, chip="310b"),
    "ties-forward-tail-f16": Spec(dtype=F16, ties=True, softcap=9.0, max_blocks=4),
    "ties-sampled-f32": Spec(target="sampled", include_label=False, ties=True),
    "teacher-mass-over-one-forward": Spec(support_mass=1.0008, temperature=1.0),
    "teacher-mass-over-one-jsd": Spec(divergence="jsd", support_mass=1.0008, ignored=()),
    "teacher-mass-over-one-reverse-bf16": Spec(
        dtype=BF16, divergence="reverse_kl", support_mass=1.0008, max_blocks=2
    ),
    "teacher-mass-over-one-jsd-f16": Spec(
        dtype=F16, divergence="jsd", support_mass=1.0008, chip="310b", ignored=(0,)
    ),
    # Softcap and z-loss.
    "softcap-forward-tail": Spec(softcap=5.0),
    "softcap-jsd-renorm-zloss": Spec(
        divergence="jsd", missing_mass="renorm", softcap=8.0, z_loss=1e-2, temperature=0.9
    ),
    "softcap-reverse-tail-bf16": Spec(dtype=BF16, divergence="reverse_kl", softcap=6.0),
    "softcap-jsd-renorm-zloss-f16": Spec(
        dtype=F16,
        divergence="jsd",
        missing_mass="renorm",
        softcap=8.0,
        z_loss=1e-2,
        temperature=0.9,
        chip="310b",
    ),
    "ce-softcap-zloss-f32": Spec(kd_weight=0.0, softcap=4.0, z_loss=2e-2, temperature=1.0),
    "zloss-forward-tail-bf16-kd03": Spec(dtype=BF16, kd_weight=0.3, z_loss=1e-3, chip="310b"),
    "zloss-reverse-renorm-f16-kd1": Spec(
        dtype=F16, divergence="reverse_kl", missing_mass="renorm", kd_weight=1.0, z_loss=5e-3
    ),
    "zloss-reverse-renorm-kd1": Spec(
        divergence="reverse_kl", missing_mass="renorm", kd_weight=1.0, z_loss=5e-3
    ),
    # Cross-entropy only, kd_weight = 0.
    "ce-f32-ragged-tail": Spec(kd_weight=0.0, rows=5, vocab=1000, max_chunk=256, ignored=(3,)),
    "ce-bf16-odd-tail": Spec(
        dtype=BF16, kd_weight=0.0, rows=4, vocab=777, max_blocks=2, max_chunk=192, ignored=()
    ),
    "ce-f16-odd-tail-310b": Spec(
        dtype=F16, kd_weight=0.0, rows=4, vocab=777, chip="310b", max_chunk=192, ignored=(2,)
    ),
    "ce-f32-310b": Spec(kd_weight=0.0, rows=3, vocab=300, chip="310b", max_chunk=64, ignored=(1,)),
    # Shapes and corner cases of the support.
    "kd-f32-vocab-under-one-chunk": Spec(
        vocab=37, k=5, kd_weight=0.7, temperature=1.0, max_chunk=0
    ),
    "kd-f32-temperature-2": Spec(rows=5, vocab=1000, k=8, kd_weight=0.5, temperature=2.0),
    "kd-bf16-310b-pure-kd": Spec(
        dtype=BF16, rows=3, vocab=300, kd_weight=1.0, chip="310b", ignored=()
    ),
    "kd-f16-910b-pure-kd-t2": Spec(
        dtype=F16,
        rows=5,
        vocab=300,
        kd_weight=1.0,
        temperature=2.0,
        cache_temperature=1.0,
        missing_mass="renorm",
        ignored=(),
    ),
    "kd-f16-support-covers-vocab": Spec(
        dtype=F16, divergence="reverse_kl", rows=3, vocab=16, k=16, max_chunk=0, ignored=()
    ),
    "kd-support-covers-vocab": Spec(
        rows=3, vocab=16, k=16, temperature=1.0, max_chunk=0, ignored=(1,)
    ),
    "reverse-support-covers-vocab": Spec(
        divergence="reverse_kl", rows=3, vocab=16, k=16, max_chunk=0, ignored=()
    ),
    "jsd-support-covers-vocab": Spec(
        divergence="jsd", rows=3, vocab=16, k=16, max_chunk=0, ignored=()
    ),
    "kd-all-rows-ignored": Spec(rows=3, vocab=100, k=4, max_chunk=64, ignored=(0, 1, 2)),
    "ce-bf16-all-rows-ignored": Spec(
        dtype=BF16, kd_weight=0.0, rows=2, vocab=90, chip="310b", ignored=(0, 1)
    ),
    "kd-f16-all-rows-ignored": Spec(dtype=F16, rows=2, vocab=90, k=4, ignored=(0, 1)),
    # SparseKdProblem::dtype left at kSparseKdDtypeFromElemBytes, as the host launcher does:
    # 2-byte logits still mean bf16.
    "bf16-dtype-from-elem-bytes": Spec(dtype=BF16, dtype_code=0xFFFFFFFF, rows=5, seed=2),
}

# Budget-sized chunks: no cap, so the chunk is the largest multiple of 64 that fits the UB.
BUDGET_CASES = {
    "budget-bf16-910b": Spec(
        dtype=BF16,
        rows=3,
        vocab=8000,
        k=4,
        kd_weight=0.5,
        temperature=1.0,
        max_blocks=0,
        max_chunk=0,
        ignored=(1,),
        seed=3,
    ),
    "budget-f16-310b-softcap": Spec(
        dtype=F16,
        rows=2,
        vocab=12000,
        k=5,
        softcap=6.0,
        temperature=1.0,
        chip="310b",
        max_blocks=0,
        max_chunk=0,
        ignored=(),
        seed=3,
    ),
    "budget-f32-310b-softcap-jsd": Spec(
        rows=2,
        vocab=9100,
        k=6,
        divergence="jsd",
        softcap=7.0,
        chip="310b",
        max_blocks=0,
        max_chunk=0,
        ignored=(),
        seed=3,
    ),
}

# The tiling's UB bytes are the kernel's InitBuffer sum: the kernel runs with exactly that
# budget and trips ub-budget with 32 bytes less (buffers are whole 32-byte blocks).
UB_EXACT_SPECS = {
    "kd-bf16": Spec(dtype=BF16, rows=2, vocab=200, ignored=()),
    "kd-f16-softcap": Spec(dtype=F16, rows=2, vocab=200, softcap=4.0, ignored=()),
    "sampled-softcap-f32": Spec(
        target="sampled", include_label=False, softcap=3.0, rows=2, vocab=200, ignored=()
    ),
    "ce-f32": Spec(kd_weight=0.0, rows=2, vocab=200, ignored=()),
}
UB_CASES = {
    f"ub-{name}-{'exact' if slack == 0 else 'short'}": replace(spec, ub_slack=slack)
    for name, spec in UB_EXACT_SPECS.items()
    for slack in (0, -32)
}

# Each validation of MakeSparseKdTiling, and the message that names the bad field.
TILING_ERRORS = {
    "tail-temperature-mismatch": (
        Spec(temperature=1.3, cache_temperature=1.0),
        "missingMass = tail needs temperature == cacheTemperature",
    ),
    "beta-above-one": (Spec(divergence="jsd", beta=1.5), "beta must be in [0, 1], got 1.5"),
    "beta-negative": (Spec(divergence="jsd", beta=-0.1), "beta must be in [0, 1]"),
    "sampled-reverse-kl": (
        Spec(target="sampled", include_label=False, divergence="reverse_kl"),
        "divergence must be 0 (forward_kl) for sampled targets, got 1",
    ),
    "sampled-with-label": (
        Spec(target="sampled", include_label=True),
        "includeLabel must be false for sampled targets",
    ),
    "softcap-zero": (Spec(softcap=0.0), "softcap must be finite and > 0"),
    "softcap-negative": (Spec(softcap=-2.0), "softcap must be finite and > 0"),
    "zloss-negative": (Spec(z_loss=-1e-3), "zLoss must be finite and >= 0"),
    "kd-weight-above-one": (Spec(kd_weight=1.5), "kdWeight must be in [0, 1]"),
    "temperature-zero": (
        Spec(kd_weight=0.0, temperature=0.0),
        "temperature must be finite and > 0",
    ),
    "max-chunk-too-small": (Spec(max_chunk=32), "maxChunk must be 0 (no cap) or >= 64"),
    "dtype-code-3": (Spec(dtype=F16, dtype_code=3), "dtype must be 0 (fp32), 1 (bf16) or 2 (fp16)"),
    "fp16-code-with-4-byte-elements": (
        Spec(dtype=torch.float32, dtype_code=2),
        "elemBytes must be 2 for dtype 2, got 4",
    ),
    "support-too-large": (
        Spec(k=8000, vocab=9000, rows=1, ignored=()),
        "supportK = 8000 teacher ids leave no room",
    ),
}
# The enum fields take codes the Python names cannot express: written into case.txt directly.
ENUM_ERRORS = {
    "divergence-code-3": ("divergence", 3, "divergence must be 0 (forward_kl), 1 (reverse_kl)"),
    "missing-mass-code-2": ("missing_mass", 2, "missingMass must be 0 (tail) or 1 (renorm), got 2"),
}

# fp16 holds at most 65504: an upstream gradient so large that d(loss)/d(z) * scale passes it at
# the labels. Plain fp16 PyTorch writes inf there; the kernel saturates, as the hardware's
# float -> half Cast does by default.
SATURATION = Spec(dtype=F16, kd_weight=0.3, scale=1.5e5, rows=5, ignored=(), seed=1)

ALL_RUN = {**CASES, **BUDGET_CASES, **UB_CASES, "f16-saturation": SATURATION}


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_program("sparse_kd_epilogue", tmp_path_factory.mktemp("ascend_sparse_kd"))


@pytest.fixture(scope="module")
def runs(binary: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, Case]]:
    """Writes every case, runs the driver once over all of them, returns (result line, case)."""
    root = tmp_path_factory.mktemp("sparse_kd_cases")
    cases: dict[str, Case] = {}
    for name, spec in {**ALL_RUN, **{n: s for n, (s, _) in TILING_ERRORS.items()}}.items():
        cases[name] = case = _make_case(spec)
        _write_case(case, root / name)
    for name, (key, code, _) in ENUM_ERRORS.items():
        cases[name] = case = _make_case(Spec())
        _write_case(case, root / name)
        text = (root / name / "case.txt").read_text()
        text = re.sub(rf"^{key} \d+$", f"{key} {code}", text, flags=re.M)
        (root / name / "case.txt").write_text(text)
    dirs = [str(case.directory) for case in cases.values()]
    result = subprocess.run([str(binary), *dirs], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return {
        name: ((case.directory / "result.txt").read_text().strip(), case)
        for name, case in cases.items()
    }


@pytest.mark.parametrize("name", sorted(CASES))
def test_epilogue_matches_reference(runs: dict[str, tuple[str, Case]], name: str) -> None:
    _, case = runs[name]
    line, run = _read_run(case)
    assert run is not None, line
    spec = case.spec
    expected_blocks = 1 if spec.chip == "310b" else min(spec.rows, spec.max_blocks or 48)
    assert run.block_dim == expected_blocks
    assert run.ub_bytes <= run.budget
    _check_against_reference(case, run)
    if spec.ignored:
        assert torch.all(run.grad[list(spec.ignored)] == 0)
        assert torch.all(run.loss[list(spec.ignored)] == 0)
        assert torch.all(run.stats[list(spec.ignored)] == 0)


@pytest.mark.parametrize("name", sorted(BUDGET_CASES))
def test_budget_sized_chunks_fill_the_ub(runs: dict[str, tuple[str, Case]], name: str) -> None:
    _, case = runs[name]
    line, run = _read_run(case)
    assert run is not None, line
    spec = case.spec
    # Bytes per chunk element over all buffers: 4 queue buffers of the input dtype, 3 float rows
    # (exp, expT, work), and a float row for bf16 or soft-capped logits. One more 64-element
    # repeat would overrun the budget.
    elem = 4 if spec.dtype == torch.float32 else 2
    per_element = 4 * elem + 12 + (4 if elem == 2 or spec.softcap is not None else 0)
    assert run.chunk % 64 == 0 and run.ub_bytes <= run.budget < run.ub_bytes + 64 * per_element
    assert run.chunk < spec.vocab and spec.vocab % run.chunk != 0
    _check_against_reference(case, run)


@pytest.mark.parametrize("name", sorted(UB_CASES))
def test_ub_bytes_equal_the_init_buffer_sum(runs: dict[str, tuple[str, Case]], name: str) -> None:
    line, case = runs[name]
    if case.spec.ub_slack == 0:
        _, run = _read_run(case)
        assert run is not None, line
        _check_against_reference(case, run)
    else:
        assert line.startswith("VIOLATION rule=ub-budget "), line


def test_fp16_gradient_saturates_instead_of_overflowing(
    runs: dict[str, tuple[str, Case]],
) -> None:
    _, case = runs["f16-saturation"]
    line, run = _read_run(case)
    assert run is not None, line
    oracle_loss, _, oracle_grad = _reference(case, case.logits.double())
    torch.testing.assert_close(run.loss.double(), oracle_loss, rtol=2e-5, atol=2e-5)
    _, _, torch_grad = _reference(case, case.logits)
    big = oracle_grad.abs() > 65504
    assert big.any() and not big.all()
    assert torch.isinf(torch_grad[oracle_grad.abs() >= 65520]).any()  # fp16 rounds these to inf
    assert torch.isfinite(run.grad).all()
    assert torch.equal(run.grad[big].double(), 65504 * oracle_grad[big].sign())
    # Elsewhere plain fp16 PyTorch is no baseline: its matmul backward spreads inf * 0 = NaN over
    # the row. The baseline is its fp32 gradient rounded to fp16 explicitly, as it would write it.
    _, _, f32_grad = _reference(case, case.logits.float())
    rounded = f32_grad.half().double()
    kernel_err = (run.grad.double() - oracle_grad)[~big].abs().max().item()
    torch_err = (rounded - oracle_grad)[~big].abs().max().item()
    assert kernel_err <= 2 * torch_err, (kernel_err, torch_err)


@pytest.mark.parametrize("name", sorted(TILING_ERRORS))
def test_tiling_rejects_bad_options(runs: dict[str, tuple[str, Case]], name: str) -> None:
    line, _ = runs[name]
    assert line.startswith("TILING-ERROR ") and TILING_ERRORS[name][1] in line, line


@pytest.mark.parametrize("name", sorted(ENUM_ERRORS))
def test_tiling_rejects_unknown_enum_codes(runs: dict[str, tuple[str, Case]], name: str) -> None:
    line, _ = runs[name]
    assert line.startswith("TILING-ERROR ") and ENUM_ERRORS[name][2] in line, line


def test_legal_neighbours_of_the_rejected_options_run(runs: dict[str, tuple[str, Case]]) -> None:
    # Beside each rejected option, the legal one ran: renorm at T != T_c, JSD at beta 0.3/0.8,
    # sampled forward KL without the label, a positive softcap and z-loss, the fp16 code with
    # 2-byte elements.
    for name in (
        "forward_kl-renorm-label",
        "jsd-tail-label",
        "bf16-jsd-tail-nolabel-910b",
        "sampled-f32-910b",
        "softcap-forward-tail",
        "zloss-reverse-renorm-kd1",
        "f16-reverse-tail-910b",
    ):
        line, _ = runs[name]
        assert line.startswith("TILING chunk="), (name, line)


def test_chip_budgets_agree_with_the_twin(binary: Path) -> None:
    result = subprocess.run([str(binary), "budgets"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "BUDGETS-AGREE", result.stdout
