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
import datetime
import gc
import json
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from sparse_kd_baselines import PROVIDERS, make_inputs

OP_NAME = "fused_linear_sparse_kd"
BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MIB = 1 << 20

# glibc keeps freed blocks below its mmap threshold in the heap, and raises that threshold (up to
# 32 MiB) each time a large mmapped block is freed; such memory stays resident and would hide a
# later allocation from RSS. A fixed threshold (which also turns off the adjustment) makes every
# allocation of 256 KiB or more its own mmap, returned to the OS on free, so the worker's RSS
# follows its live tensors.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(256 << 10), "MALLOC_TRIM_THRESHOLD_": str(256 << 10)}


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
# Memory measurement (worker side)


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} field")
    return int(match.group(1))


def _rss_bytes() -> int:
    return _proc_status_kib("VmRSS") << 10


class PeakRSS:
    """Peak resident memory of this process inside a ``with`` block, above its RSS at entry.

    The kernel's high-water mark VmHWM is exact: unlike a sampler it cannot miss a short-lived
    buffer (a transient [N, V] tensor of backward lives for milliseconds). Writing "5" to
    /proc/self/clear_refs resets it to the current RSS (Linux >= 4.0). Where that file is not
    writable, a thread samples VmRSS every millisecond instead; ``method`` says which was used.
    """

    def __init__(self) -> None:
        self.method = "vmhwm"
        self.peak_bytes = 0
        self._start = 0
        self._sampled = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRSS:
        self._start = _rss_bytes()
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
        except OSError:
            self.method = "sampled-1ms"
            self._sampled = self._start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._sampled = max(self._sampled, _rss_bytes())

    def __exit__(self, *exc_info: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            peak = max(self._sampled, _rss_bytes())
        else:
            peak = _proc_status_kib("VmHWM") << 10
        self.peak_bytes = max(0, peak - self._start)


# ---------------------------------------------------------------------------------------------
# Worker: one configuration, in its own process


def _percentiles(values: list[float]) -> dict[str, float]:
    q = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    q = torch.quantile(torch.tensor(values, dtype=torch.float64), q)
    return {"p20": q[0].item(), "p50": q[1].item(), "p80": q[2].item()}


def run_worker(config: Config) -> dict[str, Any]:
    """Warm up once, then time and measure ``reps`` forward+backward calls.

    Memory: the inputs exist before each call and are part of the starting RSS, so the peak
    growth over the call is what the loss needs beyond its inputs ("peak extra"), gradients
    included. "Above grads" subtracts grad_hidden and grad_weight in the input dtype, which every
    provider has to return: it is the working memory of the loss itself.
    """
    if config.mem_limit_bytes > 0:
        # Address-space limit: an allocation past it fails as a RuntimeError (a failed row),
        # where overcommit would otherwise let the OOM killer pick a process on a shared machine.
        resource.setrlimit(resource.RLIMIT_AS, (config.mem_limit_bytes, config.mem_limit_bytes))
    if config.threads > 0:
        torch.set_num_threads(config.threads)
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
    if result["status"] == "ok":
        peaks = result.pop("peak_bytes")
        result["above_grads_mib"] = _percentiles([(p - inputs.grad_bytes()) / MIB for p in peaks])
    return result


def time_and_peak_memory(
    call: Callable[[], None], clear_grads: Callable[[], None], reps: int
) -> dict[str, Any]:
    """One warmup call, then ``reps`` timed calls, each with its peak RSS growth.

    Returns ``status``, and either ``error`` or ``time_ms``/``peak_extra_mib`` percentiles with the
    raw ``peak_bytes`` of every repetition.
    """
    times_ms: list[float] = []
    peaks: list[int] = []
    try:
        call()  # warmup: first-call costs (oneDNN primitives, page faults of pools)
        for _ in range(reps):
            clear_grads()
            gc.collect()
            with PeakRSS() as peak:
                start = time.perf_counter()
                call()
                times_ms.append((time.perf_counter() - start) * 1e3)
            peaks.append(peak.peak_bytes)
    except (MemoryError, RuntimeError) as exc:
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    return {
        "status": "ok",
        "memory_method": peak.method,
        "time_ms": _percentiles(times_ms),
        "peak_extra_mib": _percentiles([p / MIB for p in peaks]),
        "peak_bytes": peaks,
    }


# ---------------------------------------------------------------------------------------------
# Driver


def run_in_subprocess(config: Any, timeout_s: float, script: Path | None = None) -> dict[str, Any]:
    """Runs one configuration (a dataclass) as ``script --worker`` in a fresh interpreter.

    Any crash, signal or timeout of the worker becomes a failed result instead of an exception.
    """
    env = {**os.environ, **WORKER_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    script = script or Path(__file__).resolve()
    cmd = [sys.executable, str(script), "--worker", json.dumps(asdict(config))]
    failed = {"config": asdict(config), "status": "failed"}
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {**failed, "error": f"timed out after {timeout_s:.0f} s"}
    if proc.returncode != 0:
        # A negative code is a signal: -9 is usually the OOM killer.
        tail = proc.stderr.strip().splitlines()[-1:] or ["no stderr"]
        return {**failed, "error": f"worker exit code {proc.returncode}: {tail[0]}"}
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {**failed, "error": f"worker printed no JSON result: {proc.stdout[-200:]!r}"}


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
                            threads=args.threads,
                            kd_weight=args.kd_weight,
                            mem_limit_bytes=int(args.mem_limit_gb * (1 << 30)),
                        )
                    )
    return configs


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read(), re.MULTILINE)
        cpu = match.group(1).strip() if match else cpu
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def to_rows(result: dict[str, Any], meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Liger-Kernel's benchmark fields, one row per metric of one configuration."""
    config = result["config"]
    metrics = [
        ("speed", "ms", "time_ms"),
        ("memory_peak_extra", "MiB", "peak_extra_mib"),
        ("memory_above_grads", "MiB", "above_grads_mib"),
    ]
    rows = []
    for metric, unit, key in metrics:
        stats = result.get(key, {})
        rows.append(
            {
                "op": OP_NAME,
                "provider": config["provider"],
                "mode": "full",
                "metric": metric,
                "unit": unit,
                "x_name": "N",
                "x": config["n_rows"],
                "p20": stats.get("p20"),
                "p50": stats.get("p50"),
                "p80": stats.get("p80"),
                "config": {
                    "V": config["vocab"],
                    "d": config["hidden_size"],
                    "K": config["top_k"] or None,
                    "dtype": config["dtype"],
                    "reps": config["reps"],
                    "threads": result.get("threads_used"),
                    "kd_weight": config["kd_weight"],
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


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def table_lines(rows: list[dict[str, Any]], markdown: bool) -> list[str]:
    """One line per configuration: time, its ratios, throughput, memory and its ratio."""
    by_key: dict[tuple, dict[str, dict[str, Any]]] = {}
    for row in rows:
        cfg = row["config"]
        key = (row["provider"], row["x"], cfg["K"], cfg["dtype"])
        by_key.setdefault(key, {})[row["metric"]] = row

    def p50(provider: str, n: int, k: int | None, dtype: str, metric: str) -> float | None:
        return by_key.get((provider, n, k, dtype), {}).get(metric, {}).get("p50")

    header = [
        "provider", "dtype", "N", "K", "median ms", "p20-p80 ms", "x floor", "x naive",
        "GFLOP/s", "peak extra MiB", "above grads MiB", "mem x naive",
    ]  # fmt: skip
    lines, failures = [], []
    for (provider, n, k, dtype), metrics in by_key.items():
        speed = metrics["speed"]
        cfg = speed["config"]
        if speed["status"] != "ok":
            cells = [provider, dtype, str(n), str(k or "-"), "failed"]
            lines.append(cells + ["-"] * (len(header) - len(cells)))
            failures.append(f"{provider} {dtype} N={n} K={k or '-'} failed: {speed['error']}")
            continue
        median = speed["p50"]
        # Every provider does (at least) three GEMMs of 2 N d V flops: the llm.c-style figure.
        gflops = 6 * n * cfg["d"] * cfg["V"] / (median * 1e-3) / 1e9
        peak = metrics["memory_peak_extra"]["p50"]
        cells = [
            provider,
            dtype,
            str(n),
            str(k or "-"),
            _fmt(median, ".1f"),
            f"{speed['p20']:.1f}-{speed['p80']:.1f}",
            _fmt(_ratio(median, p50("floor", n, None, dtype, "speed")), ".2f", "x"),
            _fmt(_ratio(median, p50("naive", n, k, dtype, "speed")), ".2f", "x"),
            _fmt(gflops, ".1f"),
            _fmt(peak, ".0f"),
            _fmt(metrics["memory_above_grads"]["p50"], ".0f"),
            _fmt(_ratio(peak, p50("naive", n, k, dtype, "memory_peak_extra")), ".2f", "x"),
        ]
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(cells) + " |" for cells in lines]
        return out + [""] + [f"- {failure}" for failure in failures] if failures else out
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    out = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *lines]]
    return out + failures


def markdown_report(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The table with the machine and the command, ready for bench/RESULTS.md."""
    cfg = rows[0]["config"] if rows else {}
    lines = [
        f"### fused linear sparse-KD, V = {cfg.get('V')}, d = {cfg.get('d')} ({meta['date']})",
        "",
        f"- CPU: {meta['cpu']}, {meta['cores']} cores available, "
        f"torch {meta['torch_version']} ({meta['torch_threads']} threads), "
        f"Python {meta['python']}",
        f"- Command: `{meta['command']}`",
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
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--providers", nargs="+", choices=list(PROVIDERS), default=list(PROVIDERS))
    parser.add_argument("--vocab", type=int, default=153376, help="V (openPangu-1B)")
    parser.add_argument("--hidden", type=int, default=1536, help="d (openPangu-1B)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions after 1 warmup")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--kd-weight", type=float, default=1.0)
    available_gb = _meminfo_kib("MemAvailable") / (1 << 20)
    parser.add_argument(
        "--mem-limit-gb",
        type=float,
        default=round(available_gb, 1),
        help="address-space limit of each worker (0: none; default: MemAvailable now)",
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "out" / "sparse_kd.json")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown report")
    parser.add_argument(
        "--from-json", type=Path, help="print the table of a saved result file; run nothing"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _meminfo_kib(field: str) -> int:
    with open("/proc/meminfo") as meminfo:
        match = re.search(rf"^{field}:\s+(\d+) kB", meminfo.read(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def print_report(meta: dict[str, Any], rows: list[dict[str, Any]], markdown: bool) -> None:
    if markdown:
        print(markdown_report(meta, rows))
    else:
        print("\n".join(table_lines(rows, markdown=False)))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.reps < 1:
        raise SystemExit(f"--reps must be at least 1, got {args.reps}")
    if args.worker:
        print(json.dumps(run_worker(Config(**json.loads(args.worker)))))
        return
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        print_report(saved["meta"], saved["rows"], args.markdown)
        return

    meta = machine_info()
    script_argv = ["bench/bench_sparse_kd.py", *sys.argv[1:]]
    meta["command"] = "PYTHONPATH=. python " + shlex.join(script_argv)
    rows = []
    configs = make_configs(args)
    for i, config in enumerate(configs, 1):
        label = f"{config.provider} N={config.n_rows} K={config.top_k or '-'} {config.dtype}"
        print(f"[{i}/{len(configs)}] {label} ...", file=sys.stderr, flush=True)
        result = run_in_subprocess(config, args.timeout)
        if result["status"] != "ok":
            print(f"    failed: {result['error']}", file=sys.stderr, flush=True)
        rows += to_rows(result, meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print_report(meta, rows, args.markdown)
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
