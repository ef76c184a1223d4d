"""The Ascend C packed causal attention forward (csrc/ascend/packed_attention_fwd.h) on the twin.

tests/ascend_twin/packed_attention_fwd.cpp is compiled with g++ against the CPU twin, fed q, k, v
and cu_seqlens through files, and its out [T, Hq, D] and lse [Hq, T] are compared with
``packed_attention_reference`` (the oracle) run in float64. fp32 inputs are held to a tight
tolerance; for bf16 and fp16 inputs the output (written in the input dtype) may be at most 2x as
far from the oracle as plain PyTorch attention computed in that dtype (torch has CPU half and bf16
kernels for matmul and softmax), and the lse (accumulated in fp32 from the exact 16-bit inputs) is
held to the fp32 tolerance. bf16 and fp16 share a size, so the driver picks the kernel from the
tiling's dtype code. The products run on the twin's cube unit (Matmul API);
one test reads back the GM workspace to check that S and PV really came from it.
"""

from __future__ import annotations

import itertools
import math
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from twin_build import TILING_ERROR_EXIT_CODE, compile_program, needs_gxx

from pangu_fastkd.data.boundaries import cu_seqlens_from_lengths
from pangu_fastkd.ops.packed_attention_reference import packed_attention_reference

pytestmark = needs_gxx


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_program(
        "packed_attention_fwd", tmp_path_factory.mktemp("ascend_packed_attention")
    )


