"""Time, throughput and peak memory of packed-sequence causal attention and its baselines.

    cd /work/main && PYTHONPATH=. python bench/bench_packed_attention.py --markdown
    PYTHONPATH=. python bench/bench_packed_attention.py --t 256 --reps 1

Providers (bench/packed_attention_baselines.py): the C++ kernel, a per-document loop of SDPA,
one SDPA call with a dense block-diagonal causal mask, and the GEMM rate of the machine. Shapes
are openPangu-1B attention (Hq = 12, Hkv = 6, D = 128). Every configuration runs in its own
process (this file with ``--worker``), run and measured by bench/harness.py as the other
benchmarks.
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
    add_common_args,
    fmt,
    group_rows,
    limit_worker,
    metric_rows,
    ratio,
    render_table,
    report_head,
    time_and_peak_memory,
    worker_limits,
)
from harness import main as run_main
from packed_attention_baselines import PROVIDERS, attention_flops, layout_lengths, make_inputs

OP_NAME = "packed_attention"
BENCH_DIR = Path(__file__).resolve().parent
MODES = {"fwd": 1.0, "fwd+bwd": 3.5}  # FLOPs as a multiple of the causal forward's
LAYOUTS = ["uniform", "skewed", "many"]
HQ, HKV, HEAD_DIM = 12, 6, 128  # openPangu-1B attention
METRICS = [("speed", "ms", "time_ms"), ("memory_peak_extra", "MiB", "peak_extra_mib")]
LONG_T = 4096  # above this, the default --reps is 2 (sdpa_dense at T = 8192 is ~5-17 s a call)


@dataclass
class Config:
    """One measured configuration; the GEMM has layout "-" and mode "fwd"."""

    provider: str
    t: int
    layout: str
    dtype: str
    mode: str
    reps: int
    threads: int
    mem_limit_bytes: int
    n_heads_q: int = HQ
    n_heads_kv: int = HKV
    head_dim: int = HEAD_DIM


# ---------------------------------------------------------------------------------------------
# Worker: one configuration, in its own process


def config_flops(config: Config) -> int:
    if config.provider == "gemm":
        return 2 * config.t * config.t * config.head_dim
    lengths = layout_lengths(config.layout, config.t)
    flops = attention_flops(lengths, config.n_heads_q, config.head_dim)
    return round(flops * MODES[config.mode])


def run_worker(config: Config) -> dict[str, Any]:
    """Warm up once, then time ``reps`` calls; peak RSS growth over each call (inputs excluded,
    the dense mask of sdpa_dense included in the inputs, gradients of q, k, v included)."""
    limit_worker(config.mem_limit_bytes, config.threads)
    fn = PROVIDERS[config.provider]
    backward = config.mode == "fwd+bwd"
    lengths = [config.t] if config.provider == "gemm" else layout_lengths(config.layout, config.t)
    inputs = make_inputs(
        lengths,
        config.n_heads_q,
        config.n_heads_kv,
        config.head_dim,
        DTYPES[config.dtype],
        requires_grad=backward,
        with_mask=config.provider == "sdpa_dense",
    )
    grad_out = torch.randn_like(inputs.q) if backward else None

    def call() -> None:
        if backward:
            fn(inputs).backward(grad_out)
        else:
            with torch.no_grad():
                fn(inputs)

    result: dict[str, Any] = {
        "config": asdict(config),
        "threads_used": torch.get_num_threads(),
        "input_bytes": inputs.input_bytes(),
        "flops": config_flops(config),
    }
    result.update(time_and_peak_memory(call, inputs.clear_grads, config.reps))
    result.pop("peak_bytes", None)
    return result


# ---------------------------------------------------------------------------------------------
# Driver


def default_reps(t: int, reps: int | None) -> int:
    return reps if reps is not None else (3 if t <= LONG_T else 2)


def make_configs(args: argparse.Namespace) -> list[Config]:
    """Per (T, dtype): the GEMM first, then every mode x layout x attention provider."""
    configs = []
    for t in args.t:
        reps = default_reps(t, args.reps)
        for dtype in args.dtype:
            common = {"t": t, "dtype": dtype, "reps": reps, **worker_limits(args)}
            if "gemm" in args.providers:
                configs.append(Config(provider="gemm", layout="-", mode="fwd", **common))
            for mode in args.mode:
                for layout in args.layout:
                    for provider in args.providers:
                        if provider != "gemm":
                            configs.append(
                                Config(provider=provider, layout=layout, mode=mode, **common)
                            )
    return configs


def label(config: Config) -> str:
    return f"{config.provider} {config.dtype} {config.mode} T={config.t} {config.layout}"


def to_rows(result: dict[str, Any], meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Liger-Kernel's benchmark fields (bench/harness.py), one row per metric."""
    config = result["config"]
    row_config = {
        "layout": config["layout"],
        "dtype": config["dtype"],
        "Hq": config["n_heads_q"],
        "Hkv": config["n_heads_kv"],
        "D": config["head_dim"],
        "flops": result.get("flops"),
        "reps": config["reps"],
        "threads": result.get("threads_used"),
        "memory_method": result.get("memory_method"),
    }
    return metric_rows(
        result,
        meta,
        op=OP_NAME,
        mode=config["mode"],
        x_name="T",
        x=config["t"],
        config=row_config,
        metrics=METRICS,
    )


