"""Tests of the fused linear sparse-KD loss: the C++ kernel against its PyTorch reference.

``sparse_kd_reference`` is the oracle and ``docs/kd-losses.md`` the definition. The kernel is
exact in float64, so float64 comparisons are tight (rtol 1e-9); float32 gets rtol 1e-5; bf16 and
fp16 follow flash-attention's rule (at most 2x plain PyTorch's own error against fp32).

Teacher values (logits, lse, weights) are always created in float32: the kernel reads them as
float32, so float32 values give the kernel and the reference the same numbers in every dtype.

Layout (pytorch/extension-cpp): ``sample_inputs`` builds a problem, private ``_check_*`` helpers
do the work, the public tests are thin.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pangu_fastkd import native_available
from pangu_fastkd.ops import (
    KDStats,
    SampledTarget,
    TopKTarget,
    fused_linear_cross_entropy,
    fused_linear_sparse_kd,
    sparse_kd_reference,
)
from pangu_fastkd.ops.sparse_kd import sparse_kd_op_args
from pangu_fastkd.ops.sparse_kd_targets import DIVERGENCES, MISSING_MASS_MODES

Target = TopKTarget | SampledTarget | None

RTOL = {torch.float64: 1e-9, torch.float32: 1e-5}
# Statistics are float32 in both implementations: one float32 rounding of the same value.
STATS_RTOL = {torch.float64: 1e-6, torch.float32: 1e-5}
GRAD_NAMES = ("grad hidden", "grad weight", "grad bias")
NUM_ITEMS = 11  # a "global" supervised-token count for reduction="num_items" cases

# Hypothesis: few examples, no deadline (the first call may build caches), same examples in CI.
PROPERTY = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
PER_MODE = settings(PROPERTY, max_examples=25)


# ---------------------------------------------------------------------------------------------
# Sample inputs


@dataclasses.dataclass(frozen=True)
class Inputs:
    """One problem: student hidden states and LM head, labels, sparse teacher target."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    labels: torch.Tensor
    target: Target

    def leaves(self) -> list[torch.Tensor]:
        return [t for t in (self.hidden, self.weight, self.bias) if t is not None]

    def to(self, dtype: torch.dtype) -> Inputs:
        """Student tensors in ``dtype``; the teacher target stays float32."""
        bias = self.bias.to(dtype) if self.bias is not None else None
        return dataclasses.replace(
            self, hidden=self.hidden.to(dtype), weight=self.weight.to(dtype), bias=bias
        )

    def fresh(self) -> Inputs:
        """Copies of the student tensors that are new autograd leaves."""
        h, w, *b = [t.detach().clone().requires_grad_() for t in self.leaves()]
        return dataclasses.replace(self, hidden=h, weight=w, bias=b[0] if b else None)

    @property
    def supervised(self) -> torch.Tensor:
        return self.labels != -100


def sample_inputs(
    n: int = 13,
    vocab: int = 37,
    d: int = 8,
    k: int = 5,
    *,
    dtype: torch.dtype = torch.float64,
    kind: str = "topk",
    bias: bool = False,
    cache_temperature: float = 1.0,
    ignored: Sequence[bool] | None = None,
    label_in_support: Sequence[bool] | None = None,
    empty_slots: int = 1,
    neg_inf_teacher: bool = False,
    logit_scale: float = 5.0,
    seed: int = 0,
) -> Inputs:
    """A random sparse-KD problem.

    Args:
        n, vocab, d, k: positions, vocabulary, hidden size, stored ids per position.
        kind: ``"topk"`` (the teacher's top-k ids of a full teacher row) or ``"sampled"`` (k ids
            drawn without replacement from the teacher, weights ``p / sum p``).
        ignored: per row, whether the label is ``-100`` (default: every 4th row).
        label_in_support: per row, whether the label is one of the stored ids (default: even
            rows); a row whose stored ids cover the vocabulary always has it inside.
        empty_slots: row ``min(1, n - 1)`` gets this many ``-1`` slots (at most k - 1), holding
            garbage values.
        neg_inf_teacher: about 30% of the teacher's vocabulary is impossible (``-inf``); each
            row keeps its maximum finite.
        logit_scale: standard deviation of the student logits.
    """
    g = torch.Generator().manual_seed(seed)
    if ignored is None:
        ignored = [i % 4 == 3 for i in range(n)]
    if label_in_support is None:
        label_in_support = [i % 2 == 0 for i in range(n)]
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, d, generator=g, dtype=torch.float64) * (logit_scale / math.sqrt(d))
    b = torch.randn(vocab, generator=g, dtype=torch.float64) if bias else None

    teacher = torch.randn(n, vocab, generator=g) * 2.0  # float32, see the module docstring
    if neg_inf_teacher:
        assert kind == "topk", "sampled ids are drawn from the teacher; keep it finite"
        impossible = torch.rand(n, vocab, generator=g) < 0.3
        impossible[torch.arange(n), teacher.argmax(dim=1)] = False
        teacher = teacher.masked_fill(impossible, -math.inf)
    if kind == "topk":
        ids = teacher.topk(k, dim=1).indices
    else:
        probs = torch.softmax(teacher.double() / cache_temperature, dim=1)
        ids = torch.multinomial(probs, k, replacement=False, generator=g)
    ids = ids.to(torch.int32)
    if min(empty_slots, k - 1) > 0:
        ids[min(1, n - 1), k - min(empty_slots, k - 1) :] = -1
    valid = ids >= 0

    labels = torch.empty(n, dtype=torch.long)
    for i in range(n):
        stored = [v for v in ids[i].tolist() if v >= 0]
        outside = sorted(set(range(vocab)) - set(stored))
        pool = stored if label_in_support[i] or not outside else outside
        labels[i] = pool[int(torch.randint(len(pool), (), generator=g))]
    label_logit = teacher.gather(1, labels[:, None]).squeeze(1)
    labels[torch.tensor(list(ignored), dtype=torch.bool)] = -100

    safe_ids = ids.long().clamp(min=0)
    if kind == "topk":
        logits = teacher.gather(1, safe_ids).masked_fill(~valid, 123.0)  # garbage in -1 slots
        lse = torch.logsumexp(teacher / cache_temperature, dim=1)
        target: Target = TopKTarget(ids, logits, lse, label_logit, cache_temperature)
    else:
        p = probs.gather(1, safe_ids).float().masked_fill(~valid, 0.0)
        weights = (p / p.sum(dim=1, keepdim=True)).masked_fill(~valid, 0.25)
        target = SampledTarget(ids, weights)

    inputs = Inputs(hidden, weight, b, labels, target)
    return inputs.to(dtype)


def _options(reduction: str = "mean", **options: Any) -> dict[str, Any]:
    """Loss options; ``reduction="num_items"`` means a sum divided by ``NUM_ITEMS``."""
    if reduction == "num_items":
        return {**options, "reduction": "sum", "num_items": NUM_ITEMS}
    return {**options, "reduction": reduction}


# ---------------------------------------------------------------------------------------------
# Running the kernel and the reference


@dataclasses.dataclass
class Run:
    loss: torch.Tensor
    stats: torch.Tensor  # [N, 6], the KDStats columns
    grads: list[torch.Tensor]  # hidden, weight[, bias]


Outer = Callable[[torch.Tensor], torch.Tensor]


def _identity(loss: torch.Tensor) -> torch.Tensor:
    return loss


def _kernel_loss(inputs: Inputs, **options: Any) -> tuple[torch.Tensor, torch.Tensor]:
    assert native_available(), "the C++ extension is not built: these tests need the kernel"
    loss, stats = fused_linear_sparse_kd(
        inputs.hidden,
        inputs.weight,
        inputs.labels,
        inputs.target,
        bias=inputs.bias,
        return_stats=True,
        **options,
    )
    assert isinstance(stats, KDStats)
    return loss, torch.stack(list(stats), dim=1)


def _reference_loss(inputs: Inputs, **options: Any) -> tuple[torch.Tensor, torch.Tensor]:
    options = {k: v for k, v in options.items() if k != "chunk_rows"}
    return sparse_kd_reference(
        inputs.hidden, inputs.weight, inputs.labels, inputs.target, bias=inputs.bias, **options
    )


