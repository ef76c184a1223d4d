"""Student training-step throughput and peak memory: the project's ops against plain PyTorch.

    cd /work/main && PYTHONPATH=. python bench/bench_train_step.py --markdown
    PYTHONPATH=. python bench/bench_train_step.py --shape tiny --reps 1    # smoke run, seconds

One step = forward, KD loss (top-K teacher, K = 16, kd_weight 0.5), backward and the AdamW update
on one packed batch of T tokens in 8 documents of mixed lengths. Providers
(bench/train_step_baselines.py): ``pangu_fastkd`` (``DecoderLM`` with the packed-attention kernel,
``fused_linear_sparse_kd``), ``pangu_fastkd+ckpt`` (the same with activation checkpointing on every
layer) and ``plain`` (the same model and weights in plain PyTorch: dense-mask SDPA, materialised
logits, ``sparse_kd_reference``). Shapes: the embedded demo student
(``small`` preset, byte vocabulary, T = 2048) and openPangu-1B cut to 2 layers (V = 153376,
T = 4096); fp32, and bf16 parameters (bf16 weights, gradients and AdamW state, no autocast) for
every provider alike. Every configuration runs in its own process (this file with
``--worker``), run and measured by bench/harness.py as the other benchmarks.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, replace
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
    mib,
    ok_p50,
    ratio,
    render_table,
    report_head,
    tensor_bytes,
    time_and_peak_memory,
    worker_limits,
)
from harness import main as run_main
from train_step_baselines import (
    PROVIDERS,
    build_model,
    make_optimizer,
    make_train_batch,
    train_step,
)

from pangu_fastkd.data import ByteTokenizer
from pangu_fastkd.model import ModelConfig

OP_NAME = "train_step"
BENCH_DIR = Path(__file__).resolve().parent
# The targets, pangu_fastkd over plain at the same (shape, dtype, T).
TARGET_SPEEDUP = 1.5  # tokens/s ratio, at least
TARGET_MEMORY = 0.5  # peak extra ratio, at most


@dataclass(frozen=True)
class Shape:
    """A model shape and its default batch size; ``num_layers`` None keeps the preset's."""

    preset: str
    vocab_size: int
    num_layers: int | None
    t: int

    def model_config(self) -> ModelConfig:
        config = ModelConfig.preset(self.preset, self.vocab_size)
        if self.num_layers is not None:
            config = replace(config, num_hidden_layers=self.num_layers)
        return config


SHAPES = {
    "tiny": Shape("tiny", ByteTokenizer().vocab_size, None, 256),  # smoke runs and tests
    "small": Shape("small", ByteTokenizer().vocab_size, None, 2048),  # the embedded demo student
    "openpangu-1b-2l": Shape("openpangu-1b", 153_376, 2, 4096),
}
DEFAULT_SHAPES = ["small", "openpangu-1b-2l"]


@dataclass
class Config:
    """One measured configuration: a provider training one shape in one dtype at T tokens."""

    provider: str
    shape: str
    dtype: str
    t: int
    n_docs: int
    top_k: int
    kd_weight: float
    reps: int
    threads: int
    seed: int
    mem_limit_bytes: int


# ---------------------------------------------------------------------------------------------
# Worker: one configuration, in its own process


