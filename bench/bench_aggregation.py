"""Aggregation methods: fastmtl against torchjd 0.18, the same method on the same Gram matrices.

For T = 2, 8 and 40: one call on a Gram matrix [T, T] and a batch of 64 ([64, T, T] in one fastmtl
call, a loop for PCD and CR-MOGM; 64 torchjd calls, which is what torchjd offers). Every Gram method both libraries
have (Krum from T = 3); the Jacobian and cross-Gram methods (GradDrop, TrimmedMean, ExcessMTL, MoDo,
SDMGrad) are cheap elementwise ATen code on either side and are not timed here. All variants in one process, interleaved call
by call, after warm-up; medians of many calls; every call takes the next of a pool of 16 different
Gram matrices (random Jacobians with conflicting tasks), so no method sees the same input twice in a
row (Nash-MTL warm-starts from its last solution, and that stays realistic). torchjd's Nash-MTL needs
the Jacobian: it gets J [T, 256] with the Gram's J J^T, the others the Gram matrix.

Where one torchjd call takes longer than --slow-ms (Nash-MTL and CAGrad at T = 40), its batch time is
64 x its single-call median, marked "x64" in the table, instead of minutes of measurement.

No same-result check here: whether each method agrees with torchjd's (where torchjd's solver is the
oracle, to which tolerance, on which Gram matrices) is tests/test_aggregation.py's job, per method.

Goal (issue 4): >= 10x faster than torchjd for UPGrad, MGDA, DualProj, CAGrad and NashMTL at T = 8
and 40. Results go to bench/results/bench_aggregation-<hostname>[-small].json.

Run: python bench/bench_aggregation.py [--small] [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch

import fastmtl.aggregation as agg
from harness import (
    Goal,
    SharedFlags,
    Variant,
    goals_table,
    markdown_table,
    print_header,
    time_variants,
    timed_call,
    write_results,
)

warnings.filterwarnings("ignore", module="cvxpy")
POOL = 16
JACOBIAN_WIDTH = 256
BATCH = 64
GOAL_METHODS = ("UPGrad", "MGDA", "DualProj", "CAGrad", "NashMTL")
GOAL_TASKS = (8, 40)
GOAL_SPEEDUP = 10.0
UNBATCHED = ("PCD", "CRMOGM")  # one EMA state per call sequence: a loop of single calls
FLAGS = SharedFlags(repeats=50, warmup=3, small_repeats=5, small_warmup=1)


def methods(T: int):
    """name -> (fastmtl aggregator, torchjd callable and whether it takes the Jacobian); every Gram method
    both libraries have. PCD and CR-MOGM keep one moving average per call sequence, so their fastmtl
    "batch" is a loop of 64 calls too (UNBATCHED)."""
    import torchjd.aggregation as tjd

    return {
        "Mean": (agg.Mean(), tjd.MeanWeighting(), False),
        "Sum": (agg.Sum(), tjd.SumWeighting(), False),
        "Krum": (agg.Krum(n_byzantine=0), tjd.KrumWeighting(n_byzantine=0), False) if T >= 3 else None,
        "PCD": (agg.PCD(), tjd.PCDWeighting(), False),
        "CRMOGM": (agg.CRMOGM(agg.UPGrad()), tjd.CRMOGMWeighting(tjd.UPGradWeighting()), False),
        "UPGrad": (agg.UPGrad(), tjd.UPGradWeighting(), False),
        "MGDA": (agg.MGDA(), tjd.MGDAWeighting(), False),
        "DualProj": (agg.DualProj(), tjd.DualProjWeighting(), False),
        "CAGrad": (agg.CAGrad(c=0.4), tjd.CAGradWeighting(c=0.4), False),
        "NashMTL": (agg.NashMTL(), tjd.NashMTL(n_tasks=T).weighting, True) if T > 1 else None,
        "PCGrad": (agg.PCGrad(), tjd.PCGradWeighting(), False),
        "GradVac": (agg.GradVac(), tjd.GradVacWeighting(), False),
        "IMTLG": (agg.IMTLG(), tjd.IMTLGWeighting(), False),
        "AlignedMTL": (agg.AlignedMTL(), tjd.AlignedMTLWeighting(), False),
        "ConFIG": (agg.ConFIG(), tjd.ConFIG(), True),
        "FairGrad": (agg.FairGrad(alpha=1.0), tjd.FairGradWeighting(alpha=1.0), False),
    }


def make_pool(T: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    jacobians, grams = [], []
    for _ in range(POOL):
        shared = torch.randn(1, JACOBIAN_WIDTH, generator=g, dtype=torch.float64)
        signs = torch.where(torch.rand(T, 1, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
        J = 0.7 * signs * shared + torch.randn(T, JACOBIAN_WIDTH, generator=g, dtype=torch.float64)
        jacobians.append(J)
        grams.append(J @ J.T)
    return jacobians, grams


def method_variants(ours, theirs, takes_jacobian: bool, jacobians, grams, batch, batched=True) -> list[Variant]:
    """fastmtl and torchjd on the next input of the pool (one counter: no method sees the same input
    twice in a row); fastmtl on the batch and torchjd's loop over it (which :func:`measure` leaves out
    where one torchjd call is slow)."""
    inputs = jacobians if takes_jacobian else grams
    counter = [0]

    def next_index() -> int:
        counter[0] = (counter[0] + 1) % POOL
        return counter[0]

    return [
        Variant("fastmtl", "fastmtl", lambda: ours(grams[next_index()])),
        Variant("torchjd", "torchjd", lambda: theirs(inputs[next_index()])),
        Variant(
            "fastmtl_batch",
            "fastmtl x64",
            (lambda: ours(batch)) if batched else (lambda: [ours(batch[i]) for i in range(BATCH)]),
        ),
        Variant("torchjd_batch", "torchjd x64", lambda: [theirs(inputs[i % POOL]) for i in range(BATCH)]),
    ]


def measure(T: int, args) -> list:
    jacobians, grams = make_pool(T, seed=T)
    batch = torch.stack([grams[i % POOL] for i in range(BATCH)])
    rows = []
    for name, entry in methods(T).items():
        if entry is None or (args.methods and name not in args.methods):
            continue
        ours, theirs, takes_jacobian = entry
        *variants, torchjd_batch = method_variants(
            ours, theirs, takes_jacobian, jacobians, grams, batch, batched=name not in UNBATCHED
        )
        for _ in range(args.warmup):
            for v in variants:
                v.step()
        slow = statistics.median(timed_call(variants[1]) for _ in range(3)) > args.slow_ms
        if not slow:
            variants.append(torchjd_batch)
        rounds = max(3, args.repeats // 10) if slow else args.repeats
        stats = time_variants(variants, rounds, warmup=0)  # warmed up above, before the slow test
        median = {key: s["median_ms"] for key, s in stats.items()}
        torchjd_batch = BATCH * median["torchjd"] if slow else median["torchjd_batch"]
        rows.append(
            {
                "method": name,
                "T": T,
                "rounds": rounds,
                "fastmtl_ms": median["fastmtl"],
                "torchjd_ms": median["torchjd"],
                "speedup": median["torchjd"] / median["fastmtl"],
                "fastmtl_batch_ms": median["fastmtl_batch"],
                "torchjd_batch_ms": torchjd_batch,
                "torchjd_batch_extrapolated": slow,
                "batch_speedup": torchjd_batch / median["fastmtl_batch"],
                "samples": stats,
            }
        )
    return rows


def print_table(rows) -> None:
    headers = ("method", "T", "fastmtl", "torchjd", "speedup", "fastmtl x64", "torchjd x64", "speedup x64")
    cells = [
        (
            r["method"],
            r["T"],
            f"{r['fastmtl_ms'] * 1e3:.0f}us",
            f"{r['torchjd_ms'] * 1e3:.0f}us",
            f"{r['speedup']:.1f}x",
            f"{r['fastmtl_batch_ms']:.2f}ms",
            f"{r['torchjd_batch_ms']:.1f}ms" + ("*" if r["torchjd_batch_extrapolated"] else ""),
            f"{r['batch_speedup']:.1f}x",
        )
        for r in rows
    ]
    print(markdown_table(headers, cells))
    print("(* torchjd x64 = 64 x its single-call median: one call is too slow to measure 64 of them)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, nargs="+", help="numbers of tasks (default 2 8 40; 2 8 with --small)")
    parser.add_argument("--methods", nargs="+", default=None, help="subset of method names (default: all)")
    parser.add_argument("--slow-ms", type=float, default=50.0, help="torchjd calls slower than this: batch x64")
    args = FLAGS.parse(parser, argv)
    args.tasks = args.tasks or ([2, 8] if args.small else [2, 8, 40])
    print_header(args)
    print(f"fastmtl vs torchjd aggregation; medians of up to {args.repeats} interleaved rounds\n")
    rows = [row for T in args.tasks for row in measure(T, args)]
    print_table(rows)
    goal_rows = [
        Goal(f"{r['method']} T={r['T']} vs torchjd", GOAL_SPEEDUP).evaluate(r["speedup"])
        for r in rows
        if r["method"] in GOAL_METHODS and r["T"] in GOAL_TASKS
    ]
    if goal_rows:
        print(f"\n{goals_table(goal_rows)}")
    settings = {"tasks": args.tasks, "methods": args.methods, "slow_ms": args.slow_ms, "pool": POOL, "batch": BATCH}
    write_results("bench_aggregation", args, {"rows": rows, "goals": goal_rows}, settings)


if __name__ == "__main__":
    main()
