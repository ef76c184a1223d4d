"""The Ascend C packed causal attention backward (csrc/ascend/packed_attention_bwd.h) on the twin.

tests/ascend_twin/packed_attention_bwd.cpp is compiled with g++ against the CPU twin, fed
grad_out, q, k, v, out, lse and cu_seqlens through files, runs the dQ pass and the dK/dV pass,
and its grad_q, grad_k, grad_v are compared with the gradients of ``packed_attention_reference``
(the oracle) taken by autograd in float64. ``out`` and ``lse`` come from the reference run on the
inputs (not from the forward kernel), as the forward would hand them to the backward.

fp32 inputs are held to a tight tolerance. For bf16 and fp16 inputs each gradient (written in the
input dtype) may be at most 2x as far from the oracle as plain PyTorch attention run and
differentiated in that dtype.
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
from twin_build import TILING_ERROR_EXIT_CODE, VIOLATION_EXIT_CODE, compile_program, needs_gxx

from pangu_fastkd.data.boundaries import cu_seqlens_from_lengths
from pangu_fastkd.ops.packed_attention_reference import packed_attention_reference

pytestmark = needs_gxx


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_program(
        "packed_attention_bwd", tmp_path_factory.mktemp("ascend_packed_attention_bwd")
    )


@dataclass
class Case:
    """q, grad_out, out [T, Hq, D], k/v [T, Hkv, D] (fp32/bf16/fp16), lse [Hq, T] f32, cu."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    grad_out: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor
    cu_seqlens: torch.Tensor
    scale: float


@dataclass
class KernelRun:
    """The driver's tiling line and outputs: grads in the input dtype, delta [Hq, T] f32."""

    tiling: dict[str, int]
    grad_q: torch.Tensor
    grad_k: torch.Tensor
    grad_v: torch.Tensor
    delta: torch.Tensor


def _make_case(
    dtype: torch.dtype,
    lengths: list[int],
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    *,
    scale: float | None = None,
    seed: int = 0,
    reference: bool = True,
) -> Case:
    gen = torch.Generator().manual_seed(seed * 7919 + sum(lengths) * 131 + head_dim)
    tokens = sum(lengths)
    # Scores of a few units, so the softmax is neither uniform nor one-hot.
    q = (torch.randn(tokens, q_heads, head_dim, generator=gen) * 1.5).to(dtype)
    k = (torch.randn(tokens, kv_heads, head_dim, generator=gen) * 1.5).to(dtype)
    v = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(dtype)
    grad_out = torch.randn(tokens, q_heads, head_dim, generator=gen).to(dtype)
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    cu = cu_seqlens_from_lengths(lengths)
    if reference and tokens > 0:
        with torch.no_grad():
            out, lse = packed_attention_reference(q, k, v, cu, softmax_scale=scale)
    else:
        out, lse = torch.zeros_like(q), torch.zeros(q_heads, tokens)
    return Case(q, k, v, grad_out, out, lse, cu, scale)


# The driver's dtype argument and the numpy type the raw bytes are read and written as.
_DRIVER_DTYPE = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def _raw(x: torch.Tensor) -> np.ndarray:
    return (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).contiguous().numpy()


