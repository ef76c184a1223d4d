"""Running and reporting benchmarks: what every bench/bench_*.py script shares.

A benchmark script keeps its configurations, its worker (one configuration measured in the
current process) and its table; this module runs each configuration in a fresh interpreter
(the script itself with ``--worker``), measures time and peak resident memory inside the
worker, and writes the results as Liger-Kernel-style JSON rows and a plain or Markdown table.

    driver:  main(script module, args) -> for each config: run_in_subprocess(config, script)
    worker:  script --worker '{config}' -> benchmark.run_worker(config) -> one JSON line
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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import torch

from pangu_fastkd.durable import atomic_write_text

__all__ = [
    "DTYPES",
    "MIB",
    "STANDARD_METRICS",
    "BenchmarkScript",
    "PeakRSS",
    "add_above_grads",
    "add_common_args",
    "fmt",
    "group_rows",
    "limit_worker",
    "machine_info",
    "main",
    "meminfo_kib",
    "metric_rows",
    "mib",
    "ok_p50",
    "percentiles",
    "ratio",
    "render_table",
    "report_head",
    "run_in_subprocess",
    "tensor_bytes",
    "time_and_peak_memory",
    "worker_limits",
]

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

# (metric name, unit, key of the worker's result) of a forward+backward benchmark's rows.
STANDARD_METRICS = (
    ("speed", "ms", "time_ms"),
    ("memory_peak_extra", "MiB", "peak_extra_mib"),
    ("memory_above_grads", "MiB", "above_grads_mib"),
)


# ---------------------------------------------------------------------------------------------
# Memory measurement (worker side)


def _kib_field(path: str, field_name: str) -> int | None:
    with open(path) as status:
        match = re.search(rf"^{field_name}:\s+(\d+) kB", status.read(), re.MULTILINE)
    return None if match is None else int(match.group(1))


def _proc_status_kib(field_name: str) -> int:
    kib = _kib_field("/proc/self/status", field_name)
    if kib is None:
        raise RuntimeError(f"/proc/self/status has no {field_name} field")
    return kib


def meminfo_kib(field_name: str) -> int:
    """A ``/proc/meminfo`` field in KiB (``MemAvailable``...), 0 when the kernel has none."""
    return _kib_field("/proc/meminfo", field_name) or 0


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


def tensor_bytes(tensors: Iterable[Any]) -> int:
    """Bytes held by the tensors among ``tensors`` (other items, e.g. AdamW's step, are skipped)."""
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


# ---------------------------------------------------------------------------------------------
# Timing (worker side)


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """``p20``/``p50``/``p80`` of ``values``, linearly interpolated (``torch.quantile``)."""
    q = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    q = torch.quantile(torch.tensor(values, dtype=torch.float64), q)
    return {"p20": q[0].item(), "p50": q[1].item(), "p80": q[2].item()}


def limit_worker(mem_limit_bytes: int, threads: int) -> None:
    """Apply a worker's address-space limit (0: none) and torch thread count (0: default).

    Under the limit an allocation past it fails as a RuntimeError (a failed row), where
    overcommit would otherwise let the OOM killer pick a process on a shared machine.
    """
    if mem_limit_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (mem_limit_bytes, mem_limit_bytes))
    if threads > 0:
        torch.set_num_threads(threads)


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
        "time_ms": percentiles(times_ms),
        "peak_extra_mib": percentiles([p / MIB for p in peaks]),
        "peak_bytes": peaks,
    }


def add_above_grads(result: dict[str, Any], grad_bytes: int) -> None:
    """Replace an ok result's raw ``peak_bytes`` by ``above_grads_mib``: the peaks minus the
    ``grad_bytes`` that every provider has to hold, the working memory of the step itself."""
    if result["status"] == "ok":
        peaks = result.pop("peak_bytes")
        result["above_grads_mib"] = percentiles([(p - grad_bytes) / MIB for p in peaks])


# ---------------------------------------------------------------------------------------------
# Driver side


