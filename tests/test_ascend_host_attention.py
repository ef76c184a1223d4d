"""The NPU host code of ``packed_attention_fwd`` (csrc/ascend/host/packed_attention_npu.cpp), run on
CPU.

The host code, its kernel entry points (csrc/ascend/packed_attention_fwd.cpp) and the module are
compiled into the twin module every host test shares (tests/ascend_host_build.py): cu_seqlens is
validated on the host, the tiling comes from the twin's CANN host tiling API for the chip the
module was built for, and the launch goes through ``ACLRT_LAUNCH_KERNEL`` into ``twin::Launch``.
Results are compared with the CPU kernel ``torch.ops.pangu_fastkd.packed_attention_fwd`` and
``packed_attention_reference``: fp32 tightly, bf16 by the project's rule (error against an exact
result at most 2x plain PyTorch attention computed in bf16).

What this does not cover: torch_npu's stream, allocator and copies (the cu_seqlens read-back is a
no-op on CPU tensors), and timing; see csrc/ascend/host/twin/README.md.
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
from pangu_fastkd.ops.packed_attention_reference import (
    cu_seqlens_from_lengths,
    packed_attention_reference,
)

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
        assert block_dim == (min(items, 24) if is_910b else 1)  # 910B: one block per cube core
        assert workspace > 0
        ragged += any(n > tile and n % tile for n in spec.lengths)
    assert ragged == len(CASES) - 1  # all but mqa41-d16, whose documents fit one tile each
    if is_910b:
        spec = CASES["mqa41-d16"]
        assert twin.packed_attention_fwd_plan(*_inputs(spec), _scale(spec))[1] == 4


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
    """Plain PyTorch attention with every product and the softmax in bf16."""
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
    with pytest.raises(ValueError, match="cannot take this problem: scale must be finite and > 0"):
        twin_910b.packed_attention_fwd(q, k, v, cu, 0.0, True, -1)
    with pytest.raises(TypeError, match="takes float32 or bfloat16 q, k and v, got Double"):
        twin_910b.packed_attention_fwd(q.double(), k.double(), v.double(), cu, 0.25, True, -1)
    with pytest.raises(ValueError, match="q must be on the cpu device for the Ascend C kernel"):
        twin_910b.packed_attention_fwd(q.to("meta"), k, v, cu, 0.25, True, -1)
    with pytest.raises(ValueError, match="k must be on the cpu device for the Ascend C kernel"):
        twin_910b.packed_attention_fwd(q, k.to("meta"), v, cu, 0.25, True, -1)
