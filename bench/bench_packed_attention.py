"""Time, throughput and peak memory of packed-sequence causal attention and its baselines.

    cd /work/main && PYTHONPATH=. python bench/bench_packed_attention.py --markdown
    PYTHONPATH=. python bench/bench_packed_attention.py --t 256 --reps 1

Providers (bench/packed_attention_baselines.py): the C++ kernel, a per-document loop of SDPA,
one SDPA call with a dense block-diagonal causal mask, and the GEMM rate of the machine. Shapes
are openPangu-1B attention (Hq = 12, Hkv = 6, D = 128). Every configuration runs in its own
process (this file with ``--worker``), as in bench_sparse_kd.py, whose measurement helpers
(PeakRSS, percentiles, machine info) are reused here.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from bench_sparse_kd import (
    _fmt,
    _meminfo_kib,
    _ratio,
    machine_info,
    run_in_subprocess,
    time_and_peak_memory,
)
from packed_attention_baselines import PROVIDERS, attention_flops, layout_lengths, make_inputs

OP_NAME = "packed_attention"
BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = {"fwd": 1.0, "fwd+bwd": 3.5}  # FLOPs as a multiple of the causal forward's
LAYOUTS = ["uniform", "skewed", "many"]
HQ, HKV, HEAD_DIM = 12, 6, 128  # openPangu-1B attention
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
    if config.mem_limit_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (config.mem_limit_bytes, config.mem_limit_bytes))
    if config.threads > 0:
        torch.set_num_threads(config.threads)
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
    mem_limit = int(args.mem_limit_gb * (1 << 30))
    configs = []
    for t in args.t:
        reps = default_reps(t, args.reps)
        for dtype in args.dtype:
            common = {"t": t, "dtype": dtype, "reps": reps, "threads": args.threads}
            common["mem_limit_bytes"] = mem_limit
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


def to_rows(result: dict[str, Any], meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Liger-Kernel's benchmark fields (as bench_sparse_kd.py), one row per metric."""
    config = result["config"]
    rows = []
    metrics = [("speed", "ms", "time_ms"), ("memory_peak_extra", "MiB", "peak_extra_mib")]
    for metric, unit, key in metrics:
        stats = result.get(key, {})
        rows.append(
            {
                "op": OP_NAME,
                "provider": config["provider"],
                "mode": config["mode"],
                "metric": metric,
                "unit": unit,
                "x_name": "T",
                "x": config["t"],
                "p20": stats.get("p20"),
                "p50": stats.get("p50"),
                "p80": stats.get("p80"),
                "config": {
                    "layout": config["layout"],
                    "dtype": config["dtype"],
                    "Hq": config["n_heads_q"],
                    "Hkv": config["n_heads_kv"],
                    "D": config["head_dim"],
                    "flops": result.get("flops"),
                    "reps": config["reps"],
                    "threads": result.get("threads_used"),
                    "memory_method": result.get("memory_method"),
                },
                "status": result["status"],
                "error": result.get("error"),
                "device": f"cpu: {meta['cpu']}",
                "torch_version": meta["torch_version"],
                "timestamp": meta["date"],
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Table


HEADER = [
    "provider", "dtype", "mode", "T", "layout", "median ms", "p20-p80 ms", "GFLOP/s", "x GEMM",
    "loop / kernel", "dense / kernel", "peak extra MiB",
]  # fmt: skip


def table_lines(rows: list[dict[str, Any]], markdown: bool) -> list[str]:
    """One line per configuration. Ratios are against the same run's other configurations."""
    by_key: dict[tuple, dict[str, dict[str, Any]]] = {}
    for row in rows:
        cfg = row["config"]
        key = (row["provider"], cfg["dtype"], row["mode"], row["x"], cfg["layout"])
        by_key.setdefault(key, {})[row["metric"]] = row

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
            _fmt(median, ".1f"),
            f"{row['p20']:.1f}-{row['p80']:.1f}",
            _fmt(gflops(row), ".1f"),
            _fmt(_ratio(gflops(row), gemm_rate), ".2f") if provider != "gemm" else "-",
            _fmt(_ratio(loop, median), ".2f", "x"),
            _fmt(_ratio(dense, median), ".2f", "x"),
            _fmt(metrics["memory_peak_extra"]["p50"], ".0f"),
        ]
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        out += ["| " + " | ".join(cells) + " |" for cells in lines]
        return out + [""] + [f"- {failure}" for failure in failures] if failures else out
    widths = [max(len(r[i]) for r in [HEADER, *lines]) for i in range(len(HEADER))]
    out = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [HEADER, *lines]]
    return out + failures


def markdown_report(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The table with the machine, date and command, ready for bench/RESULTS.md."""
    cfg = rows[0]["config"] if rows else {}
    reps = sorted({(r["x"], r["config"]["reps"]) for r in rows})
    lines = [
        f"### packed attention, Hq = {cfg.get('Hq')}, Hkv = {cfg.get('Hkv')}, "
        f"D = {cfg.get('D')} ({meta['date']})",
        "",
        f"- CPU: {meta['cpu']}, {meta['cores']} cores available, "
        f"torch {meta['torch_version']} ({meta['torch_threads']} threads), "
        f"Python {meta['python']}",
        f"- Command: `{meta['command']}`",
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
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--mode", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--providers", nargs="+", choices=list(PROVIDERS), default=list(PROVIDERS))
    parser.add_argument(
        "--reps",
        type=int,
        default=None,
        help=f"timed repetitions after 1 warmup (default 3; 2 for T > {LONG_T})",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--mem-limit-gb",
        type=float,
        default=round(_meminfo_kib("MemAvailable") / (1 << 20), 1),
        help="address-space limit of each worker (0: none; default: MemAvailable now)",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "out" / "packed_attention.json")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown report")
    parser.add_argument(
        "--from-json", type=Path, help="print the table of a saved result file; run nothing"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def print_report(meta: dict[str, Any], rows: list[dict[str, Any]], markdown: bool) -> None:
    print(markdown_report(meta, rows) if markdown else "\n".join(table_lines(rows, False)))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.reps is not None and args.reps < 1:
        raise SystemExit(f"--reps must be at least 1, got {args.reps}")
    if args.worker:
        print(json.dumps(run_worker(Config(**json.loads(args.worker)))))
        return
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        print_report(saved["meta"], saved["rows"], args.markdown)
        return
    for t in args.t:
        for layout in args.layout:
            layout_lengths(layout, t)  # fail now, not in a worker

    meta = machine_info()
    script_argv = ["bench/bench_packed_attention.py", *sys.argv[1:]]
    meta["command"] = "PYTHONPATH=. python " + shlex.join(script_argv)
    rows = []
    configs = make_configs(args)
    for i, config in enumerate(configs, 1):
        label = f"{config.provider} {config.dtype} {config.mode} T={config.t} {config.layout}"
        print(f"[{i}/{len(configs)}] {label} ...", file=sys.stderr, flush=True)
        result = run_in_subprocess(config, args.timeout, Path(__file__).resolve())
        if result["status"] != "ok":
            print(f"    failed: {result['error']}", file=sys.stderr, flush=True)
        rows += to_rows(result, meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print_report(meta, rows, args.markdown)
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
