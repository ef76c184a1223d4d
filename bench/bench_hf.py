"""Hugging Face models: one SFT training step of a transformers Qwen3, pangu_fastkd against stock.

    cd /work/main && PYTHONPATH=. python bench/bench_hf.py --markdown
    PYTHONPATH=. python bench/bench_hf.py --shape tiny --reps 1    # smoke run, seconds

One step = forward and backward of the causal-LM cross-entropy (mean over the supervised
tokens) of a ``Qwen3ForCausalLM`` built from a config with random weights (nothing downloaded),
on 8 documents of mixed lengths, T tokens in all. Providers (bench/hf_baselines.py):
``hf_padded`` (padded [B, Lmax] batch, sdpa, ``model(..., labels=...).loss``), ``hf_packed_sdpa``
(one row from ``DataCollatorWithFlattening``, sdpa on transformers' block-diagonal mask, the
model's loss) and ``pangu_fastkd`` (the same row, ``attn_implementation="pangu_fastkd"``,
``pangu_fastkd.hf.causal_lm_loss``). Shapes: a small model (d = 512, 4 layers, V = 32000,
T = 2048) and openPangu-1B's widths cut to 2 layers (V = 153376, T = 4096); fp32 and bf16
weights (no autocast). Every configuration runs in its own process (this file with
``--worker``), run and measured by bench/harness.py as the other benchmarks.
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
from hf_baselines import PROVIDERS, SHAPES, build_model, make_batch

OP_NAME = "hf_sft_step"
BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_SHAPES = ["small", "openpangu-1b-2l"]
BASELINES = ("hf_padded", "hf_packed_sdpa")  # what the ratios are taken against


@dataclass
class Config:
    """One measured configuration: a provider training one shape in one dtype on T tokens."""

    provider: str
    shape: str
    dtype: str
    t: int
    n_docs: int
    reps: int
    threads: int
    seed: int
    mem_limit_bytes: int


# ---------------------------------------------------------------------------------------------
# Worker: one configuration, in its own process


def run_worker(config: Config) -> dict[str, Any]:
    """Warm up with one step, then time ``reps`` steps and their peak RSS growth.

    The weights and the batch exist before each timed step, so "peak extra" is what the step
    needs beyond them: activations, logits (where built), masks and the gradients (set to None
    before every step). "Above grads" subtracts the gradients, which every provider holds alike.
    """
    if config.provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {tuple(PROVIDERS)}, got {config.provider!r}")
    if config.shape not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {config.shape!r}")
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
    limit_worker(config.mem_limit_bytes, config.threads)
    shape = SHAPES[config.shape]
    batch = make_batch(config.t, config.n_docs, shape.vocab_size, config.seed)
    model = build_model(config.provider, shape, DTYPES[config.dtype], config.seed)
    loss_fn = PROVIDERS[config.provider]
    params = list(model.parameters())  # tied weights appear once
    losses: list[float] = []

    def step() -> None:
        loss = loss_fn(model, batch)
        loss.backward()
        losses.append(loss.item())

    def clear_grads() -> None:
        model.zero_grad(set_to_none=True)

    grad_bytes = tensor_bytes(params)
    padded = config.provider == "hf_padded"
    result: dict[str, Any] = {
        "config": asdict(config),
        "threads_used": torch.get_num_threads(),
        "model": {
            "hidden_size": shape.hidden_size,
            "layers": shape.num_layers,
            "vocab_size": shape.vocab_size,
            "parameters": sum(p.numel() for p in params),
        },
        "n_supervised": batch.num_supervised,
        # Positions the model computes: padding included for the padded batch.
        "n_computed": batch.padded_ids.numel() if padded else batch.num_tokens,
        "grad_bytes": grad_bytes,
        "weight_bytes": grad_bytes,
    }
    result.update(time_and_peak_memory(step, clear_grads, config.reps))
    # The warmup step runs on the initial weights (no update): every step's loss is the same, and
    # every provider must report the same loss up to rounding.
    result["first_loss"] = losses[0] if losses else None
    add_above_grads(result, grad_bytes)
    if result["status"] == "ok" and not bool(torch.isfinite(torch.tensor(losses)).all()):
        result.update(status="failed", error=f"non-finite loss: {losses}")
    return result


# ---------------------------------------------------------------------------------------------
# Driver


def make_configs(args: argparse.Namespace) -> list[Config]:
    """Per (shape, dtype): the baselines first, in ``BASELINES`` order, then pangu_fastkd."""
    order = {p: i for i, p in enumerate(PROVIDERS)}
    configs = []
    for shape in args.shape:
        t = args.t if args.t is not None else SHAPES[shape].t
        for dtype in args.dtype:
            for provider in sorted(args.providers, key=order.__getitem__):
                configs.append(
                    Config(
                        provider=provider,
                        shape=shape,
                        dtype=dtype,
                        t=t,
                        n_docs=args.n_docs,
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
        "computed": result.get("n_computed"),
        "reps": config["reps"],
        "threads": result.get("threads_used"),
        "weights_mib": mib(result.get("weight_bytes")),
        "grad_mib": mib(result.get("grad_bytes")),
        "first_loss": result.get("first_loss"),
        "memory_method": result.get("memory_method"),
    }
    return metric_rows(
        result, meta, op=OP_NAME, mode="full", x_name="T", x=config["t"], config=row_config
    )


# ---------------------------------------------------------------------------------------------
# Table


HEADER = [
    "provider", "shape", "dtype", "T", "positions", "median ms", "p20-p80 ms", "tokens/s",
    "speed x padded", "speed x packed sdpa", "peak extra MiB", "above grads MiB",
    "mem x padded", "mem x packed sdpa", "loss",
]  # fmt: skip


def _row_key(row: dict[str, Any]) -> tuple:
    """``(provider, shape, dtype, T)``."""
    return (row["provider"], row["config"]["shape"], row["config"]["dtype"], row["x"])


def table_lines(rows: list[dict[str, Any]], markdown: bool) -> list[str]:
    """One line per configuration; ratios against both baselines at the same (shape, dtype, T).

    speed x B = B's median time / this median time (above 1: faster than B); mem x B = this
    peak extra / B's peak extra (below 1: less memory than B).
    """
    by_key = group_rows(rows, _row_key)
    lines, failures = [], []
    for key, metrics in by_key.items():
        provider, shape, dtype, t = key
        speed = metrics["speed"]
        if speed["status"] != "ok":
            cells = [provider, shape, dtype, str(t), "-", "failed"]
            lines.append(cells + ["-"] * (len(HEADER) - len(cells)))
            failures.append(f"{provider} {shape} {dtype} T={t} failed: {speed['error']}")
            continue
        median, cfg = speed["p50"], speed["config"]
        peak = metrics["memory_peak_extra"]["p50"]
        speed_ratios = [
            fmt(ratio(ok_p50(by_key, (b, shape, dtype, t), "speed"), median), ".2f", "x")
            for b in BASELINES
        ]
        mem_ratios = [
            fmt(ratio(peak, ok_p50(by_key, (b, shape, dtype, t), "memory_peak_extra")), ".2f", "x")
            for b in BASELINES
        ]
        cells = [
            provider,
            shape,
            dtype,
            str(t),
            str(cfg["computed"]),
            fmt(median, ".1f"),
            f"{speed['p20']:.1f}-{speed['p80']:.1f}",
            fmt(t / (median * 1e-3), ".0f"),
            *speed_ratios,
            fmt(peak, ".0f"),
            fmt(metrics["memory_above_grads"]["p50"], ".0f"),
            *mem_ratios,
            fmt(cfg["first_loss"], ".6f"),
        ]
        lines.append(cells)
    return render_table(HEADER, lines, failures, markdown)


def markdown_report(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The table with the machine, the command and what was measured, for bench/RESULTS.md."""
    shapes: dict[str, dict[str, Any]] = {}
    for row in rows:
        cfg = row["config"]
        if cfg.get("V") is not None:
            shapes[cfg["shape"]] = cfg
    shape_text = "; ".join(
        f"{name}: d = {c['d']}, {c['layers']} layers, V = {c['V']}, "
        f"{c['parameters'] / 1e6:.1f}M parameters, {c['supervised']} supervised tokens"
        for name, c in shapes.items()
    )
    cfg = rows[0]["config"] if rows else {}
    lines = [
        *report_head(
            "Qwen3ForCausalLM SFT step, pangu_fastkd vs stock transformers",
            meta,
            f"transformers {meta.get('transformers_version', '?')}, ",
        ),
        f"- Shapes: {shape_text or '-'}.",
        f"- One step: forward and backward of the causal-LM cross-entropy (mean over the "
        f"supervised tokens) on {cfg.get('documents')} documents of mixed lengths, T tokens in "
        "all (random ids; prompts unsupervised), random weights from a config. bf16 = bf16 "
        "weights and gradients, no autocast.",
        "- hf_padded: right-padded [B, Lmax] batch + attention_mask, sdpa, "
        "`model(..., labels=...).loss` (positions = B x Lmax, padding included). "
        "hf_packed_sdpa: one row from `DataCollatorWithFlattening` (position_ids, "
        "`use_cache=False`), sdpa on transformers' dense block-diagonal mask, the model's loss. "
        'pangu_fastkd: the same row, `attn_implementation="pangu_fastkd"`, '
        "`pangu_fastkd.hf.causal_lm_loss` (fused LM-head cross-entropy, no logits).",
        "- Median and p20-p80 of the timed steps after one warmup step, each configuration in "
        "its own process; tokens/s = T / median (real tokens, not padding). speed x B = B's "
        "median / this median; mem x B = this peak extra / B's. Peak extra: peak RSS growth "
        "over the step above the resident weights and batch (gradients included; above grads "
        "subtracts them). Loss: the warmup step's, the same for all providers up to rounding.",
        "",
        *table_lines(rows, markdown=True),
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
    parser.add_argument("--reps", type=int, default=3, help="timed steps after 1 warmup step")
    parser.add_argument("--seed", type=int, default=0, help="weights and batch")
    add_common_args(parser, PROVIDERS, out=BENCH_DIR / "out" / "hf.json", timeout_s=3600)
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Fail in the driver, before any worker starts, on values a worker would refuse."""
    if args.reps < 1:
        raise SystemExit(f"--reps must be at least 1, got {args.reps}")
    if args.n_docs < 1:
        raise SystemExit(f"--n-docs must be at least 1, got {args.n_docs}")
    for shape in args.shape:
        t = args.t if args.t is not None else SHAPES[shape].t
        if t < 2 * args.n_docs:
            raise SystemExit(f"--t must be at least 2 x --n-docs = {2 * args.n_docs}, got {t}")


def extra_meta() -> dict[str, Any]:
    """The driver records transformers' version; the workers import it to run."""
    import transformers

    return {"transformers_version": transformers.__version__}


def main(argv: list[str] | None = None) -> None:
    run_main(sys.modules[__name__], parse_args(argv), argv)


if __name__ == "__main__":
    main()
