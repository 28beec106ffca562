"""The harness every bench script runs on: named variants, warm-up, interleaved timing (medians of
many rounds), peak memory per variant, a same-result check against a reference variant, goals,
markdown tables, the shared command-line flags and the JSON results with the machine's description.

A benchmark builds a list of :class:`Variant` (one way of doing the same work each), checks that they
compute the same thing (:func:`check_same_result`), times them (:func:`time_variants`), and prints
and saves what it measured (:func:`markdown_table`, :func:`goals_table`, :func:`write_results`).
Flags: ``FLAGS = SharedFlags(...); args = FLAGS.parse(parser, argv)`` adds and checks ``--small
--repeats --warmup --threads --device --out`` on a parser that holds the script's own flags. A
script, in short (run as ``python bench/bench_x.py``: bench/ is on sys.path, so ``import harness``)::

    FLAGS = SharedFlags(repeats=30, warmup=5, small_repeats=5, small_warmup=1)
    args = FLAGS.parse(argparse.ArgumentParser(description="..."))
    print_header(args)
    variants = [Variant("plain", "plain PyTorch", plain_step, grads_to_none(plain), result=grads_of(plain)),
                Variant("fastmtl", "fastmtl", fused_step, grads_to_none(model), result=grads_of(model))]
    check_same_result(variants, reference="fastmtl", rtol=1e-4)
    stats = time_variants(variants, args.repeats, args.warmup, args.device)
    speedup = stats["plain"]["median_ms"] / stats["fastmtl"]["median_ms"]
    print(markdown_table(("variant", "median ms"), [(v.label, f"{stats[v.key]['median_ms']:.3f}") for v in variants]))
    print(goals_table([Goal("fastmtl vs plain", 1.5).evaluate(speedup)]))
    write_results("bench_x", args, {"stats": stats, "speedup": speedup})
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

import fastmtl
from _common import default_output_path, machine_description, write_json

# ----------------------------------------------------------------------------------------------
# variants


@dataclass
class Variant:
    """One way of running the benchmarked work.

    ``step`` is the timed call. ``reset`` runs before every call, untimed (zeroing gradients, say, so
    that a variant with many parameters is not charged for a Python loop over them). ``result`` maps
    what ``step`` returned to the tensors the same-result check compares (a dict name -> tensor, or a
    list); None keeps the variant out of the check (a GEMM floor computes nothing comparable).
    ``extra_warmup`` adds warm-up calls (compiled variants settle their caches); ``note`` is a remark
    for the table (how it was compiled, say)."""

    key: str
    label: str
    step: Callable[[], Any]
    reset: Callable[[], None] | None = None
    result: Callable[[Any], Any] | None = None
    extra_warmup: int = 0
    note: str = ""

    def run(self) -> Any:
        if self.reset is not None:
            self.reset()
        return self.step()


def grads_to_none(*owners) -> Callable[[], None]:
    """A ``reset`` that sets the gradients of these modules' (or tensors') parameters to None."""
    params = []
    for owner in owners:
        params += list(owner.parameters()) if isinstance(owner, torch.nn.Module) else list(owner)

    def reset() -> None:
        for p in params:
            p.grad = None

    return reset


def _check_keys(variants: Sequence[Variant]) -> None:
    keys = [v.key for v in variants]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"harness: variant keys must be unique, repeated: {repeated}")


# ----------------------------------------------------------------------------------------------
# timing


def timed_call(variant: Variant, device="cpu") -> float:
    """Milliseconds of one ``step`` (``reset`` before the clock starts; CUDA synchronised around,
    nothing else inside the clock: aggregation steps take microseconds)."""
    if variant.reset is not None:
        variant.reset()
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    variant.step()
    if on_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def rotated_orders(count: int, rounds: int) -> list[list[int]]:
    """The order of the variants in each round: every round runs each variant once, starting one
    further along each time, so machine noise and cache state hit all variants alike."""
    return [[(start + i) % count for i in range(count)] for start in range(rounds)]


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarise(samples: list[float]) -> dict:
    return {
        "median_ms": statistics.median(samples),
        "p10_ms": percentile(samples, 0.1),
        "p90_ms": percentile(samples, 0.9),
        "samples_ms": samples,
    }


def time_variants(variants: Sequence[Variant], repeats: int, warmup: int, device="cpu") -> dict[str, dict]:
    """Per variant key, :func:`summarise` of ``repeats`` interleaved timed calls, after ``warmup``
    (+ the variant's ``extra_warmup``) untimed ones, also interleaved."""
    _check_keys(variants)
    most = max((warmup + v.extra_warmup for v in variants), default=0)
    for round_ in range(most):
        for v in variants:
            if round_ < warmup + v.extra_warmup:
                timed_call(v, device)
    samples = {v.key: [] for v in variants}
    for order in rotated_orders(len(variants), repeats):
        for index in order:
            samples[variants[index].key].append(timed_call(variants[index], device))
    return {key: summarise(values) for key, values in samples.items()}


# ----------------------------------------------------------------------------------------------
# memory and profiles


def peak_memory_bytes(variant: Variant, device="cpu") -> int:
    """Peak bytes the variant's step allocates beyond what was allocated before it (its ``reset``
    done first). CUDA: the caching allocator's peak statistic. CPU: torch.profiler's allocation
    events (running sum of allocated minus freed bytes, its maximum): torch's CPU allocator keeps no
    peak statistic, and Python-level tracers (tracemalloc) do not see tensor memory."""
    if variant.reset is not None:
        variant.reset()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        variant.step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        variant.step()
    events = prof.profiler.kineto_results.events()
    allocations = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in allocations:
        current += nbytes
        peak = max(peak, current)
    return peak


def op_time_share(variant: Variant, op_names: Sequence[str], calls: int = 10) -> float:
    """Self CPU time spent in the named aten ops (e.g. the GEMMs) over the wall time of ``calls``
    profiled calls of the variant (``reset`` included in the wall time: it is cheap)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            variant.run()
        wall_us = (time.perf_counter() - start) * 1e6
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in op_names) / wall_us


# ----------------------------------------------------------------------------------------------
# the same-result check


def _named(outputs) -> dict[str, torch.Tensor]:
    if isinstance(outputs, Mapping):
        return dict(outputs)
    return {f"output {i}": t for i, t in enumerate(outputs)}


def check_same_result(variants: Sequence[Variant], reference: str, rtol: float, atol_scale: float | None = None):
    """Runs every variant that has a ``result`` once and compares its tensors with the reference
    variant's, in float64, so a table never compares different computations. Per tensor, atol is
    ``atol_scale`` (default rtol) times the reference tensor's largest magnitude: entries near zero
    carry rounding noise only. Raises AssertionError naming the variant and the tensor."""
    _check_keys(variants)
    outputs = {}
    for v in variants:
        if v.result is not None:
            value = v.run()
            outputs[v.key] = {name: t.detach().double().clone() for name, t in _named(v.result(value)).items()}
            if v.reset is not None:
                v.reset()
    if reference not in outputs:
        raise ValueError(f"check_same_result: reference {reference!r} is not a checked variant ({sorted(outputs)})")
    expected = outputs[reference]
    scale = rtol if atol_scale is None else atol_scale
    for key, got in outputs.items():
        if list(got) != list(expected):
            raise AssertionError(f"{key}: outputs {list(got)} differ from {reference}'s {list(expected)}")
        for name, tensor in got.items():
            want = expected[name]
            atol = scale * want.abs().max().item() if want.numel() else 0.0
            torch.testing.assert_close(
                tensor,
                want,
                rtol=rtol,
                atol=atol,
                msg=lambda m, key=key, name=name: f"{key}: {name} differs from {reference}'s\n{m}",
            )


# ----------------------------------------------------------------------------------------------
# goals and tables


@dataclass(frozen=True)
class Goal:
    """A target for a measured ratio: at least ``target`` (a speedup) or at most (a ratio to a floor)."""

    name: str
    target: float
    at_least: bool = True

    def describe(self) -> str:
        return f"{self.name} {'>=' if self.at_least else '<='} {self.target:g}x"

    def evaluate(self, measured: float | None) -> dict:
        """The goal's row: met is None where nothing was measured (a variant left out)."""
        met = None if measured is None else bool(measured >= self.target if self.at_least else measured <= self.target)
        return {"goal": self.describe(), "target": self.target, "measured": measured, "met": met}


def ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"markdown_table: a row has {len(row)} cells, the header {len(headers)}: {row}")
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def goals_table(goal_rows: Sequence[dict]) -> str:
    """goal | measured | met? of :meth:`Goal.evaluate` rows; '' where there are none."""
    if not goal_rows:
        return ""
    status = {True: "met", False: "MISSED", None: "not measured"}

    def measured(g: dict) -> str:
        text = ratio(g["measured"])
        if g["met"] is False and text == ratio(g["target"]):  # "1.00x MISSED": show by how much
            text = f"{g['measured']:.5f}x"
        return text

    return markdown_table(("goal", "measured", "met?"), [(g["goal"], measured(g), status[g["met"]]) for g in goal_rows])


