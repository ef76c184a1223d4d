"""The cube unit of the CPU twin: the Ascend C Matmul high-level API (lib/matmul/matmul_intf.h).

Runs tests/ascend_twin/matmul_tiles.cpp, a kernel in which every block computes a band of rows
of C = A @ op(B) (+ bias) through a Matmul object whose tiling comes from the host-side
matmul_tiling::MatmulApiTiling, and compares C with torch: a float64 matmul of the same rounded
inputs. The cube unit forms each product in fp32 and accumulates in fp32, so C must lie within the
rounding-error bound of fp32 summation, (K + 2) * 2**-24 * (|A| @ |B| + |bias|), per element;
a dropped K step, a wrong stride or a misplaced block is orders of magnitude above it.

Cases cover ragged tails in M, N and K, transposed and row-major B, float/half/bfloat16 inputs,
IterateAll into GM, Iterate + GetTensorC into UB (VECIN), A staged in UB (VECOUT), A and B with
row strides larger than K (org shapes, as for one head of q[T, H, D]), two Matmul objects in one
kernel, several blocks on the 910B and one on the 310B.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from twin_build import TILING_ERROR_EXIT_CODE, compile_program, needs_gxx

pytestmark = needs_gxx

U32 = 2.0**-24  # unit roundoff of fp32
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_program("matmul_tiles", tmp_path_factory.mktemp("ascend_twin_matmul"))


def _raw(x: torch.Tensor) -> np.ndarray:
    x = x.contiguous()
    return (x.view(torch.int16) if x.dtype in (torch.float16, torch.bfloat16) else x).numpy()


def _run(
    binary: Path,
    tmp_path: Path,
    mode: str,
    dtype: str,
    m: int,
    n: int,
    k: int,
    lda: int,
    ldb: int,
    trans_b: bool,
    bias: bool,
    chip: str,
    block_dim: int,
    fix: tuple[int, int, int] = (-1, -1, -1),
) -> tuple[subprocess.CompletedProcess[str], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(m * 7919 + n * 131 + k)
    t = DTYPES[dtype]
    data = {
        "a": torch.randn(m, lda, generator=gen).to(t),
        "b": torch.randn(n if trans_b else k, ldb, generator=gen).to(t),
        "bias": torch.randn(n, generator=gen),
        "d": torch.randn(n, k, generator=gen),
    }
    for name, tensor in data.items():
        _raw(tensor).tofile(tmp_path / f"{name}.bin")
    args = [mode, dtype, m, n, k, lda, ldb, int(trans_b), int(bias), chip, block_dim, *fix]
    result = subprocess.run(
        [str(binary), *map(str, args), str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    if result.returncode == 0:
        cols = k if mode == "chain" else n
        data["c"] = torch.from_numpy(np.fromfile(tmp_path / "c.bin", dtype=np.float32)).view(
            m, cols
        )
    return result, data


def _reference(
    data: dict[str, torch.Tensor], mode: str, n: int, k: int, trans_b: bool, bias: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 result of the same rounded inputs, and the fp32-accumulation error bound."""
    a = data["a"][:, :k].double()
    b = data["b"][:, :k].double().T if trans_b else data["b"][:, :n].double()
    ref = a @ b
    bound = (k + 2) * U32 * (a.abs() @ b.abs())
    if bias:
        ref = ref + data["bias"].double()
        bound = bound + (k + 2) * U32 * data["bias"].double().abs()
    if mode == "chain":  # O = S @ D with S the fp32 result of the first Matmul
        d = data["d"].double()
        bound = bound @ d.abs() + (n + 2) * U32 * (ref.abs() + bound) @ d.abs()
        ref = ref @ d
    return ref, bound


