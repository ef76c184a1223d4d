"""The non-finite policy of docs/non-finite.md, for both ops.

Without ``check_finite`` a NaN or infinity in the student's data gives the result plain PyTorch
gives for the same definition (which outputs are finite, position by position); with it, a
``NonFiniteError`` names the tensor and its first bad row, also when finite inputs overflow.
"""

from __future__ import annotations

import math

import pytest
import torch

from pangu_fastkd.ops import (
    TopKTarget,
    fused_linear_sparse_kd,
    packed_attention,
    packed_attention_reference,
    sparse_kd_reference,
)
from pangu_fastkd.ops.input_checks import NonFiniteError, check_finite_rows

N, D, V, K = 6, 8, 32, 4
BAD_VALUES = [math.nan, math.inf, -math.inf]


def _problem(seed: int = 0, ignored_row: int | None = None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g)
    weight = torch.randn(V, D, generator=g)
    bias = torch.randn(V, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    teacher = torch.randn(N, V, generator=g) * 2
    top = teacher.topk(K, dim=1)
    target = TopKTarget(
        top.indices.to(torch.int32),
        top.values,
        teacher.logsumexp(dim=1),
        teacher.gather(1, labels[:, None])[:, 0],
    )
    if ignored_row is not None:
        labels[ignored_row] = -100
    return hidden, weight, bias, labels, target


def _finiteness(fn, hidden, weight, bias, labels, target):
    """Which of loss, grad hidden (per row), grad weight (per row), grad bias are finite."""
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    loss = fn(h, w, labels, target, bias=b)
    loss = loss[0] if isinstance(loss, tuple) else loss
    loss.backward()
    rows = lambda t: torch.isfinite(t).all(dim=-1).tolist()  # noqa: E731
    return bool(torch.isfinite(loss)), rows(h.grad), rows(w.grad), torch.isfinite(b.grad).tolist()


@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("where", ["hidden", "weight", "bias"])
def test_sparse_kd_propagates_non_finite_data_as_pytorch(where: str, value: float) -> None:
    hidden, weight, bias, labels, target = _problem()
    {"hidden": hidden[2], "weight": weight[5], "bias": bias[5:6]}[where][0] = value
    kernel = _finiteness(fused_linear_sparse_kd, hidden, weight, bias, labels, target)
    reference = _finiteness(sparse_kd_reference, hidden, weight, bias, labels, target)
    assert kernel == reference
    if not (where == "bias" and value == -math.inf):  # a -inf bias is an impossible token
        assert kernel[0] is False  # the loss says that something is wrong


@pytest.mark.parametrize("value", BAD_VALUES)
def test_ignored_rows_are_never_read(value: float) -> None:
    """The documented exception: a bad hidden state on an ignored row changes nothing."""
    hidden, weight, bias, labels, target = _problem(ignored_row=2)
    clean = fused_linear_sparse_kd(hidden, weight, labels, target, bias=bias)
    hidden[2, 0] = value
    assert torch.equal(fused_linear_sparse_kd(hidden, weight, labels, target, bias=bias), clean)


@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize(("where", "row"), [("hidden", 3), ("weight", 7), ("bias", 11)])
def test_sparse_kd_check_finite_names_the_tensor_and_row(where: str, row: int, value) -> None:
    hidden, weight, bias, labels, target = _problem()
    {"hidden": hidden, "weight": weight, "bias": bias}[where][row, ...].view(-1)[0] = value
    with pytest.raises(NonFiniteError, match=rf"{where} holds {value} in row {row}"):
        fused_linear_sparse_kd(hidden, weight, labels, target, bias=bias, check_finite=True)


def test_sparse_kd_check_finite_reports_overflow_of_finite_inputs() -> None:
    """Finite hidden states of 1e30 overflow the z-loss's lse^2 in fp32."""
    hidden, weight, _, labels, _ = _problem()
    hidden[1] = 1e30
    assert not math.isfinite(fused_linear_sparse_kd(hidden, weight, labels, z_loss=1e-4,
                                                     kd_weight=0.0).item())  # fmt: skip
    with pytest.raises(NonFiniteError, match=r"largest student logsumexp: .* in row 1.*overflow"):
        fused_linear_sparse_kd(hidden, weight, labels, kd_weight=0.0, z_loss=1e-4,
                               check_finite=True)  # fmt: skip


def test_sparse_kd_check_finite_accepts_good_input_and_the_empty_mean() -> None:
    hidden, weight, bias, labels, target = _problem()
    kwargs = {"bias": bias}
    plain = fused_linear_sparse_kd(hidden, weight, labels, target, **kwargs)
    checked = fused_linear_sparse_kd(hidden, weight, labels, target, check_finite=True, **kwargs)
    assert torch.equal(plain, checked)
    ignored = torch.full_like(labels, -100)
    empty = fused_linear_sparse_kd(hidden, weight, ignored, target, check_finite=True)
    assert math.isnan(empty.item())  # a mean over no row: defined, not an error


def test_fp16_logits_beyond_fp16_range_overflow_as_in_pytorch() -> None:
    """fp16 hidden states of 6e4: the GEMM's fp16 logits overflow, in the kernel as in plain
    PyTorch, and check_finite says so."""
    hidden, weight, _, labels, _ = _problem()
    big = (hidden * 6e4 / hidden.abs().max()).half()
    loss = fused_linear_sparse_kd(big, weight.half(), labels, kd_weight=0.0)
    expected = torch.nn.functional.cross_entropy((big @ weight.half().T).float(), labels)
    assert not math.isfinite(expected.item()) and not math.isfinite(loss.item())
    with pytest.raises(NonFiniteError, match="overflow"):
        fused_linear_sparse_kd(big, weight.half(), labels, kd_weight=0.0, check_finite=True)


# ---------------------------------------------------------------------------------------------
# packed_attention

T, H = 10, 2
CU = torch.tensor([0, 4, 10], dtype=torch.int32)


def _attention_finiteness(fn, q, k, v) -> list[list[bool]]:
    out = fn(q, k, v, CU)
    out = out[0] if isinstance(out, tuple) else out
    return torch.isfinite(out).all(dim=-1).tolist()


@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("token", [1, 5, 9])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_attention_propagates_non_finite_data_as_pytorch(where: str, token: int, value) -> None:
    """Only queries that see the bad token (same document, at or after it) are affected."""
    g = torch.Generator().manual_seed(token)
    x = {name: torch.randn(T, H, D, generator=g) for name in "qkv"}
    x[where][token, 0, 3] = value
    kernel = _attention_finiteness(packed_attention, x["q"], x["k"], x["v"])
    reference = _attention_finiteness(packed_attention_reference, x["q"], x["k"], x["v"])
    assert kernel == reference
    if where != "k":  # a key of +-inf can leave every output finite, in PyTorch too
        assert not all(all(row) for row in kernel)


@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_attention_check_finite_names_the_tensor_and_token(where: str) -> None:
    x = {name: torch.randn(T, H, D) for name in "qkv"}
    x[where][6, 1, 0] = math.nan
    with pytest.raises(NonFiniteError, match=rf"{where} holds nan in row 6"):
        packed_attention(x["q"], x["k"], x["v"], CU, check_finite=True)


def test_attention_check_finite_reports_overflowing_scores() -> None:
    x = {name: torch.randn(T, H, D) * 1e19 for name in "qkv"}
    with pytest.raises(NonFiniteError, match="its output"):
        packed_attention(x["q"], x["k"], x["v"], CU, check_finite=True)


def test_attention_large_scale_matches_pytorch() -> None:
    """A finite softmax_scale of 1e30 is legal: the kernel gives what PyTorch's math gives."""
    g = torch.Generator().manual_seed(3)
    x = {name: torch.randn(T, H, D, generator=g) for name in "qkv"}
    out = packed_attention(x["q"], x["k"], x["v"], CU, softmax_scale=1e30)
    ref = packed_attention_reference(x["q"], x["k"], x["v"], CU, softmax_scale=1e30)[0]
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    finite = torch.isfinite(ref)
    assert torch.allclose(out[finite], ref[finite], atol=1e-5)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_large_tensor_is_checked_slice_by_slice_to_its_last_row(bad):
    """An LM head larger than one check slice (here 5M entries) is checked in slices: a bad
    entry in any slice, the last included, is found and named by its row."""
    weight = torch.zeros(5000, 1000)
    weight[4999, 999] = bad
    with pytest.raises(NonFiniteError, match=rf"weight holds {bad} in row 4999"):
        check_finite_rows("op", {"hidden": torch.zeros(3, 1000), "weight": weight})
    weight[4999, 999] = 0.0
    weight[2500, 0] = bad
    with pytest.raises(NonFiniteError, match=r"weight holds .* in row 2500"):
        check_finite_rows("op", {"weight": weight})
    weight[2500, 0] = -math.inf
    check_finite_rows("op", {"weight": weight}, allow_neg_inf=("weight",))