# ----------------------------------------------------------------------------------------------
# flags, header, results


@dataclass(frozen=True)
class SharedFlags:
    """The flags every bench script takes, with that script's defaults."""

    repeats: int
    warmup: int
    small_repeats: int
    small_warmup: int
    devices: tuple = ("cpu",)

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--small", action="store_true", help="the smallest size and fewer rounds: a smoke run")
        parser.add_argument(
            "--repeats",
            type=int,
            help=f"timed interleaved rounds, median reported (default {self.repeats}, "
            f"{self.small_repeats} with --small)",
        )
        parser.add_argument(
            "--warmup", type=int, help=f"untimed rounds first (default {self.warmup}, {self.small_warmup} with --small)"
        )
        parser.add_argument("--threads", type=int, help="torch.set_num_threads for all variants (default: torch's)")
        parser.add_argument("--device", default="cpu", help=f"where to run: {' or '.join(self.devices)} (default cpu)")
        parser.add_argument(
            "--out", help="JSON path (default: bench/results/<script>-<hostname>[-<device>][-small].json)"
        )

    def parse(self, parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
        """Adds the shared flags to ``parser``, parses ``argv``, fills the --small defaults, checks the
        values (parser.error, exit status 2) and applies --threads."""
        self.add_to(parser)
        args = parser.parse_args(argv)
        if args.repeats is None:
            args.repeats = self.small_repeats if args.small else self.repeats
        if args.warmup is None:
            args.warmup = self.small_warmup if args.small else self.warmup
        if args.repeats < 1 or args.warmup < 0:
            parser.error(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
        if args.threads is not None and args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        try:
            device_type = torch.device(args.device).type
        except RuntimeError:
            parser.error(f"--device: expected {' or '.join(self.devices)}, got {args.device!r}")
        if device_type not in self.devices:
            parser.error(f"--device: this benchmark runs on {' or '.join(self.devices)}, got {args.device!r}")
        if device_type == "cuda" and not (torch.cuda.is_available() and fastmtl.build_info().get("cuda")):
            parser.error("--device cuda: needs a GPU and a fastmtl build with CUDA kernels (build_info()['cuda'])")
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        return args


def print_header(args: argparse.Namespace) -> None:
    machine = machine_description(args.device)
    gpu = f", {machine['gpu']}" if "gpu" in machine else ""
    print(
        f"fastmtl {fastmtl.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{machine['cpu']}{gpu}; {args.repeats} repeats, {args.warmup} warm-up rounds"
    )
    if args.repeats < 20:
        print("note: fewer than 20 repeats: a smoke run, not a measurement")


def results_payload(benchmark: str, args: argparse.Namespace, results: Any, settings: dict | None = None) -> dict:
    """The JSON every bench script writes: what ran, when, where, with which settings, and its results."""
    return {
        "benchmark": benchmark,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(args.device),
        "settings": {
            "repeats": args.repeats,
            "warmup": args.warmup,
            "threads": torch.get_num_threads(),
            "device": args.device,
            "small": args.small,
            **(settings or {}),
        },
        "results": results,
    }


def write_results(
    benchmark: str, args: argparse.Namespace, results: Any, settings: dict | None = None, suffix: str = ""
) -> str:
    """Writes :func:`results_payload` to ``--out`` or bench/results/<benchmark>-<host>[...][suffix].json."""
    path = args.out or default_output_path(benchmark, args.device, args.small, suffix)
    write_json(path, results_payload(benchmark, args, results, settings))
    print(f"\nwrote {path}")
    return path
