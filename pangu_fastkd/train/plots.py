"""The run's plot (``plot.png``): training loss, KD health and throughput by global step, and
each stage's last eval."""

from __future__ import annotations

import io
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..durable import atomic_write_bytes
from .kd_health import HEALTH_KEYS
from .metrics import read_metrics

__all__ = ["RUN_PLOT_PIXELS", "plot_replicates", "plot_run"]

# plot_run's image, width x height.
RUN_PLOT_PIXELS = (1100, 850)
# The loss panel's line style per key: the hard and soft losses of a KD stage beside its loss.
_LOSS_STYLES = {
    "loss": ("-", "loss"),
    "hard_loss": ("--", "hard loss (CE)"),
    "soft_loss": (":", "soft loss (divergence)"),
}


def plot_run(metrics_path: str | Path, png_path: str | Path) -> None:
    """Plot a run's metrics file to a PNG (``RUN_PLOT_PIXELS``), atomically.

    Train records are drawn against the global step: stages are chained in file order, a
    stage's global steps continuing from the last global step of the stage before it, and a
    dashed line with the stage's name marks where each stage starts. Top left: ``loss``, one
    colour per stage; a KD stage (one whose records have ``soft_loss``) also shows its
    ``hard_loss`` (dashed) and ``soft_loss`` (dotted; for SFT the hard loss is the loss). Top
    right: the last eval record of each stage, accuracies (``acc*`` keys, in percent, left axis)
    and losses (``loss*`` keys, dashed, right axis). Bottom left: the KD health statistics
    (``kd_health.HEALTH_KEYS``, fractions), one colour per statistic. Bottom right:
    ``tokens_per_s``. Panels without data say so.

    Uses ``matplotlib.figure.Figure`` with the Agg canvas, never pyplot, so it opens no window
    and leaves pyplot's global state (backend, current figure) alone.

    Raises:
        FileNotFoundError / MetricsError: from ``read_metrics``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path)
    width, height = RUN_PLOT_PIXELS
    fig = Figure(figsize=(width / 100, height / 100), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    (loss_ax, eval_ax), (health_ax, speed_ax) = fig.subplots(2, 2, width_ratios=(3, 2))
    runs = _stage_runs([r for r in records if r["kind"] == "train"])
    _plot_train_loss(loss_ax, runs)
    _plot_stage_evals(eval_ax, [r for r in records if r["kind"] == "eval"])
    _plot_health(health_ax, runs)
    _plot_tokens_per_s(speed_ax, runs)
    fig.suptitle(Path(metrics_path).resolve().parent.name or str(metrics_path))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(Path(png_path), buffer.getvalue())


def plot_replicates(summary: dict[str, Any], png_path: str | Path) -> None:
    """Bar chart of a run across seeds (``replicates.aggregate_summaries``'s summary), as PNG.

    One group per stage, one bar per eval mode: the mean accuracy over seeds in percent, the
    error bar one standard deviation, each seed's figure a dot on its bar.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stages = summary["stages"]
    modes = [m for m in ("reasoning", "fast") if any(m in s["accuracy"] for s in stages)]
    fig = Figure(figsize=(max(6.0, 1.1 * len(stages) + 2), 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / max(len(modes), 1)
    for j, mode in enumerate(modes):
        xs, means, stds, dots = [], [], [], []
        for i, stage in enumerate(stages):
            spread = stage["accuracy"].get(mode)
            if spread is None:
                continue
            x = i + (j - (len(modes) - 1) / 2) * width
            xs.append(x)
            means.append(100 * spread["mean"])
            stds.append(100 * spread["std"])
            dots += [(x, 100 * v) for v in spread["per_seed"]]
        ax.bar(xs, means, width * 0.9, yerr=stds, capsize=3, label=f"accuracy ({mode})")
        if dots:
            ax.plot(*zip(*dots, strict=True), "k.", markersize=3)
    ax.set_xticks(range(len(stages)), [s["stage"] for s in stages], rotation=25, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"mean over seeds {summary['seeds']}, error bars one std, dots per seed")
    ax.grid(True, axis="y", alpha=0.3)
    if modes:
        ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(Path(png_path), buffer.getvalue())


def _by_stage(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Records grouped by stage, stages in order of first appearance (dicts keep it)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(record["stage"], []).append(record)
    return groups


def _number(value: Any) -> float:
    """A metric value as a float; None and non-numbers (not plottable) as NaN."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return math.nan
    return float(value)


def _no_data(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


@dataclass
class _StageRun:
    """One stage's train records and their global steps."""

    stage: str
    records: list[dict[str, Any]]
    steps: list[int]

    def series(self, key: str) -> list[float]:
        return [_number(r.get(key)) for r in self.records]

    def has(self, key: str) -> bool:
        return any(not math.isnan(v) for v in self.series(key))


def _stage_runs(train: list[dict[str, Any]]) -> list[_StageRun]:
    """The train records by stage, in file order, each stage's steps following the last global
    step of the stages before it."""
    runs, offset = [], 0
    for stage, stage_records in _by_stage(train).items():
        steps = [offset + r["step"] for r in stage_records]
        runs.append(_StageRun(stage, stage_records, steps))
        offset = max(offset, *steps)
    return runs


def _stage_axis(ax: Any, runs: list[_StageRun], ylabel: str) -> None:
    """The global-step axis every train panel shares: stage starts marked, limits from 0."""
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    colours = colormaps["tab10"]
    last = 0
    for i, run in enumerate(runs):
        start = (run.steps[0] - run.records[0]["step"]) + 0.5
        if i > 0:
            ax.axvline(start, color="0.5", linestyle="--", linewidth=0.8)
        ax.text(
            start,
            0.98,
            f" {run.stage}",
            transform=ax.get_xaxis_transform(),
            ha="left",
            va="top",
            fontsize=8,
            color=colours(i % colours.N),
            in_layout=False,
        )
        last = max(last, *run.steps)
    # From 0 so every stage label sits inside the panel, also for a single point.
    ax.set_xlim(0, last + max(0.5, 0.02 * last))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("global step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def _line(ax: Any, run: _StageRun, key: str, **style: Any) -> list[Any]:
    # A marker keeps a one-point stage visible; on long stages markers would be clutter.
    marker = "o" if len(run.steps) < 30 else None
    return ax.plot(run.steps, run.series(key), marker=marker, markersize=3, linewidth=1.2, **style)


def _plot_train_loss(ax: Any, runs: list[_StageRun]) -> None:
    ax.set_title("training loss")
    if not runs:
        _no_data(ax, "no training records yet")
        return
    from matplotlib import colormaps
    from matplotlib.lines import Line2D

    colours = colormaps["tab10"]
    kd = False
    for i, run in enumerate(runs):
        keys = ["loss"]
        if run.has("soft_loss"):
            keys += ["hard_loss", "soft_loss"]
            kd = True
        for key in keys:
            _line(ax, run, key, color=colours(i % colours.N), linestyle=_LOSS_STYLES[key][0])
    _stage_axis(ax, runs, "loss")
    if kd:
        handles = [
            Line2D([], [], color="0.3", linestyle=style, label=label)
            for style, label in _LOSS_STYLES.values()
        ]
        ax.legend(handles=handles, fontsize=8, loc="upper right", bbox_to_anchor=(1, 0.92))


def _plot_health(ax: Any, runs: list[_StageRun]) -> None:
    ax.set_title("KD health (top-K agreement with the teacher's cache)")
    shown = [run for run in runs if any(run.has(key) for key in HEALTH_KEYS)]
    if not shown:
        _no_data(ax, "no KD health statistics (no KD stage with a top-K cache yet)")
        return
    from matplotlib import colormaps

    # One colour per statistic, from another palette than the stages' (the stage is told by
    # the markers along the axis).
    colours = colormaps["Dark2"]
    labelled: set[str] = set()
    for run in shown:
        for j, key in enumerate(HEALTH_KEYS):
            if run.has(key):
                label = None if key in labelled else key.replace("_", " ")
                labelled.add(key)
                _line(ax, run, key, color=colours(j % colours.N), label=label)
    _stage_axis(ax, runs, "fraction")
    ax.set_ylim(-0.02, 1.05)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)


def _plot_tokens_per_s(ax: Any, runs: list[_StageRun]) -> None:
    ax.set_title("throughput")
    shown = [(i, run) for i, run in enumerate(runs) if run.has("tokens_per_s")]
    if not shown:
        _no_data(ax, "no throughput records yet")
        return
    from matplotlib import colormaps

    colours = colormaps["tab10"]
    for i, run in shown:
        _line(ax, run, "tokens_per_s", color=colours(i % colours.N))
    _stage_axis(ax, runs, "tokens / s (all ranks)")
    ax.set_ylim(bottom=0)


def _plot_stage_evals(ax: Any, evals: list[dict[str, Any]]) -> None:
    ax.set_title("eval at stage end")
    last = [stage_records[-1] for stage_records in _by_stage(evals).values()]
    acc_keys = _metric_keys(last, "acc")
    loss_keys = _metric_keys(last, "loss")
    if not acc_keys and not loss_keys:
        _no_data(ax, "no eval records yet")
        return
    from matplotlib import colormaps

    # One colour per series across both y axes: a twin axis would restart the colour cycle.
    colours = colormaps["tab10"]
    xs = list(range(len(last)))
    handles = []
    for i, key in enumerate(acc_keys):
        ys = [100.0 * _number(r.get(key)) for r in last]
        label = _series_label(key, "accuracy")
        handles += ax.plot(xs, ys, marker="o", color=colours(i % colours.N), label=label)
    ax.set_ylabel("accuracy (%)")
    if loss_keys:
        loss_ax = ax.twinx()
        loss_ax.set_ylabel("eval loss")
        for i, key in enumerate(loss_keys, start=len(acc_keys)):
            ys = [_number(r.get(key)) for r in last]
            label = _series_label(key, "eval loss")
            handles += loss_ax.plot(
                xs, ys, marker="s", linestyle="--", color=colours(i % colours.N), label=label
            )
    ax.set_xticks(xs, [r["stage"] for r in last], rotation=20, ha="right", fontsize=8)
    ax.set_xlim(-0.5, len(last) - 0.5)
    ax.grid(True, alpha=0.3)
    # Below the panel: "best" placement cannot see the twin axis' lines and would cover them.
    ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)


def _metric_keys(records: list[dict[str, Any]], prefix: str) -> list[str]:
    """Keys ``prefix`` or ``prefix_*`` holding a number in any record, in first-seen order."""
    keys: dict[str, None] = {}
    for record in records:
        for key, value in record.items():
            if (key == prefix or key.startswith(prefix + "_")) and not math.isnan(_number(value)):
                keys[key] = None
    return list(keys)


def _series_label(key: str, name: str) -> str:
    _, _, mode = key.partition("_")
    return f"{name} ({mode})" if mode else name
