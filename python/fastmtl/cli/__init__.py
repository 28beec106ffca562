"""The command line, ``python -m fastmtl <command>``: one module per command.

  train    one MTL method on a data set: metrics JSON, training curves, gradient cosine heatmap
  compare  single-task baselines against MTL methods in label-rich and label-scarce regimes: tables of
           metrics, Δm% and ms per step; every aggregator's step against the LibMTL loop ("x faster")
  bench    the micro-benchmarks of bench/ at a small size

Needs the apps extra (scikit-learn, matplotlib, tqdm): ``pip install "fastmtl-torch[apps]"``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from . import bench, compare, train

COMMANDS = (train, compare, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastmtl",
        description="fastmtl: multi-task learning on real data.",
        epilog="`python -m fastmtl <command> --help` documents each command's options.",
    )
    subparsers = parser.add_subparsers(title="commands", dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line on ``argv`` (default: sys.argv[1:]) and returns the exit status. Bad
    option values end with argparse's usage message (exit status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()  # --threads is for the command, not for the caller's process
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as error:
        parser.error(f"{args.command}: {error}")
    except ImportError as error:  # an optional dependency of the apps is missing: say which extra
        parser.exit(1, f"{parser.prog} {args.command}: {error}\n")
    finally:
        torch.set_num_threads(threads)