def run_worker(config: Config) -> dict[str, Any]:
    """Warm up with one step, then time ``reps`` steps and their peak RSS growth.

    The weights, the AdamW state (created by the warmup step) and the batch exist before each
    timed step, so "peak extra" is what the step needs beyond them: activations, logits,
    gradients (set to None before every step, torch's ``zero_grad`` default) and the update's
    temporaries. "Above grads" subtracts the gradients, which both providers hold alike.
    """
    if config.shape not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {config.shape!r}")
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
    limit_worker(config.mem_limit_bytes, config.threads)
    model_config = SHAPES[config.shape].model_config()
    batch = make_train_batch(
        config.t, config.n_docs, model_config.vocab_size, config.top_k, config.seed
    )
    model = build_model(config.provider, model_config, DTYPES[config.dtype], config.seed)
    optimizer = make_optimizer(model)
    losses: list[float] = []

    def step() -> None:
        losses.append(train_step(config.provider, model, optimizer, batch, config.kd_weight).item())

    def clear_grads() -> None:
        optimizer.zero_grad(set_to_none=True)

    params = list(model.parameters())
    grad_bytes = tensor_bytes(params)
    result: dict[str, Any] = {
        "config": asdict(config),
        "threads_used": torch.get_num_threads(),
        "model": {
            "hidden_size": model_config.hidden_size,
            "layers": model_config.num_hidden_layers,
            "vocab_size": model_config.vocab_size,
            "parameters": sum(p.numel() for p in params),
        },
        "n_supervised": int(batch.rows.numel()),
        "grad_bytes": grad_bytes,
    }
    result.update(time_and_peak_memory(step, clear_grads, config.reps))
    state_tensors = [t for state in optimizer.state.values() for t in state.values()]
    result["state_bytes"] = tensor_bytes(params) + tensor_bytes(state_tensors)
    # The warmup step runs on the initial weights: every provider must report the same loss.
    result["first_loss"] = losses[0] if losses else None
    add_above_grads(result, grad_bytes)
    if result["status"] == "ok" and not bool(torch.isfinite(torch.tensor(losses)).all()):
        result.update(status="failed", error=f"non-finite loss: {losses}")
    return result


# ---------------------------------------------------------------------------------------------
# Driver


def make_configs(args: argparse.Namespace) -> list[Config]:
    """Per (shape, dtype): plain first, the baseline the other providers are compared with."""
    configs = []
    for shape in args.shape:
        t = args.t if args.t is not None else SHAPES[shape].t
        for dtype in args.dtype:
            for provider in sorted(args.providers, key=lambda p: p != "plain"):
                configs.append(
                    Config(
                        provider=provider,
                        shape=shape,
                        dtype=dtype,
                        t=t,
                        n_docs=args.n_docs,
                        top_k=args.top_k,
                        kd_weight=args.kd_weight,
                        reps=args.reps,
                        seed=args.seed,
                        **worker_limits(args),
                    )
                )
    return configs


def label(config: Config) -> str:
    return f"{config.provider} {config.shape} {config.dtype} T={config.t}"


