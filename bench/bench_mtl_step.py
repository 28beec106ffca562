"""One gradient-aggregation training step (UPGrad): fastmtl's fused per-task engine against the ways
people compute per-task gradients today, and the plain summed-loss step.

The step: trunk forward, all heads, every task's loss (~10% labels missing), the per-task gradients
of the trunk's parameters (or what stands for them), their Gram matrix, UPGrad's weights, and the
aggregated update in ``.grad``. Variants, on copies of the same weights, input and targets:

  plain      fastmtl's model, ``model.loss(x, targets).backward()`` (no aggregation: the floor the
             engine is measured against for memory and rep mode)
  exact      ``model.mtl_backward(x, targets, UPGrad())``: the fused engine, exact Gram
  rep        ``model.mtl_backward(..., mode="rep")``: Gram of the trunk output's gradients (MGDA-UB)
  (a) loop   the LibMTL way on the plain PyTorch model (nn.Sequential trunk, one nn.Linear per task,
             a Python loop of masked losses): T ``torch.autograd.grad`` calls over a retained graph,
             the Gram of the stacked T x P Jacobian, fastmtl's UPGrad solver, ``w @ J`` into .grad
  (b) autojac  torchjd 0.18: ``autojac.mtl_backward`` + ``jac_to_grad(shared, UPGrad())``
  (c) autogram torchjd 0.18: ``autogram.Engine(trunk).compute_gramian(losses)``, ``UPGradWeighting``,
             ``losses.backward(weights)``
  (c') autogram + fastmtl solver: (c) with fastmtl's UPGrad on its Gramian, so the engines compare
             without torchjd's quadprog-based solver
  GEMM floors  only the GEMMs of (a) and of exact, on their shapes, into preallocated outputs: what
             their arithmetic costs on this machine, and, as a ratio, how much of a gap between
             them is arithmetic and how much is everything else

Before timing, every aggregating exact variant must give the exact engine's trunk gradients (rtol
1e-3: the UPGrad solvers agree to ~1e-10 on the same Gram; the rest is float32 rounding of different
summation orders), so the table never compares different computations.

Timing: one process, each repeat runs every variant once in an order rotated per repeat, median of
the repeats; gradients are set to None outside the timed region. Peak memory: bytes allocated by
torch's CPU allocator during one warmed-up step (the profiler's allocation events, running maximum
of allocated minus freed), i.e. what the step itself needs beyond the model and the batch.
fastmtl's fused backward reuses up to four per-thread B x d scratch buffers across steps; those are
allocated once and are not in the per-step figure (the ratios to `plain` share them).

    python bench/bench_mtl_step.py              # the three sizes of issue 5
    python bench/bench_mtl_step.py --small      # a smoke run in seconds
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

import fastmtl
import torch
from baselines import (
    Size,
    copies,
    make_fastmtl_model,
    make_libmtl_loop_step,
    make_plain_heads,
    make_plain_trunk,
    make_targets,
    make_tasks,
    plain_model_losses,
    trunk_weights_of,
)
from gemm_floors import make_exact_engine_floor, make_loop_floor
from harness import (
    Goal,
    SharedFlags,
    Variant,
    check_same_result,
    goals_table,
    grads_to_none,
    markdown_table,
    peak_memory_bytes,
    print_header,
    time_variants,
    write_results,
)

CHECK_RTOL = 1e-3
SEED = 0
FLAGS = SharedFlags(repeats=30, warmup=3, small_repeats=5, small_warmup=1)


def engine_goals(vs_loop, vs_autogram, rep_over_plain, memory_over_plain) -> tuple:
    """(ratio key, goal) pairs: the ratios of :func:`ratios_of`."""
    return (
        ("loop_over_exact", Goal("(a) loop / exact", vs_loop)),
        ("autogram_over_exact", Goal("(c) autogram / exact", vs_autogram)),
        ("rep_over_plain", Goal("rep / plain", rep_over_plain, at_least=False)),
        ("memory_exact_over_plain", Goal("peak memory exact / plain", memory_over_plain, at_least=False)),
    )


SIZES = {
    "1": Size("1", 256, 128, (256, 256, 256), 40, engine_goals(1.3, 2.0, 1.25, 1.5)),
    "2": Size("2", 512, 128, (512, 512, 512), 8, engine_goals(1.3, 2.0, 1.25, 1.5)),
    "3": Size("3", 64, 256, (1024, 1024), 8, engine_goals(1.8, 2.0, 1.25, 1.5)),
}
SMALL_SIZE = Size("small", 32, 16, (32, 32), 3)


def trunk_grads(trunk):
    """The check's result: the trunk's weight gradients after a step."""
    return lambda _: {f"trunk layer {i} weight gradient": w.grad for i, w in enumerate(trunk_weights_of(trunk))}


def make_variants(size: Size, tasks, x, targets) -> list[Variant]:
    from torchjd.aggregation import UPGrad as TorchjdUPGrad
    from torchjd.aggregation import UPGradWeighting
    from torchjd.autogram import Engine
    from torchjd.autojac import jac_to_grad
    from torchjd.autojac import mtl_backward as torchjd_mtl_backward

    torch.manual_seed(SEED)
    plain_trunk = make_plain_trunk(size, "cpu", torch.float32)
    plain_heads = make_plain_heads(tasks, size.hidden[-1], "cpu", torch.float32)
    aggregator = fastmtl.aggregation.UPGrad()
    variants = []

    def fastmtl_variant(key, label, step, checked=True):
        model = make_fastmtl_model(plain_trunk, plain_heads, tasks, size, "cpu", torch.float32)
        variants.append(
            Variant(
                key, label, lambda: step(model), grads_to_none(model), trunk_grads(model.trunk) if checked else None
            )
        )

    # plain and rep compute other updates: timed and measured, not checked against exact.
    fastmtl_variant("plain", "fastmtl plain step (summed loss)", lambda m: m.loss(x, targets).backward(), False)
    fastmtl_variant("exact", "fastmtl exact", lambda m: m.mtl_backward(x, targets, aggregator))
    fastmtl_variant("rep", "fastmtl rep", lambda m: m.mtl_backward(x, targets, aggregator, mode="rep"), False)

    trunk, heads = copies(plain_trunk, plain_heads)
    loop_step = make_libmtl_loop_step(trunk, heads, tasks, x, targets, aggregator)
    variants.append(
        Variant("loop", "(a) LibMTL-style loop", loop_step, grads_to_none(trunk, heads), trunk_grads(trunk))
    )

    trunk_b, heads_b = copies(plain_trunk, plain_heads)
    torchjd_upgrad = TorchjdUPGrad()

    def autojac_step():
        z, losses = plain_model_losses(trunk_b, heads_b, tasks, x, targets)
        torchjd_mtl_backward(losses, features=z, shared_params=list(trunk_b.parameters()))
        jac_to_grad(list(trunk_b.parameters()), torchjd_upgrad)

    variants.append(
        Variant("autojac", "(b) torchjd autojac", autojac_step, grads_to_none(trunk_b, heads_b), trunk_grads(trunk_b))
    )

    def autogram_variant(key, label, weighting):
        trunk, heads = copies(plain_trunk, plain_heads)
        engine = Engine(trunk, batch_dim=None)

        def step():
            _, losses = plain_model_losses(trunk, heads, tasks, x, targets)
            losses = torch.stack(losses)
            losses.backward(weighting(engine.compute_gramian(losses)))

        variants.append(Variant(key, label, step, grads_to_none(trunk, heads), trunk_grads(trunk)))

    autogram_variant("autogram", "(c) torchjd autogram", UPGradWeighting())
    autogram_variant("autogram_fastmtl", "(c') autogram + fastmtl UPGrad", lambda g: aggregator(g.detach()))
    # Only the GEMMs of (a) and of exact: see gemm_floors.py; the ratio of the two floors is the most
    # the engine can gain over the loop without doing less arithmetic.
    variants.append(Variant("loop_gemms", "GEMM floor of (a)", make_loop_floor(size, tasks)))
    variants.append(Variant("exact_gemms", "GEMM floor of exact", make_exact_engine_floor(size, tasks)))
    return variants


def ratios_of(medians: dict[str, float], memory: dict[str, int]) -> dict[str, float]:
    return {
        "loop_over_exact": medians["loop"] / medians["exact"],
        "autogram_over_exact": medians["autogram"] / medians["exact"],
        "rep_over_plain": medians["rep"] / medians["plain"],
        "memory_exact_over_plain": memory["exact"] / memory["plain"],
    }


def run_size(size: Size, repeats: int, warmup: int) -> dict:
    torch.manual_seed(SEED)
    tasks = make_tasks(size.num_tasks)
    x = torch.randn(size.batch, size.in_features)
    targets = make_targets(tasks, size.batch, "cpu", torch.float32)
    variants = make_variants(size, tasks, x, targets)
    check_same_result(variants, "exact", CHECK_RTOL)
    stats = time_variants(variants, repeats, warmup)
    memory = {v.key: peak_memory_bytes(v) for v in variants}
    ratios = ratios_of({key: s["median_ms"] for key, s in stats.items()}, memory)
    return {
        "size": asdict(size),
        "description": size.describe(),
        "repeats": repeats,
        "labels": {v.key: v.label for v in variants},
        "stats": stats,
        "peak_memory_bytes": memory,
        "ratios": ratios,
        "goals": [goal.evaluate(ratios[key]) for key, goal in size.goals],
    }


def print_result(result: dict) -> None:
    stats, memory, labels = result["stats"], result["peak_memory_bytes"], result["labels"]
    exact, plain_memory = stats["exact"]["median_ms"], memory["plain"]
    print(f"\n{result['description']}  (median of {result['repeats']} interleaved steps, float32)\n")
    rows = [
        (
            labels[key],
            f"{s['median_ms']:.2f}",
            f"{s['p10_ms']:.2f}-{s['p90_ms']:.2f}",
            f"{s['median_ms'] / exact:.2f}x",
            f"{memory[key] / 2**20:.1f}",
            f"{memory[key] / plain_memory:.2f}x",
        )
        for key, s in stats.items()
    ]
    headers = ("variant", "median ms", "p10-p90 ms", "time / exact", "peak MB", "memory / plain")
    print(markdown_table(headers, rows))
    floors = stats["loop_gemms"]["median_ms"] / stats["exact_gemms"]["median_ms"]
    print(f"\nGEMM floors, (a) / exact: {floors:.2f} (above 1 only where the engine does less GEMM work than (a))")
    if result["goals"]:
        print(f"\n{goals_table(result['goals'])}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=sorted(SIZES))
    args = FLAGS.parse(parser, argv)
    print_header(args)
    results = []
    for size in [SMALL_SIZE] if args.small else [SIZES[name] for name in args.sizes]:
        results.append(run_size(size, args.repeats, args.warmup))
        print_result(results[-1])
    write_results("bench_mtl_step", args, results, {"dtype": "float32", "check_rtol": CHECK_RTOL, "seed": SEED})


if __name__ == "__main__":
    main()
