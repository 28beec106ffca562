"""``python -m fastmtl compare``: independent single-task models against MTL methods on one data set,
in a label-rich and a label-scarce regime, all from the same initial weights and batches; a table
of per-task test metrics, Delta_m% and the time per step per regime, the time per step of every
gradient method against the same method done the usual way, as Markdown and JSON, and a PNG chart.

Where MTL is known to pay and where not: with every task fully labelled (label-rich) one model per
task has T times the parameters and all the data it needs, and usually wins; with each task
labelled on its own small subset (label-scarce) a shared trunk learns from every task's labels,
which no single-task model sees."""

from __future__ import annotations

import dataclasses
import math
import os
import time

from .. import plots
from ..metrics import HIGHER_IS_BETTER, delta_m
from . import speed as speed_comparison
from .common import (
    add_command,
    data_defaults,
    load_data,
    output_dir,
    positive_int,
    progress_bar,
    run_settings,
    training_config,
    write_json,
)
from .names import METHODS, argument_type, is_aggregator
from .training import ARCHITECTURES, steps_per_run, train_run, train_single_task_baselines

DEFAULT_METHODS = ("EW", "UW", "DWA", "MGDA", "PCGrad", "CAGrad", "UPGrad", "NashMTL", "FAMO")
REGIMES = {"rich": "label-rich", "scarce": "label-scarce"}
# The scarce regime's labels: 500 per task, 5% of multidigits' 10,000 pairs (~50 per class of the
# 10-class tasks), each task on its own rows: few enough that one model per task is short of
# labels, the setting of the semi-supervised and multi-task literature; fixed before any run.
DEFAULT_LABELS_PER_TASK = 500
# Interleaved rounds of the speed comparison: every variant steps once per round; medians of 20
# steps are stable to a few percent here, and all variants' rounds cost ~5 s on the 2-core machine.
DEFAULT_SPEED_ROUNDS = 20
_METRIC_LABELS = {"accuracy": "acc. %", "auc": "AUC", "rmse": "RMSE", "mae": "MAE"}
_ARCHS = {name.lower(): name for name in ARCHITECTURES}


def add_parser(subparsers) -> None:
    def methods_option(parser):
        parser.add_argument(
            "--methods",
            type=argument_type("method", METHODS),
            nargs="+",
            default=None,
            help=f"fastmtl.aggregation / fastmtl.weighting classes, any case (default: "
            f"{' '.join(DEFAULT_METHODS)}; recommender: EW UPGrad; all: "
            f"{', '.join(METHODS.values())})",
        )
        parser.add_argument(
            "--regimes",
            type=argument_type("regime", {r: r for r in REGIMES}),
            nargs="+",
            default=None,
            help="rich: the data set's labels as they are; scarce: each task labelled on its own "
            "--labels-per-task rows (default: rich scarce; recommender: rich, its conversion "
            "labels are scarce already)",
        )
        parser.add_argument(
            "--labels-per-task",
            type=positive_int,
            default=DEFAULT_LABELS_PER_TASK,
            help=f"the scarce regime's labelled rows per task, disjoint across tasks; it is trained "
            f"for as many steps as the rich one (default: {DEFAULT_LABELS_PER_TASK})",
        )
        parser.add_argument(
            "--archs",
            type=argument_type("architecture", _ARCHS),
            nargs="+",
            default=None,
            help=f"trunks to train each method with: {', '.join(ARCHITECTURES)} (default: "
            f"SharedBottom; recommender: all three)",
        )
        parser.add_argument(
            "--speed-rounds",
            type=int,
            default=None,
            help=f"rounds of the interleaved speed comparison of every aggregator's step against "
            f"the LibMTL loop and the plain step, 0 for none (default: {DEFAULT_SPEED_ROUNDS}; "
            f"recommender: 0, its trunk is not a FusedMLP)",
        )

    parser = add_command(
        subparsers,
        "compare",
        "single-task baselines against MTL methods in label-rich and "
        "label-scarce regimes; each method's step against the usual way (Markdown, JSON, PNG)",
        __doc__,
        "runs/compare-<data>",
        methods_option,
        default_epochs=None,
    )
    parser.set_defaults(handler=run)


def compare_defaults(args) -> None:
    """Fills the options left unset with the data set's defaults (see common.DATA_DEFAULTS)."""
    recommender = args.data == "recommender"
    if args.methods is None:
        args.methods = ["EW", "UPGrad"] if recommender else list(DEFAULT_METHODS)
    if args.regimes is None:
        args.regimes = ["rich"] if recommender else list(REGIMES)
    if args.archs is None:
        args.archs = list(ARCHITECTURES) if recommender else ["SharedBottom"]
    if args.speed_rounds is None:
        args.speed_rounds = 0 if recommender else DEFAULT_SPEED_ROUNDS
    if args.speed_rounds < 0:
        raise ValueError(f"argument --speed-rounds expected an int >= 0, got {args.speed_rounds}")
    if args.speed_rounds and (args.archs != ["SharedBottom"] or recommender):
        raise ValueError(
            "argument --speed-rounds: the speed comparison needs the SharedBottom trunk on dense "
            "features (--archs SharedBottom, not the recommender); pass --speed-rounds 0"
        )


def _row(result, baseline_metrics, regime: str, arch: str) -> dict:
    return {
        "label": result.label,
        "method": result.method,
        "arch": arch,
        "regime": regime,
        "metrics": result.metrics,
        "delta_m": delta_m(result.metrics, baseline_metrics),
        "step_ms": result.step_ms,
        "train_seconds": result.train_seconds,
    }


