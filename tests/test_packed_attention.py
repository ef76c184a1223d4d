"""Packed-sequence attention: cu_seqlens helpers, the op against SDPA and the reference.

``packed_attention`` on CPU tensors runs the C++ kernel; the reference is the oracle, itself
checked against PyTorch's SDPA run document by document.
"""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
import torch.nn.functional as F

from pangu_fastkd.data.boundaries import cu_seqlens_from_lengths, cu_seqlens_from_position_ids
from pangu_fastkd.ops import packed_attention, packed_attention_reference


def sample_inputs(lengths, hq, hkv, d, dtype=torch.float32, seed=0, requires_grad=True):
    """Random ``q [T, Hq, D]``, ``k``/``v [T, Hkv, D]`` and the ``cu_seqlens`` of ``lengths``."""
    gen = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q, k, v = (
        torch.randn(T, h, d, generator=gen, dtype=torch.float64)
        .to(dtype)
        .requires_grad_(requires_grad)
        for h in (hq, hkv, hkv)
    )
    return q, k, v, cu_seqlens_from_lengths(lengths)


def sdpa_per_document(q, k, v, cu_seqlens, *, causal=True, window=None, scale=None):
    """PyTorch's SDPA on each document separately: the independent oracle."""
    outs = []
    bounds = cu_seqlens.tolist()
    for start, end in itertools.pairwise(bounds):
        qd, kd, vd = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))  # [1, H, L, D]
        mask = None
        if window is not None:
            i = torch.arange(end - start)[:, None]
            j = torch.arange(end - start)[None, :]
            mask = (j <= i) & (j >= i - window)
        out = F.scaled_dot_product_attention(
            qd,
            kd,
            vd,
            attn_mask=mask,
            is_causal=causal and window is None,
            scale=scale,
            enable_gqa=True,
        )
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs, dim=0)


def _grads(out, inputs, seed=1):
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return torch.autograd.grad(out, inputs, grad_out)


# ---------------------------------------------------------------------------------------------
# cu_seqlens helpers


def test_cu_seqlens_from_lengths():
    cu = cu_seqlens_from_lengths([3, 1, 0, 5])
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 4, 4, 9]
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        cu_seqlens_from_lengths([2, -1])


@pytest.mark.parametrize("batched", [False, True])
def test_cu_seqlens_from_position_ids(batched):
    pos = torch.tensor([0, 1, 2, 0, 0, 1, 2, 3])
    cu = cu_seqlens_from_position_ids(pos[None] if batched else pos)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 4, 8]


@pytest.mark.parametrize(
    ("pos", "message"),
    [
        ([1, 2, 3], "must start at 0"),
        ([0, 1, 3], "count up by 1"),
        ([0.0, 1.0], "integer"),
    ],
)
def test_cu_seqlens_from_bad_position_ids(pos, message):
    with pytest.raises(ValueError, match=message):
        cu_seqlens_from_position_ids(torch.tensor(pos))


# ---------------------------------------------------------------------------------------------
# The reference against SDPA

LENGTHS = [
    [1, 7, 1, 33, 2, 16],  # length-1 documents and odd sizes
    [40],  # a single document
    [1] * 9 + [3] * 4,  # many tiny documents
]