def _run(
    loss_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    inputs: Inputs,
    outer: Outer = _identity,
    **options: Any,
) -> Run:
    """Loss, stats and the gradients of ``outer(loss)`` with respect to h, W and b."""
    inputs = inputs.fresh()
    loss, stats = loss_fn(inputs, **options)
    outer(loss).backward()
    grads = [t.grad for t in inputs.leaves()]
    assert all(g is not None for g in grads), "every student tensor must get a gradient"
    return Run(loss.detach(), stats.detach(), grads)


def _assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    rtol: float,
    what: str,
    *,
    floor: float = 0.0,
    atol: float = 0.0,
) -> None:
    """``max|actual - expected| <= rtol * max(max|expected|, floor) + atol``, both finite."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert bool(torch.isfinite(expected).all()), f"{what}: expected value not finite: {expected}"
    assert bool(torch.isfinite(actual).all()), f"{what}: actual value not finite: {actual}"
    if actual.numel() == 0:
        return
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(expected.double().abs().max().item(), floor)
    assert err <= rtol * scale + atol, (
        f"{what}: max error {err:.3e} > {rtol:g} x {scale:.3e} + {atol:g}"
    )


def _check_stats(actual: torch.Tensor, expected: torch.Tensor, supervised: torch.Tensor, rtol):
    """Each KDStats column against the reference; exact zeros on ignored rows."""
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    for col, name in enumerate(KDStats._fields):
        _assert_close(actual[:, col], expected[:, col], rtol, f"stats.{name}", atol=1e-7)
        assert bool((actual[~supervised, col] == 0).all()), f"stats.{name} on ignored rows"
    correct = actual[:, KDStats._fields.index("correct")]
    assert bool(((correct == 0) | (correct == 1)).all())
    assert torch.equal(correct, expected[:, KDStats._fields.index("correct")])


def _check_against_reference(
    inputs: Inputs, *, outer: Outer = _identity, floor: float = 0.0, **options: Any
) -> Run:
    """Loss, gradients of h, W, b and statistics of the kernel against the reference."""
    dtype = inputs.hidden.dtype
    rtol = RTOL[dtype]
    kernel = _run(_kernel_loss, inputs, outer, **options)
    ref = _run(_reference_loss, inputs, outer, **options)
    assert kernel.loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    empty_mean = (
        options.get("reduction", "mean") == "mean"
        and options.get("num_items") is None
        and not bool(inputs.supervised.any())
    )
    if empty_mean:  # a mean over no row: NaN, as F.cross_entropy (docs/kd-losses.md)
        assert kernel.loss.isnan() and ref.loss.isnan()
    else:
        _assert_close(kernel.loss, ref.loss, rtol, "loss", atol=1e-12)
    n_grads = len(kernel.grads)
    for name, scale_of, a, e in zip(
        GRAD_NAMES[:n_grads],
        (inputs.weight, inputs.hidden, None)[:n_grads],
        kernel.grads,
        ref.grads,
        strict=True,
    ):
        # floor > 0 (extreme logits): errors are judged against the natural scale of the
        # gradient, |W| for grad_h, |h| for grad_W, 1 for grad_b, not against a tiny gradient.
        natural = floor * (scale_of.abs().max().item() if scale_of is not None else 1.0)
        _assert_close(a, e, rtol, name, floor=natural)
    _check_stats(kernel.stats, ref.stats, inputs.supervised, STATS_RTOL[dtype])
    return kernel


def _per_token_loss(stats: torch.Tensor, kd_weight: float, temperature: float, z_loss: float):
    """``loss_i`` rebuilt from the statistics (docs/kd-losses.md, "Per-token loss")."""
    s = KDStats.from_matrix(stats.double())
    D, ce, lse = s.divergence, s.cross_entropy, s.student_lse
    return kd_weight * temperature**2 * D + (1 - kd_weight) * ce + z_loss * lse * lse


def _check_low_precision(inputs32: Inputs, dtype: torch.dtype, **options: Any) -> None:
    """flash-attention's rule: the kernel's error in ``dtype`` against an fp32 reference is at
    most twice plain PyTorch's error in ``dtype`` (the reference run on ``dtype`` inputs, so its
    matmul runs in ``dtype``) against the same fp32 reference, plus a tiny absolute slack."""
    low = inputs32.to(dtype)
    exact = _run(_reference_loss, low.to(torch.float32), **options)  # same values, fp32 math
    torch_low = _run(_reference_loss, low, **options)
    kernel = _run(_kernel_loss, low, **options)
    assert kernel.loss.dtype == torch.float32
    assert [g.dtype for g in kernel.grads] == [dtype] * len(kernel.grads)

    def err(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a.double() - b.double()).abs().max().item()

    def check(what: str, kernel_err: float, torch_err: float, scale: float) -> None:
        slack = 1e-6 * max(scale, 1.0)
        assert kernel_err <= 2 * torch_err + slack, (
            f"{dtype} {what}: kernel error {kernel_err:.3e} > 2 x PyTorch's {torch_err:.3e}"
        )

    # Per-token losses (from the statistics): the rule over N samples of the error.
    kd = options.get("kd_weight", 1.0)
    T = options.get("temperature", 1.0)
    zl = options.get("z_loss", 0.0)
    rows_exact, rows_torch, rows_kernel = (
        _per_token_loss(r.stats, kd, T, zl) for r in (exact, torch_low, kernel)
    )
    scale = rows_exact.abs().max().item()
    check("per-token loss", err(rows_kernel, rows_exact), err(rows_torch, rows_exact), scale)
    # The scalar loss is one sample, so PyTorch's error there can vanish by luck; its error
    # budget is the reduction of its per-token errors (what it guarantees without cancellation).
    torch_budget = (rows_torch - rows_exact).abs().sum().item()
    if options.get("num_items") is not None:
        torch_budget /= options["num_items"]
    elif options.get("reduction", "mean") == "mean":
        torch_budget /= max(int(inputs32.supervised.sum()), 1)
    check("loss", err(kernel.loss, exact.loss), torch_budget, exact.loss.abs().item())
    for name, k, t, e in zip(
        GRAD_NAMES[: len(kernel.grads)],
        kernel.grads,
        torch_low.grads,
        exact.grads,
        strict=True,
    ):
        check(name, err(k, e), err(t, e), e.abs().max().item())


def _check_gradients(inputs: Inputs, *, check_undefined_grad: bool = False, **options) -> None:
    """``torch.autograd.gradcheck`` of the kernel (float64) against finite differences.

    ``check_undefined_grad`` (backward called without a gradient for the loss) is off here and
    tested on its own in ``test_backward_without_loss_gradient``, so that these tests judge the
    gradient values only."""
    assert inputs.hidden.dtype == torch.float64

    def loss_of(hidden, weight, *bias):
        return fused_linear_sparse_kd(
            hidden,
            weight,
            inputs.labels,
            inputs.target,
            bias=bias[0] if bias else None,
            **options,
        )

    leaves = [t.detach().clone().requires_grad_() for t in inputs.leaves()]
    assert torch.autograd.gradcheck(
        loss_of, leaves, eps=1e-6, atol=1e-8, rtol=1e-6, check_undefined_grad=check_undefined_grad
    )


def _op_args(
    inputs: Inputs,
    *,
    kd_weight: float = 1.0,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    missing_mass: str = "tail",
    include_label: bool = True,
    softcap: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    chunk_rows: int = 0,
    need_grad: bool = True,
    compute_stats: bool = True,
) -> list[Any]:
    """Positional arguments of ``torch.ops.pangu_fastkd.sparse_kd_fused`` (see csrc/ops.cpp)."""
    return sparse_kd_op_args(
        inputs.hidden,
        inputs.weight,
        inputs.labels,
        inputs.target,
        bias=inputs.bias,
        kd_weight=kd_weight,
        divergence=divergence,
        temperature=temperature,
        missing_mass=missing_mass,
        include_label=include_label,
        softcap=softcap or None,
        z_loss=z_loss,
        reduction=reduction,
        chunk_rows=chunk_rows,
        need_grad_input=need_grad,
        need_grad_weight=need_grad,
        compute_stats=compute_stats,
    )


def _opcheck(inputs: Inputs, **options: Any) -> None:
    """``torch.library.opcheck``: schema, fake kernel, autograd registration, AOT dispatch."""
    op = torch.ops.pangu_fastkd.sparse_kd_fused.default
    result = torch.library.opcheck(op, _op_args(inputs, **options))
    assert set(result.values()) == {"SUCCESS"}, result


# ---------------------------------------------------------------------------------------------
# 1. Every option against the reference

# Pairwise cover of the secondary options: every pair of values of (bias, softcap, z_loss,
# reduction) appears in some row.
EXTRAS = [
    ("sum", False, None, 0.0),
    ("sum", True, 30.0, 1e-3),
    ("mean", False, 30.0, 1e-3),
    ("mean", True, None, 0.0),
    ("num_items", False, 30.0, 0.0),
    ("num_items", True, None, 1e-3),
]
# (kind, divergence, missing_mass); sampled targets take forward KL only.
MODES = [("topk", div, mass) for mass in MISSING_MASS_MODES for div in DIVERGENCES] + [
    ("sampled", "forward_kl", "tail")
]
# (T, T_c): tail needs T == T_c (also a cache temperature != 1); renorm and sampled any T.
TEMPERATURES = {"tail": [(1.0, 1.0), (2.0, 2.0)], "renorm": [(1.0, 1.0), (2.0, 1.0)]}


def _case(kind, div, mass, include_label, T, Tc, kd_weight, extra) -> Any:
    reduction, bias, softcap, z_loss = extra
    sample = {"kind": kind, "bias": bias, "cache_temperature": Tc}
    options = _options(
        reduction,
        kd_weight=kd_weight,
        divergence=div,
        missing_mass=mass,
        include_label=include_label,
        temperature=T,
        softcap=softcap,
        z_loss=z_loss,
    )
    name = "-".join(
        [
            "sampled" if kind == "sampled" else f"{div}-{mass}",
            "label" if include_label else "nolabel",
            f"T{T:g}-Tc{Tc:g}",
            f"kd{kd_weight:g}",
            reduction,
            "bias" if bias else "nobias",
            f"cap{softcap:g}" if softcap else "nocap",
            f"z{z_loss:g}",
        ]
    )
    return pytest.param(sample, options, id=name)


def _float64_cases() -> list[Any]:
    """Full product over mode x label x temperature x kd_weight, pairwise cover of the rest."""
    cases = [_case("topk", "forward_kl", "tail", True, 1.0, 1.0, 0.0, e) for e in EXTRAS]
    for kind, div, mass in MODES:
        for include_label in (True, False) if kind == "topk" else (False,):
            for T, Tc in TEMPERATURES["renorm" if kind == "sampled" else mass]:
                for kd_weight in (0.5, 1.0):
                    for extra in EXTRAS:
                        cases.append(_case(kind, div, mass, include_label, T, Tc, kd_weight, extra))
    return cases


def _float32_cases() -> list[Any]:
    """Every mode and label setting once per kd_weight, rotating through the other options."""
    cases, i = [], 0
    for kind, div, mass in MODES:
        for include_label in (True, False) if kind == "topk" else (False,):
            for kd_weight in (0.5, 1.0):
                temps = TEMPERATURES["renorm" if kind == "sampled" else mass]
                T, Tc = temps[i % len(temps)]
                extra = EXTRAS[i % len(EXTRAS)]
                cases.append(_case(kind, div, mass, include_label, T, Tc, kd_weight, extra))
                i += 1
    return cases


def test_extension_is_built():
    assert native_available(), "pangu_fastkd._C is missing: pip install --no-build-isolation -e ."
    assert torch.ops.pangu_fastkd.sparse_kd_fused.default is not None


@pytest.mark.parametrize(("sample", "options"), _float64_cases())
def test_matches_reference_float64(sample, options):
    _check_against_reference(sample_inputs(dtype=torch.float64, **sample), **options)


@pytest.mark.parametrize(("sample", "options"), _float32_cases())
def test_matches_reference_float32(sample, options):
    _check_against_reference(sample_inputs(dtype=torch.float32, **sample), **options)


@pytest.mark.parametrize("beta", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("mass", MISSING_MASS_MODES)
def test_jsd_beta_matches_reference(beta, mass):
    _check_against_reference(
        sample_inputs(bias=True), divergence="jsd", beta=beta, missing_mass=mass, kd_weight=0.7
    )


@pytest.mark.parametrize("mass", MISSING_MASS_MODES)
@pytest.mark.parametrize("div", DIVERGENCES)
def test_neg_inf_teacher_logits(div, mass):
    inputs = sample_inputs(neg_inf_teacher=True, k=30, seed=3)
    assert bool((inputs.target.logits == -math.inf).any()), "the sample must hold -inf slots"
    _check_against_reference(inputs, divergence=div, missing_mass=mass)


def test_ignore_index_and_int32_labels():
    inputs = sample_inputs(kind="topk")
    relabeled = dataclasses.replace(
        inputs, labels=torch.where(inputs.supervised, inputs.labels, -1).to(torch.int32)
    )
    expected = _run(_reference_loss, inputs)
    got = _run(_kernel_loss, relabeled, ignore_index=-1)
    _assert_close(got.loss, expected.loss, 1e-9, "loss")
    for a, e in zip(got.grads, expected.grads, strict=True):
        _assert_close(a, e, 1e-9, "grad")


@pytest.mark.parametrize("loss_fn", [_kernel_loss, _reference_loss], ids=["kernel", "reference"])
def test_ignored_rows_are_never_read(loss_fn):
    """docs/kd-losses.md: validation covers supervised rows; ignored rows are never read."""
    inputs = sample_inputs(seed=79)
    row = int((~inputs.supervised).nonzero()[0, 0])
    tg = inputs.target
    ids, logits, lse = tg.ids.clone(), tg.logits.clone(), tg.lse.clone()
    ids[row] = torch.tensor([-7, 10_000, 3, 3, -1])  # out of range and duplicated
    logits[row] = math.nan
    lse[row] = math.inf
    garbage = dataclasses.replace(
        inputs, target=dataclasses.replace(tg, ids=ids, logits=logits, lse=lse)
    )
    expected, _ = loss_fn(inputs)
    loss, _ = loss_fn(garbage)
    _assert_close(loss, expected, 0.0, "loss")


# ---------------------------------------------------------------------------------------------
# 2. Statistics


@pytest.mark.parametrize(("kind", "div", "mass"), MODES)
def test_stats_columns(kind, div, mass):
    inputs = sample_inputs(kind=kind, seed=5)
    include_label = kind == "topk"
    options = {"divergence": div, "missing_mass": mass, "include_label": include_label}
    kernel = _check_against_reference(inputs, kd_weight=0.5, **options)
    stats = KDStats.from_matrix(kernel.stats)
    sup = inputs.supervised
    assert bool((~sup).any()), "the sample must have ignored rows"
    for column in stats:
        assert column.shape == (inputs.hidden.shape[0],) and column.dtype == torch.float32
        assert bool((column[~sup] == 0).all())
    # Sanity of the meaning of each column on supervised rows.
    assert bool((stats.student_mass[sup] > 0).all() and (stats.student_mass[sup] <= 1).all())
    if kind == "sampled" or mass == "renorm":
        torch.testing.assert_close(stats.teacher_mass[sup], torch.ones(int(sup.sum())))
    else:
        assert bool((stats.teacher_mass[sup] > 0).all() and (stats.teacher_mass[sup] < 1).all())
    logits = inputs.hidden[sup] @ inputs.weight.T
    torch.testing.assert_close(stats.student_lse[sup], torch.logsumexp(logits, 1).float())
    ce = F.cross_entropy(logits, inputs.labels[sup], reduction="none").float()
    torch.testing.assert_close(stats.cross_entropy[sup], ce)
    correct = (logits.argmax(1) == inputs.labels[sup]).float()
    torch.testing.assert_close(stats.correct[sup], correct)
    # Asking for statistics changes nothing else.
    plain = fused_linear_sparse_kd(
        inputs.hidden, inputs.weight, inputs.labels, inputs.target, kd_weight=0.5, **options
    )
    assert torch.equal(plain, kernel.loss)


# ---------------------------------------------------------------------------------------------
# 3. bf16 / fp16: at most 2x plain PyTorch's error against fp32

LOW_PRECISION = [
    ("topk", "forward_kl", "tail", "mean", False, None),
    ("topk", "reverse_kl", "tail", "sum", True, 30.0),
    ("topk", "jsd", "tail", "mean", True, None),
    ("topk", "forward_kl", "renorm", "num_items", True, 30.0),
    ("topk", "reverse_kl", "renorm", "mean", False, 30.0),
    ("topk", "jsd", "renorm", "sum", False, None),
    ("sampled", "forward_kl", "tail", "mean", True, 30.0),
]


@pytest.mark.parametrize(
    ("dtype", "kind", "div", "mass", "reduction", "bias", "softcap"),
    [(torch.bfloat16, *c) for c in LOW_PRECISION]
    + [(torch.float16, *LOW_PRECISION[i]) for i in (0, 4, 6)],
)
def test_low_precision_error_within_2x_pytorch(dtype, kind, div, mass, reduction, bias, softcap):
    inputs = sample_inputs(32, 2048, 64, 16, dtype=torch.float32, kind=kind, bias=bias, seed=7)
    options = _options(
        reduction,
        kd_weight=0.5,
        divergence=div,
        missing_mass=mass,
        include_label=kind == "topk",
        softcap=softcap,
        z_loss=1e-4,
    )
    _check_low_precision(inputs, dtype, **options)


def test_low_precision_cross_entropy_only():
    inputs = sample_inputs(32, 2048, 64, 16, dtype=torch.float32, bias=True, seed=8)
    _check_low_precision(inputs, torch.bfloat16, kd_weight=0.0, z_loss=1e-3)


# ---------------------------------------------------------------------------------------------
# 4. gradcheck

GRADCHECK = [
    ("topk", {"divergence": "forward_kl", "missing_mass": "tail"}),
    ("topk", {"divergence": "reverse_kl", "missing_mass": "tail", "include_label": False}),
    ("topk", {"divergence": "jsd", "missing_mass": "tail", "beta": 0.3}),
    ("topk", {"divergence": "forward_kl", "missing_mass": "renorm", "temperature": 2.0}),
    ("topk", {"divergence": "reverse_kl", "missing_mass": "renorm"}),
    ("topk", {"divergence": "jsd", "missing_mass": "renorm", "temperature": 0.5}),
    ("sampled", {"temperature": 2.0, "reduction": "sum"}),
    ("topk", {"softcap": 5.0, "kd_weight": 0.5, "z_loss": 1e-2, "divergence": "jsd"}),
    ("topk", {"kd_weight": 0.0, "softcap": 3.0, "num_items": 3}),
]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("kind", "options"), GRADCHECK)
def test_gradcheck(kind, options, bias):
    inputs = sample_inputs(5, 7, 3, 3, kind=kind, bias=bias, logit_scale=2.0, seed=11)
    _check_gradients(inputs, **options)


def test_backward_without_loss_gradient():
    """autograd may call backward with no gradient for the loss (an undefined grad, None in
    Python): gradcheck's check_undefined_grad; it must give zero or no gradients, not crash."""
    inputs = sample_inputs(5, 7, 3, 3, bias=True, logit_scale=2.0, seed=11)
    _check_gradients(inputs, check_undefined_grad=True, kd_weight=0.5)