def run_in_subprocess(config: Any, timeout_s: float, script: Path) -> dict[str, Any]:
    """Runs one configuration (a dataclass) as ``script --worker`` in a fresh interpreter.

    Any crash, signal or timeout of the worker becomes a failed result instead of an exception.
    """
    env = {**os.environ, **WORKER_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
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


def machine_info() -> dict[str, Any]:
    """CPU model, usable cores, torch threads and version, Python version and the UTC date."""
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


def mib(n_bytes: int | None) -> float | None:
    """Bytes in MiB, None kept."""
    return None if n_bytes is None else n_bytes / MIB


def metric_rows(
    result: dict[str, Any],
    meta: dict[str, Any],
    *,
    op: str,
    mode: str,
    x_name: str,
    x: int,
    config: dict[str, Any],
    metrics: Sequence[tuple[str, str, str]] = STANDARD_METRICS,
) -> list[dict[str, Any]]:
    """Liger-Kernel's benchmark fields, one row per ``(metric, unit, result key)`` of one result.

    ``config`` is the row's ``config`` field (the benchmark's own description of the run).
    """
    rows = []
    for metric, unit, key in metrics:
        stats = result.get(key, {})
        rows.append(
            {
                "op": op,
                "provider": result["config"]["provider"],
                "mode": mode,
                "metric": metric,
                "unit": unit,
                "x_name": x_name,
                "x": x,
                "p20": stats.get("p20"),
                "p50": stats.get("p50"),
                "p80": stats.get("p80"),
                "config": config,
                "status": result["status"],
                "error": result.get("error"),
                "device": f"cpu: {meta['cpu']}",
                "torch_version": meta["torch_version"],
                "timestamp": meta["date"],
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Tables


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    """``value`` formatted with ``spec`` and ``suffix``, or "-" when there is none."""
    return "-" if value is None else f"{value:{spec}}{suffix}"


def ratio(value: float | None, base: float | None) -> float | None:
    """``value / base``, or None when either is missing (or ``base`` is 0)."""
    return value / base if value is not None and base else None


RowKey = Callable[[dict[str, Any]], tuple]


def group_rows(rows: list[dict[str, Any]], key: RowKey) -> dict[tuple, dict[str, dict[str, Any]]]:
    """``key(row) -> metric -> row``, configurations in the order of the rows."""
    by_key: dict[tuple, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_key.setdefault(key(row), {})[row["metric"]] = row
    return by_key


def ok_p50(by_key: dict[tuple, dict[str, dict[str, Any]]], key: tuple, metric: str) -> float | None:
    """The median of ``metric`` of configuration ``key``; None if it is missing or failed."""
    row = by_key.get(key, {}).get(metric, {})
    return row.get("p50") if row.get("status") == "ok" else None


def render_table(
    header: list[str], lines: list[list[str]], failures: list[str], markdown: bool
) -> list[str]:
    """A Markdown table (failures listed below it) or right-aligned plain columns."""
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(cells) + " |" for cells in lines]
        return out + [""] + [f"- {failure}" for failure in failures] if failures else out
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    out = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *lines]]
    return out + failures


def report_head(title: str, meta: dict[str, Any], libraries: str = "") -> list[str]:
    """A Markdown report's first lines: the title with the run's date, the machine and the
    command; ``libraries`` (e.g. "transformers 5.2, ") goes before the Python version."""
    return [
        f"### {title} ({meta['date']})",
        "",
        f"- CPU: {meta['cpu']}, {meta['cores']} cores available, "
        f"torch {meta['torch_version']} ({meta['torch_threads']} threads), "
        f"{libraries}Python {meta['python']}",
        f"- Command: `{meta['command']}`",
    ]


# ---------------------------------------------------------------------------------------------
# Command line


def add_common_args(
    parser: argparse.ArgumentParser,
    providers: Iterable[str],
    *,
    out: Path,
    timeout_s: float,
) -> None:
    """The options every benchmark has: dtypes, providers, threads, the worker's memory limit
    and timeout, the output file, the report's form, ``--from-json`` and the hidden
    ``--worker``."""
    providers = list(providers)
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--providers", nargs="+", choices=providers, default=providers)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--mem-limit-gb",
        type=float,
        default=round(meminfo_kib("MemAvailable") / (1 << 20), 1),
        help="address-space limit of each worker (0: none; default: MemAvailable now)",
    )
    parser.add_argument(
        "--timeout", type=float, default=timeout_s, help="seconds per configuration"
    )
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--markdown", action="store_true", help="print a Markdown report")
    parser.add_argument(
        "--from-json", type=Path, help="print the table of a saved result file; run nothing"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)