@pytest.mark.parametrize("lengths", LENGTHS, ids=["mixed", "single", "tiny"])
@pytest.mark.parametrize(("hq", "hkv"), [(12, 6), (8, 1), (4, 4)])
@pytest.mark.parametrize("d", [64, 80, 128])
def test_reference_matches_sdpa(lengths, hq, hkv, d):
    q, k, v, cu = sample_inputs(lengths, hq, hkv, d)
    out = packed_attention(q, k, v, cu)
    expected = sdpa_per_document(q, k, v, cu)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(_grads(out, (q, k, v)), _grads(expected, (q, k, v)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_reference_makes_its_tensors_on_the_inputs_device():
    # The NPU falls back to this reference: a mask or a cu_seqlens made on the default device
    # would not mix with NPU inputs. With the default device set to meta, any tensor created
    # without a device would be a meta tensor, and mixing it with the CPU inputs raises.
    q, k, v, cu = sample_inputs([5, 9, 1], 4, 2, 16, requires_grad=False)
    expected = packed_attention_reference(q, k, v, cu, window=3)
    with torch.device("meta"):
        out, lse = packed_attention_reference(q, k, v, cu, window=3)
    assert out.device == q.device and lse.device == q.device
    torch.testing.assert_close((out, lse), expected, rtol=0, atol=0)


def test_reference_non_causal_and_scale():
    q, k, v, cu = sample_inputs([5, 9, 1], 4, 2, 16)
    out = packed_attention(q, k, v, cu, causal=False, softmax_scale=0.3)
    torch.testing.assert_close(out, sdpa_per_document(q, k, v, cu, causal=False, scale=0.3))


@pytest.mark.parametrize("window", [0, 1, 4, 100])
def test_reference_sliding_window(window):
    q, k, v, cu = sample_inputs([12, 3, 20], 6, 3, 32)
    out = packed_attention(q, k, v, cu, window=window)
    torch.testing.assert_close(out, sdpa_per_document(q, k, v, cu, window=window))


def test_lse_is_the_logsumexp_of_the_scaled_scores():
    q, k, v, cu = sample_inputs([6, 1, 10], 4, 2, 8, requires_grad=False)
    _, lse = packed_attention(q, k, v, cu, return_lse=True)
    assert lse.shape == (4, 17)
    assert lse.dtype == torch.float32
    # Token 7 (the second token of the third document) sees tokens 7 and 8 of its document.
    start, pos = 7, 8
    kv = k.repeat_interleave(2, dim=1)
    scores = torch.einsum("hd,thd->ht", q[pos], kv[start : pos + 1]) / math.sqrt(8)
    torch.testing.assert_close(lse[:, pos], torch.logsumexp(scores, dim=1))


def test_documents_do_not_see_each_other():
    """Changing one document leaves every other document's output untouched."""
    q, k, v, cu = sample_inputs([4, 6, 5], 2, 1, 8, requires_grad=False)
    before = packed_attention(q, k, v, cu)
    k2, v2 = k.clone(), v.clone()
    k2[4:10] += 3.0
    v2[4:10] -= 2.0
    after = packed_attention(q, k2, v2, cu)
    assert torch.equal(before[:4], after[:4])
    assert torch.equal(before[10:], after[10:])
    assert not torch.allclose(before[4:10], after[4:10])


def test_gradcheck_float64():
    q, k, v, cu = sample_inputs([3, 1, 4], 4, 2, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b, c: packed_attention(a, b, c, cu), (q, k, v))
    assert torch.autograd.gradcheck(
        lambda a, b, c: packed_attention(a, b, c, cu, window=1), (q, k, v)
    )


def test_non_contiguous_inputs_are_handled():
    q, k, v, cu = sample_inputs([5, 8], 4, 2, 16, requires_grad=False)
    # The same values in a [H, T, D] buffer viewed as [T, H, D]: strided, not contiguous.
    q_strided = q.transpose(0, 1).contiguous().transpose(0, 1)
    assert not q_strided.is_contiguous()
    torch.testing.assert_close(packed_attention(q_strided, k, v, cu), packed_attention(q, k, v, cu))


def test_bf16_output_dtype_and_error():
    q, k, v, cu = sample_inputs([9, 14], 4, 2, 32, requires_grad=False)
    exact = packed_attention_reference(q, k, v, cu)[0]
    low = packed_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), exact, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------------------------
# Bad input


Q, K, V, CU = sample_inputs([3, 5], 4, 2, 8, requires_grad=False)


def _cu(*bounds: int) -> torch.Tensor:
    return torch.tensor(bounds, dtype=torch.int32)


BAD_INPUTS = [
    pytest.param((Q, K, V, _cu(1, 3, 8)), {}, ValueError, "start at 0", id="start"),
    pytest.param((Q, K, V, _cu(0, 5, 3, 8)), {}, ValueError, "non-decreasing", id="decreasing"),
    pytest.param((Q, K, V, _cu(0, 3, 7)), {}, ValueError, "end at T = 8", id="end"),
    pytest.param((Q, K, V, CU.long()), {}, TypeError, "cu_seqlens must be int32", id="cu-dtype"),
    pytest.param(
        (Q, K[:, :1].expand(8, 3, 8), V[:, :1].expand(8, 3, 8), CU),
        {},
        ValueError,
        "multiple of kv heads",
        id="heads",
    ),
    pytest.param((Q, K[..., :4], V[..., :4], CU), {}, ValueError, "same head dim", id="head-dim"),
    pytest.param((Q, K, V[..., :4], CU), {}, ValueError, "k and v must have the same", id="kv"),
    pytest.param((Q, K[:7], V[:7], CU), {}, ValueError, "T = 8 tokens", id="tokens"),
    pytest.param((Q[None], K, V, CU), {}, ValueError, "q must be [T, H, D]", id="rank"),
    pytest.param((Q, K.double(), V, CU), {}, TypeError, "share a dtype", id="qkv-dtype"),
    pytest.param((Q.long(), K.long(), V.long(), CU), {}, TypeError, "floating", id="int-q"),
    pytest.param(
        (Q, K, V, CU), {"causal": False, "window": 2}, ValueError, "needs causal", id="window"
    ),
    pytest.param(
        (Q, K, V, CU), {"max_seqlen": 4}, ValueError, "shorter than the longest", id="max-seqlen"
    ),
]


@pytest.mark.parametrize(("args", "kwargs", "exc", "message"), BAD_INPUTS)
def test_bad_input(args, kwargs, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        packed_attention(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# The C++ kernel against the reference


def _kernel_and_reference(lengths, hq, hkv, d, dtype=torch.float32, **options):
    q, k, v, cu = sample_inputs(lengths, hq, hkv, d, dtype=dtype)
    out, lse = packed_attention(q, k, v, cu, return_lse=True, **options)
    assert out.dtype == dtype
    grads = _grads(out, (q, k, v))
    exact_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = packed_attention_reference(*exact_inputs, cu, **options)
    ref_grads = _grads(ref, exact_inputs)
    return (out, lse, grads), (ref, ref_lse, ref_grads), (q, k, v, cu)


@pytest.mark.parametrize(
    "options",
    [{}, {"window": 70}, {"window": 300}, {"causal": False}],
    ids=["causal", "window70", "window300", "full"],
)
@pytest.mark.parametrize(("hq", "hkv"), [(12, 6), (8, 1), (4, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_matches_reference_across_tiles(options, hq, hkv, dtype):
    """Documents spanning several query blocks (32 to 128 rows per head, by GQA group) and key
    tiles (256 keys), ragged tails, windows that end inside and across tiles, D = 80."""
    (out, lse, grads), (ref, ref_lse, ref_grads), _ = _kernel_and_reference(
        [600, 1, 129, 257, 7], hq, hkv, 80, dtype=dtype, **options
    )
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    # The reference returns lse in fp32 whatever the input dtype.
    torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=10 * tol, atol=10 * tol)


@pytest.mark.parametrize(("hq", "hkv", "d"), [(12, 6, 128), (8, 1, 64)])
def test_kernel_bf16_within_2x_pytorch_error(hq, hkv, d):
    """flash-attn's rule: error vs an fp32 reference at most 2x that of SDPA in bf16."""
    lengths = [300, 100, 3, 1, 40]  # 300: two key tiles, so the online softmax rescales
    (out, _, grads), (ref, _, ref_grads), (q, k, v, cu) = _kernel_and_reference(
        lengths, hq, hkv, d, dtype=torch.bfloat16
    )
    low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    torch_out = sdpa_per_document(*low, cu)
    torch_grads = _grads(torch_out, low)
    pairs = [(out, torch_out, ref), *zip(grads, torch_grads, ref_grads, strict=True)]
    for ours, theirs, exact in pairs:
        ours_err = (ours.double() - exact).abs().max().item()
        torch_err = (theirs.double() - exact).abs().max().item()
        assert ours_err <= 2 * torch_err + 1e-6, (ours_err, torch_err)


def test_kernel_thread_count_invariance():
    q, k, v, cu = sample_inputs([200, 5, 1, 90], 4, 2, 32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = packed_attention(q, k, v, cu)
        one_grads = _grads(one, (q, k, v))
        torch.set_num_threads(2)
        two = packed_attention(q, k, v, cu)
        two_grads = _grads(two, (q, k, v))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one, two, rtol=0, atol=0)
    for a, b in zip(one_grads, two_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_opcheck():
    q, k, v, cu = sample_inputs([20, 1, 70], 4, 2, 16)
    torch.library.opcheck(
        torch.ops.pangu_fastkd.packed_attention_fwd.default, (q, k, v, cu, 0.25, True, -1)
    )
    torch.library.opcheck(
        torch.ops.pangu_fastkd.packed_attention_fwd.default, (q, k, v, cu, 0.25, True, 5)
    )


def test_kernel_rejects_bad_cu_seqlens_at_the_op():
    q, k, v, _ = sample_inputs([3, 5], 4, 2, 8, requires_grad=False)
    bad = torch.tensor([0, 5, 3, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="non-decreasing"):
        torch.ops.pangu_fastkd.packed_attention_fwd(q, k, v, bad, 0.3, True, -1)


def test_deterministic_mode_gives_bitwise_identical_gradients():
    """Under torch.use_deterministic_algorithms the work split is static, so repeated backward
    passes sum dK/dV in the same order (what exact resume of training relies on)."""
    q, k, v, cu = sample_inputs([300, 5, 1, 190, 77], 8, 2, 32)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        runs = []
        for _ in range(3):
            out = packed_attention(q, k, v, cu)
            runs.append((out, *_grads(out, (q, k, v))))
    finally:
        torch.use_deterministic_algorithms(previous)
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b)