def test_stats_are_not_differentiable():
    """The kernel computes no gradient of the statistics: they must not pretend to have one."""
    inputs = sample_inputs(seed=83).fresh()
    loss, stats = fused_linear_sparse_kd(
        inputs.hidden, inputs.weight, inputs.labels, inputs.target, return_stats=True
    )
    assert loss.requires_grad
    for name, column in zip(KDStats._fields, stats, strict=True):
        assert not column.requires_grad, f"stats.{name} requires grad"


def test_repeated_backward_accumulates():
    """backward(retain_graph=True) three times accumulates three gradients, as in PyTorch."""
    inputs = sample_inputs(bias=True, seed=89)
    once = _run(_kernel_loss, inputs)
    leaves = inputs.fresh()
    loss, _ = _kernel_loss(leaves)
    for _ in range(3):
        loss.backward(retain_graph=True)
    for t, g in zip(leaves.leaves(), once.grads, strict=True):
        _assert_close(t.grad, 3 * g, 1e-12, "accumulated grad")
    # autograd.grad hands out fresh tensors: editing one in place leaves the next call intact.
    leaves = inputs.fresh()
    loss, _ = _kernel_loss(leaves)
    first = torch.autograd.grad(loss, leaves.hidden, retain_graph=True)[0]
    first.zero_()
    second = torch.autograd.grad(loss, leaves.hidden)[0]
    _assert_close(second, once.grads[0], 1e-12, "grad after editing the previous one")