@dataclass
class Case:
    """q [T, Hq, D], k/v [T, Hkv, D] (fp32/bf16/fp16), cu_seqlens [B + 1] int32, softmax scale."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens: torch.Tensor
    scale: float


@dataclass
class KernelRun:
    """What the driver printed and wrote: tiling, out [T, Hq, D] and lse [Hq, T] f32."""

    tile: int
    block_dim: int
    items: int
    ub_bytes: int
    budget: int
    out: torch.Tensor
    lse: torch.Tensor
    workspace: dict[str, int]  # total, sys, block and the q/s/p/o offsets inside a block


DTYPE_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def _make_case(
    dtype: torch.dtype,
    lengths: list[int],
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    *,
    scale: float | None = None,
    seed: int = 0,
    qk_scale: float = 1.5,
) -> Case:
    gen = torch.Generator().manual_seed(seed * 7919 + sum(lengths) * 131 + head_dim)
    tokens = sum(lengths)
    # Scores of a few units, so the softmax is neither uniform nor one-hot.
    q = (torch.randn(tokens, q_heads, head_dim, generator=gen) * qk_scale).to(dtype)
    k = (torch.randn(tokens, kv_heads, head_dim, generator=gen) * qk_scale).to(dtype)
    v = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(dtype)
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    return Case(q, k, v, cu_seqlens_from_lengths(lengths), scale)


def _raw(x: torch.Tensor) -> np.ndarray:
    return (x if x.dtype == torch.float32 else x.view(torch.int16)).contiguous().numpy()


def _run_kernel(
    binary: Path,
    tmp_path: Path,
    case: Case,
    chip: str,
    max_blocks: int,
    max_tile: int,
    workspace_out: Path | None = None,
    dtype_code: int | None = None,
) -> tuple[subprocess.CompletedProcess[str], KernelRun | None]:
    tokens, q_heads, head_dim = case.q.shape
    kv_heads = case.k.shape[1]
    is_f32 = case.q.dtype == torch.float32
    _raw(case.q).tofile(tmp_path / "q.bin")
    _raw(case.k).tofile(tmp_path / "k.bin")
    _raw(case.v).tofile(tmp_path / "v.bin")
    case.cu_seqlens.int().numpy().tofile(tmp_path / "cu_seqlens.bin")
    out_path = tmp_path / "out.bin"
    docs = case.cu_seqlens.numel() - 1
    dtype = DTYPE_NAMES[case.q.dtype] + ("" if dtype_code is None else f":{dtype_code}")
    args = [dtype, tokens, docs, q_heads, kv_heads, head_dim]
    args += [repr(case.scale), chip, max_blocks, max_tile, tmp_path, out_path]
    if workspace_out is not None:
        args.append(workspace_out)
    result = subprocess.run(
        [str(binary), *map(str, args)], capture_output=True, text=True, timeout=300
    )
    if result.returncode != 0:
        return result, None
    tiling = re.search(
        r"TILING tile=(\d+) blockDim=(\d+) items=(\d+) ubBytes=(\d+) budget=(\d+)", result.stdout
    )
    assert tiling is not None, result.stdout
    ws = re.search(
        r"WORKSPACE total=(\d+) sys=(\d+) block=(\d+) slots=(\d+) q=(\d+) s=(\d+) p=(\d+) "
        r"o=(\d+)",
        result.stdout,
    )
    assert ws is not None, result.stdout
    keys = ["total", "sys", "block", "slots", "q", "s", "p", "o"]
    workspace = dict(zip(keys, map(int, ws.groups()), strict=True))
    raw_out = out_path.read_bytes()
    out_bytes = case.q.numel() * case.q.element_size()
    out_np = np.frombuffer(raw_out[:out_bytes], dtype=np.float32 if is_f32 else np.int16)
    out = torch.from_numpy(out_np.copy())
    out = (out if is_f32 else out.view(case.q.dtype)).reshape(tokens, q_heads, head_dim)
    lse = torch.from_numpy(np.frombuffer(raw_out[out_bytes:], dtype=np.float32).copy())
    tile, block_dim, items, ub_bytes, budget = map(int, tiling.groups())
    lse = lse.reshape(q_heads, tokens)
    run = KernelRun(tile, block_dim, items, ub_bytes, budget, out, lse, workspace)
    return result, run


def _torch_low_precision(case: Case, fp32_scores: bool = False) -> torch.Tensor:
    """Plain PyTorch attention with every product and the softmax in the inputs' dtype.

    ``fp32_scores``: q k^T and the softmax in fp32 instead (P rounded to the inputs' dtype for
    P V), the flash-attention rule the kernel follows, for inputs whose scores overflow fp16.
    """
    group = case.q.shape[1] // case.k.shape[1]
    outs = []
    bounds = case.cu_seqlens.tolist()
    for start, end in itertools.pairwise(bounds):
        length = end - start
        qd = case.q[start:end].transpose(0, 1)  # [Hq, L, D]
        kd = case.k[start:end].repeat_interleave(group, dim=1).transpose(0, 1)
        vd = case.v[start:end].repeat_interleave(group, dim=1).transpose(0, 1)
        if fp32_scores:
            qd, kd = qd.float(), kd.float()
        scores = (qd @ kd.transpose(1, 2)) * case.scale  # [Hq, L, L]
        future = torch.ones(length, length, dtype=torch.bool).triu(1)
        probs = torch.softmax(scores.masked_fill(future, -math.inf), dim=-1).to(vd.dtype)
        outs.append((probs @ vd).transpose(0, 1))  # [L, Hq, D]
    return torch.cat(outs, dim=0)


def _check_against_reference(case: Case, run: KernelRun, fp32_scores: bool = False) -> None:
    oracle_out, oracle_lse = packed_attention_reference(
        case.q.double(),
        case.k.double(),
        case.v.double(),
        case.cu_seqlens,
        softmax_scale=case.scale,
    )
    # The lse accumulates in fp32 from the exact input values, whatever the input dtype (the
    # oracle's is computed in float64 and rounded once to float32).
    torch.testing.assert_close(run.lse, oracle_lse, rtol=1e-5, atol=1e-5)
    assert run.out.dtype == case.q.dtype
    if case.q.dtype == torch.float32:
        torch.testing.assert_close(run.out.double(), oracle_out, rtol=1e-5, atol=2e-6)
        return
    kernel_err = (run.out.double() - oracle_out).abs().max().item()
    torch_out = _torch_low_precision(case, fp32_scores).double()
    torch_err = (torch_out - oracle_out).abs().max().item()
    assert kernel_err <= 2 * torch_err, (kernel_err, torch_err)


# (dtype, document lengths, Hq, Hkv, D, chip, max_blocks, max_tile)
CASES = {
    "f32-mixed-docs-gqa2": (torch.float32, [5, 1, 19, 3, 1, 11], 4, 2, 16, "910b", 5, 8),
    "f32-single-doc-mqa": (torch.float32, [37], 4, 1, 32, "910b", 3, 16),
    "f32-mha-310b": (torch.float32, [1, 23, 9], 2, 2, 64, "310b", 0, 8),
    "f32-budget-tile": (torch.float32, [29, 2, 14], 4, 2, 32, "910b", 4, 0),
    "bf16-mixed-docs-gqa2": (torch.bfloat16, [7, 1, 21, 4], 4, 2, 32, "910b", 6, 8),
    "bf16-single-doc-mqa-310b": (torch.bfloat16, [30], 4, 1, 16, "310b", 0, 16),
    "bf16-mha-d64": (torch.bfloat16, [1, 17, 1, 6], 2, 2, 64, "910b", 3, 0),
    "f16-mixed-docs-gqa2": (torch.float16, [7, 1, 21, 4], 4, 2, 32, "910b", 6, 8),
    "f16-single-doc-mqa-310b": (torch.float16, [30], 4, 1, 16, "310b", 0, 16),
    "f16-mha-d64": (torch.float16, [1, 17, 1, 6], 2, 2, 64, "910b", 3, 0),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_matches_reference(binary: Path, tmp_path: Path, name: str) -> None:
    dtype, lengths, q_heads, kv_heads, head_dim, chip, max_blocks, max_tile = CASES[name]
    case = _make_case(dtype, lengths, q_heads, kv_heads, head_dim)
    result, run = _run_kernel(binary, tmp_path, case, chip, max_blocks, max_tile)
    assert result.returncode == 0 and run is not None, result.stdout + result.stderr
    tile = max_tile or -(-max(lengths) // 8) * 8  # no cap: the longest document fits one tile
    assert run.tile == tile
    # One item per (document, kv head, query tile): the group's query heads are stacked.
    items = kv_heads * sum(-(-length // tile) for length in lengths)
    assert run.items == items
    # A 910B block is one cube core driving two vector cores, which take the items: as many
    # blocks as the items need, at most the 24 cube cores.
    expected_blocks = 1 if chip == "310b" else min(-(-items // 2), max_blocks or 24)
    assert run.block_dim == expected_blocks
    assert run.ub_bytes <= run.budget
    _check_against_reference(case, run)


@pytest.mark.parametrize(
    ("seed", "dtype", "heads"),
    [
        (0, torch.float32, (4, 2)),
        (1, torch.bfloat16, (4, 1)),
        (2, torch.float32, (2, 2)),
        (3, torch.float16, (6, 2)),
    ],
)
def test_random_document_lengths(
    binary: Path, tmp_path: Path, seed: int, dtype: torch.dtype, heads: tuple[int, int]
) -> None:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 20, (6,), generator=gen).tolist()
    lengths[seed % 6] = 1  # a one-token document: its only key is itself
    case = _make_case(dtype, lengths, *heads, 16, seed=seed)
    result, run = _run_kernel(binary, tmp_path, case, "910b", 4, 8)
    assert result.returncode == 0 and run is not None, result.stdout + result.stderr
    _check_against_reference(case, run)


def test_non_default_scale_and_empty_document(binary: Path, tmp_path: Path) -> None:
    case = _make_case(torch.float32, [6, 0, 13], 4, 2, 16, scale=0.9, seed=2)
    result, run = _run_kernel(binary, tmp_path, case, "910b", 0, 8)
    assert result.returncode == 0 and run is not None, result.stdout + result.stderr
    _check_against_reference(case, run)


@pytest.mark.parametrize(
    ("chip", "dtype"),
    [("910b", torch.float32), ("310b", torch.bfloat16), ("910b", torch.float16)],
)
def test_budget_sized_tile_fills_the_ub(
    binary: Path, tmp_path: Path, chip: str, dtype: torch.dtype
) -> None:
    # One long document with D = 64: the UB budget, not the document, bounds the tile.
    case = _make_case(dtype, [203], 2, 1, 64, seed=3)
    result, run = _run_kernel(binary, tmp_path, case, chip, 0, 0)
    assert result.returncode == 0 and run is not None, result.stdout + result.stderr
    assert run.tile % 8 == 0 and run.tile < 203 and 203 % run.tile != 0
    # The next tile (8 more rows) would overrun the budget.
    elem = case.q.element_size()
    assert run.ub_bytes == _ub_bytes(2, run.tile, 64, elem)
    assert run.ub_bytes <= run.budget < _ub_bytes(2, run.tile + 8, 64, elem)
    _check_against_reference(case, run)


def _ub_bytes(group: int, tile: int, head_dim: int, elem_bytes: int) -> int:
    """PackedAttentionUbBytes of packed_attention_tiling.h, restated to check the tile choice."""

    def align32(n: int) -> int:
        return -(-n // 32) * 32

    m = group * tile
    total = align32(m * tile * 4) + align32(m * tile * elem_bytes)  # S in, P out
    total += 2 * align32(m * head_dim * 4)  # PV in, O accumulator
    total += 2 * align32(m * head_dim * elem_bytes)  # out, Q staging
    total += align32(tile * tile // 8)  # causal mask bits
    total += align32((13 * m + tile) * 4)  # statistics, reductions, work
    return total


def _block_workspace(group: int, tile: int, head_dim: int, elem_bytes: int) -> dict[str, int]:
    """PackedAttentionBlockWorkspace restated: stacked Q, S, P, PV, each 512-byte aligned."""

    def align512(n: int) -> int:
        return -(-n // 512) * 512

    m = group * tile
    q = 0
    s = q + align512(m * head_dim * elem_bytes)
    p = s + align512(m * tile * 4)
    o = p + align512(m * tile * elem_bytes)
    return {"q": q, "s": s, "p": p, "o": o, "block": o + align512(m * head_dim * 4)}


# Lengths of 1 to 3 tiles with ragged tails (and one-token documents), GQA groups (4, 2),
# (4, 1), (2, 2), (8, 2), D in {16, 64, 128}, both chips and dtypes.
# (dtype, lengths, Hq, Hkv, D, chip, max_blocks, max_tile)
CUBE_CASES = {
    "f32-g2-d16-910b": (torch.float32, [16, 5, 33, 1, 47], 4, 2, 16, "910b", 5, 16),
    "bf16-g2-d16-310b": (torch.bfloat16, [17, 1, 40], 4, 2, 16, "310b", 0, 16),
    "f32-g4-d64-310b": (torch.float32, [9, 24, 3], 4, 1, 64, "310b", 0, 8),
    "bf16-g4-d64-910b": (torch.bfloat16, [11, 30, 2], 4, 1, 64, "910b", 7, 16),
    "f32-g1-d128-910b": (torch.float32, [25, 1, 12], 2, 2, 128, "910b", 3, 16),
    "bf16-g1-d128-310b": (torch.bfloat16, [20, 7], 2, 2, 128, "310b", 0, 8),
    "f32-g4-d16-910b-hkv2": (torch.float32, [13, 29, 1], 8, 2, 16, "910b", 4, 16),
    "bf16-g4-d128-910b-hkv2": (torch.bfloat16, [19, 6], 8, 2, 128, "910b", 6, 8),
    "f16-g2-d64-910b": (torch.float16, [17, 1, 40], 4, 2, 64, "910b", 5, 16),
    "f16-g4-d128-310b": (torch.float16, [11, 30, 2], 4, 1, 128, "310b", 0, 16),
    "f16-g1-d16-910b": (torch.float16, [25, 1, 12], 2, 2, 16, "910b", 3, 8),
}


@pytest.mark.parametrize("name", sorted(CUBE_CASES))
def test_cube_forward_groups_dims_and_chips(binary: Path, tmp_path: Path, name: str) -> None:
    dtype, lengths, q_heads, kv_heads, head_dim, chip, max_blocks, max_tile = CUBE_CASES[name]
    case = _make_case(dtype, lengths, q_heads, kv_heads, head_dim, seed=len(name))
    result, run = _run_kernel(binary, tmp_path, case, chip, max_blocks, max_tile)
    assert result.returncode == 0 and run is not None, result.stdout + result.stderr
    assert run.tile == max_tile  # every case has a document longer than one tile
    assert max(lengths) > 2 * max_tile or any(n % max_tile for n in lengths)
    elem = case.q.element_size()
    group = q_heads // kv_heads
    assert run.ub_bytes == _ub_bytes(group, run.tile, head_dim, elem) <= run.budget
    layout = _block_workspace(group, run.tile, head_dim, elem)
    assert {k: run.workspace[k] for k in layout} == layout
    # One scratch area per vector core: in the 910B's MIX mode each cube block drives two.
    assert run.workspace["slots"] == run.block_dim * (2 if chip == "910b" else 1)
    total = run.workspace["sys"] + run.workspace["slots"] * layout["block"]
    assert run.workspace["total"] == total
    _check_against_reference(case, run)


@pytest.mark.parametrize(
    ("chip", "dtype"),
    [("910b", torch.float32), ("310b", torch.bfloat16), ("910b", torch.float16)],
)
def test_products_come_from_the_cube_workspace(
    binary: Path, tmp_path: Path, chip: str, dtype: torch.dtype
) -> None:
    # One block, one document of 13 tokens, group of 2: the last vector core's last item (the
    # 910B's second vector core, or the 310B's only core after kv head 0) is kv head 1 with
    # query heads 2 and 3 stacked (M = 26 rows) and a single, diagonal key tile of 13 keys. Its
    # workspace area (poisoned with NaN by the driver) must then hold what the cube wrote:
    # S = Qstack K^T with row pitch `tile` and PV = P V, with P the kernel's own probabilities.
    case = _make_case(dtype, [13], 4, 2, 16, seed=5)
    ws_path = tmp_path / "ws.bin"
    result, run = _run_kernel(binary, tmp_path, case, chip, 1, 16, workspace_out=ws_path)
    assert result.returncode == 0 and run is not None, result.stdout + result.stderr
    assert run.block_dim == 1 and run.items == 2 and run.tile == 16
    _check_against_reference(case, run)
    raw = ws_path.read_bytes()
    assert len(raw) == run.workspace["block"]
    m, tile, length, d = 26, 16, 13, 16
    in_np = np.float32 if dtype == torch.float32 else np.int16

    def region(name: str, np_dtype: type, count: int) -> torch.Tensor:
        off = run.workspace[name]
        size = np.dtype(np_dtype).itemsize
        t = torch.from_numpy(np.frombuffer(raw[off : off + count * size], dtype=np_dtype).copy())
        return t.view(dtype).float() if np_dtype is np.int16 else t

    q_stack = case.q[:, 2:4].transpose(0, 1).reshape(m, d).float()  # heads 2, 3 stacked
    k1, v1 = case.k[:, 1].float(), case.v[:, 1].float()
    torch.testing.assert_close(region("q", in_np, m * d).reshape(m, d), q_stack, rtol=0, atol=0)
    s = region("s", np.float32, m * tile).reshape(m, tile)[:, :length]
    torch.testing.assert_close(s, q_stack @ k1.T, rtol=1e-5, atol=1e-5)
    p = region("p", in_np, m * tile).reshape(m, tile)
    rows = torch.arange(m) % length
    future = torch.arange(tile)[None, :] > rows[:, None]
    assert torch.all(p[future] == 0) and torch.all(p[~future] > 0)  # the causal mask, as P
    pv = region("o", np.float32, m * d).reshape(m, d)
    torch.testing.assert_close(pv, p[:, :length] @ v1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chip", ["910b", "310b"])
def test_fp16_scores_beyond_the_fp16_range(binary: Path, tmp_path: Path, chip: str) -> None:
    # |q|, |k| ~ 60 with D = 64: q . k reaches ~1e5 > 65504. Plain fp16 PyTorch overflows in
    # q k^T; the kernel's cube accumulates S in fp32 and only P (in [0, 1]) is cast to half, so
    # it is held to the same rule against PyTorch with fp32 scores and P rounded to fp16.
    case = _make_case(torch.float16, [40, 9], 4, 2, 64, seed=6, qk_scale=60.0)
    assert not torch.isfinite(_torch_low_precision(case)).all()
    result, run = _run_kernel(binary, tmp_path, case, chip, 0, 16)
    assert result.returncode == 0 and run is not None, result.stdout + result.stderr
    assert torch.isfinite(run.out).all()
    _check_against_reference(case, run, fp32_scores=True)


@pytest.mark.parametrize(
    ("dtype", "code", "message"),
    [
        (torch.float16, 3, "dtype must be 0 (fp32), 1 (bf16) or 2 (fp16), got 3"),
        (torch.float32, 2, "elemBytes must be 2 for dtype 2, got 4"),
        (torch.float16, 0, "elemBytes must be 4 for dtype 0, got 2"),
    ],
)
def test_bad_dtype_code_is_a_tiling_error(
    binary: Path, tmp_path: Path, dtype: torch.dtype, code: int, message: str
) -> None:
    case = _make_case(dtype, [4, 4], 4, 2, 16)
    result, _ = _run_kernel(binary, tmp_path, case, "910b", 0, 0, dtype_code=code)
    assert result.returncode == TILING_ERROR_EXIT_CODE, result.stdout + result.stderr
    assert f"TILING-ERROR {message}" in result.stdout


def test_dtype_from_elem_bytes_keeps_meaning_bf16(binary: Path, tmp_path: Path) -> None:
    # PackedAttentionProblem::dtype left at its default, as callers written before fp16 do:
    # 2-byte elements are bf16, with the bf16 cube tilings and kernel.
    case = _make_case(torch.bfloat16, [9, 14], 4, 2, 32, seed=7)
    result, run = _run_kernel(binary, tmp_path, case, "910b", 3, 8, dtype_code=0xFFFFFFFF)
    assert result.returncode == 0 and run is not None, result.stdout + result.stderr
    _check_against_reference(case, run)


def test_chip_budgets_agree_with_the_twin(binary: Path) -> None:
    result = subprocess.run([str(binary), "budgets"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "BUDGETS-AGREE", result.stdout


def test_core_counts_follow_the_part(binary: Path) -> None:
    # CANN 8.1 data/platform_config/<part>.ini: the 910B3/B4 have 20 cube + 40 vector cores, not
    # the 910B1's 24 + 48; the tiling of 512 work items then launches one block per cube core.
    parts = ["Ascend910B1", "Ascend910B2C", "Ascend910B3", "Ascend910B4", "Ascend310B1"]
    result = subprocess.run(
        [str(binary), "parts", *parts], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split("\n")[:-1] == [
        "PART Ascend910B1 aic=24 aiv=48 blocks=24",
        "PART Ascend910B2C aic=24 aiv=48 blocks=24",
        "PART Ascend910B3 aic=20 aiv=40 blocks=20",
        "PART Ascend910B4 aic=20 aiv=40 blocks=20",
        "PART Ascend310B1 aic=1 aiv=1 blocks=1",
    ]
    unknown = subprocess.run(
        [str(binary), "parts", "Ascend910A"], capture_output=True, text=True, timeout=300
    )
    assert unknown.returncode != 0 and "'Ascend910A' is not a part the twin knows" in (
        unknown.stdout + unknown.stderr
    )


@pytest.mark.parametrize(
    ("lengths", "q_heads", "kv_heads", "head_dim", "cu_override", "message"),
    [
        ([4, 4], 4, 2, 24, None, "headDim must be a multiple of 16"),
        ([4, 4], 3, 2, 16, None, "qHeads must be a positive multiple of kvHeads"),
        ([4, 4], 4, 2, 16, [0, 5, 4], "cu_seqlens must be non-decreasing"),
        ([4, 4], 4, 2, 16, [0, 4, 7], "cu_seqlens[-1] must equal tokens = 8"),
        ([4, 4], 4, 2, 16, [1, 4, 8], "cu_seqlens[0] must be 0"),
    ],
)
def test_bad_problem_is_a_tiling_error(
    binary: Path,
    tmp_path: Path,
    lengths: list[int],
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    cu_override: list[int] | None,
    message: str,
) -> None:
    case = _make_case(torch.float32, lengths, q_heads, kv_heads, head_dim)
    if cu_override is not None:
        case.cu_seqlens = torch.tensor(cu_override, dtype=torch.int32)
    result, _ = _run_kernel(binary, tmp_path, case, "910b", 0, 0)
    assert result.returncode == TILING_ERROR_EXIT_CODE, result.stdout + result.stderr
    assert f"TILING-ERROR {message}" in result.stdout


@pytest.mark.parametrize("lengths", [[], [0, 0]])
def test_empty_batch_launches_one_idle_block(
    binary: Path, tmp_path: Path, lengths: list[int]
) -> None:
    case = _make_case(torch.float32, lengths, 4, 2, 16)
    result, run = _run_kernel(binary, tmp_path, case, "910b", 0, 0)
    assert result.returncode == 0 and run is not None, result.stdout + result.stderr
    assert run.items == 0 and run.block_dim == 1
    assert run.out.shape == (0, 4, 16) and run.lse.shape == (4, 0)
