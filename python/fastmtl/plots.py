"""The pictures of the command line: training curves, the tasks' gradient cosine similarities, and the
comparison chart. matplotlib's object-oriented API (``Figure`` + Agg canvas) draws straight to PNG
files, leaving pyplot's global backend alone for whoever imported it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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


def training_curves(
    step_losses: Sequence[Sequence[float]],
    task_names: Sequence[str],
    path: str,
    title: str = "",
    steps_per_epoch: int = 0,
) -> None:
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


REGIME_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd")


def comparison_chart(regimes: Sequence[Mapping], speed, path: str, title: str = "") -> None:
    """The compare command's chart. Top: Delta_m% of every MTL method against the single-task models
    (the line at 0), one bar per regime, values written on the bars. Bottom (when ``speed`` is given):
    each aggregator's ms per step done by fastmtl and the usual way (LibMTL's loop), how many times
    faster, and the plain summed-loss step as a dashed line.

    ``regimes``: ``[{"regime": name, "rows": [{"label", "method", "delta_m"}, ...]}, ...]``;
    ``speed``: the dict of :func:`fastmtl.cli.speed.time_steps` or None."""
    labels = list(dict.fromkeys(row["label"] for r in regimes for row in r["rows"] if row["method"] != "single-task"))
    panels = 2 if speed else 1
    speed_height = 0.55 * len(speed["rows"]) + 1.8 if speed else 0.0
    figure = _figure(max(8.0, 0.95 * len(labels) + 2.5), 4.6 + speed_height + 0.6)
    grid = figure.add_gridspec(panels, 1, height_ratios=[4.6, speed_height] if speed else [1])
    delta = figure.add_subplot(grid[0])
    width = 0.8 / max(1, len(regimes))
    for k, regime in enumerate(regimes):
        by_label = {row["label"]: row["delta_m"] for row in regime["rows"]}
        xs = [i + (k - (len(regimes) - 1) / 2) * width for i in range(len(labels))]
        values = [by_label.get(label, float("nan")) for label in labels]
        bars = delta.bar(
            xs, values, width=width * 0.95, color=REGIME_COLORS[k % len(REGIME_COLORS)], label=regime["regime"]
        )
        for bar, value in zip(bars, values):
            if value == value:  # not NaN
                delta.annotate(
                    f"{value:+.1f}",
                    (bar.get_x() + bar.get_width() / 2, value),
                    ha="center",
                    va="bottom" if value >= 0 else "top",
                    fontsize=7,
                    xytext=(0, 2 if value >= 0 else -2),
                    textcoords="offset points",
                )
    delta.axhline(0, color="black", linewidth=1.2)
    delta.text(
        1.0, 0, " single-task\n models", transform=delta.get_yaxis_transform(), va="center", ha="left", fontsize=8
    )
    crowded = len(labels) > 6 or max((len(label) for label in labels), default=0) > 9  # would overlap flat
    delta.set_xticks(range(len(labels)), labels, rotation=30 if crowded else 0, ha="right" if crowded else "center")
    delta.set_ylabel("Δm% vs one model per task (↑ better)")
    delta.set_title("multi-task performance: above 0, MTL beats the single-task models", fontsize=10)
    low, high = delta.get_ylim()
    delta.set_ylim(low - 0.08 * (high - low), high + 0.08 * (high - low))  # room for the value labels
    delta.grid(axis="y", alpha=0.3)
    if len(regimes) > 1:  # one regime: the title and the table say which
        delta.legend(loc="best", fontsize=8)
    if speed:
        axes = figure.add_subplot(grid[1])
        rows = speed["rows"]
        ys = list(range(len(rows)))
        axes.barh(
            [y + 0.2 for y in ys],
            [r["loop_ms"] for r in rows],
            height=0.38,
            color="#aaaaaa",
            label="usual way: T backward passes (LibMTL loop)",
        )
        axes.barh([y - 0.2 for y in ys], [r["fastmtl_ms"] for r in rows], height=0.38, color="#d62728", label="fastmtl")
        for y, r in zip(ys, rows):
            axes.annotate(
                f"{r['times_faster']:.2f}× faster",
                (max(r["loop_ms"], r["fastmtl_ms"]), y),
                va="center",
                xytext=(4, 0),
                textcoords="offset points",
                fontsize=8,
                fontweight="bold",
            )
        axes.axvline(
            speed["plain_ms"],
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"plain summed-loss step ({speed['plain_ms']:.1f} ms)",
        )
        axes.set_yticks(ys, [r["method"] for r in rows])
        axes.invert_yaxis()
        axes.set_xlabel("ms per training step (median, interleaved)")
        axes.set_xlim(0, 1.25 * max(max(r["loop_ms"], r["fastmtl_ms"]) for r in rows))
        axes.set_title("time per step of each gradient method", fontsize=10)
        axes.grid(axis="x", alpha=0.3)
        axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8, frameon=False)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path)