# ---------------------------------------------------------------------------------------------
# 5. Chunk size and thread count do not change the result


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunk_size_invariance(dtype):
    inputs = sample_inputs(29, 53, 8, 6, dtype=dtype, bias=True, seed=13)
    options = {"divergence": "jsd", "kd_weight": 0.5, "softcap": 30.0}
    base = _run(_kernel_loss, inputs, **options)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for chunk_rows in (1, 7, 29, 10_000):
        run = _run(_kernel_loss, inputs, chunk_rows=chunk_rows, **options)
        _assert_close(run.loss, base.loss, tol, f"loss, chunk_rows={chunk_rows}")
        _assert_close(run.stats, base.stats, 1e-6, f"stats, chunk_rows={chunk_rows}")
        for a, e in zip(run.grads, base.grads, strict=True):
            _assert_close(a, e, tol, f"grad, chunk_rows={chunk_rows}")


def test_default_chunking_from_memory_budget(monkeypatch):
    # A 1 MiB budget for float64 logits with V = 2048 gives 64-row chunks: the 113 supervised
    # rows of these 150 take two.
    inputs = sample_inputs(150, 2048, 4, 4, seed=17)
    whole = _run(_kernel_loss, inputs, chunk_rows=150)
    monkeypatch.setenv("PANGU_FASTKD_CHUNK_MB", "1")
    chunked = _run(_kernel_loss, inputs)
    _assert_close(chunked.loss, whole.loss, 1e-12, "loss")
    for a, e in zip(chunked.grads, whole.grads, strict=True):
        _assert_close(a, e, 1e-12, "grad")


@pytest.fixture
def restore_num_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_thread_count_invariance(dtype, restore_num_threads):
    inputs = sample_inputs(40, 97, 8, 6, dtype=dtype, bias=True, seed=19)
    options = {"divergence": "reverse_kl", "missing_mass": "renorm", "temperature": 2.0}
    torch.set_num_threads(1)
    one = _run(_kernel_loss, inputs, chunk_rows=16, **options)
    torch.set_num_threads(2)
    two = _run(_kernel_loss, inputs, chunk_rows=16, **options)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    _assert_close(two.loss, one.loss, tol, "loss")
    _assert_close(two.stats, one.stats, 1e-6, "stats")
    for a, e in zip(two.grads, one.grads, strict=True):
        _assert_close(a, e, tol, "grad")


# ---------------------------------------------------------------------------------------------
# 6. Properties over random shapes (hypothesis)


@st.composite
def kd_problems(draw, mode=None, logit_scales=(1.0, 5.0, 20.0)):
    """(sample_inputs kwargs, loss options) of a random small problem; ``mode`` fixes
    (kind, divergence, missing_mass), which is otherwise drawn too."""
    n = draw(st.integers(1, 6))
    vocab = draw(st.integers(1, 24))
    k = draw(st.integers(1, vocab))
    kind, div, mass = mode if mode is not None else draw(st.sampled_from(MODES))
    topk = kind == "topk"
    cache_t = draw(st.sampled_from([1.0, 2.0, 0.5]))
    sample = {
        "n": n,
        "vocab": vocab,
        "k": k,
        "d": draw(st.integers(1, 6)),
        "kind": kind,
        "bias": draw(st.booleans()),
        "cache_temperature": cache_t,
        "ignored": draw(st.lists(st.booleans(), min_size=n, max_size=n)),
        "label_in_support": draw(st.lists(st.booleans(), min_size=n, max_size=n)),
        "empty_slots": draw(st.integers(0, 3)),
        "neg_inf_teacher": topk and draw(st.booleans()),
        "logit_scale": draw(st.sampled_from(logit_scales)),
        "seed": draw(st.integers(0, 2**16)),
    }
    options = _options(
        draw(st.sampled_from(["sum", "mean", "num_items"])),
        kd_weight=draw(st.sampled_from([0.0, 0.5, 1.0])),
        divergence=div,
        missing_mass=mass,
        include_label=topk and draw(st.booleans()),
        temperature=cache_t if mass == "tail" else draw(st.sampled_from([1.0, 2.0, 0.5])),
        softcap=draw(st.sampled_from([None, 30.0])),
        z_loss=draw(st.sampled_from([0.0, 1e-3])),
    )
    return sample, options


