"""Aggregation methods: fastmtl against torchjd 0.18, the same method on the same Gram matrices.

For T = 2, 8 and 40: one call on a Gram matrix [T, T] and a batch of 64 ([64, T, T] in one fastmtl
call; 64 torchjd calls, which is what torchjd offers). All variants in one process, interleaved call
by call, after warm-up; medians of many calls; every call takes the next of a pool of 16 different
Gram matrices (random Jacobians with conflicting tasks), so no method sees the same input twice in a
row (Nash-MTL warm-starts from its last solution, and that stays realistic). torchjd's Nash-MTL needs
the Jacobian: it gets J [T, 256] with the Gram's J J^T, the others the Gram matrix.

Where one torchjd call takes longer than --slow-ms (Nash-MTL and CAGrad at T = 40), its batch time is
64 x its single-call median, marked "x64" in the table, instead of minutes of measurement.

Goal (issue 4): >= 10x faster than torchjd for UPGrad, MGDA, DualProj, CAGrad and NashMTL at T = 8
and 40. Results go to bench/results/bench_aggregation-<hostname>[-small].json.

Run: python bench/bench_aggregation.py [--small] [--repeats N]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fastmtl.aggregation as agg  # noqa: E402
from _common import cpu_model, default_output_path, machine_description, write_json
from harness import summarise  # noqa: E402

warnings.filterwarnings("ignore", module="cvxpy")
POOL = 16
JACOBIAN_WIDTH = 256
BATCH = 64
GOAL_METHODS = ("UPGrad", "MGDA", "DualProj", "CAGrad", "NashMTL")
GOAL_TASKS = (8, 40)
GOAL_SPEEDUP = 10.0


def methods(T: int):
    """name -> (fastmtl aggregator, torchjd callable and whether it takes the Jacobian)."""
    import torchjd.aggregation as tjd

    return {
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


def time_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def measure(T: int, repeats: int, warmup: int, slow_ms: float, names) -> list:
    jacobians, grams = make_pool(T, seed=T)
    batch = torch.stack([grams[i % POOL] for i in range(BATCH)])
    rows = []
    for name, entry in methods(T).items():
        if entry is None or (names and name not in names):
            continue
        ours, theirs, takes_jacobian = entry
        inputs = jacobians if takes_jacobian else grams
        counter = {"i": 0}

        def next_index():
            counter["i"] = (counter["i"] + 1) % POOL
            return counter["i"]

        variants = {
            "fastmtl": lambda: ours(grams[next_index()]),
            "torchjd": lambda: theirs(inputs[next_index()]),
            "fastmtl_batch": lambda: ours(batch),
        }
        for _ in range(warmup):
            for fn in variants.values():
                fn()
        single_torchjd = statistics.median(time_ms(variants["torchjd"]) for _ in range(3))
        slow = single_torchjd > slow_ms
        if not slow:
            variants["torchjd_batch"] = lambda: [theirs(inputs[i % POOL]) for i in range(BATCH)]
        n = max(3, repeats // 10) if slow else repeats
        samples = {key: [] for key in variants}
        for _ in range(n):  # interleaved: one call of each variant per round
            for key, fn in variants.items():
                samples[key].append(time_ms(fn))
        stats = {key: summarise(v) for key, v in samples.items()}
        torchjd_batch = stats["torchjd_batch"]["median_ms"] if not slow else BATCH * stats["torchjd"]["median_ms"]
        rows.append({
            "method": name, "T": T, "rounds": n,
            "fastmtl_ms": stats["fastmtl"]["median_ms"], "torchjd_ms": stats["torchjd"]["median_ms"],
            "speedup": stats["torchjd"]["median_ms"] / stats["fastmtl"]["median_ms"],
            "fastmtl_batch_ms": stats["fastmtl_batch"]["median_ms"], "torchjd_batch_ms": torchjd_batch,
            "torchjd_batch_extrapolated": slow,
            "batch_speedup": torchjd_batch / stats["fastmtl_batch"]["median_ms"],
            "samples": stats,
        })
    return rows


def print_table(rows) -> None:
    print(f"{'method':<11}{'T':>4} | {'fastmtl':>10}{'torchjd':>11}{'speedup':>9} | "
          f"{'fastmtl x64':>12}{'torchjd x64':>14}{'speedup':>9}")
    for r in rows:
        mark = "*" if r["torchjd_batch_extrapolated"] else " "
        print(f"{r['method']:<11}{r['T']:>4} | {r['fastmtl_ms']*1e3:>8.0f}us{r['torchjd_ms']*1e3:>9.0f}us"
              f"{r['speedup']:>8.1f}x | {r['fastmtl_batch_ms']:>10.2f}ms{r['torchjd_batch_ms']:>11.1f}ms{mark}"
              f"{r['batch_speedup']:>8.1f}x")
    print("(* torchjd x64 = 64 x its single-call median: one call is too slow to measure 64 of them)")


def goals(rows) -> list:
    out = []
    for r in rows:
        if r["method"] in GOAL_METHODS and r["T"] in GOAL_TASKS:
            ok = r["speedup"] >= GOAL_SPEEDUP
            out.append({"goal": f"{r['method']} T={r['T']} >= {GOAL_SPEEDUP:.0f}x torchjd", "value": r["speedup"],
                        "status": "met" if ok else "MISSED"})
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 8, 40])
    parser.add_argument("--methods", nargs="+", default=None, help="subset of method names (default: all)")
    parser.add_argument("--repeats", type=int, default=50, help="interleaved rounds per method and T")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--slow-ms", type=float, default=50.0)
    parser.add_argument("--small", action="store_true", help="T = 2 and 8, few rounds: a smoke run")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.small:
        args.tasks, args.repeats, args.warmup = [2, 8], 5, 1
    print(f"fastmtl vs torchjd aggregation, {cpu_model()}, {torch.get_num_threads()} threads; "
          f"medians of up to {args.repeats} interleaved rounds")
    rows = []
    for T in args.tasks:
        rows += measure(T, args.repeats, args.warmup, args.slow_ms, args.methods)
    print_table(rows)
    goal_rows = goals(rows)
    for g in goal_rows:
        print(f"  goal {g['goal']:<34} {g['value']:>7.1f}x  {g['status']}")
    path = args.out or default_output_path("bench_aggregation", "cpu", args.small)
    write_json(path, {
        "benchmark": "bench_aggregation",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": machine_description("cpu"),
        "args": vars(args),
        "rows": rows,
        "goals": goal_rows,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
