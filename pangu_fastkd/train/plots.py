"""The run's plot (``curves.png``): training loss by global step and each stage's last eval."""

from __future__ import annotations

import io
import math
import numbers
from pathlib import Path
from typing import Any

from ..durable import atomic_write_bytes
from .metrics import read_metrics

__all__ = ["plot_replicates", "plot_run"]


def plot_run(metrics_path: str | Path, png_path: str | Path) -> None:
    """Plot a run's metrics file to a PNG (1100 x 450 pixels), atomically.

    Left panel: training ``loss`` against the global step, one colour per stage, with a dashed
    line and the stage's name where each stage starts. Stages are chained in file order: a
    stage's global steps continue from the last global step of the stage before it. Right
    panel: the last eval record of each stage, accuracies (``acc*`` keys, in percent, left axis)
    and losses (``loss*`` keys, dashed, right axis). Panels without data say so.

    Uses ``matplotlib.figure.Figure`` with the Agg canvas, never pyplot, so it opens no window
    and leaves pyplot's global state (backend, current figure) alone.

    Raises:
        FileNotFoundError / MetricsError: from ``read_metrics``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path)
    fig = Figure(figsize=(11, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, eval_ax = fig.subplots(1, 2, width_ratios=(3, 2))
    _plot_train_loss(loss_ax, [r for r in records if r["kind"] == "train"])
    _plot_stage_evals(eval_ax, [r for r in records if r["kind"] == "eval"])
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


def _plot_train_loss(ax: Any, train: list[dict[str, Any]]) -> None:
    ax.set_title("training loss")
    if not train:
        _no_data(ax, "no training records yet")
        return
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    colours = colormaps["tab10"]
    offset = 0
    for i, (stage, stage_records) in enumerate(_by_stage(train).items()):
        xs = [offset + r["step"] for r in stage_records]
        ys = [_number(r.get("loss")) for r in stage_records]
        colour = colours(i % colours.N)
        # A marker keeps a one-point stage visible; on long stages markers would be clutter.
        marker = "o" if len(xs) < 30 else None
        ax.plot(xs, ys, color=colour, marker=marker, markersize=3, linewidth=1.2, label=stage)
        start = offset + 0.5
        if i > 0:
            ax.axvline(start, color="0.5", linestyle="--", linewidth=0.8)
        ax.text(
            start,
            0.98,
            f" {stage}",
            transform=ax.get_xaxis_transform(),
            ha="left",
            va="top",
            fontsize=8,
            color=colour,
            in_layout=False,
        )
        offset = max(offset, *xs)
    # From 0 so every stage label sits inside the panel, also for a single point.
    ax.set_xlim(0, offset + max(0.5, 0.02 * offset))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("global step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)


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
