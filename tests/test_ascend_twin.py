"""The CPU twin of the Ascend C API (tests/ascend_twin/include/kernel_operator.h).

Compiles the C++ programs in tests/ascend_twin/ with g++ and runs them:
- softmax_rows.cpp, an Ascend C style kernel (chunked, ragged tail, double-buffered TQue,
  several blocks, SyncAll), is compared with torch, judged by its error against a float64
  reference next to the error of torch's own float32 softmax;
- rule_violations.cpp makes one deliberately wrong call per hardware rule ("bad") and the
  legal call next to it ("good"): the bad one must be reported as that rule's violation, the
  good one must run clean. That includes the Matmul API's rules (lib/matmul/matmul_intf.h); its
  numerics are tested in test_ascend_twin_matmul.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from twin_build import VIOLATION_EXIT_CODE, compile_program, needs_gxx

pytestmark = needs_gxx


@pytest.fixture(scope="module")
def binaries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out_dir = tmp_path_factory.mktemp("ascend_twin")
    return {name: compile_program(name, out_dir) for name in ("softmax_rows", "rule_violations")}


def _run(binary: Path, *args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binary), *map(str, args)], capture_output=True, text=True, timeout=300
    )


def _run_softmax(
    binary: Path, tmp_path: Path, x: torch.Tensor, chunk: int, block_dim: int, chip: str
) -> tuple[subprocess.CompletedProcess[str], np.ndarray | None]:
    rows, vocab = x.shape
    dtype = {torch.float32: "f32", torch.bfloat16: "bf16"}[x.dtype]
    raw = x.view(torch.int16) if x.dtype == torch.bfloat16 else x
    in_path, out_path = tmp_path / "x.bin", tmp_path / "y.bin"
    raw.contiguous().numpy().tofile(in_path)
    result = _run(binary, dtype, rows, vocab, chunk, block_dim, chip, in_path, out_path)
    output = np.fromfile(out_path, dtype=np.float32) if result.returncode == 0 else None
    return result, output


@pytest.mark.parametrize(
    ("dtype", "rows", "vocab", "chunk", "block_dim", "chip"),
    [
        (torch.float32, 5, 1000, 256, 3, "910b"),  # ragged tail of 232, rows not a multiple
        (torch.bfloat16, 4, 777, 192, 2, "910b"),  # bf16 cast before Exp/Ln, odd tail
        (torch.float32, 7, 37, 64, 4, "910b"),  # whole row shorter than one chunk
        (torch.float32, 3, 300, 64, 1, "310b"),  # one-core chip
    ],
)
def test_softmax_kernel_matches_torch(
    binaries: dict[str, Path],
    tmp_path: Path,
    dtype: torch.dtype,
    rows: int,
    vocab: int,
    chunk: int,
    block_dim: int,
    chip: str,
) -> None:
    gen = torch.Generator().manual_seed(rows * 1000 + vocab)
    x = (torch.randn(rows, vocab, generator=gen) * 4 + 3).to(dtype)
    result, out = _run_softmax(binaries["softmax_rows"], tmp_path, x, chunk, block_dim, chip)
    assert result.returncode == 0, result.stdout + result.stderr
    assert out is not None and out.shape == (1 + rows + rows * vocab,)
    total, lse, probs = out[0], out[1 : 1 + rows], out[1 + rows :].reshape(rows, vocab)

    # Judge against a float64 reference, next to torch's float32 error for the same formula
    # (lse by logsumexp, then exp(x - lse)): fp32 accumulation must be at most 2x torch's error.
    x64 = x.double()
    ref_lse, ref_probs = torch.logsumexp(x64, 1), torch.softmax(x64, 1)
    torch_lse = torch.logsumexp(x.float(), 1)
    torch_probs = torch.exp(x.float() - torch_lse[:, None])

    def err(a: torch.Tensor | np.ndarray, ref: torch.Tensor) -> float:
        return (torch.as_tensor(a).double() - ref).abs().max().item()

    assert err(lse, ref_lse) <= 2 * err(torch_lse, ref_lse)
    assert err(probs, ref_probs) <= 2 * err(torch_probs, ref_probs)
    # Block 0 sums lse rows written by every block after SyncAll.
    assert total == pytest.approx(ref_lse.sum().item(), rel=1e-5)


def test_softmax_tiling_over_the_ub_budget_is_rejected(
    binaries: dict[str, Path], tmp_path: Path
) -> None:
    # 16384-float chunks need 2x64 KB in + 2x64 KB out + 2x64 KB scratch = 384 KB of UB.
    x = torch.zeros(2, 20000)
    result, _ = _run_softmax(binaries["softmax_rows"], tmp_path, x, 16384, 1, "910b")
    assert result.returncode == VIOLATION_EXIT_CODE, result.stdout + result.stderr
    assert "VIOLATION rule=ub-budget" in result.stdout
    assert "188416-byte UB budget of Ascend910B" in result.stdout


def test_syncall_wider_than_the_chip_is_rejected(binaries: dict[str, Path], tmp_path: Path) -> None:
    x = torch.zeros(3, 64)
    result, _ = _run_softmax(binaries["softmax_rows"], tmp_path, x, 64, 3, "310b")
    assert result.returncode == VIOLATION_EXIT_CODE, result.stdout + result.stderr
    assert "VIOLATION rule=syncall-block-dim" in result.stdout
    assert "blockDim 3 exceeds the 1 cores of Ascend310B" in result.stdout


# case -> (rule reported, a value the message must name)
RULE_CASES = {
    "ub-alignment": ("ub-alignment", "starts 8 bytes into its buffer"),
    "datacopy-32b": ("datacopy-32b", "48 bytes is not a multiple of 32"),
    "compare-256b": ("compare-256b", "192 bytes is not a multiple of 256"),
    "exp-ln-dtype": ("exp-ln-dtype", "Exp: element type of 2 bytes"),
    # per-chip copy and cast tables of CANN's dav_c220 / dav_m300 implementations
    "copy-dtype": ("copy-dtype", "no DataCopyPad intrinsic for bfloat16_t on Ascend310B"),
    "gm-write-overlap": (
        "gm-write-overlap",
        "(GetBlockIdx 0) of block 0 and vector core (AIV) (GetBlockIdx 1) of block 1 both wrote",
    ),
    "cast-mode-narrow": ("cast-mode", "round mode 0 is not supported from float to bfloat16_t"),
    "cast-mode-widen": ("cast-mode", "round mode 1 is not supported from half to float"),
    "ub-budget": ("ub-budget", "196608 requested"),
    "buffers-per-position": ("buffers-per-position", "8 QUE buffers already on VECIN + 1"),
    "buffers-total": ("buffers-total", "64 buffers already in this kernel + 1"),
    "flag-set-without-wait": ("flag-pairing", "SetFlag of HardEvent::MTE2_V event id 1"),
    "flag-wait-without-set": ("flag-pairing", "HardEvent::V_MTE3 event id 2 was never set"),
    "queue-read-before-deque": ("queue-protocol", "never EnQue'd/DeQue'd"),
    "queue-double-free": ("queue-protocol", "double FreeTensor"),
    "ub-bounds": ("ub-bounds", "elements [0, 72) outside a tensor of 64"),
    "gm-bounds": ("gm-bounds", "elements [0, 16) outside the global buffer of 8"),
    "syncall-divergence": ("syncall-divergence", "finished without reaching this SyncAll"),
    # Matmul high-level API (lib/matmul/matmul_intf.h)
    "matmul-dtype": ("matmul-dtype", "A half, B bfloat16_t, bias float, C float"),
    "matmul-before-regist": ("matmul-protocol", "Matmul used before REGIST_MATMUL_OBJ"),
    "matmul-iterate-before-set": ("matmul-protocol", "SetTensorB was not called since Init"),
    "matmul-gettensorc-without-iterate": ("matmul-protocol", "no pending Iterate"),
    "matmul-use-after-end": ("matmul-protocol", "SetTensorA was not called since End"),
    "matmul-switch-without-end": ("matmul-protocol", "without End() on the one that computed"),
    "matmul-objects": ("matmul-protocol", "more than 8 Matmul objects"),
    # 910B MIX kernels: one cube core (AIC) and two vector cores (AIV) per block
    "regist-scope": ("regist-scope", "Matmul call after the REGIST client went out of scope"),
    "cube-core-vector": ("cube-core-vector", "vector instruction on a cube core"),
    "mix-deadlock": ("mix-deadlock", "sub-block 1) ended without reaching REGIST_MATMUL_OBJ"),
    "kernel-type": ("kernel-type", "launched as KernelType::AivOnly on Ascend910B"),
    "workspace-sync": ("workspace-sync", "HAVE_WORKSPACE and HAVE_TILING"),
    "matmul-workspace": ("matmul-protocol", "system workspace is null on Ascend910B"),
    "matmul-org-shape": ("matmul-shape", "32x32x32 exceeds the org shape M=16"),
    "matmul-single-shape": ("matmul-shape", "48x32x32 outside [1, tiling singleCore 32x32x32]"),
    "matmul-gm-bounds": ("gm-bounds", "elements [0, 1024) outside the global buffer of 992"),
    "matmul-ub-c-size": ("ub-bounds", "elements [0, 1024) outside a tensor of 512"),
    "matmul-ub-c-alignment": ("ub-alignment", "starts 16 bytes into its buffer"),
    "matmul-tiling-l0c": ("matmul-tiling", "262144 bytes > L0C 131072"),
    "matmul-tiling-l1": ("matmul-tiling", "1179648 bytes > L1 524288"),
    "matmul-tiling-fractal": ("matmul-tiling", "baseM 24 and baseN 32 must be multiples of 16"),
    "matmul-tiling-basek": ("matmul-tiling", "baseK 8 is not a multiple of 16"),
    "matmul-position-local": ("matmul-position", "A LocalTensor lives in TBuf<VECCALC>"),
    "matmul-position-chip": ("matmul-position", "position VECOUT is not accepted on Ascend310B"),
    "matmul-transpose": ("matmul-transpose", "B transposed but its MatmulType ISTRANS is false"),
}


@pytest.mark.parametrize("case", sorted(RULE_CASES))
def test_each_rule_fires_on_the_wrong_call(binaries: dict[str, Path], case: str) -> None:
    rule, detail = RULE_CASES[case]
    result = _run(binaries["rule_violations"], case, "bad")
    assert result.returncode == VIOLATION_EXIT_CODE, result.stdout + result.stderr
    assert f"VIOLATION rule={rule} what=[{rule}]" in result.stdout
    assert detail in result.stdout


@pytest.mark.parametrize("case", sorted(RULE_CASES))
def test_the_legal_call_next_to_it_runs_clean(binaries: dict[str, Path], case: str) -> None:
    result = _run(binaries["rule_violations"], case, "good")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "OK"


# Calls the twin once refused and CANN accepts (the twin follows the real headers): "good" only.
LEGAL_CASES = ["matmul-initbuffer-then-regist"]


@pytest.mark.parametrize("case", LEGAL_CASES)
def test_calls_cann_allows_run_clean(binaries: dict[str, Path], case: str) -> None:
    result = _run(binaries["rule_violations"], case, "good")
    assert result.returncode == 0, result.stdout + result.stderr


def test_unknown_case_is_reported(binaries: dict[str, Path]) -> None:
    result = _run(binaries["rule_violations"], "no-such-rule", "bad")
    assert result.returncode == 2
    assert "unknown case no-such-rule" in result.stderr