def _format(metric: str, value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{100 * value:.2f}" if metric == "accuracy" else f"{value:.4f}"


def markdown_table(rows, tasks, metrics) -> str:
    """The comparison as a Markdown table: one row per method, a column per task metric (↑ higher is
    better, ↓ lower; ``metrics``: task name -> metric names), then Δm% and the median ms per training
    step; the best MTL value in bold."""
    columns = [(t.name, m) for t in tasks for m in metrics[t.name]]
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
            top = is_best(row, lambda r, sign=sign, task=task, metric=metric: sign * r["metrics"][task][metric])
            cells.append(f"**{_format(metric, value)}**" if top else _format(metric, value))
        top = is_best(row, lambda r: r["delta_m"])
        cells.append(f"**{row['delta_m']:+.2f}**" if top else f"{row['delta_m']:+.2f}")
        cells.append(f"{row['step_ms']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def regime_data(train, regime: str, args):
    """The training set of a regime: as loaded (rich), or each task on its own rows (scarce)."""
    if regime == "rich":
        return train
    return train.with_task_subsets(args.labels_per_task, seed=args.seed)


def regime_config(config, train, rich_train):
    """The scarce regime trains for as many steps as the rich one (its epochs scaled up), so that
    the regimes differ in their labels, not in the training they get."""
    rich_steps = steps_per_run(rich_train, config)
    per_epoch = -(-len(train) // config.batch_size)
    return dataclasses.replace(config, epochs=max(1, round(rich_steps / per_epoch)))


def run(args) -> int:
    data_defaults(args)
    compare_defaults(args)
    config = training_config(args)
    out = output_dir(args.out or os.path.join("runs", f"compare-{args.data}"))  # before the data
    rich_train, test = load_data(args)
    methods = list(dict.fromkeys(args.methods))  # each once, in the order given
    archs = list(dict.fromkeys(args.archs))
    aggregators = [m for m in methods if is_aggregator(m)]
    plans = []
    for regime in dict.fromkeys(args.regimes):
        train = regime_data(rich_train, regime, args)
        plans.append((regime, train, regime_config(config, train, rich_train)))
    total = sum(steps_per_run(train, cfg) * (len(train.tasks) + len(archs) * len(methods)) for _, train, cfg in plans)
    speed_rounds = args.speed_rounds if aggregators else 0
    total += speed_rounds + speed_comparison.WARMUP_ROUNDS if speed_rounds else 0

    started = time.perf_counter()
    sections, all_rows, speed = [], [], None
    with progress_bar(total, args, f"compare on {args.data}") as bar:
        for regime, train, cfg in plans:
            baseline = train_single_task_baselines(train, test, cfg, progress=bar)
            rows = [_row(baseline, baseline.metrics, regime, "SharedBottom")]
            for arch in archs:
                arch_cfg = _with_arch(cfg, arch)
                for m in methods:
                    label = m if len(archs) == 1 else f"{arch} {m}"
                    result = train_run(label, m, train, test, arch_cfg, progress=bar)
                    rows.append(_row(result, baseline.metrics, regime, arch))
            sections.append((regime, train, cfg, rows))
            all_rows += rows
        if speed_rounds:
            speed = speed_comparison.time_steps(rich_train, aggregators, config, speed_rounds, progress=bar)
    seconds = time.perf_counter() - started

    text, chart_regimes = [], []
    for regime, train, cfg, rows in sections:
        labelled = train.labelled_counts()
        title = (
            f"**{REGIMES[regime]}**: {len(train)} training rows, labelled per task "
            + ", ".join(f"{name} {count}" for name, count in labelled.items())
            + f"; {cfg.epochs} epochs ({steps_per_run(train, cfg)} steps)"
        )
        table = markdown_table(rows, train.tasks, train.metrics)
        text.append(f"{table}\n\n{title}.\n")  # the caption below: the file starts with the first table
        chart_regimes.append({"regime": REGIMES[regime], "rows": rows})
    if speed is not None:
        text.append(
            f"{speed_comparison.markdown_table(speed)}\n\n**Time per step**: fastmtl against the same "
            f"method done the usual way (LibMTL's T backward passes over a retained graph, plain PyTorch "
            f"model) and the plain summed-loss step; medians of {speed['rounds']} interleaved steps, batch "
            f"{speed['batch_size']}.\n"
        )
    settings = (
        f"{args.data}, {len(rich_train)} train / {len(test)} test samples, trunk {list(config.hidden)} "
        f"({config.activation}; {', '.join(archs)}), batch {config.batch_size}, Adam lr {config.lr}, "
        f"mode {config.mode}, seed {config.seed}, {args.threads} thread(s); single-task: one SharedBottom "
        f"model per task, ms/step the {len(rich_train.tasks)} models' steps together"
    )
    report = "\n".join(text) + f"\n{settings}. Total {seconds:.0f} s.\n"
    with open(os.path.join(out, "comparison.md"), "w") as f:
        f.write(report)
    write_json(
        os.path.join(out, "comparison.json"),
        {
            "command": "compare",
            "settings": run_settings(args),
            "tasks": rich_train.task_names,
            "metrics": rich_train.metrics,
            "rows": all_rows,
            "speed": speed,
            "total_seconds": seconds,
        },
    )
    plots.comparison_chart(
        chart_regimes,
        speed,
        os.path.join(out, "comparison.png"),
        title=f"{args.data}: MTL methods against one model per task",
    )
    print(report)
    print(f"{seconds:.0f} s in all; wrote {out}/comparison.md, comparison.json, comparison.png")
    return 0


def _with_arch(config, arch: str):
    return dataclasses.replace(config, arch=arch)