# The two tests against the reference run once per mode, so that each mode gets its examples
# (hypothesis's derandomized draws are far from uniform over a sampled_from).
@pytest.mark.parametrize("mode", MODES, ids=["-".join(m) for m in MODES])
def test_property_matches_reference(mode):
    @PER_MODE
    @given(problem=kd_problems(mode))
    def check(problem):
        sample, options = problem
        _check_against_reference(sample_inputs(**sample), **options)

    check()


@pytest.mark.parametrize("mode", MODES, ids=["-".join(m) for m in MODES])
def test_property_extreme_logits_finite(mode):
    """|h W^T| reaches ~1e4: softmax saturates, probabilities underflow. No NaN, no inf, and the
    reference's answer (it works in log space) within tolerance of the gradient's scale."""

    @PER_MODE
    @given(problem=kd_problems(mode, logit_scales=(1e4,)))
    def check(problem):
        sample, options = problem
        _check_against_reference(sample_inputs(**sample), floor=1.0, **options)

    check()


@PROPERTY
@given(problem=kd_problems(), reduction=st.sampled_from(["sum", "mean", "num_items"]))
def test_property_all_ignored(problem, reduction):
    sample, options = problem
    sample = {**sample, "ignored": [True] * sample["n"]}
    options = {**options, **_options(reduction)}
    if reduction != "num_items":
        options.pop("num_items", None)
    inputs = sample_inputs(**sample)
    if reduction == "mean":
        # A mean over no row is 0 / 0 = NaN, as F.cross_entropy; the gradients are zero.
        kernel, ref = (_run(fn, inputs, **options) for fn in (_kernel_loss, _reference_loss))
        assert math.isnan(kernel.loss.item()) and math.isnan(ref.loss.item())
    else:
        kernel = _check_against_reference(inputs, **options)
        assert kernel.loss.item() == 0.0
    for g in kernel.grads:
        assert bool((g == 0).all())
    assert bool((kernel.stats == 0).all())


@PROPERTY
@given(problem=kd_problems(), extra=st.integers(1, 4))
def test_property_ignored_rows_do_not_count(problem, extra):
    """Appending ignored rows leaves the summed loss and the gradients of the others alone."""
    sample, options = problem
    options = {**options, "reduction": "sum"}
    options.pop("num_items", None)
    base = sample_inputs(**sample)
    n = sample["n"]

    def pad(t: torch.Tensor) -> torch.Tensor:  # the extra rows repeat row 0
        return torch.cat([t, t[:1].repeat(extra, *[1] * (t.dim() - 1))])

    tg = base.target
    tensors = {f.name: getattr(tg, f.name) for f in dataclasses.fields(tg)}
    padded = {k: pad(v) for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    bigger = Inputs(
        torch.cat([base.hidden, torch.full((extra, base.hidden.shape[1]), 0.5).double()]),
        base.weight,
        base.bias,
        torch.cat([base.labels, torch.full((extra,), -100)]),
        dataclasses.replace(tg, **padded),
    )
    small, large = _run(_kernel_loss, base, **options), _run(_kernel_loss, bigger, **options)
    # Invariance only (finiteness is other tests' business): inf == inf passes here.
    torch.testing.assert_close(large.loss, small.loss, rtol=1e-12, atol=1e-12)
    _assert_close(large.grads[0][:n], small.grads[0], 1e-12, "grad hidden")
    assert bool((large.grads[0][n:] == 0).all())
    for a, e in zip(large.grads[1:], small.grads[1:], strict=True):
        _assert_close(a, e, 1e-12, "grad")


EDGE_SHAPES = [(1, 5, 1), (1, 1, 1), (4, 17, 1), (3, 6, 6), (2, 9, 9)]


@pytest.mark.parametrize("mass", MISSING_MASS_MODES)
@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize(("n", "vocab", "k"), EDGE_SHAPES)
def test_edge_shapes(n, vocab, k, div, mass):
    """N = 1, K = 1 and K = V (the support covers the vocabulary; the rest bucket is empty)."""
    inputs = sample_inputs(n, vocab, 3, k, ignored=[False] * n, empty_slots=0, seed=23)
    _check_against_reference(inputs, divergence=div, missing_mass=mass)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mass", MISSING_MASS_MODES)
@pytest.mark.parametrize("div", DIVERGENCES)
def test_extreme_logits(div, mass, dtype):
    """Student logits ~1e4: probabilities underflow, log-probabilities must not."""
    inputs = sample_inputs(dtype=dtype, logit_scale=1e4, seed=29)
    logits = inputs.hidden @ inputs.weight.T
    assert logits.abs().max() > 1e4
    rtol = RTOL[dtype]
    kernel = _run(_kernel_loss, inputs, divergence=div, missing_mass=mass, kd_weight=0.5)
    ref = _run(_reference_loss, inputs, divergence=div, missing_mass=mass, kd_weight=0.5)
    _assert_close(kernel.loss, ref.loss, rtol, "loss")
    for a, e, s in zip(kernel.grads, ref.grads, (inputs.weight, inputs.hidden), strict=True):
        _assert_close(a, e, rtol, "grad", floor=s.abs().max().item())


def test_tail_float32_large_logit_gap():
    """float32 student logits 120 apart: exp(-120) underflows in float32, yet
    q(rest) = 1 - Q_S = 2 e^-120 / (1 + 2 e^-120) is a fine number and so is the loss
    (docs/kd-losses.md: q(rest) "computed from the full student row, so exact")."""
    hidden = torch.tensor([[1.0]])
    weight = torch.tensor([[0.0], [-120.0], [-120.0]])
    teacher = torch.zeros(1, 3)  # p = 1/3 each: p(rest) = 2/3
    target = TopKTarget(
        torch.tensor([[0]], dtype=torch.int32),
        teacher[:, :1],
        torch.logsumexp(teacher, 1),
        teacher[:, 0],
    )
    p_rest = 2 / 3
    log_q_rest = math.log(2) - 120 - math.log1p(2 * math.exp(-120))
    expected = (1 / 3) * math.log(1 / 3) + p_rest * (math.log(p_rest) - log_q_rest)
    inputs = Inputs(hidden, weight, None, torch.tensor([0]), target)
    for name, loss_fn in (("kernel", _kernel_loss), ("reference", _reference_loss)):
        loss, _ = loss_fn(inputs, include_label=False)
        _assert_close(loss, torch.tensor(expected), 1e-6, f"{name} loss")


def test_tail_rest_bucket_is_everything_outside_the_support():
    """The tail bucket holds exactly the tokens outside S, also when the label duplicates a
    stored id (include_label) and when a -1 slot sits next to id 0: docs/kd-losses.md, tail.

    An independent per-row computation in float64 is the oracle for both implementations."""
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    weight = torch.tensor(
        [[0.5, -1.0], [1.5, 0.2], [-0.3, 0.7], [0.0, 1.1], [2.0, -0.4], [-1.0, 0.3]],
        dtype=torch.float64,
    )
    teacher = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0, 0.3], [1.0, -0.5, 0.2, 0.8, -2.0, 0.1]])
    ids = torch.tensor([[0, 1, 2], [0, 3, -1]], dtype=torch.int32)
    labels = torch.tensor([1, 5])  # row 0: label stored; row 1: label outside, id 0 + a -1 slot
    lse = torch.logsumexp(teacher, dim=1)
    target = TopKTarget(
        ids, teacher.gather(1, ids.long().clamp(min=0)), lse, teacher[[0, 1], labels], 1.0
    )
    z = hidden @ weight.T
    logq = torch.log_softmax(z, dim=1)
    expected = []
    for i, support in enumerate([[0, 1, 2], [0, 3, 5]]):
        logp_s = teacher[i, support].double() - lse[i].double()
        p_rest = 1 - logp_s.exp().sum()
        q_rest = 1 - logq[i, support].exp().sum()
        expected.append(
            (logp_s.exp() * (logp_s - logq[i, support])).sum()
            + p_rest * (p_rest.log() - q_rest.log())
        )
    expected = torch.stack(expected).mean()
    inputs = Inputs(hidden, weight, None, labels, target)
    for name, loss_fn in (("kernel", _kernel_loss), ("reference", _reference_loss)):
        loss, _ = loss_fn(inputs, divergence="forward_kl", missing_mass="tail")
        _assert_close(loss, expected, 1e-12, f"{name} loss")


