"""A config with ``seeds = [...]`` runs once per seed, then reports the mean and spread.

Run directory::

    config.json               the config as given (with its seeds)
    teachers/                 teachers trained here, shared by every seed's run
    seed-<s>/                 one ordinary run per seed (its own eval.md and summary.json)
    eval.md, summary.json     across seeds: mean, standard deviation and each seed's figure
    replicates.png            mean accuracy per stage and mode, error bars one std

Seed ``s`` sets the run's ``seed`` (data order, rollout sampling) to ``s`` and adds ``s`` to
the student's initialisation seed. Data and held-out problems stay the same in every run, so a
comparison is paired within each seed and the seeds show what the training noise is.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..distributed import DistributedContext
from ..durable import atomic_write_bytes
from .comparisons import MODES
from .config import PipelineConfig
from .pipeline import Pipeline
from .plots import plot_replicates
from .run_dir import prepare_run_dir
from .tensorboard_log import require_tensorboard

__all__ = ["aggregate_summaries", "replicate_config", "replicates_report", "run_replicates"]


def replicate_config(config: PipelineConfig, seed: int) -> PipelineConfig:
    """The config of seed ``seed``'s run: in ``<run_dir>/seed-<seed>``, without ``seeds``."""
    student = dataclasses.replace(config.student, seed=config.student.seed + seed)
    return dataclasses.replace(
        config,
        seeds=[],
        seed=seed,
        student=student,
        run_dir=str(Path(config.run_dir) / f"seed-{seed}"),
    )


def run_replicates(
    config: PipelineConfig,
    context: DistributedContext,
    *,
    resume: bool = False,
    overwrite: bool = False,
    log=None,
) -> dict[str, Any]:
    """Runs (or resumes) every seed's run, then writes the report across seeds; returns it."""
    if config.logging.tensorboard:
        require_tensorboard()  # before the run directory is touched
    run_dir = Path(config.run_dir)
    prepare_run_dir(
        run_dir, dataclasses.asdict(config), context, resume=resume, overwrite=overwrite
    )
    summaries = []
    for seed in config.seeds:
        sub = replicate_config(config, seed)
        started = (Path(sub.run_dir) / "config.json").exists()
        pipeline = Pipeline(sub, context, resume=started, log=log)
        pipeline.teachers_dir = run_dir / "teachers"
        pipeline.run()
        if context.is_main:
            summaries.append(json.loads((Path(sub.run_dir) / "summary.json").read_text()))
    context.barrier()
    if not context.is_main:
        return {}
    summary = aggregate_summaries(config.seeds, summaries)
    text = json.dumps(summary, indent=1, allow_nan=False)
    atomic_write_bytes(run_dir / "summary.json", (text + "\n").encode("utf-8"))
    report = replicates_report(summary)
    atomic_write_bytes(run_dir / "eval.md", (report + "\n").encode("utf-8"))
    plot_replicates(summary, run_dir / "replicates.png")
    print(report, file=log)
    return summary


def _spread(values: Sequence[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "per_seed": list(values),
    }


def aggregate_summaries(
    seeds: Sequence[int], summaries: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """Each stage's accuracy per mode and each comparison's difference, across the seeds' runs.

    Args:
        seeds: the seeds, in the order of ``summaries``.
        summaries: each seed's ``summary.json`` (see ``summary.run_summary``).

    Returns:
        ``{"seeds", "eval_problems", "stages": [{stage, schedule, accuracy: {mode: spread}}],
        "comparisons": [{stage, baseline, mode, difference: spread, outside_noise_seeds,
        seeds}]}``; a spread is ``{mean, std, min, max, per_seed}`` (std over seeds, 0 with
        one). A stage or comparison missing from some seed's run is left out.
    """
    if len(seeds) != len(summaries) or not summaries:
        raise ValueError("aggregate_summaries needs one summary per seed (at least one)")
    stages = []
    for first in summaries[0]["stages"]:
        runs = [_find(s["stages"], stage=first["stage"]) for s in summaries]
        if any(r is None for r in runs):
            continue
        accuracy = {
            mode: _spread([r["accuracy"][mode]["value"] for r in runs])
            for mode in MODES
            if all(mode in r["accuracy"] for r in runs)
        }
        stages.append(
            {"stage": first["stage"], "schedule": first["schedule"], "accuracy": accuracy}
        )
    comparisons = []
    for first in summaries[0]["comparisons"]:
        key = {k: first[k] for k in ("stage", "baseline", "mode")}
        runs = [_find(s["comparisons"], **key) for s in summaries]
        if any(r is None for r in runs):
            continue
        comparisons.append(
            {
                **key,
                "configured": first["configured"],
                "difference": _spread([r["difference"]["value"] for r in runs]),
                "intervals": [[r["difference"]["low"], r["difference"]["high"]] for r in runs],
                "outside_noise_seeds": sum(r["outside_noise"] for r in runs),
                "seeds": len(runs),
            }
        )
    return {
        "seeds": list(seeds),
        "eval_problems": summaries[0]["eval_problems"],
        "stages": stages,
        "comparisons": comparisons,
    }


def _find(items: Sequence[dict[str, Any]], **key: Any) -> dict[str, Any] | None:
    return next((i for i in items if all(i.get(k) == v for k, v in key.items())), None)


def _pct(spread: dict[str, Any], signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{100 * spread['mean']:{sign}.1f} ± {100 * spread['std']:.1f}"


def replicates_report(summary: dict[str, Any]) -> str:
    """``eval.md`` across seeds: accuracies (mean ± std over seeds, in percent) and the
    comparisons (mean difference ± std in points, and in how many seeds its paired 95%
    interval excluded 0)."""
    n = len(summary["seeds"])
    sizes = ", ".join(f"{v:,} {m}" for m, v in summary["eval_problems"].items())
    lines = [
        f"Mean ± standard deviation over {n} seeds ({', '.join(map(str, summary['seeds']))}); "
        f"held-out problems per run: {sizes}.",
        "",
        "| stage | schedule so far | accuracy (reasoning) | accuracy (fast) |",
        "| :-- | :-- | --: | --: |",
    ]
    for stage in summary["stages"]:
        cells = [_pct(stage["accuracy"][m]) + "%" if m in stage["accuracy"] else "-" for m in MODES]
        lines.append(f"| {stage['stage']} | {stage['schedule']} | {cells[0]} | {cells[1]} |")
    if summary["comparisons"]:
        lines += [
            "",
            "| stage | baseline | mode | difference (points) | per seed | outside the noise |",
            "| :-- | :-- | :-- | --: | :-- | :-- |",
        ]
        for c in summary["comparisons"]:
            per_seed = ", ".join(f"{100 * v:+.1f}" for v in c["difference"]["per_seed"])
            lines.append(
                f"| {c['stage']} | {c['baseline']} | {c['mode']} | {_pct(c['difference'], True)} "
                f"| {per_seed} | {c['outside_noise_seeds']}/{c['seeds']} seeds |"
            )
    return "\n".join(lines)
