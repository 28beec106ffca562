"""The pictures of the command line: training curves, the tasks' gradient cosine similarities, and the
comparison chart. matplotlib's object-oriented API (``Figure`` + Agg canvas) draws straight to PNG
files, leaving pyplot's global backend alone for whoever imported it."""

from __future__ import annotations

from typing import Mapping, Sequence

from ._optional import require

DPI = 110


def _figure(width: float, height: float):
    figure = require("matplotlib.figure", "fastmtl.plots").Figure(figsize=(width, height), dpi=DPI)
    require("matplotlib.backends.backend_agg", "fastmtl.plots").FigureCanvasAgg(figure)
    return figure


def _moving_average(values: Sequence[float], window: int):
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def training_curves(step_losses: Sequence[Sequence[float]], task_names: Sequence[str], path: str,
                    title: str = "", steps_per_epoch: int = 0) -> None:
    """One panel per task (their losses have different scales): the loss of every step, light, and
    its moving average over ~2% of the run; epoch boundaries on the x axis when given."""
    count = len(task_names)
    figure = _figure(3.2 * count, 3.0)
    window = max(1, len(step_losses) // 50)
    for t, name in enumerate(task_names):
        axes = figure.add_subplot(1, count, t + 1)
        values = [row[t] for row in step_losses]
        steps = range(1, len(values) + 1)
        axes.plot(steps, values, color="C0", alpha=0.25, linewidth=0.6)
        axes.plot(steps, _moving_average(values, window), color="C0", linewidth=1.5)
        axes.set_title(name)
        axes.set_xlabel("step" if not steps_per_epoch else f"step ({steps_per_epoch} per epoch)")
        if t == 0:
            axes.set_ylabel("training loss")
        if values and min(values) > 0:
            axes.set_yscale("log")
        axes.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path)


def cosine_heatmap(cosine: Sequence[Sequence[float]], task_names: Sequence[str], path: str, title: str = "") -> None:
    """The tasks' gradient cosine similarities (``G_st / sqrt(G_ss G_tt)``, averaged over training) as
    a heatmap: positive where tasks pull the shared parameters the same way, negative where they fight."""
    count = len(task_names)
    figure = _figure(1.2 * count + 2.4, 1.1 * count + 1.6)
    axes = figure.add_subplot(1, 1, 1)
    image = axes.imshow(cosine, cmap="RdBu_r", vmin=-1, vmax=1)
    axes.set_xticks(range(count), task_names, rotation=30, ha="right")
    axes.set_yticks(range(count), task_names)
    for s in range(count):
        for t in range(count):
            value = cosine[s][t]
            axes.text(t, s, f"{value:.2f}", ha="center", va="center", color="white" if abs(value) > 0.6 else "black")
    figure.colorbar(image, ax=axes, label="gradient cosine similarity")
    axes.set_title(title or "task gradient cosine similarity")
    figure.tight_layout()
    figure.savefig(path)


def comparison_chart(rows: Sequence[Mapping], path: str, title: str = "") -> None:
    """Two panels over the compared methods: Delta_m% against the single-task baselines (higher is
    better) and the median time of a training step."""
    labels = [row["label"] for row in rows]
    figure = _figure(max(6.0, 0.75 * len(rows) + 3), 6.0)
    delta, speed = figure.add_subplot(2, 1, 1), figure.add_subplot(2, 1, 2)
    values = [row["delta_m"] for row in rows]
    delta.bar(labels, values, color=["C2" if v >= 0 else "C3" for v in values])
    delta.axhline(0, color="black", linewidth=0.8)
    delta.set_ylabel("Δm% vs single-task (↑)")
    speed.bar(labels, [row["step_ms"] for row in rows], color="C0")
    speed.set_ylabel("ms per training step")
    for axes in (delta, speed):
        axes.tick_params(axis="x", rotation=30)
        axes.grid(axis="y", alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path)
