"""Benchmarks of the sparse-KD providers at small shapes, and a check that they agree.

    cd /work/main && PYTHONPATH=. pytest bench/test_bench_sparse_kd.py --benchmark-enable

pytest.ini passes ``--benchmark-disable``, under which each benchmark runs its function once:
then these are smoke tests, and the correctness tests are real tests. The figures that count
come from bench/bench_sparse_kd.py at the openPangu-1B head's shapes.
"""

from __future__ import annotations

import pytest
import torch
from sparse_kd_baselines import (
    PROVIDERS,
    SparseKDInputs,
    chunked_torch,
    fused_kernel,
    gemm_floor,
    make_inputs,
    naive_torch,
)

from pangu_fastkd.ops import sparse_kd_reference

# An awkward shape (Liger-style odd sizes): chunks of 16 rows leave a ragged last chunk.
TINY = {"n_rows": 41, "vocab": 1271, "hidden_size": 37, "top_k": 7}
SMALL = {"n_rows": 256, "vocab": 16384, "hidden_size": 256, "top_k": 16}
KD_WEIGHT = 0.7  # both the KL and the CE term
GRAD_OUTPUT = 2.5  # the loss is not the last op


def _loss_and_grads(
    provider, inputs: SparseKDInputs, grad_output: float = GRAD_OUTPUT, **kwargs
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, grad_hidden [N, d], grad_weight [V, d])`` in float64."""
    inputs.clear_grads()
    loss = provider(
        inputs.hidden, inputs.weight, inputs.labels, inputs.target, kd_weight=KD_WEIGHT, **kwargs
    )
    (grad_output * loss).backward()
    return loss.detach().double(), inputs.hidden.grad.double(), inputs.weight.grad.double()


def _upcast(inputs: SparseKDInputs) -> SparseKDInputs:
    """The same (already rounded) values in float64: the oracle of low-precision runs."""
    return SparseKDInputs(
        inputs.hidden.detach().double().requires_grad_(),
        inputs.weight.detach().double().requires_grad_(),
        inputs.labels,
        inputs.target,
    )


def _max_rel_errors(got, want) -> list[float]:
    return [((g - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want, strict=True)]


# ---------------------------------------------------------------------------------------------
# Correctness: the baselines compute the kernel's loss


@pytest.mark.parametrize("grad_output", [1.0, GRAD_OUTPUT])
def test_baselines_match_kernel_float64(grad_output: float) -> None:
    inputs = make_inputs(**TINY, dtype=torch.float64, ignored_fraction=0.25, seed=3)
    want = _loss_and_grads(fused_kernel, inputs, grad_output)
    for provider, kwargs in [(naive_torch, {}), (chunked_torch, {"chunk_rows": 16})]:
        got = _loss_and_grads(provider, inputs, grad_output, **kwargs)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_low_precision_error_within_twice_naive(dtype: torch.dtype) -> None:
    """flash-attention's rule: at most 2x plain PyTorch's own error against a float64 oracle."""
    inputs = make_inputs(**TINY, dtype=dtype, ignored_fraction=0.25, seed=3)
    oracle = _loss_and_grads(naive_torch, _upcast(inputs))
    naive_error = _max_rel_errors(_loss_and_grads(naive_torch, inputs), oracle)
    for provider, kwargs in [(chunked_torch, {"chunk_rows": 16}), (fused_kernel, {})]:
        error = _max_rel_errors(_loss_and_grads(provider, inputs, **kwargs), oracle)
        names = ["loss", "grad_hidden", "grad_weight"]
        for name, e, base in zip(names, error, naive_error, strict=True):
            # The 1e-6 floor covers float32 losses that naive happens to get exactly right.
            assert e <= 2 * base + 1e-6, f"{provider.__name__} {name}: {e:.2e} vs naive {base:.2e}"


def test_naive_matches_reference_when_label_outside_topk() -> None:
    inputs = make_inputs(**TINY, dtype=torch.float64, seed=5)
    label_in_topk = (inputs.target.ids.long() == inputs.labels[:, None]).any(1)
    inputs.labels = inputs.labels.masked_fill(label_in_topk, -100)
    _check_naive_against_reference(inputs)


def test_naive_matches_reference_when_label_inside_topk() -> None:
    inputs = make_inputs(**TINY, dtype=torch.float64, seed=5)
    label_in_topk = (inputs.target.ids.long() == inputs.labels[:, None]).any(1)
    inputs.labels = inputs.labels.masked_fill(~label_in_topk, -100)
    _check_naive_against_reference(inputs)


def _check_naive_against_reference(inputs: SparseKDInputs) -> None:
    want = _loss_and_grads(_reference_loss, inputs)
    got = _loss_and_grads(naive_torch, inputs)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def _reference_loss(hidden, weight, labels, target, *, kd_weight: float) -> torch.Tensor:
    return sparse_kd_reference(hidden, weight, labels, target, kd_weight=kd_weight)[0]


def test_gemm_floor_gradients_are_the_three_gemms() -> None:
    inputs = make_inputs(**TINY, dtype=torch.float64)
    _, grad_hidden, grad_weight = _loss_and_grads(gemm_floor, inputs, grad_output=1.0)
    hidden, weight = inputs.hidden.detach(), inputs.weight.detach()
    logits = hidden @ weight.T  # [N, V]
    torch.testing.assert_close(grad_hidden, logits @ weight)
    torch.testing.assert_close(grad_weight, logits.T @ hidden)


# ---------------------------------------------------------------------------------------------
# Benchmarks: forward + backward at a small shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_bench_sparse_kd(benchmark, provider: str, dtype: torch.dtype) -> None:
    inputs = make_inputs(**SMALL, dtype=dtype)
    loss_fn = PROVIDERS[provider]
    benchmark.group = f"sparse_kd {str(dtype).removeprefix('torch.')}"
    benchmark.extra_info.update(SMALL, provider=provider, dtype=str(dtype))

    def forward_backward() -> None:
        loss = loss_fn(inputs.hidden, inputs.weight, inputs.labels, inputs.target)
        loss.backward()

    benchmark.pedantic(forward_backward, setup=inputs.clear_grads, rounds=5, warmup_rounds=1)
    assert inputs.weight.grad is not None and inputs.weight.grad.shape == inputs.weight.shape
