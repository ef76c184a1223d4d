"""The NPU host code of ``packed_attention_fwd`` and ``packed_attention_bwd``
(csrc/ascend/host/packed_attention_npu.cpp), run on CPU.

The host code, its kernel entry points (csrc/ascend/packed_attention_{fwd,bwd}.cpp) and the module
are compiled into the twin module every host test shares (tests/ascend_host_build.py): cu_seqlens is
validated on the host, the tiling comes from the twin's CANN host tiling API for the chip the module
was built for, and the launch goes through ``ACLRT_LAUNCH_KERNEL`` into ``twin::Launch``. Results
are compared with the CPU kernel ``torch.ops.pangu_fastkd.packed_attention_fwd`` and
``packed_attention_reference``: fp32 tightly, bf16 and fp16 by the project's rule (error against an
exact result at most 2x plain PyTorch attention computed, and for the backward differentiated, in
that dtype). The backward's two launches (dQ pass, then dK/dV pass on the same workspace) are
compared with the CPU kernel ``torch.ops.pangu_fastkd.packed_attention_bwd``, and forward then
backward through the twin with ``torch.autograd`` of the reference.

What this does not cover: torch_npu's stream, allocator and copies (the cu_seqlens read-back is a
no-op on CPU tensors), and timing; see tests/ascend_twin/host/README.md.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from types import ModuleType

import pytest
import torch
from ascend_host_build import SOC_310B, SOC_910B, host_twin, needs_host_twin

from pangu_fastkd import _native
from pangu_fastkd.data.boundaries import cu_seqlens_from_lengths
from pangu_fastkd.ops.packed_attention_reference import packed_attention_reference

pytestmark = needs_host_twin


@pytest.fixture(scope="session", params=[SOC_910B, SOC_310B], ids=["910b", "310b"])
def twin(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    return host_twin(request.param, tmp_path_factory)


@pytest.fixture(scope="session")
def twin_910b(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    return host_twin(SOC_910B, tmp_path_factory)


# ---------------------------------------------------------------------------------------------
# Problems


@dataclass(frozen=True)
class Spec:
    lengths: tuple[int, ...]
    hq: int
    hkv: int
    d: int
    seed: int = 0


def _inputs(spec: Spec, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """q [T, Hq, D], k/v [T, Hkv, D] in ``dtype``, cu_seqlens [B + 1] int32."""
    g = torch.Generator().manual_seed(spec.seed)
    t = sum(spec.lengths)
    q = torch.randn(t, spec.hq, spec.d, generator=g)
    k = torch.randn(t, spec.hkv, spec.d, generator=g)
    v = torch.randn(t, spec.hkv, spec.d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype), cu_seqlens_from_lengths(spec.lengths)


def _scale(spec: Spec) -> float:
    return 1.0 / math.sqrt(spec.d)


# Documents of length 1, an empty document, and long documents whose last query tile is ragged
# on both chips (the tile is picked from the UB budget, e.g. 56 rows for G=2, D=64 fp32 on the 910B
# and 72 on the 310B). The names give (Hq, Hkv) and D.
CASES = {
    "gqa42-d64": Spec((1, 150, 13, 0, 5), 4, 2, 64),
    "gqa42-d16": Spec((1, 130, 9, 1), 4, 2, 16, seed=1),
    "mqa41-d16": Spec((9, 1, 23, 2), 4, 1, 16, seed=2),
    "mqa41-d64": Spec((100, 1, 6), 4, 1, 64, seed=3),
    "mha22-d16": Spec((1, 1, 1, 300), 2, 2, 16, seed=4),
    "mha22-d64": Spec((5, 200, 1), 2, 2, 64, seed=5),
}


# ---------------------------------------------------------------------------------------------
# fp32: equal to the CPU kernel and the reference


@pytest.mark.parametrize("spec", CASES.values(), ids=CASES.keys())
def test_float32_matches_cpu_kernel_and_reference(twin: ModuleType, spec: Spec) -> None:
    q, k, v, cu = _inputs(spec)
    scale = _scale(spec)
    out, lse = twin.packed_attention_fwd(q, k, v, cu, scale, True, -1)
    cpu_out, cpu_lse = torch.ops.pangu_fastkd.packed_attention_fwd(q, k, v, cu, scale, True, -1)
    ref_out, ref_lse = packed_attention_reference(q, k, v, cu, softmax_scale=scale)
    assert out.shape == cpu_out.shape and out.dtype == torch.float32
    assert lse.shape == (spec.hq, sum(spec.lengths)) and lse.dtype == torch.float32
    for expected_out, expected_lse in ((cpu_out, cpu_lse), (ref_out, ref_lse)):
        torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(lse, expected_lse, rtol=1e-5, atol=1e-5)


def test_tilings_cover_several_blocks_and_ragged_tiles(twin: ModuleType) -> None:
    # The cases above run what the claims say: several blocks on the 910B and one on the 310B,
    # and documents longer than one tile that end in a partial tile.
    is_910b = twin.build_info()["soc_version"] == SOC_910B
    ragged = 0
    for spec in CASES.values():
        q, k, v, cu = _inputs(spec)
        tile, block_dim, items, workspace = twin.packed_attention_fwd_plan(
            q, k, v, cu, _scale(spec)
        )
        expected_items = spec.hkv * sum(math.ceil(n / tile) for n in spec.lengths)
        assert items == expected_items
        # 910B: a MIX launch, each block one cube core and its two vector cores, which split the
        # work items between them; 310B: its one core.
        assert block_dim == (min(math.ceil(items / 2), 24) if is_910b else 1)
        assert workspace > 0
        ragged += any(n > tile and n % tile for n in spec.lengths)
    assert ragged == len(CASES) - 1  # all but mqa41-d16, whose documents fit one tile each
    if is_910b:
        spec = CASES["mqa41-d16"]
        # 4 work items (one head group, 4 one-tile documents): 2 blocks, 4 vector cores.
        assert twin.packed_attention_fwd_plan(*_inputs(spec), _scale(spec))[1] == 2


def test_strided_inputs_and_a_non_default_scale(twin_910b: ModuleType) -> None:
    spec = CASES["gqa42-d16"]
    q, k, v, cu = _inputs(spec)
    q_strided = q.transpose(0, 1).contiguous().transpose(0, 1)  # same values, [Hq, T, D] storage
    assert not q_strided.is_contiguous()
    out, lse = twin_910b.packed_attention_fwd(q_strided, k, v, cu, 0.3, True, -1)
    cpu_out, cpu_lse = torch.ops.pangu_fastkd.packed_attention_fwd(q, k, v, cu, 0.3, True, -1)
    torch.testing.assert_close(out, cpu_out, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(lse, cpu_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lengths", [(0,), (0, 0)])
def test_no_tokens(twin_910b: ModuleType, lengths: tuple[int, ...]) -> None:
    q, k, v, cu = _inputs(Spec(lengths, 4, 2, 16))
    out, lse = twin_910b.packed_attention_fwd(q, k, v, cu, 0.25, True, -1)
    cpu_out, cpu_lse = torch.ops.pangu_fastkd.packed_attention_fwd(q, k, v, cu, 0.25, True, -1)
    assert out.shape == cpu_out.shape == (0, 4, 16) and lse.shape == cpu_lse.shape == (4, 0)


def test_twin_registers_no_npu_kernel(twin_910b: ModuleType) -> None:
    assert not _native.npu_kernel_available("packed_attention_fwd")


# ---------------------------------------------------------------------------------------------
# bf16: at most 2x plain PyTorch's error


def _plain_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float):
    """Plain PyTorch attention with every product and the softmax in the inputs' dtype."""
    group = q.shape[1] // k.shape[1]
    outs = []
    for start, end in itertools.pairwise(cu.tolist()):
        qd = q[start:end].transpose(0, 1)
        kd = k[start:end].repeat_interleave(group, dim=1).transpose(0, 1)
        vd = v[start:end].repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (qd @ kd.transpose(1, 2)) * scale
        future = torch.ones(end - start, end - start, dtype=torch.bool).triu(1)
        probs = torch.softmax(scores.masked_fill(future, -math.inf), dim=-1)
        outs.append((probs @ vd).transpose(0, 1))
    return torch.cat(outs, dim=0)


