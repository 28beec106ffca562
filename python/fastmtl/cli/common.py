"""Options, data loading, progress bars and output files that the train and compare commands share."""

from __future__ import annotations

import argparse
import json
import math
import os

import torch

from .._optional import require
from ..data import DATASETS
from .names import DATA_SETS, MODE_NAMES, argument_type
from .training import TrainingConfig


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text}")
    return value


#: numpy's and torch's generators both take seeds in [0, 2**32 - 1] (numpy refuses negative ones).
MAX_SEED = 2**32 - 1


def seed_value(text: str) -> int:
    """--seed: an int in [0, 2**32 - 1] (the range every generator the data and model use accepts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int in [0, {MAX_SEED}], got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an int in [0, {MAX_SEED}], got {text}")
    return value


def positive_finite_float(text: str) -> float:
    """--lr: a finite float > 0 (inf or nan poisons the first step, and training would go on silently)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def device_name(text: str) -> str:
    """--device: a torch device that holds data and that this machine has (cpu; cuda[:i] with a GPU)."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu or cuda:0, got {text!r}") from None
    if device.type == "cpu":
        return text
    if device.type != "cuda":
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:index] (a device that holds data), got {text!r}")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"expected cpu: {text!r} asked for, but torch.cuda.is_available() is False")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(
            f"expected a CUDA device index < {torch.cuda.device_count()} (the GPUs visible), got {text!r}"
        )
    return text


#: Per data set: the trunk's widths, and the epochs of each command (compare trains 13 models per
#: regime and keeps its whole default run within a few minutes on the 2-core machine).
DATA_DEFAULTS = {
    "multidigits": {"hidden": [256, 256], "epochs": {"train": 30, "compare": 5}},
    "synthetic_tasks": {"hidden": [256, 256], "epochs": {"train": 30, "compare": 5}},
    # 40,000 impressions: 313 steps an epoch. 6 fields x 8 embedding dimensions (--embedding-dim:
    # room for the generator's 8 latent factors) = 48 inputs into a 64-64 trunk, a little wider than
    # its input as the 256-256 trunk is on multidigits' 128 pixels.
    "recommender": {"hidden": [64, 64], "epochs": {"train": 2, "compare": 2}},
}


def data_defaults(args) -> None:
    """Fills --hidden and --epochs, when not given, with the data set's defaults for the command."""
    defaults = DATA_DEFAULTS[args.data]
    if args.hidden is None:
        args.hidden = list(defaults["hidden"])
    if args.epochs is None:
        args.epochs = defaults["epochs"][args.command]


def add_command(
    subparsers, name: str, summary: str, doc: str, default_out: str, method_option, default_epochs=None
) -> argparse.ArgumentParser:
    """A train-like command: its method option (``method_option(parser)``), the data and training
    options, and ``--out``."""
    parser = subparsers.add_parser(name, help=summary, description=doc.split("\n\n")[0].replace("``", ""))
    method_option(parser)
    add_data_options(parser)
    add_training_options(parser, default_epochs)
    parser.add_argument("--out", default=None, help=f"output folder (default: {default_out})")
    return parser


def add_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data",
        type=argument_type("data set", DATA_SETS),
        default="multidigits",
        help=f"data set, as named in fastmtl.data: {', '.join(DATA_SETS.values())} (default: multidigits)",
    )
    group.add_argument(
        "--train-samples",
        type=positive_int,
        default=None,
        help="training samples (default: multidigits 10000, synthetic_tasks 10000, recommender 40000)",
    )
    group.add_argument(
        "--test-samples",
        type=positive_int,
        default=None,
        help="test samples (default: multidigits 2000, synthetic_tasks 2000, recommender 20000)",
    )
    group.add_argument(
        "--missing-fraction", type=float, default=0.0, help="share of each task's training labels hidden (default: 0)"
    )
    group.add_argument("--num-tasks", type=positive_int, default=2, help="synthetic_tasks: tasks (default: 2)")
    group.add_argument(
        "--correlation",
        type=float,
        default=0.5,
        help="synthetic_tasks: cosine between the tasks' weight vectors (default: 0.5)",
    )
    group.add_argument(
        "--in-features", type=positive_int, default=100, help="synthetic_tasks: input width (default: 100)"
    )


