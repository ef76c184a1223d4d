"""The Ascend C sparse-KD / CE epilogue (csrc/ascend/sparse_kd_epilogue.h) on the CPU twin.

tests/ascend_twin/sparse_kd_epilogue.cpp is compiled with g++ against the twin, fed logits,
labels and a top-K teacher target through files, and its per-row loss, lse and in-place gradient
are compared with ``sparse_kd_reference`` (the oracle): with ``weight = I`` the reference's
hidden states are the logits, so its gradient w.r.t. ``hidden`` is d(loss)/d(logits).
fp32 logits are held to a tight tolerance against a float64 oracle; for bf16 logits the gradient
(written in bf16) may be at most 2x as far from the oracle as plain PyTorch's bf16 gradient.
"""

from __future__ import annotations

import math
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from twin_build import TILING_ERROR_EXIT_CODE, compile_program, needs_gxx

from pangu_fastkd.ops.sparse_kd_reference import sparse_kd_reference
from pangu_fastkd.ops.sparse_kd_targets import TopKTarget

IGNORE = -100

pytestmark = needs_gxx


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_program("sparse_kd_epilogue", tmp_path_factory.mktemp("ascend_sparse_kd"))


@dataclass
class Case:
    """One epilogue problem: logits [N, V] (fp32/bf16), labels [N], optional top-K target."""

    logits: torch.Tensor
    labels: torch.Tensor
    target: TopKTarget | None
    kd_weight: float
    temperature: float
    scale: float


@dataclass
class KernelRun:
    """What the driver printed and wrote: tiling, per-row loss and lse [N] f32, gradient [N, V]."""

    chunk: int
    block_dim: int
    ub_bytes: int
    budget: int
    loss: torch.Tensor
    lse: torch.Tensor
    grad: torch.Tensor