# ---------------------------------------------------------------------------------------------
# 7. Not the last op; plain cross-entropy


def _used_twice(loss: torch.Tensor) -> torch.Tensor:
    return loss * 2 + loss**2  # grad_output = 2 + 2 * loss


@pytest.mark.parametrize(
    "outer",
    [lambda loss: loss * 3.7, lambda loss: -0.25 * loss, _used_twice],
    ids=["times-3.7", "times-minus-0.25", "used-twice"],
)
@pytest.mark.parametrize(("kind", "div", "mass"), [MODES[0], MODES[5], MODES[6]])
def test_loss_not_last_op(outer, kind, div, mass):
    inputs = sample_inputs(kind=kind, bias=True, seed=31)
    options = {"divergence": div, "missing_mass": mass, "include_label": kind == "topk"}
    _check_against_reference(inputs, outer=outer, kd_weight=0.5, z_loss=1e-3, **options)


def test_grad_output_scales_gradients():
    inputs = sample_inputs(bias=True, seed=37)
    one = _run(_kernel_loss, inputs)
    scaled = _run(_kernel_loss, inputs, lambda loss: loss * 3.7)
    for a, e in zip(scaled.grads, one.grads, strict=True):
        _assert_close(a, e * 3.7, 1e-12, "grad")


@pytest.mark.parametrize("ignore_index", [-100, -1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "num_items"])
@pytest.mark.parametrize("bias", [False, True])
def test_cross_entropy_matches_torch(bias, reduction, ignore_index):
    inputs = sample_inputs(bias=bias, kind="topk", seed=41)
    labels = torch.where(inputs.supervised, inputs.labels, ignore_index)
    options = _options(reduction)
    h, w, *b = inputs.fresh().leaves()
    loss = fused_linear_cross_entropy(
        h, w, labels, bias=b[0] if b else None, ignore_index=ignore_index, **options
    )
    loss.backward()
    h2, w2, *b2 = inputs.fresh().leaves()
    logits = F.linear(h2, w2, b2[0] if b2 else None)
    torch_reduction = "mean" if reduction == "mean" else "sum"
    expected = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=torch_reduction)
    if reduction == "num_items":
        expected = expected / NUM_ITEMS
    expected.backward()
    _assert_close(loss, expected, 1e-9, "loss")
    for a, e in zip([t.grad for t in (h, w, *b)], [t.grad for t in (h2, w2, *b2)], strict=True):
        _assert_close(a, e, 1e-9, "grad")


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_cross_entropy_z_loss_and_softcap(softcap):
    inputs = sample_inputs(bias=True, seed=43)
    options = {"kd_weight": 0.0, "z_loss": 1e-2, "softcap": softcap}
    _check_against_reference(dataclasses.replace(inputs, target=None), **options)
    # ... and against the formula on materialised logits: CE + z_loss * lse^2.
    h, w, b = inputs.fresh().leaves()
    loss = fused_linear_cross_entropy(h, w, inputs.labels, bias=b, z_loss=1e-2, softcap=softcap)
    z = F.linear(inputs.hidden, inputs.weight, inputs.bias)[inputs.supervised]
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    y = inputs.labels[inputs.supervised]
    expected = F.cross_entropy(z, y) + 1e-2 * torch.logsumexp(z, dim=1).pow(2).mean()
    _assert_close(loss.detach(), expected, 1e-9, "loss")


def test_cross_entropy_stats():
    inputs = sample_inputs(seed=47)
    loss, stats = fused_linear_cross_entropy(
        inputs.hidden, inputs.weight, inputs.labels, return_stats=True
    )
    sup = inputs.supervised
    for column in (stats.divergence, stats.student_mass, stats.teacher_mass):
        assert bool((column == 0).all())
    _assert_close(stats.cross_entropy[sup].double().mean(), loss, 1e-6, "mean CE")


def test_gradient_accumulation_with_num_items():
    """Two micro-batches with num_items = the global count give the gradient of one batch."""
    inputs = sample_inputs(20, 37, 8, 5, seed=53, bias=True)
    n_sup = int(inputs.supervised.sum())
    whole = _run(_kernel_loss, inputs, reduction="mean")
    halves = [
        Inputs(
            inputs.hidden[s],
            inputs.weight,
            inputs.bias,
            inputs.labels[s],
            dataclasses.replace(
                inputs.target,
                ids=inputs.target.ids[s],
                logits=inputs.target.logits[s],
                lse=inputs.target.lse[s],
                label_logit=inputs.target.label_logit[s],
            ),
        )
        for s in (slice(0, 7), slice(7, 20))
    ]
    runs = [_run(_kernel_loss, half, num_items=torch.tensor(n_sup)) for half in halves]
    _assert_close(runs[0].loss + runs[1].loss, whole.loss, 1e-12, "loss")
    _assert_close(torch.cat([r.grads[0] for r in runs]), whole.grads[0], 1e-12, "grad hidden")
    for i in (1, 2):
        _assert_close(runs[0].grads[i] + runs[1].grads[i], whole.grads[i], 1e-12, "grad")


# ---------------------------------------------------------------------------------------------
# 8. opcheck and torch.compile


@pytest.mark.parametrize(
    ("kind", "bias", "options"),
    [
        ("topk", True, {"kd_weight": 0.5, "divergence": "jsd", "softcap": 30.0}),
        ("topk", False, {"missing_mass": "renorm", "compute_stats": False, "chunk_rows": 3}),
        ("sampled", True, {"include_label": False, "reduction": "sum", "need_grad": False}),
        ("topk", False, {"kd_weight": 0.0, "z_loss": 1e-3}),
    ],
    ids=["topk-bias-stats", "renorm-nobias-nostats", "sampled-nograd", "ce"],
)
def test_opcheck(kind, bias, options):
    inputs = sample_inputs(6, 11, 4, 3, kind=kind, bias=bias, seed=59)
    if options.get("kd_weight") == 0.0:
        inputs = dataclasses.replace(inputs, target=None)
    if options.get("need_grad", True):
        inputs = inputs.fresh()
    _opcheck(inputs, **options)


def _compiled_step(hidden, weight, bias, labels, ids, logits, lse, label_logit):
    target = TopKTarget(ids, logits, lse, label_logit, 1.0)
    loss = fused_linear_sparse_kd(
        hidden * 1.0, weight, labels, target, bias=bias, kd_weight=0.5, divergence="jsd"
    )
    return loss * 2.0  # not the last op


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    inputs = sample_inputs(6, 11, 4, 3, bias=True, seed=61)
    tg = inputs.target
    extra = (inputs.labels, tg.ids, tg.logits, tg.lse, tg.label_logit)
    compiled = torch.compile(_compiled_step, fullgraph=True, backend=backend)
    results = []
    for fn in (_compiled_step, compiled):
        leaves = inputs.fresh().leaves()
        loss = fn(*leaves, *extra)
        loss.backward()
        results.append((loss.detach(), [t.grad for t in leaves]))
    (eager_loss, eager_grads), (loss, grads) = results
    _assert_close(loss, eager_loss, 1e-12, "loss")
    for a, e in zip(grads, eager_grads, strict=True):
        _assert_close(a, e, 1e-12, "grad")


# Device checks: this machine has only the CPU. Mixing CPU and meta tensors is no test of them:
# PyTorch itself then runs meta kernels and returns uninitialised CPU memory (F.linear does too).
@pytest.mark.parametrize("kd_weight", [0.0, 0.5])
def test_reference_makes_its_tensors_on_the_inputs_device(kd_weight):
    # The NPU falls back to the reference: its zeros and statistics must be made on the inputs'
    # device. With the default device set to meta, any tensor created without a device would be
    # a meta tensor, and mixing it with the CPU inputs raises.
    inputs = sample_inputs(6, 11, 4, 3, dtype=torch.float32, seed=71)
    target = inputs.target if kd_weight > 0 else None
    args = (inputs.hidden, inputs.weight, inputs.labels, target)
    expected = sparse_kd_reference(*args, kd_weight=kd_weight)
    with torch.device("meta"):
        loss, stats = sparse_kd_reference(*args, kd_weight=kd_weight)
    assert loss.device == inputs.hidden.device and stats.device == inputs.hidden.device
    torch.testing.assert_close((loss, stats), expected, rtol=0, atol=0)


