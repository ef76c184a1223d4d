"""Bad arguments to both ops raise a named error before any kernel runs: devices, head counts,
option values, integers beyond int64, inconsistent teacher targets, empty batches, boundaries.

Cases that crashed the process before their fix run in a subprocess, so a regression fails the
test instead of killing the run.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from pangu_fastkd.data.boundaries import cu_seqlens_from_lengths, cu_seqlens_from_position_ids
from pangu_fastkd.ops import (
    TopKTarget,
    fused_linear_cross_entropy,
    fused_linear_sparse_kd,
    packed_attention,
    sparse_kd_reference,
)
from pangu_fastkd.ops.sparse_kd import sparse_kd_op_args

N, D, V, K = 6, 8, 32, 4


def _problem(n: int = N, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, D, generator=g)
    weight = torch.randn(V, D, generator=g)
    labels = torch.randint(0, V, (n,), generator=g)
    teacher = torch.randn(n, V, generator=g) * 2
    top = teacher.topk(K, dim=1)
    target = TopKTarget(
        top.indices.to(torch.int32),
        top.values,
        teacher.logsumexp(dim=1),
        teacher.gather(1, labels[:, None])[:, 0],
    )
    return hidden, weight, labels, target


def _run_isolated(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter: a crash shows as a signal, not as a dead test run."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


# ---------------------------------------------------------------------------------------------
# packed_attention


def test_zero_query_heads_raise_in_the_public_op() -> None:
    q, kv = torch.randn(5, 0, 8), torch.randn(5, 1, 8)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="positive multiple of kv heads"):
        packed_attention(q, kv, kv, cu)


def test_zero_query_heads_raise_in_the_raw_op_without_crashing() -> None:
    result = _run_isolated(
        """
        import torch, pangu_fastkd.ops
        q, kv = torch.randn(5, 0, 8), torch.randn(5, 1, 8)
        cu = torch.tensor([0, 5], dtype=torch.int32)
        try:
            torch.ops.pangu_fastkd.packed_attention_fwd(q, kv, kv, cu, 0.3, True, -1)
        except ValueError as e:
            print("raised:", e)
        """
    )
    assert result.returncode == 0, f"the process died: {result.returncode} {result.stderr}"
    assert "positive multiple of kv heads" in result.stdout


def test_zero_head_dim_raises() -> None:
    x = torch.randn(4, 2, 0)
    with pytest.raises(ValueError, match="head dim must be >= 1"):
        packed_attention(x, x, x, torch.tensor([0, 4], dtype=torch.int32))


@pytest.mark.parametrize("meta", ["q", "k", "v"])
def test_attention_refuses_a_meta_tensor_among_cpu_ones(meta: str) -> None:
    x = {name: torch.randn(6, 2, 8) for name in "qkv"}
    x[meta] = torch.empty(6, 2, 8, device="meta")
    with pytest.raises(ValueError, match=f"{meta} is on meta"):
        packed_attention(x["q"], x["k"], x["v"], torch.tensor([0, 6], dtype=torch.int32))


def test_attention_raw_op_refuses_mixed_devices() -> None:
    q, v = torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    k = torch.empty(6, 2, 8, device="meta")
    cu = torch.tensor([0, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="one device"):
        torch.ops.pangu_fastkd.packed_attention_fwd(q, k, v, cu, 0.3, True, -1)


def test_attention_on_meta_traces_with_cpu_boundaries() -> None:
    x = torch.empty(6, 2, 8, device="meta")
    cu = torch.tensor([0, 6], dtype=torch.int32)
    out, lse = torch.ops.pangu_fastkd.packed_attention_fwd(x, x, x, cu, 0.3, True, -1)
    assert out.device.type == "meta" and out.shape == (6, 2, 8) and lse.shape == (2, 6)


def test_attention_refuses_meta_boundaries() -> None:
    x = torch.randn(6, 2, 8)
    cu = torch.empty(2, dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match="cu_seqlens is on meta"):
        packed_attention(x, x, x, cu)


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, 0.0, -0.5])
def test_attention_softmax_scale_must_be_finite_and_positive(scale: float) -> None:
    x = torch.randn(6, 2, 8)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="softmax_scale must be finite and > 0"):
        packed_attention(x, x, x, cu, softmax_scale=scale)
    with pytest.raises(ValueError, match="softmax_scale must be finite and > 0"):
        torch.ops.pangu_fastkd.packed_attention_fwd(x, x, x, cu, scale, True, -1)


# ---------------------------------------------------------------------------------------------
# fused_linear_sparse_kd: devices


def _with_meta(name: str, hidden, weight, labels, target, bias):
    def meta(t: torch.Tensor) -> torch.Tensor:
        return torch.empty(t.shape, dtype=t.dtype, device="meta")

    if name in ("hidden", "weight", "labels", "bias"):
        parts = {"hidden": hidden, "weight": weight, "labels": labels, "bias": bias}
        parts[name] = meta(parts[name])
        return parts["hidden"], parts["weight"], parts["labels"], target, parts["bias"]
    field = name.split(".")[1]
    fields = {f: getattr(target, f) for f in ("ids", "logits", "lse", "label_logit")}
    fields[field] = meta(fields[field])
    return hidden, weight, labels, TopKTarget(**fields), bias


META_ARGUMENTS = [
    "hidden",
    "weight",
    "bias",
    "labels",
    "target.ids",
    "target.logits",
    "target.lse",
    "target.label_logit",
]


@pytest.mark.parametrize("name", META_ARGUMENTS)
def test_sparse_kd_refuses_a_meta_tensor_among_cpu_ones(name: str) -> None:
    hidden, weight, labels, target = _problem()
    bias = torch.randn(V)
    args = _with_meta(name, hidden, weight, labels, target, bias)
    with pytest.raises(ValueError, match=f"{name} is on meta|but {name.split('.')[0]}"):
        fused_linear_sparse_kd(args[0], args[1], args[2], args[3], bias=args[4])


@pytest.mark.parametrize("name", META_ARGUMENTS)
def test_sparse_kd_raw_op_refuses_mixed_devices(name: str) -> None:
    hidden, weight, labels, target = _problem()
    bias = torch.randn(V)
    h, w, y, tg, b = _with_meta(name, hidden, weight, labels, target, bias)
    with pytest.raises(ValueError, match="one device"):
        torch.ops.pangu_fastkd.sparse_kd_fused(*sparse_kd_op_args(h, w, y, tg, bias=b))


# ---------------------------------------------------------------------------------------------
# fused_linear_sparse_kd: option values and integers


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("softcap", math.inf, "softcap must be finite"),
        ("softcap", math.nan, "softcap must be finite"),
        ("z_loss", math.inf, "z_loss must be finite"),
        ("z_loss", math.nan, "z_loss must be finite"),
        ("num_items", math.inf, "num_items must be finite"),
        ("num_items", math.nan, "num_items must be finite"),
        ("temperature", math.nan, "temperature must be > 0"),
        ("beta", math.nan, "beta must be in"),
        ("kd_weight", math.nan, "kd_weight must be in"),
        ("chunk_rows", -3, "chunk_rows must be >= 1"),
        ("chunk_rows", 2.5, "chunk_rows must be an int"),
        ("ignore_index", 2**64, "ignore_index must fit in int64"),
        ("ignore_index", True, "ignore_index must be an int"),
    ],
)
def test_sparse_kd_option_values_are_checked(option: str, value, message: str) -> None:
    hidden, weight, labels, target = _problem()
    with pytest.raises((ValueError, TypeError), match=message):
        fused_linear_sparse_kd(hidden, weight, labels, target, **{option: value})


@pytest.mark.parametrize(
    ("index", "value", "message"),
    [
        (17, math.inf, "softcap must be finite"),
        (17, math.nan, "softcap must be finite"),
        (18, math.inf, "z_loss must be finite"),
        (20, math.inf, "num_items must be finite"),
        (20, -1.0, "num_items must be finite"),
        (21, -3, "chunk_rows must be >= 1"),
        (13, math.inf, "cache temperature must be > 0"),
        (13, 0.0, "cache temperature must be > 0"),
    ],
)
def test_sparse_kd_raw_op_checks_its_scalars(index: int, value, message: str) -> None:
    """The raw op (what torch.compile and the smoke kit call) checks the same values itself."""
    hidden, weight, labels, target = _problem()
    args = sparse_kd_op_args(hidden, weight, labels, target, missing_mass="renorm")
    args[index] = value
    with pytest.raises(ValueError, match=message):
        torch.ops.pangu_fastkd.sparse_kd_fused(*args)


@pytest.mark.parametrize("temperature", [math.inf, math.nan, 0.0])
def test_cache_temperature_of_a_target_is_checked(temperature: float) -> None:
    hidden, weight, labels, target = _problem()
    bad = TopKTarget(target.ids, target.logits, target.lse, target.label_logit, temperature)
    with pytest.raises(ValueError, match=r"target\.temperature must be finite and > 0"):
        fused_linear_sparse_kd(hidden, weight, labels, bad, missing_mass="renorm")


@pytest.mark.parametrize("big", [2**31, 2**32 + 1, 2**32 - 1, 2**40])
def test_wide_target_ids_are_range_checked_before_narrowing(big: int) -> None:
    """An int64 id of 2**32 + 1 must not wrap to 1 (nor 2**32 - 1 to the empty slot -1)."""
    hidden, weight, labels, target = _problem()
    ids = target.ids.long()
    ids[2, 1] = big
    bad = TopKTarget(ids, target.logits, target.lse, target.label_logit)
    with pytest.raises(ValueError, match=rf"got {big} \(row 2\)"):
        fused_linear_sparse_kd(hidden, weight, labels, bad)


@pytest.mark.parametrize("big", [2**31, 2**32 + 1])
def test_wide_labels_are_range_checked(big: int) -> None:
    hidden, weight, labels, _ = _problem()
    labels = labels.clone()
    labels[3] = big
    with pytest.raises(ValueError, match=rf"got {big} \(row 3\)"):
        fused_linear_cross_entropy(hidden, weight, labels)


# ---------------------------------------------------------------------------------------------
# Teacher logits that do not belong to their lse


@pytest.mark.parametrize("loss_fn", ["kernel", "reference"])
@pytest.mark.parametrize("shift", [-2.0, -10.0])
def test_teacher_logits_inconsistent_with_their_lse(loss_fn: str, shift: float) -> None:
    """A lowered lse (or raised logits) gives the top-K more than probability 1: an error."""
    hidden, weight, labels, target = _problem()
    lse = target.lse.clone()
    lse[4] += shift
    bad = TopKTarget(target.ids, target.logits, lse, target.label_logit)
    fn = fused_linear_sparse_kd if loss_fn == "kernel" else sparse_kd_reference
    with pytest.raises(ValueError, match=r"probability .*> 1 under their lse.*\(row 4\)"):
        fn(hidden, weight, labels, bad)


def test_consistent_targets_up_to_rounding_pass() -> None:
    """A full-vocabulary support (mass exactly 1, up to float rounding) is accepted."""
    hidden, weight, labels, _ = _problem()
    teacher = torch.randn(N, V) * 3
    ids = torch.arange(V, dtype=torch.int32).expand(N, V).contiguous()
    lse = teacher.logsumexp(dim=1) - 1e-5  # rounding of a stored lse
    target = TopKTarget(ids, teacher, lse, teacher.gather(1, labels[:, None])[:, 0])
    loss = fused_linear_sparse_kd(hidden, weight, labels, target)
    assert math.isfinite(loss.item())


# ---------------------------------------------------------------------------------------------
# Empty batches and batches without a supervised row: what PyTorch defines


@pytest.mark.parametrize("n", [0, N])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kd", [False, True])
def test_no_supervised_row_matches_pytorch(n: int, reduction: str, kd: bool) -> None:
    hidden, weight, labels, target = _problem(n)
    labels = torch.full_like(labels, -100)  # n = 0, or every row ignored
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, stats = fused_linear_sparse_kd(
        h, w, labels, target if kd else None, kd_weight=1.0 if kd else 0.0,
        reduction=reduction, return_stats=True,
    )  # fmt: skip
    loss.backward()
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    expected = F.cross_entropy(h_ref @ w_ref.T, labels, reduction=reduction)
    expected.backward()
    assert torch.equal(loss.isnan(), expected.isnan()) and (loss.isnan() or loss == expected)
    assert h.grad is not None and h.grad.shape == (n, D) and torch.equal(h.grad, h_ref.grad)
    assert torch.equal(w.grad, w_ref.grad)  # zeros
    assert stats.divergence.shape == (n,) and bool((torch.stack(list(stats)) == 0).all())


def test_no_supervised_row_with_num_items_is_zero() -> None:
    hidden, weight, labels, target = _problem(0)
    loss = fused_linear_sparse_kd(hidden, weight, labels, target, reduction="sum", num_items=8)
    assert loss.item() == 0.0


# ---------------------------------------------------------------------------------------------
# Boundary helpers


def test_float_lengths_are_refused_not_truncated() -> None:
    with pytest.raises(TypeError, match="document lengths must be ints"):
        cu_seqlens_from_lengths([1.5, 2])
    with pytest.raises(TypeError, match="document lengths must be integers"):
        cu_seqlens_from_lengths(torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="document lengths must be ints"):
        cu_seqlens_from_lengths([True, 2])
    assert cu_seqlens_from_lengths(torch.tensor([2, 3])).tolist() == [0, 2, 5]


def test_lengths_beyond_int32_are_refused() -> None:
    with pytest.raises(ValueError, match="does not fit cu_seqlens' int32"):
        cu_seqlens_from_lengths([2**31, 1])
    with pytest.raises(ValueError, match="does not fit"):
        cu_seqlens_from_lengths([2**64])


def test_boolean_position_ids_are_refused() -> None:
    with pytest.raises(TypeError, match="position_ids must be an integer tensor"):
        cu_seqlens_from_position_ids(torch.tensor([False, True, True]))