def worker_limits(args: argparse.Namespace) -> dict[str, int]:
    """A configuration's ``threads`` and ``mem_limit_bytes`` from ``add_common_args``' options."""
    return {"threads": args.threads, "mem_limit_bytes": int(args.mem_limit_gb * (1 << 30))}


class BenchmarkScript(Protocol):
    """What a bench_*.py module defines for ``main`` (a module satisfies a Protocol, PEP 544).

    Attributes:
        __file__: the script; each configuration runs as ``python __file__ --worker CONFIG``.
        Config: its configuration dataclass (JSON-serialisable fields).
        run_worker: measures one configuration in this process, returns its JSON result.
        make_configs: the configurations of a command line, in the order they run.
        label: a configuration's name in the progress lines.
        to_rows: a worker's result and the run's meta -> JSON rows (``metric_rows``).
        table_lines: rows, markdown -> the table's lines (``render_table``).
        markdown_report: meta, rows -> the report for bench/RESULTS.md.
        check_args: fails (SystemExit) before any worker starts on values a worker would refuse.
        extra_meta: optional; more entries of the run's meta (library versions), read in the
            driver.
    """

    __file__: str
    Config: type

    def run_worker(self, config: Any) -> dict[str, Any]: ...
    def make_configs(self, args: argparse.Namespace) -> list[Any]: ...
    def label(self, config: Any) -> str: ...
    def to_rows(self, result: dict[str, Any], meta: dict[str, Any]) -> list[dict[str, Any]]: ...
    def table_lines(self, rows: list[dict[str, Any]], markdown: bool) -> list[str]: ...
    def markdown_report(self, meta: dict[str, Any], rows: list[dict[str, Any]]) -> str: ...
    def check_args(self, args: argparse.Namespace) -> None: ...


def _report(
    bench: BenchmarkScript, meta: dict[str, Any], rows: list[dict[str, Any]], markdown: bool
) -> str:
    if markdown:
        return bench.markdown_report(meta, rows)
    return "\n".join(bench.table_lines(rows, False))


def main(bench: BenchmarkScript, args: argparse.Namespace, argv: list[str] | None = None) -> None:
    """Worker mode, ``--from-json`` mode, or the driver: every configuration in its own process,
    the JSON file (rows and meta) written atomically, then the report on stdout.

    ``bench`` is the calling script's module (``sys.modules[__name__]``).
    """
    if args.worker:
        config = bench.Config(**json.loads(args.worker))
        print(json.dumps(bench.run_worker(config)))
        return
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        print(_report(bench, saved["meta"], saved["rows"], args.markdown))
        return
    bench.check_args(args)

    meta = {**machine_info(), **getattr(bench, "extra_meta", dict)()}
    script = Path(bench.__file__).resolve()
    script_argv = [f"bench/{script.name}", *(sys.argv[1:] if argv is None else argv)]
    meta["command"] = "PYTHONPATH=. python " + shlex.join(script_argv)
    rows = []
    configs = bench.make_configs(args)
    for i, config in enumerate(configs, 1):
        print(f"[{i}/{len(configs)}] {bench.label(config)} ...", file=sys.stderr, flush=True)
        result = run_in_subprocess(config, args.timeout, script)
        if result["status"] != "ok":
            print(f"    failed: {result['error']}", file=sys.stderr, flush=True)
        rows += bench.to_rows(result, meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(_report(bench, meta, rows, args.markdown))
    print(f"\nwrote {args.out}", file=sys.stderr)