BF16_CASES = ("gqa42-d64", "mqa41-d16", "mha22-d64")


@pytest.mark.parametrize("name", BF16_CASES)
def test_bfloat16_within_2x_pytorch(twin: ModuleType, name: str) -> None:
    spec = CASES[name]
    q, k, v, cu = _inputs(spec, torch.bfloat16)
    scale = _scale(spec)
    out, lse = twin.packed_attention_fwd(q, k, v, cu, scale, True, -1)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    # Exact: the CPU kernel in float64 on the same (bf16-rounded) values.
    exact_out, exact_lse = torch.ops.pangu_fastkd.packed_attention_fwd(
        q.double(), k.double(), v.double(), cu, scale, True, -1
    )
    ours = (out.double() - exact_out).abs().max().item()
    pytorch = (_plain_bf16(q, k, v, cu, scale).double() - exact_out).abs().max().item()
    assert ours <= 2 * pytorch, f"bf16 out: error {ours:.3e} > 2 x PyTorch's {pytorch:.3e}"
    # The lse accumulates in fp32 from the exact bf16 inputs: fp32-tight against the exact one.
    torch.testing.assert_close(lse.double(), exact_lse, rtol=1e-5, atol=1e-5)


def test_float16_forward_within_2x_pytorch(twin: ModuleType) -> None:
    spec = CASES["gqa42-d64"]
    q, k, v, cu = _inputs(spec, torch.float16)
    scale = _scale(spec)
    out, lse = twin.packed_attention_fwd(q, k, v, cu, scale, True, -1)
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    exact_out, exact_lse = torch.ops.pangu_fastkd.packed_attention_fwd(
        q.double(), k.double(), v.double(), cu, scale, True, -1
    )
    ours = (out.double() - exact_out).abs().max().item()
    pytorch = (_plain_bf16(q, k, v, cu, scale).double() - exact_out).abs().max().item()
    assert ours <= 2 * pytorch, f"fp16 out: error {ours:.3e} > 2 x PyTorch's {pytorch:.3e}"
    torch.testing.assert_close(lse.double(), exact_lse, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# What the Ascend C kernel does not take, and bad input


def test_non_causal_and_window_are_refused(twin_910b: ModuleType) -> None:
    q, k, v, cu = _inputs(CASES["mqa41-d16"])
    with pytest.raises(NotImplementedError, match="supports causal=True only, got causal=False"):
        twin_910b.packed_attention_fwd(q, k, v, cu, 0.25, False, -1)
    with pytest.raises(
        NotImplementedError, match="does not support a sliding window, got window=4"
    ):
        twin_910b.packed_attention_fwd(q, k, v, cu, 0.25, True, 4)
    with pytest.raises(NotImplementedError, match="got window=0"):
        twin_910b.packed_attention_fwd(q, k, v, cu, 0.25, True, 0)


def _replace_cu(values: list[int], dtype: torch.dtype = torch.int32):
    def change(args: list) -> None:
        args[3] = torch.tensor(values, dtype=dtype)

    return change


def _set_arg(index: int, value):
    def change(args: list) -> None:
        args[index] = value(args[index]) if callable(value) else value

    return change


# (exception type, change to the arguments of a valid call): the CPU kernel raises the same error.
# The valid call: T = 35, cu_seqlens [0, 9, 10, 33, 35], Hq = 4, Hkv = 2.
CPU_ERRORS = {
    "cu-not-starting-at-0": (ValueError, _replace_cu([1, 9, 10, 33, 35])),
    "cu-decreasing": (ValueError, _replace_cu([0, 9, 8, 33, 35])),
    "cu-not-ending-at-T": (ValueError, _replace_cu([0, 9, 10, 33, 34])),
    "cu-past-T": (ValueError, _replace_cu([0, 9, 10, 33, 36])),
    "cu-int64": (TypeError, _replace_cu([0, 9, 10, 33, 35], torch.int64)),
    "cu-one-entry": (ValueError, _replace_cu([0])),
    "cu-2d": (ValueError, _set_arg(3, lambda cu: cu[None])),
    "q-2d": (ValueError, _set_arg(0, lambda q: q[:, 0])),
    "kv-shapes-differ": (ValueError, _set_arg(2, lambda v: v[:-1])),
    "heads-not-a-multiple": (ValueError, _set_arg(0, lambda q: q[:, :3])),  # Hkv = 2 below
    "dtypes-differ": (TypeError, _set_arg(1, lambda k: k.bfloat16())),
    "window-without-causal": (ValueError, lambda args: args.__setitem__(slice(5, 7), [False, 3])),
}


@pytest.mark.parametrize("error,change", CPU_ERRORS.values(), ids=CPU_ERRORS.keys())
def test_bad_input_raises_the_cpu_kernels_error(
    twin_910b: ModuleType, error: type[Exception], change
) -> None:
    q, k, v, cu = _inputs(Spec((9, 1, 23, 2), 4, 2, 16))
    args = [q, k, v, cu, 0.25, True, -1]
    change(args)
    with pytest.raises(error) as cpu_error:
        torch.ops.pangu_fastkd.packed_attention_fwd(*args)
    with pytest.raises(error) as twin_error:
        twin_910b.packed_attention_fwd(*args)
    assert str(twin_error.value).splitlines()[0] == str(cpu_error.value).splitlines()[0]


def test_problems_the_kernel_cannot_take(twin_910b: ModuleType) -> None:
    spec = Spec((5, 3), 2, 1, 24)
    q, k, v, cu = _inputs(spec)
    with pytest.raises(
        ValueError, match="Ascend C kernel cannot take this problem: headDim must be a multiple"
    ):
        twin_910b.packed_attention_fwd(q, k, v, cu, 0.2, True, -1)
    q, k, v, cu = _inputs(CASES["mqa41-d16"])
    # The host checks the option before the kernel's tiling would.
    with pytest.raises(ValueError, match="softmax_scale must be finite and > 0, got 0"):
        twin_910b.packed_attention_fwd(q, k, v, cu, 0.0, True, -1)
    with pytest.raises(
        TypeError, match="takes float32, bfloat16 or float16 q, k and v, got Double"
    ):
        twin_910b.packed_attention_fwd(q.double(), k.double(), v.double(), cu, 0.25, True, -1)
    with pytest.raises(ValueError, match="q must be on the cpu device for the Ascend C kernel"):
        twin_910b.packed_attention_fwd(q.to("meta"), k, v, cu, 0.25, True, -1)
    # Checked against q's device first, so the message names both devices.
    with pytest.raises(
        ValueError, match="k is on meta but q is on cpu; every input must be on one"
    ):
        twin_910b.packed_attention_fwd(q, k.to("meta"), v, cu, 0.25, True, -1)


# ---------------------------------------------------------------------------------------------
# The backward: two launches (dQ pass, dK/dV pass) on one workspace


def _backward_inputs(spec: Spec, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """grad_out, q, k, v, out, lse, cu_seqlens: out and lse from the CPU kernel in float64 on the
    ``dtype`` values (out rounded to ``dtype``), as a forward would hand them over."""
    q, k, v, cu = _inputs(spec, dtype)
    g = torch.Generator().manual_seed(spec.seed + 100)
    grad_out = torch.randn(q.shape, generator=g).to(dtype)
    out, lse = torch.ops.pangu_fastkd.packed_attention_fwd(
        q.double(), k.double(), v.double(), cu, _scale(spec), True, -1
    )
    return grad_out, q, k, v, out.to(dtype), lse.float(), cu


def _exact_grads(args: tuple[torch.Tensor, ...], scale: float) -> tuple[torch.Tensor, ...]:
    """Autograd of the reference in float64 on the (rounded) input values."""
    grad_out, q, k, v, _, _, cu = args
    q, k, v = (x.double().requires_grad_() for x in (q, k, v))
    out, _ = packed_attention_reference(q, k, v, cu, softmax_scale=scale)
    out.backward(grad_out.double())
    return q.grad, k.grad, v.grad


def _plain_grads(args: tuple[torch.Tensor, ...], scale: float) -> tuple[torch.Tensor, ...]:
    """Plain PyTorch attention run and differentiated by autograd in the inputs' dtype."""
    grad_out, q, k, v, _, _, cu = args
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    _plain_bf16(q, k, v, cu, scale).backward(grad_out)
    return q.grad, k.grad, v.grad


# (Hq, Hkv) (4, 2), (4, 1), (2, 2); D 16 and 64; documents of length 1 and ragged last tiles.
BWD_CASES = ("gqa42-d64", "gqa42-d16", "mqa41-d16", "mha22-d16", "mha22-d64")


@pytest.mark.parametrize("name", BWD_CASES)
def test_backward_float32_matches_cpu_kernel(twin: ModuleType, name: str) -> None:
    spec = CASES[name]
    args = _backward_inputs(spec, torch.float32)
    scale = _scale(spec)
    grads = twin.packed_attention_bwd(*args, scale, True, -1)
    cpu_grads = torch.ops.pangu_fastkd.packed_attention_bwd(*args, scale, True, -1)
    for got, expected, what in zip(grads, cpu_grads, ("grad_q", "grad_k", "grad_v"), strict=True):
        assert got.shape == expected.shape and got.dtype == torch.float32, what
        torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5, msg=what)


LOW_PRECISION_BWD = {
    "bf16-gqa42-d64": (torch.bfloat16, "gqa42-d64"),
    "bf16-mqa41-d16": (torch.bfloat16, "mqa41-d16"),
    "bf16-mha22-d16": (torch.bfloat16, "mha22-d16"),
    "fp16-gqa42-d16": (torch.float16, "gqa42-d16"),
    "fp16-mha22-d64": (torch.float16, "mha22-d64"),
}


@pytest.mark.parametrize("dtype,name", LOW_PRECISION_BWD.values(), ids=LOW_PRECISION_BWD.keys())
def test_backward_low_precision_within_2x_pytorch(
    twin: ModuleType, dtype: torch.dtype, name: str
) -> None:
    spec = CASES[name]
    args = _backward_inputs(spec, dtype)
    scale = _scale(spec)
    grads = twin.packed_attention_bwd(*args, scale, True, -1)
    exact = _exact_grads(args, scale)
    plain = _plain_grads(args, scale)
    for got, want, torch_grad, what in zip(
        grads, exact, plain, ("grad_q", "grad_k", "grad_v"), strict=True
    ):
        assert got.dtype == dtype, what
        ours = (got.double() - want).abs().max().item()
        pytorch = (torch_grad.double() - want).abs().max().item()
        assert ours <= 2 * pytorch, f"{what}: error {ours:.3e} > 2 x PyTorch's {pytorch:.3e}"


def test_backward_plan_covers_several_blocks_and_ragged_tiles(twin: ModuleType) -> None:
    is_910b = twin.build_info()["soc_version"] == SOC_910B
    ragged = 0
    for name in BWD_CASES:
        spec = CASES[name]
        q, k, v, cu = _inputs(spec)
        tile, dq_blocks, dkv_blocks, workspace = twin.packed_attention_bwd_plan(
            q, k, v, cu, _scale(spec)
        )
        tiles = sum(math.ceil(n / tile) for n in spec.lengths)
        # 910B: one block per cube core and its two vector cores, which split the work items;
        # 310B: its one core.
        assert dq_blocks == (min(math.ceil(spec.hq * tiles / 2), 24) if is_910b else 1)
        assert dkv_blocks == (min(math.ceil(spec.hkv * tiles / 2), 24) if is_910b else 1)
        assert workspace > 0
        ragged += any(n > tile and n % tile for n in spec.lengths)
    assert ragged >= 3
    if is_910b:
        assert dq_blocks > 1 and dkv_blocks > 1


@pytest.mark.parametrize("soc", ["910b", "310b"])
def test_forward_then_backward_reproduce_autograd_of_the_reference(
    soc: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    module = host_twin(SOC_910B if soc == "910b" else SOC_310B, tmp_path_factory)
    spec = Spec((1, 70, 4, 33), 4, 2, 16, seed=7)
    q, k, v, cu = _inputs(spec)
    scale = _scale(spec)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(8))
    out, lse = module.packed_attention_fwd(q, k, v, cu, scale, True, -1)
    grads = module.packed_attention_bwd(grad_out, q, k, v, out, lse, cu, scale, True, -1)
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    ref_out, _ = packed_attention_reference(qr, kr, vr, cu, softmax_scale=scale)
    ref_grads = torch.autograd.grad(ref_out, (qr, kr, vr), grad_out)
    torch.testing.assert_close(out, ref_out.detach(), rtol=1e-5, atol=2e-6)
    for got, expected, what in zip(grads, ref_grads, ("grad_q", "grad_k", "grad_v"), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=what)


@pytest.mark.parametrize("lengths", [(0,), (0, 0)])
def test_backward_no_tokens(twin_910b: ModuleType, lengths: tuple[int, ...]) -> None:
    args = _backward_inputs(Spec(lengths, 4, 2, 16), torch.float32)
    grads = twin_910b.packed_attention_bwd(*args, 0.25, True, -1)
    assert [g.shape for g in grads] == [(0, 4, 16), (0, 2, 16), (0, 2, 16)]


def test_backward_non_causal_and_window_are_refused(twin_910b: ModuleType) -> None:
    args = _backward_inputs(CASES["mqa41-d16"], torch.float32)
    with pytest.raises(NotImplementedError, match="supports causal=True only, got causal=False"):
        twin_910b.packed_attention_bwd(*args, 0.25, False, -1)
    with pytest.raises(
        NotImplementedError, match="does not support a sliding window, got window=3"
    ):
        twin_910b.packed_attention_bwd(*args, 0.25, True, 3)


# Changes to a valid backward call (grad_out, q, k, v, out, lse, cu_seqlens, scale, causal,
# window) that the CPU kernel rejects with the same error.
BWD_CPU_ERRORS = {
    "grad-out-shape": (ValueError, _set_arg(0, lambda g: g[:, :2])),
    "out-shape": (ValueError, _set_arg(4, lambda o: o[:-1])),
    "lse-shape": (ValueError, _set_arg(5, lambda lse: lse.t())),
    "cu-decreasing": (ValueError, _set_arg(6, lambda cu: torch.tensor([0, 9, 8, 33, 35]).int())),
    "dtypes-differ": (TypeError, _set_arg(2, lambda k: k.double())),
    "window-without-causal": (ValueError, lambda args: args.__setitem__(slice(8, 10), [False, 3])),
}


@pytest.mark.parametrize("error,change", BWD_CPU_ERRORS.values(), ids=BWD_CPU_ERRORS.keys())
def test_backward_bad_input_raises_the_cpu_kernels_error(
    twin_910b: ModuleType, error: type[Exception], change
) -> None:
    args = [*_backward_inputs(Spec((9, 1, 23, 2), 4, 2, 16), torch.float32), 0.25, True, -1]
    change(args)
    with pytest.raises(error) as cpu_error:
        torch.ops.pangu_fastkd.packed_attention_bwd(*args)
    with pytest.raises(error) as twin_error:
        twin_910b.packed_attention_bwd(*args)
    assert str(twin_error.value).splitlines()[0] == str(cpu_error.value).splitlines()[0]


def test_backward_problems_the_kernel_cannot_take(twin_910b: ModuleType) -> None:
    args = _backward_inputs(Spec((5, 3), 2, 1, 24), torch.float32)
    with pytest.raises(ValueError, match="cannot take this problem: headDim must be a multiple"):
        twin_910b.packed_attention_bwd(*args, 0.2, True, -1)
    grad_out, q, k, v, out, lse, cu = _backward_inputs(CASES["mqa41-d16"], torch.float32)
    with pytest.raises(TypeError, match="takes float32, bfloat16 or float16 q, k and v"):
        twin_910b.packed_attention_bwd(
            grad_out, q.double(), k.double(), v.double(), out, lse, cu, 0.25, True, -1
        )
    with pytest.raises(ValueError, match="lse is on meta but q is on cpu; every input must be on"):
        twin_910b.packed_attention_bwd(grad_out, q, k, v, out, lse.to("meta"), cu, 0.25, True, -1)