def _run_kernel(
    binary: Path,
    tmp_path: Path,
    case: Case,
    chip: str,
    max_blocks: int,
    max_tile: int,
    mode: str = "run",
) -> tuple[subprocess.CompletedProcess[str], KernelRun | None]:
    tokens, q_heads, head_dim = case.q.shape
    kv_heads = case.k.shape[1]
    is_f32 = case.q.dtype == torch.float32
    for name in ("q", "k", "v", "grad_out", "out"):
        _raw(getattr(case, name)).tofile(tmp_path / f"{name}.bin")
    case.lse.float().contiguous().numpy().tofile(tmp_path / "lse.bin")
    case.cu_seqlens.int().numpy().tofile(tmp_path / "cu_seqlens.bin")
    out_path = tmp_path / "grads.bin"
    docs = case.cu_seqlens.numel() - 1
    args = [mode, _DRIVER_DTYPE[case.q.dtype], tokens, docs, q_heads, kv_heads, head_dim]
    args += [repr(case.scale), chip, max_blocks, max_tile, tmp_path, out_path]
    result = subprocess.run(
        [str(binary), *map(str, args)], capture_output=True, text=True, timeout=300
    )
    if result.returncode != 0:
        return result, None
    line = re.search(r"TILING (.*)", result.stdout)
    assert line is not None, result.stdout
    tiling = {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", line.group(1))}
    raw = out_path.read_bytes()
    np_dtype = np.float32 if is_f32 else np.int16
    if case.q.dtype == torch.float16:
        np_dtype = np.float16

    def take(offset: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, int]:
        count = math.prod(shape)
        size = count * case.q.element_size()
        x = torch.from_numpy(np.frombuffer(raw[offset : offset + size], dtype=np_dtype).copy())
        x = x.view(torch.bfloat16) if case.q.dtype == torch.bfloat16 else x
        return x.reshape(shape), offset + size

    grad_q, at = take(0, (tokens, q_heads, head_dim))
    grad_k, at = take(at, (tokens, kv_heads, head_dim))
    grad_v, at = take(at, (tokens, kv_heads, head_dim))
    delta = torch.from_numpy(np.frombuffer(raw[at:], dtype=np.float32).copy())
    return result, KernelRun(tiling, grad_q, grad_k, grad_v, delta.reshape(q_heads, tokens))


def _oracle_grads(case: Case) -> tuple[torch.Tensor, ...]:
    """Gradients of the reference in float64 from the (exact) input values."""
    q, k, v = (x.double().requires_grad_() for x in (case.q, case.k, case.v))
    out, _ = packed_attention_reference(q, k, v, case.cu_seqlens, softmax_scale=case.scale)
    out.backward(case.grad_out.double())
    return q.grad, k.grad, v.grad


def _torch_low_precision_grads(case: Case) -> tuple[torch.Tensor, ...]:
    """Plain PyTorch attention run and differentiated in the inputs' dtype (bf16 or fp16)."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (case.q, case.k, case.v))
    group = q.shape[1] // k.shape[1]
    outs = []
    for start, end in itertools.pairwise(case.cu_seqlens.tolist()):
        length = end - start
        qd = q[start:end].transpose(0, 1)  # [Hq, L, D]
        kd = k[start:end].repeat_interleave(group, dim=1).transpose(0, 1)
        vd = v[start:end].repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (qd @ kd.transpose(1, 2)) * case.scale  # [Hq, L, L]
        future = torch.ones(length, length, dtype=torch.bool).triu(1)
        probs = torch.softmax(scores.masked_fill(future, -math.inf), dim=-1)
        outs.append((probs @ vd).transpose(0, 1))  # [L, Hq, D]
    torch.cat(outs, dim=0).backward(case.grad_out)
    return q.grad, k.grad, v.grad


def _check_against_reference(case: Case, run: KernelRun) -> None:
    # delta = rowsum(dO * O) in f32 from the exact input values.
    expected_delta = (case.grad_out.double() * case.out.double()).sum(-1).transpose(0, 1)
    torch.testing.assert_close(run.delta.double(), expected_delta, rtol=1e-5, atol=1e-5)
    oracle = _oracle_grads(case)
    got = (run.grad_q, run.grad_k, run.grad_v)
    for name, kernel, exact in zip(("grad_q", "grad_k", "grad_v"), got, oracle, strict=True):
        assert kernel.dtype == case.q.dtype, name
        if case.q.dtype == torch.float32:
            # out and lse are themselves f32 roundings of the oracle's, so the gradient cannot be
            # closer than a few f32 ulps of the values it sums.
            torch.testing.assert_close(kernel.double(), exact, rtol=2e-5, atol=2e-5, msg=name)
    if case.q.dtype == torch.float32:
        return
    torch_grads = _torch_low_precision_grads(case)
    for name, kernel, exact, plain in zip(
        ("grad_q", "grad_k", "grad_v"), got, oracle, torch_grads, strict=True
    ):
        kernel_err = (kernel.double() - exact).abs().max().item()
        torch_err = (plain.double() - exact).abs().max().item()
        assert kernel_err <= 2 * torch_err, (name, kernel_err, torch_err)


def _tiles(lengths: list[int], tile: int) -> int:
    return sum(-(-length // tile) for length in lengths)


# (dtype, document lengths, Hq, Hkv, D, chip, max_blocks, max_tile). Lengths span 1 to 3 tiles
# with ragged tails and one-token documents.
CASES = {
    "f32-gqa2-d16-910b": (torch.float32, [5, 1, 37, 16, 3], 4, 2, 16, "910b", 5, 16),
    "f32-mqa-d64-910b": (torch.float32, [41, 2], 4, 1, 64, "910b", 3, 16),
    "f32-mha-d64-310b": (torch.float32, [1, 23, 9, 40], 2, 2, 64, "310b", 0, 16),
    "f32-gqa2-d16-310b-one-tile": (torch.float32, [29, 2, 14], 4, 2, 16, "310b", 0, 0),
    "bf16-gqa2-d64-910b": (torch.bfloat16, [7, 1, 45, 20], 4, 2, 64, "910b", 6, 16),
    "bf16-mqa-d16-310b": (torch.bfloat16, [33, 1, 12], 4, 1, 16, "310b", 0, 16),
    "bf16-mha-d16-910b": (torch.bfloat16, [1, 17, 1, 38], 2, 2, 16, "910b", 4, 16),
    "bf16-gqa2-d64-910b-tile32": (torch.bfloat16, [70, 9], 4, 2, 64, "910b", 0, 32),
    "f16-gqa2-d64-910b": (torch.float16, [7, 1, 45, 20], 4, 2, 64, "910b", 6, 16),
    "f16-mqa-d16-310b": (torch.float16, [33, 1, 12], 4, 1, 16, "310b", 0, 16),
    "f16-mha-d16-910b-tile32": (torch.float16, [1, 70, 9], 2, 2, 16, "910b", 0, 32),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_match_reference(binary: Path, tmp_path: Path, name: str) -> None:
    dtype, lengths, q_heads, kv_heads, head_dim, chip, max_blocks, max_tile = CASES[name]
    case = _make_case(dtype, lengths, q_heads, kv_heads, head_dim)
    result, run = _run_kernel(binary, tmp_path, case, chip, max_blocks, max_tile)
    assert result.returncode == 0 and run is not None, result.stdout + result.stderr
    tile = run.tiling["tile"]
    if max_tile:
        assert tile == max_tile and max(lengths) > 2 * tile  # up to 3 tiles, ragged tails
    else:
        assert tile == -(-max(lengths) // 16) * 16  # no cap: the longest document is one tile
    assert run.tiling["dqItems"] == q_heads * _tiles(lengths, tile)
    assert run.tiling["dkvItems"] == kv_heads * _tiles(lengths, tile)
    # A 910B block is one cube core driving two vector cores, which take the items: as many
    # blocks as the items need, at most the cube cores.
    cores = 1 if chip == "310b" else min(24, max_blocks or 24)
    per_block = 1 if chip == "310b" else 2
    assert run.tiling["dqBlocks"] == min(-(-run.tiling["dqItems"] // per_block), cores)
    assert run.tiling["dkvBlocks"] == min(-(-run.tiling["dkvItems"] // per_block), cores)
    assert max(run.tiling["dqUb"], run.tiling["dkvUb"]) <= run.tiling["budget"]
    # Every vector core the launch brings takes work (a split over GetBlockNum() alone would
    # leave the second vector core of each 910B block idle, with correct results).
    active = re.search(r"ACTIVE dq=(\d+)/(\d+) dkv=(\d+)/(\d+)", result.stdout)
    assert active is not None, result.stdout
    dq_working, dq_cores, dkv_working, dkv_cores = map(int, active.groups())
    assert dq_cores == run.tiling["dqBlocks"] * per_block
    assert dkv_cores == run.tiling["dkvBlocks"] * per_block
    assert dq_working == min(run.tiling["dqItems"], dq_cores)
    assert dkv_working == min(run.tiling["dkvItems"], dkv_cores)
    _check_against_reference(case, run)


def test_block_count_does_not_change_the_result(binary: Path, tmp_path: Path) -> None:
    # Each block owns its rows and workspace slot: 1 block and many give bit-identical grads.
    case = _make_case(torch.bfloat16, [19, 40, 6], 4, 2, 16, seed=4)
    runs = []
    for blocks in (1, 7):
        result, run = _run_kernel(binary, tmp_path, case, "910b", blocks, 16)
        assert result.returncode == 0 and run is not None, result.stdout + result.stderr
        runs.append(run)
    assert runs[1].tiling["dqBlocks"] == 7 and runs[0].tiling["dqBlocks"] == 1
    for name in ("grad_q", "grad_k", "grad_v"):
        assert torch.equal(
            getattr(runs[0], name).view(torch.int16), getattr(runs[1], name).view(torch.int16)
        )


def test_non_default_scale_and_empty_document(binary: Path, tmp_path: Path) -> None:
    case = _make_case(torch.float32, [6, 0, 21], 4, 2, 16, scale=0.9, seed=2)
    result, run = _run_kernel(binary, tmp_path, case, "910b", 0, 16)
    assert result.returncode == 0 and run is not None, result.stdout + result.stderr
    _check_against_reference(case, run)


@pytest.mark.parametrize(("chip", "dtype"), [("910b", torch.bfloat16), ("310b", torch.float32)])
def test_budget_sized_tile(binary: Path, tmp_path: Path, chip: str, dtype: torch.dtype) -> None:
    # D = 128 and one long document: the UB budget, not the document or the 128 cap, bounds the
    # tile, and the next tile (16 more rows) would not fit.
    case = _make_case(dtype, [150], 2, 1, 128, seed=3)
    result, run = _run_kernel(binary, tmp_path, case, chip, 0, 0)
    assert result.returncode == 0 and run is not None, result.stdout + result.stderr
    tile, elem = run.tiling["tile"], case.q.element_size()
    assert tile < 128 and 150 % tile != 0
    assert max(run.tiling["dqUb"], run.tiling["dkvUb"]) <= run.tiling["budget"]
    assert max(_dq_ub(tile + 16, 128, elem), _dkv_ub(tile + 16, 128, elem)) > run.tiling["budget"]
    assert run.tiling["dqUb"] == _dq_ub(tile, 128, elem)
    assert run.tiling["dkvUb"] == _dkv_ub(tile, 128, elem)
    _check_against_reference(case, run)


def _align32(n: int) -> int:
    return -(-n // 32) * 32


def _common_ub(tile: int, head_dim: int, elem: int, out_tiles: int) -> int:
    """CommonUbBytes of packed_attention_bwd_tiling.h, restated to check the tile choice."""
    total = 3 * _align32(tile * tile * 4) + out_tiles * _align32(tile * tile * elem)
    total += _align32(tile * 2 * 4)
    if elem != 4:
        total += _align32(tile * head_dim * 4) + _align32(tile * head_dim * elem)
    return total


def _dq_ub(tile: int, head_dim: int, elem: int) -> int:
    products = 1 if elem == 4 else 2
    total = _common_ub(tile, head_dim, elem, 1) + 2 * _align32(tile * head_dim * elem)
    return total + _align32((products * tile * head_dim + tile * 8 + head_dim) * 4)


def _dkv_ub(tile: int, head_dim: int, elem: int) -> int:
    return _common_ub(tile, head_dim, elem, 2)


def test_chip_budgets_agree_with_the_twin(binary: Path) -> None:
    result = subprocess.run([str(binary), "budgets"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "BUDGETS-AGREE", result.stdout


@pytest.mark.parametrize(
    ("chip", "mode", "rule", "detail"),
    [
        ("910b", "bad-cube-tiling", "matmul-tiling", "baseM 8 "),
        ("310b", "bad-cube-tiling", "matmul-tiling", "baseM 8 "),
        ("910b", "short-score-k", "matmul-shape", r"single shape (16|4)x16x16 outside"),
        ("310b", "short-score-k", "matmul-shape", r"single shape (16|4)x16x16 outside"),
    ],
)
def test_products_go_through_the_matmul_api(
    binary: Path, tmp_path: Path, chip: str, mode: str, rule: str, detail: str
) -> None:
    # The twin counts no Matmul calls. Instead the driver breaks the score Matmul's TCubeTiling:
    # a baseM of 8 must stop the kernels when they initialise their Matmul objects with it, and
    # a singleCoreK of D - 1 must stop the first S product (K = D) at SetSingleShape, so the
    # products are made by Matmul objects initialised with the host tiling.
    case = _make_case(torch.float32, [20], 2, 1, 16)
    result, _ = _run_kernel(binary, tmp_path, case, chip, 0, 16, mode=mode)
    assert result.returncode == VIOLATION_EXIT_CODE, result.stdout + result.stderr
    # Blocks run concurrently and the first to fail is reported: with several blocks that may be
    # the one holding the 4-row tail tile (20 tokens = 16 + 4), hence the two single-shape M.
    assert f"VIOLATION rule={rule}" in result.stdout, result.stdout
    assert re.search(detail, result.stdout), result.stdout


@pytest.mark.parametrize(
    ("lengths", "q_heads", "kv_heads", "head_dim", "cu_override", "max_tile", "message"),
    [
        ([4, 4], 4, 2, 24, None, 0, "headDim must be a multiple of 16"),
        ([4, 4], 3, 2, 16, None, 0, "qHeads must be a positive multiple of kvHeads"),
        ([4, 4], 4, 2, 16, [0, 5, 4], 0, "cu_seqlens must be non-decreasing"),
        ([4, 4], 4, 2, 16, [0, 4, 7], 0, "cu_seqlens[-1] must equal tokens = 8"),
        ([4, 4], 4, 2, 16, [1, 4, 8], 0, "cu_seqlens[0] must be 0"),
        ([4, 4], 4, 2, 16, None, 24, "maxTile must be 0 (no cap) or a positive multiple of 16"),
        ([4], 256, 256, 512, None, 0, "qHeads * headDim must be at most 65535"),
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
    max_tile: int,
    message: str,
) -> None:
    # Problems the reference rejects too: out and lse are placeholders the host never reads.
    case = _make_case(torch.float32, lengths, q_heads, kv_heads, head_dim, reference=False)
    if cu_override is not None:
        case.cu_seqlens = torch.tensor(cu_override, dtype=torch.int32)
    result, _ = _run_kernel(binary, tmp_path, case, "910b", 0, max_tile)
    assert result.returncode == TILING_ERROR_EXIT_CODE, result.stdout + result.stderr
    assert f"TILING-ERROR {message}" in result.stdout


@pytest.mark.parametrize("lengths", [[], [0, 0]])
def test_empty_batch_launches_one_idle_block(
    binary: Path, tmp_path: Path, lengths: list[int]
) -> None:
    case = _make_case(torch.float32, lengths, 4, 2, 16)
    result, run = _run_kernel(binary, tmp_path, case, "910b", 0, 0)
    assert result.returncode == 0 and run is not None, result.stdout + result.stderr
    assert run.tiling["dqItems"] == 0 and run.tiling["dqBlocks"] == 1
    assert run.tiling["dkvBlocks"] == 1
    assert run.grad_q.shape == (0, 4, 16) and run.grad_k.shape == (0, 2, 16)