def to_rows(result: dict[str, Any], meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Liger-Kernel's benchmark fields (bench/harness.py), one row per metric."""
    config = result["config"]
    model = result.get("model", {})
    row_config = {
        "shape": config["shape"],
        "dtype": config["dtype"],
        "V": model.get("vocab_size"),
        "d": model.get("hidden_size"),
        "layers": model.get("layers"),
        "parameters": model.get("parameters"),
        "documents": config["n_docs"],
        "supervised": result.get("n_supervised"),
        "K": config["top_k"],
        "kd_weight": config["kd_weight"],
        "reps": config["reps"],
        "threads": result.get("threads_used"),
        "state_mib": mib(result.get("state_bytes")),
        "grad_mib": mib(result.get("grad_bytes")),
        "first_loss": result.get("first_loss"),
        "memory_method": result.get("memory_method"),
    }
    return metric_rows(
        result, meta, op=OP_NAME, mode="full", x_name="T", x=config["t"], config=row_config
    )


# ---------------------------------------------------------------------------------------------
# Table and summary


HEADER = [
    "provider", "shape", "dtype", "T", "median ms", "p20-p80 ms", "tokens/s", "speed x plain",
    "peak extra MiB", "above grads MiB", "mem x plain", "weights+AdamW MiB", "first loss",
]  # fmt: skip


def _row_key(row: dict[str, Any]) -> tuple:
    """``(provider, shape, dtype, T)``."""
    return (row["provider"], row["config"]["shape"], row["config"]["dtype"], row["x"])


def _tokens_per_s(t: int, median_ms: float | None) -> float | None:
    return None if median_ms is None else t / (median_ms * 1e-3)


def table_lines(rows: list[dict[str, Any]], markdown: bool) -> list[str]:
    """One line per configuration; ratios against plain at the same (shape, dtype, T)."""
    by_key = group_rows(rows, _row_key)
    lines, failures = [], []
    for key, metrics in by_key.items():
        provider, shape, dtype, t = key
        speed = metrics["speed"]
        if speed["status"] != "ok":
            cells = [provider, shape, dtype, str(t), "failed"]
            lines.append(cells + ["-"] * (len(HEADER) - len(cells)))
            failures.append(f"{provider} {shape} {dtype} T={t} failed: {speed['error']}")
            continue
        plain = ("plain", shape, dtype, t)
        median, cfg = speed["p50"], speed["config"]
        peak = metrics["memory_peak_extra"]["p50"]
        tokens_per_s = _tokens_per_s(t, median)
        cells = [
            provider,
            shape,
            dtype,
            str(t),
            fmt(median, ".1f"),
            f"{speed['p20']:.1f}-{speed['p80']:.1f}",
            fmt(tokens_per_s, ".0f"),
            fmt(ratio(tokens_per_s, _tokens_per_s(t, ok_p50(by_key, plain, "speed"))), ".2f", "x"),
            fmt(peak, ".0f"),
            fmt(metrics["memory_above_grads"]["p50"], ".0f"),
            fmt(ratio(peak, ok_p50(by_key, plain, "memory_peak_extra")), ".2f", "x"),
            fmt(cfg["state_mib"], ".0f"),
            fmt(cfg["first_loss"], ".6f"),
        ]
        lines.append(cells)
    return render_table(HEADER, lines, failures, markdown)


def target_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's two targets per (shape, dtype, T) and project provider, against plain; for
    ``pangu_fastkd+ckpt`` also its step time over ``pangu_fastkd``'s (what recomputing costs)."""
    by_key = group_rows(rows, _row_key)
    header = [
        "provider", "shape", "dtype", "T", f"tokens/s x plain (>= {TARGET_SPEEDUP}x)",
        f"peak extra x plain (<= {TARGET_MEMORY}x)", "with weights+AdamW",
        "step time x pangu_fastkd",
    ]  # fmt: skip
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    groups = dict.fromkeys(key[1:] for key in by_key)
    ours = [p for p in PROVIDERS if p != "plain"]
    for shape, dtype, t in groups:
        plain = ("plain", shape, dtype, t)
        # pangu_fastkd always has a line, so that a failed or missing run shows as such.
        measured = [p for p in ours if (p, shape, dtype, t) in by_key] or ["pangu_fastkd"]
        for provider in measured:
            key = (provider, shape, dtype, t)
            speedup = ratio(ok_p50(by_key, plain, "speed"), ok_p50(by_key, key, "speed"))
            mem_ours = ok_p50(by_key, key, "memory_peak_extra")
            mem_plain = ok_p50(by_key, plain, "memory_peak_extra")
            # The same ratio with the resident weights and AdamW state counted, for the reader
            # who reads "peak memory" as the whole process's.
            state = by_key.get(key, {}).get("speed", {}).get("config", {}).get("state_mib")
            total = (
                ratio(mem_ours + state, mem_plain + state)
                if None not in (mem_ours, mem_plain, state)
                else None
            )
            cost = None
            if provider != "pangu_fastkd":
                base = ok_p50(by_key, ("pangu_fastkd", shape, dtype, t), "speed")
                cost = ratio(ok_p50(by_key, key, "speed"), base)
            cells = [
                provider,
                shape,
                dtype,
                str(t),
                _verdict(speedup, lambda r: r >= TARGET_SPEEDUP),
                _verdict(ratio(mem_ours, mem_plain), lambda r: r <= TARGET_MEMORY),
                fmt(total, ".2f", "x"),
                fmt(cost, ".2f", "x"),
            ]
            out.append("| " + " | ".join(cells) + " |")
    return out


def _verdict(value: float | None, met: Any) -> str:
    if value is None:
        return "- (a provider failed or was not run)"
    return f"{value:.2f}x: " + ("met" if met(value) else "**not met**")


def markdown_report(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The table and the targets, with the machine and the command, ready for bench/RESULTS.md."""
    shapes = {}
    for row in rows:
        cfg = row["config"]
        if cfg.get("V") is not None:
            shapes[cfg["shape"]] = cfg
    shape_text = "; ".join(
        f"{name}: d = {c['d']}, {c['layers']} layers, V = {c['V']}, "
        f"{c['parameters'] / 1e6:.1f}M parameters, {c['supervised']} supervised rows"
        for name, c in shapes.items()
    )
    cfg = rows[0]["config"] if rows else {}
    lines = [
        *report_head("student training step, pangu_fastkd vs plain PyTorch", meta),
        f"- Shapes: {shape_text or '-'}.",
        f"- One step: forward, loss, backward, fused AdamW update, on one packed batch of T "
        f"tokens in {cfg.get('documents')} documents (random ids; prompts unsupervised); loss "
        f"= {cfg.get('kd_weight')} x forward KL to a random top-{cfg.get('K')} teacher (tail, "
        f"label-conditioned) + {1 - (cfg.get('kd_weight') or 0):g} x CE, mean over the "
        "supervised rows. bf16 = bf16 parameters, gradients and AdamW state (no autocast), for "
        "every provider.",
        "- pangu_fastkd: `DecoderLM.hidden_states` (packed-attention kernel) + "
        "`fused_linear_sparse_kd`. plain: the same weights in a plain-PyTorch model "
        "(`F.scaled_dot_product_attention` with a dense [T, T] block-diagonal causal mask) + "
        "`sparse_kd_reference` (materialised [n, V] logits and log-softmax). "
        "pangu_fastkd+ckpt: pangu_fastkd with activation checkpointing on every layer "
        "(`activation_checkpointing = true`: each layer keeps only its input and runs its "
        "forward again in backward); step time x pangu_fastkd is what that recompute costs.",
        "- Median and p20-p80 of the timed steps after one warmup step, each configuration in "
        "its own process; tokens/s = T / median step time. Peak extra: peak RSS growth over "
        "the step above the resident weights, AdamW state and batch (gradients included; above "
        "grads subtracts them). First loss: the warmup step's loss, on the initial weights, "
        "the same for every provider up to rounding.",
        "",
        *table_lines(rows, markdown=True),
        "",
        "Against the issue's targets:",
        "",
        *target_lines(rows),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shape", nargs="+", choices=list(SHAPES), default=DEFAULT_SHAPES, help="model shapes"
    )
    parser.add_argument(
        "--t", type=int, default=None, help="tokens per batch (default: per shape, 2048 / 4096)"
    )
    parser.add_argument("--n-docs", type=int, default=8, help="documents per batch")
    parser.add_argument("--top-k", type=int, default=16, help="K of the teacher target")
    parser.add_argument("--kd-weight", type=float, default=0.5, help="0.5: half KL, half CE")
    parser.add_argument("--reps", type=int, default=3, help="timed steps after 1 warmup step")
    parser.add_argument("--seed", type=int, default=0, help="weights, batch and target")
    add_common_args(parser, PROVIDERS, out=BENCH_DIR / "out" / "train_step.json", timeout_s=3600)
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Fail in the driver, before any worker starts, on values a worker would refuse."""
    if args.reps < 1:
        raise SystemExit(f"--reps must be at least 1, got {args.reps}")
    if args.n_docs < 1:
        raise SystemExit(f"--n-docs must be at least 1, got {args.n_docs}")
    if args.t is not None and args.t < 2 * args.n_docs:
        raise SystemExit(f"--t must be at least 2 x --n-docs = {2 * args.n_docs}, got {args.t}")
    if not 0 <= args.kd_weight <= 1:
        raise SystemExit(f"--kd-weight must be in [0, 1], got {args.kd_weight}")
    for shape in args.shape:
        spec = SHAPES[shape]
        if not 1 <= args.top_k <= spec.vocab_size:
            raise SystemExit(
                f"--top-k must be in [1, {spec.vocab_size}] (vocabulary of {shape}), "
                f"got {args.top_k}"
            )
        t = args.t if args.t is not None else spec.t
        if t < 2 * args.n_docs:
            raise SystemExit(f"T = {t} of {shape} is below 2 x --n-docs = {2 * args.n_docs}")


def main(argv: list[str] | None = None) -> None:
    run_main(sys.modules[__name__], parse_args(argv), argv)


if __name__ == "__main__":
    main()