def _make_case(
    dtype: torch.dtype,
    rows: int,
    vocab: int,
    k: int,
    kd_weight: float,
    temperature: float,
    *,
    ignored: tuple[int, ...] = (),
    scale: float = 0.25,
    seed: int = 0,
) -> Case:
    gen = torch.Generator().manual_seed(seed * 7919 + rows * 131 + vocab)
    logits = (torch.randn(rows, vocab, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    if kd_weight == 0:
        labels[list(ignored)] = IGNORE
        return Case(logits, labels, None, kd_weight, temperature, scale)
    # A teacher correlated with the student, so the divergence is neither 0 nor huge.
    teacher = logits.float() * 0.6 + torch.randn(rows, vocab, generator=gen) * 2
    ids = teacher.topk(k, dim=1).indices
    t = teacher.gather(1, ids)
    labels[::2] = ids[::2, 0]  # label inside the top-K on even rows, usually outside on odd
    if k > 2 and vocab > k:
        ids[1::3, 1] = -1  # empty slots
        t[0, 2] = -math.inf  # an impossible token the cache kept
    label_logit = teacher.gather(1, labels[:, None]).squeeze(1)
    lam = torch.logsumexp(teacher / temperature, dim=1)
    labels[list(ignored)] = IGNORE
    target = TopKTarget(ids.int(), t, lam, label_logit, temperature)
    return Case(logits, labels, target, kd_weight, temperature, scale)


def _run_kernel(
    binary: Path,
    tmp_path: Path,
    case: Case,
    chip: str,
    max_blocks: int,
    max_chunk: int,
) -> tuple[subprocess.CompletedProcess[str], KernelRun | None]:
    rows, vocab = case.logits.shape
    is_f32 = case.logits.dtype == torch.float32
    raw = case.logits if is_f32 else case.logits.view(torch.int16)
    raw.contiguous().numpy().tofile(tmp_path / "logits.bin")
    case.labels.int().numpy().tofile(tmp_path / "labels.bin")
    k = 0
    if case.target is not None:
        k = case.target.ids.shape[1]
        case.target.ids.int().numpy().tofile(tmp_path / "ids.bin")
        case.target.logits.float().numpy().tofile(tmp_path / "teacher_logits.bin")
        case.target.lse.float().numpy().tofile(tmp_path / "teacher_lse.bin")
        case.target.label_logit.float().numpy().tofile(tmp_path / "label_logit.bin")
    out_path = tmp_path / "out.bin"
    args = ["f32" if is_f32 else "bf16", rows, vocab, k, case.kd_weight, case.temperature]
    args += [case.scale, chip, max_blocks, max_chunk, tmp_path, out_path]
    result = subprocess.run(
        [str(binary), *map(str, args)], capture_output=True, text=True, timeout=30
    )
    if result.returncode != 0:
        return result, None
    tiling = re.search(
        r"TILING chunk=(\d+) blockDim=(\d+) ubBytes=(\d+) budget=(\d+)", result.stdout
    )
    assert tiling is not None, result.stdout
    raw_out = out_path.read_bytes()
    stats = torch.from_numpy(np.frombuffer(raw_out[: 8 * rows], dtype=np.float32).copy())
    grad_bytes = np.frombuffer(raw_out[8 * rows :], dtype=np.float32 if is_f32 else np.int16)
    grad = torch.from_numpy(grad_bytes.copy())
    grad = (grad if is_f32 else grad.view(torch.bfloat16)).reshape(rows, vocab)
    chunk, block_dim, ub_bytes, budget = map(int, tiling.groups())
    run = KernelRun(chunk, block_dim, ub_bytes, budget, stats[:rows], stats[rows:], grad)
    return result, run


def _reference(case: Case, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row loss [N], lse [N] and scaled gradient [N, V] of the reference at logits' dtype."""
    vocab = logits.shape[1]
    hidden = logits.detach().clone().requires_grad_(True)
    eye = torch.eye(vocab, dtype=logits.dtype)
    target = case.target
    if target is not None and logits.dtype == torch.float64:
        target = TopKTarget(
            target.ids,
            target.logits.double(),
            target.lse.double(),
            target.label_logit.double(),
            target.temperature,
        )
    total, stats = sparse_kd_reference(
        hidden,
        eye,
        case.labels,
        target,
        kd_weight=case.kd_weight,
        temperature=case.temperature,
        reduction="sum",
        num_items=1.0 / case.scale,
    )
    total.backward()
    kd, T = case.kd_weight, case.temperature
    loss = kd * T * T * stats[:, 0].double() + (1 - kd) * stats[:, 1].double()
    return loss, stats[:, 4].double(), hidden.grad


def _check_against_reference(case: Case, run: KernelRun) -> None:
    oracle_loss, oracle_lse, oracle_grad = _reference(case, case.logits.double())
    # Loss and lse accumulate in fp32 from the exact input values, whatever the input dtype.
    torch.testing.assert_close(run.loss.double(), oracle_loss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(run.lse.double(), oracle_lse, rtol=2e-6, atol=2e-5)
    if case.logits.dtype == torch.float32:
        torch.testing.assert_close(run.grad.double(), oracle_grad, rtol=1e-4, atol=3e-7)
        return
    _, _, torch_grad = _reference(case, case.logits)
    kernel_err = (run.grad.double() - oracle_grad).abs().max().item()
    torch_err = (torch_grad.double() - oracle_grad).abs().max().item()
    assert kernel_err <= 2 * torch_err, (kernel_err, torch_err)


# (dtype, N, V, K, kd_weight, T, chip, max_blocks, max_chunk, ignored rows)
CASES = {
    "ce-f32-ragged-tail": (torch.float32, 5, 1000, 0, 0.0, 1.0, "910b", 3, 256, (3,)),
    "ce-bf16-odd-tail": (torch.bfloat16, 4, 777, 0, 0.0, 1.0, "910b", 2, 192, ()),
    "ce-f32-310b": (torch.float32, 3, 300, 0, 0.0, 1.0, "310b", 0, 64, (1,)),
    "kd-f32-vocab-under-one-chunk": (torch.float32, 7, 37, 5, 0.7, 1.0, "910b", 3, 0, (4,)),
    "kd-f32-temperature-2": (torch.float32, 5, 1000, 8, 0.5, 2.0, "910b", 4, 256, (2,)),
    "kd-bf16-310b-pure-kd": (torch.bfloat16, 3, 300, 6, 1.0, 1.5, "310b", 0, 64, ()),
    "kd-bf16-910b-blocks": (torch.bfloat16, 6, 500, 4, 0.4, 0.7, "910b", 4, 128, (0, 5)),
    "kd-support-covers-vocab": (torch.float32, 3, 16, 16, 0.5, 1.0, "910b", 2, 0, ()),
    "kd-all-rows-ignored": (torch.float32, 3, 100, 4, 0.5, 1.0, "910b", 2, 64, (0, 1, 2)),
    "ce-bf16-all-rows-ignored": (torch.bfloat16, 2, 90, 0, 0.0, 1.0, "310b", 0, 64, (0, 1)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_epilogue_matches_reference(binary: Path, tmp_path: Path, name: str) -> None:
    dtype, rows, vocab, k, kd, T, chip, max_blocks, max_chunk, ignored = CASES[name]
    case = _make_case(dtype, rows, vocab, k, kd, T, ignored=ignored)
    result, run = _run_kernel(binary, tmp_path, case, chip, max_blocks, max_chunk)
    assert result.returncode == 0 and run is not None, result.stdout + result.stderr
    expected_blocks = 1 if chip == "310b" else min(rows, max_blocks or 48)
    assert run.block_dim == expected_blocks
    assert run.ub_bytes <= run.budget
    _check_against_reference(case, run)
    if ignored:
        assert torch.all(run.grad[list(ignored)] == 0)
        assert torch.all(run.loss[list(ignored)] == 0)


@pytest.mark.parametrize(
    ("dtype", "rows", "vocab", "k", "chip"),
    [
        (torch.bfloat16, 3, 8000, 4, "910b"),  # several blocks, budget-sized chunk, ragged tail
        (torch.float32, 2, 9100, 6, "310b"),  # the larger 310B UB gives a larger chunk
    ],
)
def test_budget_sized_chunks_fill_the_ub(
    binary: Path, tmp_path: Path, dtype: torch.dtype, rows: int, vocab: int, k: int, chip: str
) -> None:
    case = _make_case(dtype, rows, vocab, k, 0.5, 1.0, ignored=(1,), seed=3)
    result, run = _run_kernel(binary, tmp_path, case, chip, 0, 0)
    assert result.returncode == 0 and run is not None, result.stdout + result.stderr
    # The chunk is the largest multiple of 64 that fits: one more repeat of 64 elements (at most
    # 28 bytes each across the buffers) would overrun the budget.
    assert run.chunk % 64 == 0 and run.ub_bytes <= run.budget < run.ub_bytes + 64 * 28
    assert run.chunk < vocab and vocab % run.chunk != 0
    _check_against_reference(case, run)


def test_chip_budgets_agree_with_the_twin(binary: Path) -> None:
    result = subprocess.run([str(binary), "budgets"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.strip() == "BUDGETS-AGREE", result.stdout


def test_support_too_large_for_the_ub_is_a_tiling_error(binary: Path, tmp_path: Path) -> None:
    case = _make_case(torch.float32, 2, 64, 4, 0.5, 1.0)
    case.target = TopKTarget(
        torch.full((2, 8000), -1, dtype=torch.int32),
        torch.zeros(2, 8000),
        case.target.lse,
        case.target.label_logit,
        1.0,
    )
    result, _ = _run_kernel(binary, tmp_path, case, "910b", 0, 0)
    assert result.returncode == TILING_ERROR_EXIT_CODE, result.stdout + result.stderr
    assert "TILING-ERROR supportK = 8000 teacher ids leave no room" in result.stdout


def test_bad_temperature_is_a_tiling_error(binary: Path, tmp_path: Path) -> None:
    case = _make_case(torch.float32, 2, 64, 0, 0.0, 1.0)
    case.temperature = 0.0
    result, _ = _run_kernel(binary, tmp_path, case, "910b", 0, 0)
    assert result.returncode == TILING_ERROR_EXIT_CODE, result.stdout + result.stderr
    assert "temperature must be finite and > 0" in result.stdout
