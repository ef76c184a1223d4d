"""Benchmarks of the packed-attention providers at tiny shapes, and a check that they agree.

    cd /work/main && PYTHONPATH=. pytest bench/test_bench_packed_attention.py --benchmark-enable

pytest.ini passes ``--benchmark-disable``, under which each benchmark runs its function once:
then these are smoke tests, and the correctness test is a real test. The figures that count come
from bench/bench_packed_attention.py at openPangu-1B's shapes.
"""

from __future__ import annotations

import pytest
import torch
from bench_packed_attention import Config, config_flops, main, run_worker
from packed_attention_baselines import (
    ATTENTION_PROVIDERS,
    PROVIDERS,
    block_causal_mask,
    layout_lengths,
    make_inputs,
)

TINY_LENGTHS = [40, 24, 32]  # T = 96, 3 documents
TINY_HEADS = {"n_heads_q": 4, "n_heads_kv": 2, "head_dim": 16}


def _outputs_and_grads(provider: str, dtype: torch.dtype) -> list[torch.Tensor]:
    inputs = make_inputs(TINY_LENGTHS, **TINY_HEADS, dtype=dtype, requires_grad=True)
    out = ATTENTION_PROVIDERS[provider](inputs)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(dtype))
    return [t.double() for t in (out, inputs.q.grad, inputs.k.grad, inputs.v.grad)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_providers_agree(dtype):
    want = _outputs_and_grads("sdpa_loop", dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for provider in ("kernel", "sdpa_dense"):
        got = _outputs_and_grads(provider, dtype)
        for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
            assert g.shape == w.shape, (provider, name)
            torch.testing.assert_close(g, w, rtol=tol, atol=tol, msg=f"{provider} {name}")


def test_no_attention_across_documents():
    """Changing the second document's keys must not change the first document's output."""
    inputs = make_inputs(TINY_LENGTHS, **TINY_HEADS)
    changed = make_inputs(TINY_LENGTHS, **TINY_HEADS)
    changed.k[40:] += 1.0
    for provider in ATTENTION_PROVIDERS.values():
        torch.testing.assert_close(provider(inputs)[:40], provider(changed)[:40])


def test_layouts_and_mask():
    assert layout_lengths("uniform", 2048) == [256] * 8
    assert layout_lengths("many", 8192) == [128] * 64
    skewed = layout_lengths("skewed", 8192)
    assert skewed[0] == 4096 and set(skewed[1:]) == {64} and sum(skewed) == 8192
    assert layout_lengths("2,3", 5) == [2, 3]
    mask = block_causal_mask([2, 1])
    assert mask.tolist() == [[True, False, False], [True, True, False], [False, False, True]]
    with pytest.raises(ValueError):
        layout_lengths("2,2", 5)


def test_worker_and_flops():
    config = Config("kernel", 128, "64,64", "fp32", "fwd+bwd", 1, 0, 0, **TINY_HEADS)
    assert config_flops(config) == round(3.5 * 2 * 2 * 64**2 * 4 * 16)
    result = run_worker(config)
    assert result["status"] == "ok" and result["time_ms"]["p50"] > 0


def test_driver_smoke(tmp_path, capsys):
    """Two subprocess workers and the Markdown report."""
    out = tmp_path / "r.json"
    argv = ["--t", "128", "--layout", "64,64", "--dtype", "fp32", "--mode", "fwd"]
    main([*argv, "--providers", "kernel", "gemm", "--reps", "1", "--out", str(out), "--markdown"])
    report = capsys.readouterr().out
    assert "| kernel | fp32 | fwd | 128 | 64,64 |" in report and "failed" not in report
    assert out.exists()


# ---------------------------------------------------------------------------------------------
# Benchmarks


# The GEMM rate is a forward-only reference, so it has no fwd+bwd case.
CASES = [(p, False) for p in PROVIDERS] + [(p, True) for p in PROVIDERS if p != "gemm"]


@pytest.mark.parametrize(
    ("provider", "backward"), CASES, ids=[f"{p}-{'fwd+bwd' if b else 'fwd'}" for p, b in CASES]
)
def test_bench_provider(benchmark, provider, backward):
    inputs = make_inputs(
        layout_lengths("uniform", 256), **TINY_HEADS, requires_grad=backward, with_mask=True
    )
    fn = PROVIDERS[provider]

    def call():
        inputs.clear_grads()
        if backward:
            fn(inputs).sum().backward()
        else:
            with torch.no_grad():
                fn(inputs)

    benchmark.pedantic(call, rounds=3, iterations=1, warmup_rounds=1)
