"""Forward+backward time and peak memory of the fused linear sparse-KD loss and its baselines.

    cd /work/main && PYTHONPATH=. python bench/bench_sparse_kd.py --markdown
    PYTHONPATH=. python bench/bench_sparse_kd.py --vocab 8192 --hidden 256 --n 128 --k 16 --reps 1

Providers (bench/sparse_kd_baselines.py): naive PyTorch, chunked PyTorch (Liger's pattern), the
C++ kernel, and the GEMM floor (the three LM-head GEMMs alone). Defaults are the openPangu-1B
head (d = 1536, V = 153376). Every configuration runs in its own process (this file with
``--worker``), so that one configuration's allocations, thread pools and a possible
out-of-memory failure cannot touch the next one's figures. The table gives each time as a
ratio to the GEMM floor of the same (N, dtype) and to naive PyTorch, measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from harness import (
    DTYPES,
    add_above_grads,
    add_common_args,
    fmt,
    group_rows,
    limit_worker,
    metric_rows,
    ok_p50,
    ratio,
    render_table,
    report_head,
    time_and_peak_memory,
    worker_limits,
)
from harness import main as run_main
from sparse_kd_baselines import PROVIDERS, make_inputs

OP_NAME = "fused_linear_sparse_kd"
BENCH_DIR = Path(__file__).resolve().parent


@dataclass
class Config:
    """One measured configuration; ``top_k`` is 0 for the GEMM floor, which has no target."""

    provider: str
    n_rows: int
    top_k: int
    dtype: str
    vocab: int
    hidden_size: int
    reps: int
    threads: int
    kd_weight: float
    mem_limit_bytes: int


# ---------------------------------------------------------------------------------------------
# Worker: one configuration, in its own process


def run_worker(config: Config) -> dict[str, Any]:
    """Warm up once, then time and measure ``reps`` forward+backward calls.

    Memory: the inputs exist before each call and are part of the starting RSS, so the peak
    growth over the call is what the loss needs beyond its inputs ("peak extra"), gradients
    included. "Above grads" subtracts grad_hidden and grad_weight in the input dtype, which every
    provider has to return: it is the working memory of the loss itself.
    """
    limit_worker(config.mem_limit_bytes, config.threads)
    loss_fn = PROVIDERS[config.provider]
    inputs = make_inputs(
        config.n_rows, config.vocab, config.hidden_size, max(config.top_k, 1), DTYPES[config.dtype]
    )

    def forward_backward() -> None:
        loss = loss_fn(
            inputs.hidden, inputs.weight, inputs.labels, inputs.target, kd_weight=config.kd_weight
        )
        loss.backward()

    result: dict[str, Any] = {
        "config": asdict(config),
        "threads_used": torch.get_num_threads(),
        "input_bytes": inputs.input_bytes(),
        "grad_bytes": inputs.grad_bytes(),
    }
    result.update(time_and_peak_memory(forward_backward, inputs.clear_grads, config.reps))
    add_above_grads(result, inputs.grad_bytes())
    return result


# ---------------------------------------------------------------------------------------------
# Driver


def make_configs(args: argparse.Namespace) -> list[Config]:
    """Floor first in each (dtype, N) group: it is what the others are compared with."""
    configs = []
    for dtype in args.dtype:
        for n_rows in args.n:
            for provider in sorted(args.providers, key=lambda p: p != "floor"):
                ks = [0] if provider == "floor" else args.k
                for top_k in ks:
                    configs.append(
                        Config(
                            provider=provider,
                            n_rows=n_rows,
                            top_k=top_k,
                            dtype=dtype,
                            vocab=args.vocab,
                            hidden_size=args.hidden,
                            reps=args.reps,
                            kd_weight=args.kd_weight,
                            **worker_limits(args),
                        )
                    )
    return configs


def label(config: Config) -> str:
    return f"{config.provider} N={config.n_rows} K={config.top_k or '-'} {config.dtype}"


def to_rows(result: dict[str, Any], meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Liger-Kernel's benchmark fields, one row per metric of one configuration."""
    config = result["config"]
    row_config = {
        "V": config["vocab"],
        "d": config["hidden_size"],
        "K": config["top_k"] or None,
        "dtype": config["dtype"],
        "reps": config["reps"],
        "threads": result.get("threads_used"),
        "kd_weight": config["kd_weight"],
        "memory_method": result.get("memory_method"),
    }
    return metric_rows(
        result, meta, op=OP_NAME, mode="full", x_name="N", x=config["n_rows"], config=row_config
    )


