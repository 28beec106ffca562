"""``python -m fastmtl compare``: independent single-task models against MTL methods on one data set,
all from the same initial weights and batches; a table of per-task test metrics, Delta_m% and the
time per step, as Markdown and JSON, and a PNG chart."""

from __future__ import annotations

import os
import time

from .. import plots
from ..metrics import HIGHER_IS_BETTER, METRICS_BY_KIND, delta_m
from .common import (add_command, load_data, output_dir, progress_bar, run_settings,
                     training_config, write_json)
from .names import METHODS, argument_type
from .training import steps_per_run, train_run, train_single_task_baselines

DEFAULT_METHODS = ("EW", "UW", "DWA", "MGDA", "PCGrad", "CAGrad", "UPGrad", "NashMTL", "FAMO")
# The default methods on multidigits take ~90 s on the 2-core CI machine while shared with other
# jobs: room to spare under the five minutes the command promises.
DEFAULT_EPOCHS = 30
_METRIC_LABELS = {"accuracy": "acc. %", "rmse": "RMSE", "mae": "MAE"}


def add_parser(subparsers) -> None:
    def methods_option(parser):
        parser.add_argument("--methods", type=argument_type("method", METHODS), nargs="+",
                            default=list(DEFAULT_METHODS),
                            help=f"fastmtl.aggregation / fastmtl.weighting classes, any case (default: "
                                 f"{' '.join(DEFAULT_METHODS)}; all: {', '.join(METHODS.values())})")
    parser = add_command(subparsers, "compare", "single-task baselines against MTL methods: metrics, Δm%%, ms per "
                         "step (Markdown, JSON, PNG)", __doc__, "runs/compare-<data>", methods_option,
                         default_epochs=DEFAULT_EPOCHS)
    parser.set_defaults(handler=run)


def _row(result, baseline_metrics) -> dict:
    return {"label": result.label, "method": result.method, "metrics": result.metrics,
            "delta_m": delta_m(result.metrics, baseline_metrics), "step_ms": result.step_ms,
            "train_seconds": result.train_seconds}


def _format(metric: str, value: float) -> str:
    return f"{100 * value:.2f}" if metric == "accuracy" else f"{value:.4f}"


def markdown_table(rows, tasks) -> str:
    """The comparison as a Markdown table: one row per method, a column per task metric (↑ higher is
    better, ↓ lower), then Δm% and the median ms per training step; the best MTL value in bold."""
    columns = [(t.name, m) for t in tasks for m in METRICS_BY_KIND[t.kind]]
    header = ["method"] + [f"{task} {_METRIC_LABELS[m]} {'↑' if HIGHER_IS_BETTER[m] else '↓'}" for task, m in columns]
    header += ["Δm% ↑", "ms/step"]
    mtl = [row for row in rows if row["method"] != "single-task"]

    def is_best(row, score) -> bool:
        return row in mtl and score(row) == max(score(r) for r in mtl)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["label"]]
        for task, metric in columns:
            value = row["metrics"][task][metric]
            sign = 1 if HIGHER_IS_BETTER[metric] else -1
            top = is_best(row, lambda r: sign * r["metrics"][task][metric])
            cells.append(f"**{_format(metric, value)}**" if top else _format(metric, value))
        top = is_best(row, lambda r: r["delta_m"])
        cells.append(f"**{row['delta_m']:+.2f}**" if top else f"{row['delta_m']:+.2f}")
        cells.append(f"{row['step_ms']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args) -> int:
    config = training_config(args)
    train, test = load_data(args)
    out = output_dir(args.out or os.path.join("runs", f"compare-{args.data}"))
    methods = list(dict.fromkeys(args.methods))  # each once, in the order given
    total = steps_per_run(train, config) * (len(train.tasks) + len(methods))
    started = time.perf_counter()
    with progress_bar(total, args, f"compare on {args.data}") as bar:
        baseline = train_single_task_baselines(train, test, config, progress=bar)
        results = [baseline] + [train_run(m, m, train, test, config, progress=bar) for m in methods]
    seconds = time.perf_counter() - started

    rows = [_row(result, baseline.metrics) for result in results]
    table = markdown_table(rows, train.tasks)
    settings = (f"{args.data}, {len(train)} train / {len(test)} test samples, trunk {list(config.hidden)} "
                f"({config.activation}), {config.epochs} epochs of batch {config.batch_size}, Adam lr {config.lr}, "
                f"mode {config.mode}, seed {config.seed}, {args.threads} thread(s); single-task ms/step: the "
                f"{len(train.tasks)} models' steps together")
    with open(os.path.join(out, "comparison.md"), "w") as f:
        f.write(f"{table}\n\n{settings}. Total {seconds:.0f} s.\n")
    write_json(os.path.join(out, "comparison.json"), {
        "command": "compare", "settings": run_settings(args), "tasks": train.task_names, "rows": rows,
        "total_seconds": seconds,
    })
    plots.comparison_chart(rows, os.path.join(out, "comparison.png"),
                           title=f"{args.data}: MTL methods against single-task models")
    print(table)
    print(f"\n{settings}.")
    print(f"{seconds:.0f} s in all; wrote {out}/comparison.md, comparison.json, comparison.png")
    return 0