def test_meta_tensors_propagate_shapes():
    inputs = sample_inputs(6, 11, 4, 3, dtype=torch.float32, seed=67)
    tg = inputs.target
    meta_target = TopKTarget(*(t.to("meta") for t in (tg.ids, tg.logits, tg.lse, tg.label_logit)))
    loss, stats = fused_linear_sparse_kd(
        inputs.hidden.to("meta"),
        inputs.weight.to("meta"),
        inputs.labels.to("meta"),
        meta_target,
        return_stats=True,
    )
    assert loss.device.type == "meta" and loss.shape == () and loss.dtype == torch.float32
    assert all(c.shape == (6,) and c.device.type == "meta" for c in stats)


# ---------------------------------------------------------------------------------------------
# 9. Bad input: a clear Python exception, never a crash

N_, V_, D_, K_ = 5, 9, 3, 3  # the bad-input problem: row 1 is supervised, row 3 ignored
Change = Callable[[dict, dict], None]  # edits (Inputs fields, options) in place


def _fields(**changes: Callable[[Any], Any] | Any) -> Change:
    """Replaces Inputs fields: by a value, or by a function of the old value."""

    def change(f: dict, o: dict) -> None:
        for name, new in changes.items():
            f[name] = new(f[name]) if callable(new) else new

    return change


def _target(**changes: Callable[[torch.Tensor], torch.Tensor]) -> Change:
    """Replaces target fields by functions of the old tensors."""

    def change(f: dict, o: dict) -> None:
        tg = f["target"]
        f["target"] = dataclasses.replace(tg, **{k: v(getattr(tg, k)) for k, v in changes.items()})

    return change


def _opt(**options: Any) -> Change:
    return lambda f, o: o.update(options)


def _all(*changes: Change) -> Change:
    def change(f: dict, o: dict) -> None:
        for c in changes:
            c(f, o)

    return change


