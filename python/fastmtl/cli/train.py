"""``python -m fastmtl train``: one MTL method on one data set; per-task test metrics as JSON, the
per-task training curves and the tasks' gradient cosine similarities as PNGs."""

from __future__ import annotations

import os

from .. import plots
from .common import (
    add_command,
    data_defaults,
    load_data,
    output_dir,
    progress_bar,
    run_settings,
    training_config,
    write_json,
)
from .names import METHODS, argument_type
from .training import ARCHITECTURES, steps_per_run, train_run

GRAM_STATS_EVERY = 10  # weightings compute no Gram matrix: take one every this many steps for the heatmap


def add_parser(subparsers) -> None:
    def method_option(parser):
        parser.add_argument(
            "--method",
            type=argument_type("method", METHODS),
            default="UPGrad",
            help=f"a fastmtl.aggregation or fastmtl.weighting class, any case: "
            f"{', '.join(METHODS.values())} (default: UPGrad)",
        )
        parser.add_argument(
            "--arch",
            type=argument_type("architecture", {a.lower(): a for a in ARCHITECTURES}),
            default="SharedBottom",
            help=f"the trunk: {', '.join(ARCHITECTURES)} (default: SharedBottom)",
        )

    parser = add_command(
        subparsers,
        "train",
        "train one MTL method; write metrics JSON, training curves and gradient cosine PNGs",
        __doc__,
        "runs/train-<data>-<method>",
        method_option,
    )
    parser.set_defaults(handler=run)


def run(args) -> int:
    data_defaults(args)
    config = training_config(args, gram_stats_every=GRAM_STATS_EVERY)
    out = output_dir(args.out or os.path.join("runs", f"train-{args.data}-{args.method}"))  # before the data
    train, test = load_data(args)
    with progress_bar(steps_per_run(train, config), args, f"train {args.method}") as bar:
        result = train_run(args.method, args.method, train, test, config, progress=bar)

    steps_per_epoch = result.steps // config.epochs
    title = f"{args.method} ({args.mode}) on {args.data}"
    plots.training_curves(
        result.step_losses,
        result.task_names,
        os.path.join(out, "training_curves.png"),
        title=title,
        steps_per_epoch=steps_per_epoch,
    )
    plots.cosine_heatmap(
        result.mean_cosine,
        result.task_names,
        os.path.join(out, "gradient_cosine.png"),
        title=f"gradient cosine, mean of {result.gram_samples} steps ({args.method})",
    )
    epoch_losses = [
        [
            sum(row[t] for row in result.step_losses[e * steps_per_epoch : (e + 1) * steps_per_epoch]) / steps_per_epoch
            for t in range(len(result.task_names))
        ]
        for e in range(config.epochs)
    ]
    write_json(
        os.path.join(out, "metrics.json"),
        {
            "command": "train",
            "settings": run_settings(args),
            "tasks": result.task_names,
            "test_metrics": result.metrics,
            "step_ms": result.step_ms,
            "steps": result.steps,
            "train_seconds": result.train_seconds,
            "epoch_train_losses": epoch_losses,
            "mean_gradient_cosine": result.mean_cosine,
            "gram_samples": result.gram_samples,
        },
    )
    print(f"{args.method} on {args.data}: {result.steps} steps, {result.step_ms:.2f} ms per step (median)")
    for task, values in result.metrics.items():
        print(f"  {task:<12} " + "  ".join(f"{name} {value:.4f}" for name, value in values.items()))
    print(f"wrote {out}/metrics.json, training_curves.png, gradient_cosine.png")
    return 0