# mode, dtype, M, N, K, lda, ldb, transB, bias, chip, blocks, fixed base (M, N, K)
CASES = [
    ("gm", "f32", 37, 50, 70, 70, 50, False, False, "910b", 3, (-1, -1, -1)),
    # strided A and B rows (org shapes > single shape), bias, 7 K steps with a tail of 8
    ("gm", "f16", 100, 72, 200, 256, 224, True, True, "910b", 4, (32, 48, 32)),
    ("gm", "bf16", 45, 33, 130, 130, 33, False, True, "310b", 1, (-1, -1, -1)),
    ("gm", "f32", 17, 19, 23, 29, 31, True, False, "310b", 1, (-1, -1, -1)),
    # Iterate + GetTensorC into UB, many ragged blocks in both directions
    ("ub", "f32", 70, 90, 50, 50, 50, True, False, "910b", 2, (32, 32, 16)),
    ("ub", "bf16", 33, 130, 96, 128, 160, False, True, "910b", 2, (16, 64, 32)),
    # A staged in UB (VECOUT) with a 32-byte-aligned row pitch
    ("uba", "f16", 40, 48, 72, 80, 72, True, False, "910b", 2, (-1, -1, -1)),
    ("uba", "f32", 21, 40, 33, 33, 40, False, True, "910b", 3, (16, 32, 16)),
    # two Matmul objects: S = A B^T, End, O = S D
    ("chain", "f16", 50, 40, 64, 64, 64, True, False, "910b", 3, (-1, -1, -1)),
    ("chain", "bf16", 20, 24, 40, 40, 40, True, False, "310b", 1, (-1, -1, -1)),
]


@pytest.mark.parametrize(
    ("mode", "dtype", "m", "n", "k", "lda", "ldb", "trans_b", "bias", "chip", "blocks", "fix"),
    CASES,
)
def test_matmul_matches_torch(
    binary: Path,
    tmp_path: Path,
    mode: str,
    dtype: str,
    m: int,
    n: int,
    k: int,
    lda: int,
    ldb: int,
    trans_b: bool,
    bias: bool,
    chip: str,
    blocks: int,
    fix: tuple[int, int, int],
) -> None:
    result, data = _run(
        binary, tmp_path, mode, dtype, m, n, k, lda, ldb, trans_b, bias, chip, blocks, fix
    )
    assert result.returncode == 0, result.stdout + result.stderr
    ref, bound = _reference(data, mode, n, k, trans_b, bias)
    err = (data["c"].double() - ref).abs()
    worst = (err - bound).max().item()
    assert worst <= 0, f"error above the fp32 bound by {worst}; max error {err.max().item()}"


def test_default_tiling_picks_the_recommended_base_block(binary: Path, tmp_path: Path) -> None:
    # CANN's recommended (baseM, baseN, baseK) = (128, 256, 64) for 16-bit inputs (150 rows per
    # block, so a tail of 22); K = 200 is fully loaded in L1 (stepKa = 4), double buffered.
    result, data = _run(
        binary, tmp_path, "gm", "f16", 300, 260, 200, 200, 260, False, False, "910b", 2
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "baseM=128 baseN=256 baseK=64 stepKa=4 depthA1=8" in result.stdout
    ref, bound = _reference(data, "gm", 260, 200, False, False)
    assert ((data["c"].double() - ref).abs() <= bound).all()


def test_ub_operands_are_rejected_by_the_310b_tiling(binary: Path, tmp_path: Path) -> None:
    # Atlas 200I/500 A2 (310B) accepts GM operands only: GetTiling returns -1.
    result, _ = _run(binary, tmp_path, "ub", "f32", 16, 16, 16, 16, 16, False, False, "310b", 1)
    assert result.returncode == TILING_ERROR_EXIT_CODE, result.stdout + result.stderr
    assert "TILING_ERROR" in result.stdout


def test_base_blocks_over_l0c_are_rejected_by_the_tiling(binary: Path, tmp_path: Path) -> None:
    # 256 x 256 fp32 accumulators need 256 KB of L0C (128 KB); both sizes are forced.
    result, _ = _run(
        binary,
        tmp_path,
        "gm",
        "f32",
        300,
        300,
        32,
        32,
        300,
        False,
        False,
        "910b",
        1,
        (256, 256, -1),
    )
    assert result.returncode == TILING_ERROR_EXIT_CODE, result.stdout + result.stderr