def add_training_options(parser: argparse.ArgumentParser, default_epochs=None) -> None:
    group = parser.add_argument_group("training")
    epochs_help = (
        f"default: {default_epochs}"
        if default_epochs
        else "default: "
        + ", ".join(f"{data} {d['epochs'][parser.prog.split()[-1]]}" for data, d in DATA_DEFAULTS.items())
    )
    group.add_argument("--epochs", type=positive_int, default=default_epochs, help=epochs_help)
    group.add_argument("--batch-size", type=positive_int, default=128, help="default: 128")
    group.add_argument("--lr", type=positive_finite_float, default=1e-3, help="Adam's learning rate (default: 1e-3)")
    group.add_argument(
        "--hidden",
        type=positive_int,
        nargs="+",
        default=None,
        help="widths of the trunk's layers (SharedBottom: the FusedMLP; MMoE: every expert; PLE: "
        "one level per width) (default: 256 256; recommender: 64 64)",
    )
    group.add_argument(
        "--embedding-dim",
        type=positive_int,
        default=8,
        help="data sets of categorical fields (recommender): each field's embedding width (default: 8)",
    )
    group.add_argument(
        "--activation", default="relu", help="trunk activation, as fastmtl.nn.FusedMLP names it (default: relu)"
    )
    group.add_argument(
        "--mode",
        type=argument_type("mode", MODE_NAMES),
        default="exact",
        help="aggregators' Gram matrix: exact (trunk parameters) or rep (trunk output, MGDA-UB); default: exact",
    )
    group.add_argument(
        "--gram-every",
        type=positive_int,
        default=1,
        help="aggregators: recompute the weights every k steps (default: 1)",
    )
    group.add_argument("--seed", type=seed_value, default=0, help="data, initial weights and batch order (default: 0)")
    group.add_argument(
        "--device",
        type=device_name,
        default="cpu",
        help="torch device of the model and batches (default: cpu; cuda needs a CUDA build of fastmtl)",
    )
    group.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch.set_num_threads (default: 1: at these sizes waking more threads costs more than it saves)",
    )
    group.add_argument("--no-progress", action="store_true", help="no progress bar")


def load_data(args):
    """(train, test) MultiTaskDatasets from the data options."""
    if not 0.0 <= args.missing_fraction <= 1.0 or math.isnan(args.missing_fraction):
        raise ValueError(f"argument --missing-fraction expected a number in [0, 1], got {args.missing_fraction}")
    make = DATASETS[args.data]
    if args.data == "multidigits":
        train = make("train", seed=args.seed, num_samples=args.train_samples)
        test = make("test", seed=args.seed, num_samples=args.test_samples)
    elif args.data == "recommender":
        train = make(args.train_samples, split="train", seed=args.seed)
        test = make(args.test_samples, split="test", seed=args.seed)
    else:
        shape = dict(
            in_features=args.in_features, num_tasks=args.num_tasks, correlation=args.correlation, seed=args.seed
        )
        train = make(args.train_samples or 10000, split="train", **shape)
        test = make(args.test_samples or 2000, split="test", **shape)
    if args.missing_fraction:
        train = train.with_missing_labels(args.missing_fraction, seed=args.seed)
    return train, test


def training_config(args, gram_stats_every=None) -> TrainingConfig:
    torch.set_num_threads(args.threads)
    return TrainingConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        hidden=tuple(args.hidden),
        activation=args.activation,
        mode=args.mode,
        gram_every=args.gram_every,
        seed=args.seed,
        device=args.device,
        gram_stats_every=gram_stats_every,
        arch=getattr(args, "arch", "SharedBottom"),
        embedding_dim=args.embedding_dim,
    )


def progress_bar(total: int, args, description: str):
    tqdm = require("tqdm", "the fastmtl command line").tqdm
    return tqdm(
        total=total, desc=description, unit="step", disable=args.no_progress, dynamic_ncols=True, mininterval=0.25
    )


def write_json(path: str, payload) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, allow_nan=True)
        f.write("\n")


def output_dir(path: str) -> str:
    """Makes the --out folder; a folder that cannot be made or written raises ValueError naming --out
    (the command line turns it into a usage error) before any training starts."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise ValueError(
            f"argument --out expected a folder that can be created, got {path!r} ({error.strerror})"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"argument --out expected a writable folder, got {path!r} (not writable)")
    return path


def run_settings(args) -> dict:
    """The options as JSON-friendly values, saved with the results."""
    return {key: value for key, value in vars(args).items() if key not in ("handler",)}
