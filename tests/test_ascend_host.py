"""The NPU host code of ``sparse_kd_fused`` (csrc/ascend/host/sparse_kd_npu.cpp), run on CPU.

The host code, its kernel entry points (csrc/ascend/sparse_kd_epilogue.cpp) and the module
(csrc/ascend/host/module.cpp) are compiled with ``PANGU_FASTKD_ASCEND_TWIN`` against stand-ins for
the CANN and torch_npu headers (tests/ascend_twin/host) and the CPU twin of the Ascend C API
(tests/ascend_twin/include), in the twin module every host test shares
(tests/ascend_host_build.py): the chunk loop's ATen GEMMs run on CPU tensors and every epilogue
launch goes through ``ACLRT_LAUNCH_KERNEL`` into ``twin::Launch``. The result is compared with
the CPU kernel ``torch.ops.pangu_fastkd.sparse_kd_fused`` called with the same arguments: fp32
tightly, bf16 and fp16 by the project's rule (error against an exact result at most 2x plain
PyTorch's error in that dtype).

What this does not cover: torch_npu's stream, allocator and copies, and anything about timing;
the launch is synchronous on the twin (docs/ascend.md, tests/ascend_twin/host/README.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

import pytest
import torch
from ascend_host_build import KERNELS, SOC_310B, SOC_910B, host_twin, needs_host_twin

from pangu_fastkd import _native
from pangu_fastkd.ops.sparse_kd_reference import sparse_kd_reference
from pangu_fastkd.ops.sparse_kd_targets import SampledTarget, TopKTarget

IGNORE = -100
GRAD_NAMES = ("grad_hidden", "grad_weight", "grad_bias")

pytestmark = needs_host_twin


@pytest.fixture(scope="session")
def twin(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    return host_twin(SOC_910B, tmp_path_factory)


# ---------------------------------------------------------------------------------------------
# Problems


@dataclass(frozen=True)
class Spec:
    """One call of the op: shape, target, options (codes as in csrc/ops.cpp)."""

    n: int = 11
    vocab: int = 333
    d: int = 24
    k: int = 6
    target: str = "topk"  # "topk" | "sampled" | "none"
    bias: bool = True
    ignored: tuple[int, ...] = (2, 7)
    kd_weight: float = 0.7
    divergence: int = 0  # forward_kl, reverse_kl, jsd
    beta: float = 0.5
    temperature: float = 1.0
    cache_temperature: float = 1.0
    missing_mass: int = 0  # tail, renorm
    include_label: bool = True
    softcap: float = 0.0
    z_loss: float = 0.0
    reduction: int = 1  # sum, mean
    num_items: float = 0.0
    chunk_rows: int = 0
    need_grad_input: bool = True
    need_grad_weight: bool = True
    compute_stats: bool = True
    seed: int = 0


def _args(spec: Spec, dtype: torch.dtype = torch.float32) -> list[Any]:
    """Positional arguments of ``torch.ops.pangu_fastkd.sparse_kd_fused`` for ``spec``.

    Row 1 has an empty (-1) slot holding garbage, even rows have the label among the stored ids.
    The student logits are moderate (std ~3), so the tail bucket's student mass never underflows
    (the epilogue's known gap: q_rest = 0 with p_rest > 0 has an infinite gradient).
    """
    g = torch.Generator().manual_seed(spec.seed)
    n, vocab, d, k = spec.n, spec.vocab, spec.d, spec.k
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(vocab, d, generator=g) * (3.0 / math.sqrt(d))
    bias = torch.randn(vocab, generator=g) if spec.bias else None
    teacher = torch.randn(n, vocab, generator=g) * 2.0
    probs = torch.softmax(teacher.double() / spec.cache_temperature, dim=1)
    if spec.target == "sampled":
        ids = torch.multinomial(probs, k, replacement=False, generator=g)
    else:
        ids = teacher.topk(k, dim=1).indices
    ids = ids.to(torch.int32)
    ids[1, -1] = -1
    labels = torch.empty(n, dtype=torch.long)
    for i in range(n):
        stored = ids[i][ids[i] >= 0]
        if i % 2 == 0:
            labels[i] = stored[i % len(stored)]
        else:
            outside = torch.ones(vocab, dtype=torch.bool)
            outside[stored.long()] = False
            labels[i] = outside.nonzero()[(7 * i) % int(outside.sum())].item()
    label_logit = teacher.gather(1, labels[:, None]).squeeze(1)
    labels[list(spec.ignored)] = IGNORE
    valid = ids >= 0
    safe = ids.long().clamp(min=0)
    topk = teacher_logits = lse = weights = None
    if spec.target == "topk":
        teacher_logits = teacher.gather(1, safe).masked_fill(~valid, 123.0)
        lse = torch.logsumexp(teacher / spec.cache_temperature, dim=1)
        topk = (teacher_logits, lse, label_logit)
    elif spec.target == "sampled":
        p = probs.gather(1, safe).float().masked_fill(~valid, 0.0)
        weights = (p / p.sum(dim=1, keepdim=True)).masked_fill(~valid, 0.25)
    has_target = spec.target != "none"
    return [
        hidden.to(dtype),
        weight.to(dtype),
        bias.to(dtype) if bias is not None else None,
        labels,
        ids if has_target else None,
        topk[0] if topk else None,
        topk[1] if topk else None,
        topk[2] if topk else None,
        weights,
        spec.kd_weight,
        spec.divergence,
        spec.beta,
        spec.temperature,
        spec.cache_temperature,
        spec.missing_mass,
        spec.include_label and spec.target == "topk",
        IGNORE,
        spec.softcap,
        spec.z_loss,
        spec.reduction,
        spec.num_items,
        spec.chunk_rows,
        spec.need_grad_input,
        spec.need_grad_weight,
        spec.compute_stats,
    ]


def _cpu(args: list[Any]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.ops.pangu_fastkd.sparse_kd_fused(*args))


def _clone(args: list[Any]) -> list[Any]:
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


def _check_fp32(module: ModuleType, spec: Spec) -> None:
    args = _args(spec)
    expected = _cpu(_clone(args))
    actual = tuple(module.sparse_kd_fused(*args))
    names = ("loss", *GRAD_NAMES, "stats")
    for name, a, e in zip(names, actual, expected, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype, (
            f"{name}: {a.shape} {a.dtype} vs {e.shape}"
        )
        # A mean over no supervised row is NaN, as in PyTorch, on both sides.
        scale = max(e.nan_to_num(0.0).abs().max().item(), 1e-3) if e.numel() else 1.0
        torch.testing.assert_close(
            a, e, rtol=2e-5, atol=2e-6 * scale, equal_nan=True, msg=lambda m, n=name: f"{n}: {m}"
        )
    if spec.reduction == 1 and bool((args[3] == IGNORE).all()):
        assert actual[0].isnan()


# Every option of kd-losses.md, each with ignored rows, a ragged vocabulary (333 = 5 x 64 + 13)
# and an odd hidden size; the names say what differs from Spec's defaults.
FP32_CASES = {
    "tail-forward_kl": Spec(),
    "tail-reverse_kl": Spec(divergence=1, temperature=1.7, cache_temperature=1.7),
    "tail-jsd": Spec(divergence=2, beta=0.3),
    "renorm-forward_kl": Spec(missing_mass=1, temperature=2.0),
    "renorm-reverse_kl": Spec(missing_mass=1, divergence=1, temperature=0.8),
    "renorm-jsd": Spec(missing_mass=1, divergence=2, beta=0.9, temperature=1.5),
    "label-not-included": Spec(include_label=False, divergence=1),
    "sampled": Spec(target="sampled", temperature=1.3, cache_temperature=1.3),
    "softcap-zloss": Spec(softcap=4.0, z_loss=1e-3, divergence=2),
    "kd_weight-0": Spec(target="none", kd_weight=0.0, z_loss=1e-2, softcap=6.0),
    "kd_weight-1": Spec(kd_weight=1.0, bias=False),
    "reduction-sum": Spec(reduction=0),
    "num_items": Spec(num_items=7.5, divergence=1),
    "uneven-chunks": Spec(chunk_rows=4, divergence=2),  # 9 supervised rows: 4 + 4 + 1
    "one-row-chunks": Spec(chunk_rows=1, target="sampled", ignored=()),
    "no-grads-no-stats": Spec(need_grad_input=False, need_grad_weight=False, compute_stats=False),
    "grad-weight-only": Spec(need_grad_input=False, chunk_rows=5),
    "all-rows-ignored": Spec(ignored=tuple(range(11))),
    # 9500 fp32 logits exceed one UB chunk on both chips (about 6.6K on the 910B, 9K on the 310B).
    "vocab-over-one-ub-chunk": Spec(n=5, vocab=9500, d=8, k=4, ignored=(3,), missing_mass=1),
}


@pytest.mark.parametrize("spec", FP32_CASES.values(), ids=FP32_CASES.keys())
def test_float32_matches_cpu_kernel(twin: ModuleType, spec: Spec) -> None:
    _check_fp32(twin, spec)


def test_build_info_of_the_twin_module(twin: ModuleType) -> None:
    assert twin.build_info() == {
        "soc_version": SOC_910B,
        "kernels": list(KERNELS),
        "twin": True,
    }


def test_twin_registers_no_npu_kernel(twin: ModuleType) -> None:
    # The twin module must not change how pangu_fastkd routes "npu" tensors in this process.
    assert not _native.npu_kernel_available("sparse_kd_fused")


# ---------------------------------------------------------------------------------------------
# bf16: at most 2x plain PyTorch's error


def _reference_bf16(args: list[Any], spec: Spec) -> tuple[torch.Tensor, ...]:
    """Plain PyTorch in bf16 (sparse_kd_reference + autograd), shaped like the op's outputs."""
    hidden, weight, bias = (
        t.detach().clone().requires_grad_(True) if t is not None else None for t in args[:3]
    )
    labels, ids, t_logits, t_lse, t_label, weights = args[3:9]
    target: TopKTarget | SampledTarget | None = None
    if spec.target == "topk":
        target = TopKTarget(ids, t_logits, t_lse, t_label, spec.cache_temperature)
    elif spec.target == "sampled":
        target = SampledTarget(ids, weights)
    loss, stats = sparse_kd_reference(
        hidden,
        weight,
        labels,
        target,
        bias=bias,
        kd_weight=spec.kd_weight,
        divergence=("forward_kl", "reverse_kl", "jsd")[spec.divergence],
        beta=spec.beta,
        temperature=spec.temperature,
        missing_mass=("tail", "renorm")[spec.missing_mass],
        include_label=spec.include_label if spec.target == "topk" else None,
        ignore_index=IGNORE,
        reduction=("sum", "mean")[spec.reduction],
        softcap=spec.softcap or None,
        z_loss=spec.z_loss,
    )
    loss.backward()
    return (loss.detach(), hidden.grad, weight.grad, bias.grad, stats.detach())


def _row_losses(stats: torch.Tensor, spec: Spec) -> torch.Tensor:
    s = stats.double()
    t2 = spec.temperature**2
    return (
        spec.kd_weight * t2 * s[:, 0] + (1 - spec.kd_weight) * s[:, 1] + spec.z_loss * s[:, 4] ** 2
    )


BF16_CASES = {
    "tail-forward_kl": Spec(chunk_rows=4),  # several chunks: the fp32 grad_W accumulator
    "renorm-jsd-softcap": Spec(missing_mass=1, divergence=2, temperature=1.5, softcap=5.0),
    "sampled": Spec(target="sampled", reduction=0),
    "kd_weight-0": Spec(target="none", kd_weight=0.0, z_loss=1e-3),
}
# (dtype, spec): every bf16 case, and fp16 (the epilogue's half instantiation) on a few.
LOW_PRECISION_CASES = {
    **{f"bf16-{name}": (torch.bfloat16, spec) for name, spec in BF16_CASES.items()},
    "fp16-tail-forward_kl": (torch.float16, BF16_CASES["tail-forward_kl"]),
    "fp16-sampled": (torch.float16, BF16_CASES["sampled"]),
}


@pytest.mark.parametrize("dtype,spec", LOW_PRECISION_CASES.values(), ids=LOW_PRECISION_CASES.keys())
def test_low_precision_within_2x_pytorch(twin: ModuleType, dtype: torch.dtype, spec: Spec) -> None:
    args = _args(spec, dtype)
    exact_args = [
        a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args
    ]
    exact = _cpu(exact_args)  # the CPU kernel in float64 on the same (rounded) values
    plain = _reference_bf16(args, spec)
    actual = tuple(twin.sparse_kd_fused(*_clone(args)))
    assert actual[0].dtype == torch.float32
    assert [g.dtype for g in actual[1:4]] == [dtype] * 3

    def err(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a.double() - b.double()).abs().max().item()

    def check(what: str, ours: float, pytorch: float, scale: float) -> None:
        assert ours <= 2 * pytorch + 1e-6 * max(scale, 1.0), (
            f"{dtype} {what}: error {ours:.3e} > 2 x PyTorch's {pytorch:.3e}"
        )

    rows_exact, rows_plain, rows_ours = (_row_losses(r[4], spec) for r in (exact, plain, actual))
    check(
        "per-row loss",
        err(rows_ours, rows_exact),
        err(rows_plain, rows_exact),
        rows_exact.abs().max().item(),
    )
    # The scalar loss is one sample; PyTorch's budget there is the reduction of its row errors.
    budget = (rows_plain - rows_exact).abs().sum().item()
    if spec.reduction == 1:
        budget /= max(int((args[3] != IGNORE).sum()), 1)
    check("loss", err(actual[0], exact[0]), budget, exact[0].abs().item())
    for name, ours, pytorch, e in zip(GRAD_NAMES, actual[1:4], plain[1:4], exact[1:4], strict=True):
        check(name, err(ours, e), err(pytorch, e), e.abs().max().item())


# ---------------------------------------------------------------------------------------------
# Bad input: the CPU kernel's error, not a crash


def _set(index: tuple[int, int] | int, value: float) -> Any:
    def change(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[index] = value
        return t

    return change


def _dup_in_row_4(ids: torch.Tensor) -> torch.Tensor:
    ids = ids.clone()
    ids[4, 1] = ids[4, 0]
    return ids


# (spec, argument index, change): each makes the CPU kernel raise ValueError.
BAD_INPUTS = {
    "label-out-of-range": (Spec(), 3, _set(5, 333)),
    "id-out-of-range": (Spec(), 4, _set((3, 2), 333)),
    "id-below-minus-one": (Spec(target="sampled"), 4, _set((0, 0), -2)),
    "duplicate-ids": (Spec(), 4, _dup_in_row_4),
    "nan-teacher-logit": (Spec(), 5, _set((6, 1), math.nan)),
    "inf-teacher-logit": (Spec(missing_mass=1), 5, _set((4, 0), math.inf)),
    "non-finite-lse": (Spec(), 6, _set(8, math.inf)),
    "nan-label-logit": (Spec(), 7, _set(0, math.nan)),
    "negative-weight": (Spec(target="sampled"), 8, _set((5, 3), -0.1)),
    "weights-not-summing-to-1": (Spec(target="sampled"), 8, lambda w: w * 1.01),
    "empty-support": (Spec(target="sampled"), 4, _set((3, slice(None)), -1)),  # type: ignore[arg-type]
    "renorm-without-finite-logit": (
        Spec(missing_mass=1, include_label=False),
        5,
        _set((9, slice(None)), -math.inf),  # type: ignore[arg-type]
    ),
    "labels-wrong-shape": (Spec(), 3, lambda t: t[:-1]),
    "ids-wrong-shape": (Spec(), 4, lambda t: t[:, None]),
    "teacher-logits-wrong-shape": (Spec(), 5, lambda t: t[:, :-1]),
    "hidden-weight-mismatch": (Spec(), 1, lambda t: t[:, :-1]),
    "bias-wrong-shape": (Spec(), 2, lambda t: t[:-1]),
    "tail-needs-cache-temperature": (Spec(), 12, lambda _: 2.0),
    "sampled-needs-forward-kl": (Spec(target="sampled"), 10, lambda _: 1),
}


@pytest.mark.parametrize("spec,index,change", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises_the_cpu_kernels_error(
    twin: ModuleType, spec: Spec, index: int, change
) -> None:
    args = _args(spec)
    args[index] = change(args[index])
    with pytest.raises(ValueError) as cpu_error:
        _cpu(_clone(args))
    with pytest.raises(ValueError) as twin_error:
        twin.sparse_kd_fused(*args)
    assert str(twin_error.value).splitlines()[0] == str(cpu_error.value).splitlines()[0]


def test_bad_rows_are_found_among_ignored_rows(twin: ModuleType) -> None:
    # Garbage in an ignored row is never read; the first bad supervised row is named.
    args = _args(Spec(ignored=(2, 7)))
    ids = args[4].clone()
    ids[2, 0] = 10**6  # ignored row: fine
    ids[9, 1] = 10**6
    args[4] = ids
    with pytest.raises(ValueError, match=r"got 1000000 \(row 9\)"):
        twin.sparse_kd_fused(*args)


def test_problem_the_epilogue_cannot_tile(twin: ModuleType) -> None:
    # 8000 teacher ids per row leave no UB room for even a 64-element chunk.
    spec = Spec(n=2, vocab=8100, d=4, k=8000, ignored=())
    args = _args(spec)
    with pytest.raises(
        ValueError, match="Ascend C epilogue cannot take this problem: supportK = 8000"
    ):
        twin.sparse_kd_fused(*args)


def test_unsupported_dtype(twin: ModuleType) -> None:
    args = _args(Spec(), torch.float64)
    with pytest.raises(TypeError, match="takes float32, bfloat16 or float16 hidden states, got"):
        twin.sparse_kd_fused(*args)


# ---------------------------------------------------------------------------------------------
# Both chips


def test_both_chips_run(twin: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> None:
    # 310B: one AI core (one block) and a 248 KB UB, so a larger chunk than on the 910B.
    twin_310b = host_twin(SOC_310B, tmp_path_factory)
    assert twin_310b.build_info()["soc_version"] == SOC_310B
    for module in (twin, twin_310b):
        for spec in (
            Spec(divergence=2, chunk_rows=4),
            replace(FP32_CASES["vocab-over-one-ub-chunk"]),
        ):
            _check_fp32(module, spec)
