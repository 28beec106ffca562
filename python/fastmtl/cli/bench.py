"""``python -m fastmtl bench``: the micro-benchmarks of the source tree's bench/ folder at their small
size (``--small``), one after another, each printing its table; their JSON goes to ``--out``."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from .common import output_dir

# What a benchmark compares against beyond fastmtl itself (the test extra installs it).
REQUIRES = {"bench_aggregation": "torchjd", "bench_mtl_step": "torchjd"}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="run bench/'s micro-benchmarks at a small size and print their tables",
        description=__doc__.split("\n\n")[0].replace("``", ""),
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        default=None,
        help="run these benchmarks only (script names without .py, e.g. bench_step)",
    )
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="skip the torch.compile baselines of the benchmarks that have them (much faster)",
    )
    parser.add_argument(
        "--bench-dir",
        default=None,
        help="the bench/ folder (default: ./bench, else the one of the source tree fastmtl runs from)",
    )
    parser.add_argument(
        "--out", default=os.path.join("runs", "bench"), help="folder for the JSON results (default: runs/bench)"
    )
    parser.set_defaults(handler=run)


def find_bench_dir(explicit=None) -> Path:
    candidates = [Path(explicit)] if explicit else [Path.cwd() / "bench", Path(__file__).resolve().parents[3] / "bench"]
    for folder in candidates:
        if (folder / "_common.py").is_file():
            return folder
    where = explicit or " or ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"no fastmtl bench/ folder at {where}: the benchmarks live in the source tree, not in the "
        f"installed package; run from a fastmtl checkout or pass --bench-dir"
    )


def _stream(command, cwd) -> int:
    """Runs ``command``, passing its output line by line through this process's sys.stdout (so that
    the tables reach whoever captures it); returns its exit status."""
    with subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as child:
        for line in child.stdout:
            print(line, end="", flush=True)
    return child.returncode


def run(args) -> int:
    folder = find_bench_dir(args.bench_dir)
    scripts = {path.stem: path for path in sorted(folder.glob("bench_*.py"))}
    names = args.only or list(scripts)
    unknown = [name for name in names if name not in scripts]
    if unknown:
        raise ValueError(f"argument --only: unknown benchmark(s) {unknown}; valid: {', '.join(scripts)}")
    output_dir(args.out)
    failed, skipped = [], []
    for name in names:
        needs = REQUIRES.get(name)
        if needs and importlib.util.find_spec(needs) is None:
            skipped.append(f'{name} (needs {needs}: pip install "fastmtl-torch[test]")')
            continue
        command = [sys.executable, str(scripts[name]), "--small", "--out", os.path.join(args.out, f"{name}.json")]
        if args.no_compile and "--no-compile" in scripts[name].read_text():
            command.append("--no-compile")
        print(f"== {name}: {' '.join(command[1:])}", flush=True)
        if _stream(command, folder.parent) != 0:
            failed.append(name)
    for line in skipped:
        print(f"skipped {line}")
    if failed:
        print(f"failed: {', '.join(failed)}")
        return 1
    return 0