# ---------------------------------------------------------------------------------------------
# Table


HEADER = [
    "provider", "dtype", "N", "K", "median ms", "p20-p80 ms", "x floor", "x naive",
    "GFLOP/s", "peak extra MiB", "above grads MiB", "mem x naive",
]  # fmt: skip


def _row_key(row: dict[str, Any]) -> tuple:
    return (row["provider"], row["x"], row["config"]["K"], row["config"]["dtype"])


def table_lines(rows: list[dict[str, Any]], markdown: bool) -> list[str]:
    """One line per configuration: time, its ratios, throughput, memory and its ratio."""
    by_key = group_rows(rows, _row_key)
    lines, failures = [], []
    for (provider, n, k, dtype), metrics in by_key.items():
        speed = metrics["speed"]
        cfg = speed["config"]
        if speed["status"] != "ok":
            cells = [provider, dtype, str(n), str(k or "-"), "failed"]
            lines.append(cells + ["-"] * (len(HEADER) - len(cells)))
            failures.append(f"{provider} {dtype} N={n} K={k or '-'} failed: {speed['error']}")
            continue
        median = speed["p50"]
        # Every provider does (at least) three GEMMs of 2 N d V flops: the llm.c-style figure.
        gflops = 6 * n * cfg["d"] * cfg["V"] / (median * 1e-3) / 1e9
        peak = metrics["memory_peak_extra"]["p50"]
        floor, naive = ("floor", n, None, dtype), ("naive", n, k, dtype)
        cells = [
            provider,
            dtype,
            str(n),
            str(k or "-"),
            fmt(median, ".1f"),
            f"{speed['p20']:.1f}-{speed['p80']:.1f}",
            fmt(ratio(median, ok_p50(by_key, floor, "speed")), ".2f", "x"),
            fmt(ratio(median, ok_p50(by_key, naive, "speed")), ".2f", "x"),
            fmt(gflops, ".1f"),
            fmt(peak, ".0f"),
            fmt(metrics["memory_above_grads"]["p50"], ".0f"),
            fmt(ratio(peak, ok_p50(by_key, naive, "memory_peak_extra")), ".2f", "x"),
        ]
        lines.append(cells)
    return render_table(HEADER, lines, failures, markdown)


def markdown_report(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The table with the machine and the command, ready for bench/RESULTS.md."""
    cfg = rows[0]["config"] if rows else {}
    lines = [
        *report_head(f"fused linear sparse-KD, V = {cfg.get('V')}, d = {cfg.get('d')}", meta),
        "- Forward+backward of a mean loss (forward KL, tail, label, T = 1); median of the timed "
        "repetitions after one warmup; each configuration in its own process. x floor: time over "
        "the three LM-head GEMMs alone at the same (N, dtype); GFLOP/s: 6 N d V / time. Peak "
        "extra: peak RSS growth over the call (inputs excluded, gradients included); above "
        "grads: minus grad_hidden and grad_weight in the input dtype.",
        "",
        *table_lines(rows, markdown=True),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 4096], help="rows N")
    parser.add_argument("--k", type=int, nargs="+", default=[16, 64], help="top-K of the target")
    parser.add_argument("--vocab", type=int, default=153376, help="V (openPangu-1B)")
    parser.add_argument("--hidden", type=int, default=1536, help="d (openPangu-1B)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions after 1 warmup")
    parser.add_argument("--kd-weight", type=float, default=1.0)
    add_common_args(parser, PROVIDERS, out=BENCH_DIR / "out" / "sparse_kd.json", timeout_s=3600)
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Fail in the driver, before any worker starts, on values a worker would refuse."""
    if args.reps < 1:
        raise SystemExit(f"--reps must be at least 1, got {args.reps}")


def main(argv: list[str] | None = None) -> None:
    run_main(sys.modules[__name__], parse_args(argv), argv)


if __name__ == "__main__":
    main()