# ---------------------------------------------------------------------------------------------
# Table


HEADER = [
    "provider", "dtype", "mode", "T", "layout", "median ms", "p20-p80 ms", "GFLOP/s", "x GEMM",
    "loop / kernel", "dense / kernel", "peak extra MiB",
]  # fmt: skip


def _row_key(row: dict[str, Any]) -> tuple:
    return (row["provider"], row["config"]["dtype"], row["mode"], row["x"], row["config"]["layout"])


def table_lines(rows: list[dict[str, Any]], markdown: bool) -> list[str]:
    """One line per configuration. Ratios are against the same run's other configurations."""
    by_key = group_rows(rows, _row_key)

    def speed(key: tuple) -> dict[str, Any]:
        return by_key.get(key, {}).get("speed", {})

    def gflops(row: dict[str, Any]) -> float | None:
        if row.get("status") != "ok":
            return None
        return row["config"]["flops"] / (row["p50"] * 1e-3) / 1e9

    lines, failures = [], []
    for key, metrics in by_key.items():
        provider, dtype, mode, t, layout = key
        row = metrics["speed"]
        if row["status"] != "ok":
            cells = [provider, dtype, mode, str(t), layout, "failed"]
            lines.append(cells + ["-"] * (len(HEADER) - len(cells)))
            failures.append(f"{provider} {dtype} {mode} T={t} {layout} failed: {row['error']}")
            continue
        median = row["p50"]
        gemm_rate = gflops(speed(("gemm", dtype, "fwd", t, "-")))
        is_kernel = provider == "kernel"
        loop = speed(("sdpa_loop", dtype, mode, t, layout)).get("p50") if is_kernel else None
        dense = speed(("sdpa_dense", dtype, mode, t, layout)).get("p50") if is_kernel else None
        cells = [
            provider,
            dtype,
            mode,
            str(t),
            layout,
            fmt(median, ".1f"),
            f"{row['p20']:.1f}-{row['p80']:.1f}",
            fmt(gflops(row), ".1f"),
            fmt(ratio(gflops(row), gemm_rate), ".2f") if provider != "gemm" else "-",
            fmt(ratio(loop, median), ".2f", "x"),
            fmt(ratio(dense, median), ".2f", "x"),
            fmt(metrics["memory_peak_extra"]["p50"], ".0f"),
        ]
        lines.append(cells)
    return render_table(HEADER, lines, failures, markdown)


def markdown_report(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The table with the machine, date and command, ready for bench/RESULTS.md."""
    cfg = rows[0]["config"] if rows else {}
    reps = sorted({(r["x"], r["config"]["reps"]) for r in rows})
    lines = [
        *report_head(
            f"packed attention, Hq = {cfg.get('Hq')}, Hkv = {cfg.get('Hkv')}, D = {cfg.get('D')}",
            meta,
        ),
        "- Median and p20-p80 of the timed repetitions after one warmup, each configuration in "
        "its own process; repetitions per T: "
        + ", ".join(f"T={t}: {n}" for t, n in reps)
        + (f" (default: 3, or 2 above T = {LONG_T} to keep the full run near 15 minutes)."),
        "- Layouts: uniform = 8 equal documents; skewed = one document of T/2, then 64-token "
        "documents; many = 64 equal documents.",
        "- GFLOP/s: causal forward FLOPs sum_docs 2 L^2 Hq D, times 3.5 for fwd+bwd (backward "
        "2.5x); sdpa_dense is credited with the same useful FLOPs though it computes all T^2 "
        "scores. gemm: one [T, D] x [D, T] matmul, 2 T^2 D FLOPs; x GEMM: a row's GFLOP/s over "
        "the GEMM's at the same (T, dtype). loop / kernel and dense / kernel: the baselines' "
        "median time over the kernel's in the same (dtype, mode, T, layout).",
        "- Peak extra: peak RSS growth over one call (q, k, v and sdpa_dense's [T, T] bool mask "
        "are inputs, built before; gradients of q, k, v included in fwd+bwd).",
        "",
        *table_lines(rows, markdown=True),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--t", type=int, nargs="+", default=[2048, 8192], help="tokens T")
    parser.add_argument(
        "--layout", nargs="+", default=LAYOUTS, help=f"{LAYOUTS} or lengths like 40,24,32"
    )
    parser.add_argument("--mode", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument(
        "--reps",
        type=int,
        default=None,
        help=f"timed repetitions after 1 warmup (default 3; 2 for T > {LONG_T})",
    )
    add_common_args(
        parser, PROVIDERS, out=BENCH_DIR / "out" / "packed_attention.json", timeout_s=1800
    )
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Fail in the driver, before any worker starts, on values a worker would refuse."""
    if args.reps is not None and args.reps < 1:
        raise SystemExit(f"--reps must be at least 1, got {args.reps}")
    for t in args.t:
        for layout in args.layout:
            layout_lengths(layout, t)  # raises ValueError on a layout that does not fit T


def main(argv: list[str] | None = None) -> None:
    run_main(sys.modules[__name__], parse_args(argv), argv)


if __name__ == "__main__":
    main()