def _at(index: Any, value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """A copy of the tensor with ``[index] = value``."""

    def set_at(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[index] = value
        return t

    return set_at


def _duplicate_in_row_1(ids: torch.Tensor) -> torch.Tensor:
    ids = ids.clone()
    ids[1, 1] = ids[1, 0]
    return ids


def _bad(name: str, change: Change, kernel: tuple, reference: tuple | None = None) -> Any:
    """One bad input. ``kernel``/``reference``: (exception type, message fragment) raised by the
    public API on CPU tensors (the C++ kernel) and by the reference; reference None where the
    reference does not check that input (option values are checked by the API or the op)."""
    return pytest.param(change, kernel, reference, id=name)


RANGE = "target ids must lie in [0, 9) or be -1"
TEACHER_LOGITS = "teacher logits must be finite or -inf"
EMPTY = "supervised row 1 has an empty teacher support"
LABELS = "labels must lie in [0, 9) or equal ignore_index=-100"
TAIL_T = "missing_mass='tail' needs temperature == cache temperature"
BAD_TOPK = [
    _bad(
        "int-hidden",
        _fields(hidden=torch.Tensor.long, weight=torch.Tensor.long),
        (TypeError, "hidden must be a floating tensor, got Long"),
    ),
    _bad(
        "weight-dtype",
        _fields(weight=torch.Tensor.double),
        (TypeError, "weight dtype Double differs from hidden dtype Float"),
        (TypeError, "weight dtype torch.float64 differs from hidden dtype torch.float32"),
    ),
    _bad(
        "bias-dtype",
        _fields(bias=torch.zeros(V_, dtype=torch.float64)),
        (TypeError, "bias dtype Double differs from hidden dtype Float"),
        (TypeError, "bias dtype torch.float64 differs from hidden dtype torch.float32"),
    ),
    _bad(
        "float-labels",
        _fields(labels=torch.Tensor.float),
        (TypeError, "labels must be int64 or int32, got Float"),
        (TypeError, "labels must be int64 or int32, got torch.float32"),
    ),
    _bad(
        "d-mismatch",
        _fields(weight=torch.zeros(V_, D_ + 1)),
        (ValueError, "weight is [V, d] with d = 4 but hidden has d = 3"),
        (ValueError, "weight is [V, d] with d = 4 but hidden has d = 3"),
    ),
    _bad(
        "hidden-3d",
        _fields(hidden=lambda h: h[None]),
        (ValueError, "hidden must be [N, d], got shape [1, 5, 3]"),
        (ValueError, "hidden must be [N, d], got shape (1, 5, 3)"),
    ),
    _bad(
        "labels-too-long",
        _fields(labels=torch.zeros(N_ + 1, dtype=torch.long)),
        (ValueError, "labels must be [N] = [5], got shape [6]"),
        (ValueError, "labels must be [N] = [5], got shape (6,)"),
    ),
    _bad(
        "labels-too-short",
        _fields(labels=lambda y: y[:-1]),
        (ValueError, "labels must be [N] = [5], got shape [4]"),
        (ValueError, "labels must be [N] = [5], got shape (4,)"),
    ),
    _bad(
        "bias-shape",
        _fields(bias=torch.zeros(V_ + 1)),
        (ValueError, "bias must be [V] = [9], got shape [10]"),
        (ValueError, "bias must be [V] = [9], got shape (10,)"),
    ),
    _bad(
        "ids-logits-shape",
        _target(logits=lambda t: t[:, :-1]),
        (ValueError, "teacher logits must match ids' shape [5, 3], got [5, 2]"),
        (ValueError, "teacher logits must match ids' shape (5, 3), got (5, 2)"),
    ),
    _bad(
        "ids-rows",
        _target(ids=lambda t: t[:-1], logits=lambda t: t[:-1]),
        (ValueError, "target ids must be [N, K] with N = 5, got shape [4, 3]"),
        (ValueError, "target ids must be [N, K] with N = 5, got shape (4, 3)"),
    ),
    _bad(
        "lse-length",
        _target(lse=lambda t: t[:-1]),
        (ValueError, "teacher lse must be [N] = [5], got shape [4]"),
        (ValueError, "teacher lse must be [N] = [5], got shape (4,)"),
    ),
    _bad(
        "label-logit-length",
        _target(label_logit=lambda t: t[:-1]),
        (ValueError, "label_logit must be [N] = [5], got shape [4]"),
        (ValueError, "label_logit must be [N] = [5], got shape (4,)"),
    ),
    _bad(
        "float-ids",
        _target(ids=torch.Tensor.float),
        (TypeError, "target ids must be an integer tensor, got Float"),
        (TypeError, "target ids must be an integer tensor, got torch.float32"),
    ),
    _bad(
        "int-teacher-logits",
        _target(logits=torch.Tensor.long),
        (TypeError, "teacher logits must be a floating tensor, got Long"),
        (TypeError, "teacher logits must be a floating tensor, got torch.int64"),
    ),
    _bad(
        "id-equal-V",
        _target(ids=_at((1, 0), V_)),
        (ValueError, f"{RANGE}, got 9 (row 1)"),
        (ValueError, f"{RANGE} (row 1)"),
    ),
    _bad(
        "id-below-minus-1",
        _target(ids=_at((1, 0), -2)),
        (ValueError, f"{RANGE}, got -2 (row 1)"),
        (ValueError, f"{RANGE} (row 1)"),
    ),
    _bad(
        "duplicate-ids",
        _target(ids=_duplicate_in_row_1),
        (ValueError, "target ids must be distinct within a row (row 1)"),
        (ValueError, "target ids must be distinct within a row (row 1)"),
    ),
    _bad(
        "k-zero",
        _all(_target(ids=lambda t: t[:, :0], logits=lambda t: t[:, :0]), _opt(include_label=False)),
        (ValueError, "target ids must have K >= 1 columns, got K = 0"),
        (ValueError, "target ids must have K >= 1 columns, got K = 0"),
    ),
    _bad(
        "lse-inf",
        _target(lse=_at(1, math.inf)),
        (ValueError, "teacher lse must be finite, got inf (row 1)"),
        (ValueError, "teacher lse must be finite (row 1)"),
    ),
    _bad(
        "lse-nan",
        _target(lse=_at(1, math.nan)),
        (ValueError, "teacher lse must be finite, got nan (row 1)"),
        (ValueError, "teacher lse must be finite (row 1)"),
    ),
    _bad(
        "teacher-logit-nan",
        _target(logits=_at((1, 1), math.nan)),
        (ValueError, f"{TEACHER_LOGITS}, got nan (row 1)"),
        (ValueError, f"{TEACHER_LOGITS} (row 1)"),
    ),
    _bad(
        "teacher-logit-plus-inf",
        _target(logits=_at((1, 1), math.inf)),
        (ValueError, f"{TEACHER_LOGITS}, got inf (row 1)"),
        (ValueError, f"{TEACHER_LOGITS} (row 1)"),
    ),
    _bad(
        "label-logit-nan",
        _target(label_logit=_at(1, math.nan)),
        (ValueError, "teacher label_logit must be finite or -inf, got nan (row 1)"),
        (ValueError, "teacher label_logit must be finite or -inf (row 1)"),
    ),
    _bad(
        "tail-temperature-not-cache-temperature",
        _opt(temperature=2.0),
        (ValueError, f"{TAIL_T} (2 != 1); use missing_mass='renorm'"),
        (ValueError, f"{TAIL_T} (2.0 != 1.0); use missing_mass='renorm'"),
    ),
    _bad(
        "label-equal-V",
        _fields(labels=_at(1, V_)),
        (ValueError, f"{LABELS}, got 9 (row 1)"),
        (ValueError, LABELS),
    ),
    _bad(
        "label-negative",
        _fields(labels=_at(1, -5)),
        (ValueError, f"{LABELS}, got -5 (row 1)"),
        (ValueError, LABELS),
    ),
    _bad(
        "no-target",
        _fields(target=None),
        (ValueError, "kd_weight > 0 needs a teacher target; use kd_weight=0"),
        (ValueError, "kd_weight > 0 needs a teacher target"),
    ),
    _bad(
        "empty-support",
        _all(_target(ids=_at(1, -1)), _opt(include_label=False)),
        (ValueError, f"{EMPTY} (every id is -1) while kd_weight > 0"),
        (ValueError, EMPTY),
    ),
    _bad(
        "renorm-no-finite-teacher-logit",
        _all(
            _target(logits=_at(1, -math.inf), label_logit=_at(1, -math.inf)),
            _opt(missing_mass="renorm"),
        ),
        (ValueError, "row 1 has no finite teacher logit on its support"),
    ),
    _bad(
        "unknown-divergence",
        _opt(divergence="kl"),
        (ValueError, "divergence must be one of ('forward_kl', 'reverse_kl', 'jsd'), got 'kl'"),
    ),
    _bad(
        "unknown-missing-mass",
        _opt(missing_mass="drop"),
        (ValueError, "missing_mass must be one of ('tail', 'renorm'), got 'drop'"),
    ),
    _bad(
        "unknown-reduction",
        _opt(reduction="none"),
        (ValueError, "reduction must be one of ('sum', 'mean'), got 'none'"),
    ),
    _bad("kd-weight-above-1", _opt(kd_weight=1.5), (ValueError, "kd_weight must be in [0, 1]")),
    _bad("beta-above-1", _opt(divergence="jsd", beta=2.0), (ValueError, "beta must be in [0, 1]")),
    _bad(
        "temperature-zero",
        _opt(temperature=0.0, missing_mass="renorm"),
        (ValueError, "temperature must be > 0, got 0"),
    ),
    _bad(
        "negative-z-loss",
        _opt(z_loss=-1.0),
        (ValueError, "z_loss must be finite and >= 0, got -1"),
    ),
    _bad(
        "num-items-zero", _opt(num_items=0), (ValueError, "num_items must be finite and > 0, got 0")
    ),
    _bad(
        "softcap-zero", _opt(softcap=0.0), (ValueError, "softcap must be finite and > 0, or None")
    ),
    _bad(
        "chunk-rows-zero",
        _opt(chunk_rows=0),
        (ValueError, "chunk_rows must be >= 1, got 0"),
        (None, "the reference has no chunks"),
    ),
    _bad(
        "target-not-a-target",
        _fields(target=lambda tg: (tg.ids, tg.logits)),
        (TypeError, "target must be a TopKTarget, a SampledTarget or None, got tuple"),
    ),
]
WEIGHTS = "sampled weights must be >= 0 and finite"
BAD_SAMPLED = [
    _bad(
        "weights-do-not-sum-to-1",
        _target(weights=lambda w: w * 0.9),
        (ValueError, "sampled weights must sum to 1 (within 1e-3), got 0.9"),
        (ValueError, "sampled weights must sum to 1 (within 1e-3) (row 0)"),
    ),
    _bad(
        "negative-weight",
        _target(weights=_at((1, 0), -0.1)),
        (ValueError, f"{WEIGHTS}, got -0.1 (row 1)"),
        (ValueError, f"{WEIGHTS} (row 1)"),
    ),
    _bad(
        "nan-weight",
        _target(weights=_at((1, 0), math.nan)),
        (ValueError, f"{WEIGHTS}, got nan (row 1)"),
        (ValueError, f"{WEIGHTS} (row 1)"),
    ),
    _bad(
        "id-out-of-range",
        _target(ids=_at((2, 1), 100)),
        (ValueError, f"{RANGE}, got 100 (row 2)"),
        (ValueError, f"{RANGE} (row 2)"),
    ),
    _bad(
        "include-label",
        _opt(include_label=True),
        (ValueError, "include_label applies to top-K targets only"),
    ),
    _bad(
        "reverse-kl",
        _opt(divergence="reverse_kl"),
        (ValueError, "sampled targets support only divergence='forward_kl'"),
    ),
    _bad("jsd", _opt(divergence="jsd"), (ValueError, "only divergence='forward_kl'")),
]


def _check_bad_input(kind: str, change: Change, kernel: tuple, reference: tuple | None) -> None:
    inputs = sample_inputs(N_, V_, D_, K_, dtype=torch.float32, kind=kind, seed=71)
    assert bool(inputs.supervised[1]) and not bool(inputs.supervised[3])
    fields = {f.name: getattr(inputs, f.name) for f in dataclasses.fields(inputs)}
    options: dict[str, Any] = {"include_label": kind == "topk"}
    change(fields, options)
    bad = Inputs(**fields)
    exc, fragment = kernel
    with pytest.raises(exc) as info:
        fused_linear_sparse_kd(
            bad.hidden, bad.weight, bad.labels, bad.target, bias=bad.bias, **options
        )
    assert fragment in str(info.value), f"{str(info.value)!r} lacks {fragment!r}"
    # The reference is the fallback on other devices: it must reject the same input, with the
    # same exception type (and the given message where its wording differs from the kernel's).
    exc, fragment = reference if reference is not None else (exc, "")
    if exc is None:
        return
    with pytest.raises(exc) as info:
        _reference_loss(bad, **options)
    assert fragment in str(info.value), f"{str(info.value)!r} lacks {fragment!r}"


@pytest.mark.parametrize(("change", "kernel", "reference"), BAD_TOPK)
def test_bad_input_topk(change, kernel, reference):
    _check_bad_input("topk", change, kernel, reference)


@pytest.mark.parametrize(("change", "kernel", "reference"), BAD_SAMPLED)
def test_bad_input_sampled(change, kernel, reference):
    _check_bad_input("sampled", change, kernel, reference)


def test_bad_input_at_the_op():
    """The op checks its own arguments, for callers that bypass the Python API."""
    op = torch.ops.pangu_fastkd.sparse_kd_fused.default
    args = _op_args(sample_inputs(N_, V_, D_, K_, dtype=torch.float32, seed=73))
    cases = [
        (8, torch.full((N_, K_), 1 / K_), "either teacher_logits (top-K) or sample_weights"),
        (6, None, "a top-K target needs teacher lse and label_logit"),
        (4, None, "kd_weight > 0 needs a teacher target (ids)"),
        (10, 7, "unknown divergence code 7"),
        (14, 2, "unknown missing_mass code 2"),
        (19, 5, "unknown reduction code 5"),
    ]
    for index, value, fragment in cases:
        bad = list(args)
        bad[index] = value
        with pytest.raises(ValueError) as info:
            op(*bad)
        assert fragment in str(info.value), f"{str(info.value)!r} lacks {fragment!r}"
