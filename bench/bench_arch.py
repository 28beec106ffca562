"""An MMoE training step: fastmtl against plain PyTorch MMoEs; and fastmtl.convert on a plain
PyTorch multi-task model.

MMoE step: E expert MLPs on x, one softmax gate per task over the experts, per-task mixtures, one
linear head per task (a click-style binary task each, BCE with logits, mean over the batch), the
summed loss and ``.backward()`` into ``.grad``. Variants, all on copies of the same weights and
the same data:

  loop              as the recommendation libraries (torch-rechub, DeepCTR-Torch, LibMTL) write it:
                    ``nn.ModuleList`` of expert ``nn.Sequential(Linear, ReLU, ...)``, a Python
                    loop over experts and over task gates, one ``nn.Linear`` head per task.
  bmm               the experts stacked as ``[E, out, in]`` parameters run by ``torch.baddbmm``,
                    all gates in one ``F.linear``, the mixtures by ``einsum``, heads stacked.
  bmm compiled      ``bmm`` under ``torch.compile`` (the backward AOTAutograd compiled with it).
  fastmtl           ``MultiTaskModel(MMoE, MultiTaskHeads).loss(x, targets).backward()``.
  gemm floor        only the GEMMs of fastmtl's step (``torch.mm`` / ``torch.bmm`` on the same
                    shapes into preallocated outputs): what no implementation that does these
                    GEMMs can beat. loop / floor bounds the speedup any MMoE of this kind can reach.

Before timing, every variant must give fastmtl's loss and expert / gate weight gradients (rtol
1e-4). The GEMM share of fastmtl's step is measured with torch.profiler (self CPU time of the
aten mm / bmm / addmm / baddbmm calls over the step's wall time, from profiled steps).

Convert step: a plain PyTorch MTL model with a custom forward (an nn.Sequential trunk, per-task
nn.Sequential towers) against ``fastmtl.convert(model)[0]``, the same training step.

Timing: one process; each repeat runs every variant once in an order rotated per repeat; medians
of the repeats. Compilation happens in the correctness check plus warm-up, never timed. Gradients
are zeroed (set_to_none) outside the timed region.

    python bench/bench_arch.py              # the two sizes of issue 6 and the convert step
    python bench/bench_arch.py --small      # a smoke run in seconds
    python bench/bench_arch.py --threads 1  # on a shared machine
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

import fastmtl
import torch
import torch.nn.functional as F
from baselines import LoopMMoE, PlainTowersMTL, StackedMMoE
from gemm_floors import make_mmoe_floor
from harness import (
    Goal,
    SharedFlags,
    Variant,
    check_same_result,
    goals_table,
    grads_to_none,
    markdown_table,
    op_time_share,
    print_header,
    ratio,
    time_variants,
    write_results,
)

CHECK_RTOL = 1e-4
CHECK_ATOL_SCALE = 1e-6  # atol of each compared tensor: this times its largest magnitude
SEED = 0
GEMM_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")
FLAGS = SharedFlags(repeats=40, warmup=5, small_repeats=5, small_warmup=2)


@dataclass(frozen=True)
class MMoESize:
    """An MMoE step's shape, and its goals: (the variant fastmtl's speedup is over, harness.Goal)."""

    name: str
    batch: int
    in_features: int
    num_experts: int
    expert_hidden: tuple
    num_tasks: int
    goals: tuple = ()

    def describe(self) -> str:
        return (
            f"B={self.batch} in={self.in_features} {self.num_experts} experts of "
            f"[{', '.join(map(str, self.expert_hidden))}] T={self.num_tasks}"
        )


SIZES = {
    "1": MMoESize(
        "1",
        512,
        128,
        8,
        (64, 32),
        6,
        (("loop", Goal("fastmtl vs loop", 2.5)), ("bmm compiled", Goal("fastmtl vs bmm compiled", 1.3))),
    ),
    "2": MMoESize("2", 2048, 256, 8, (256, 128), 4, (("loop", Goal("fastmtl vs loop", 1.1)),)),
}
SMALL_SIZE = MMoESize("small", 32, 16, 3, (8, 4), 2)


def backward_variant(key, module, loss_fn, grads) -> Variant:
    """``loss_fn().backward()``; the check compares the loss and ``grads()`` (named by position)."""

    def step():
        loss = loss_fn()
        loss.backward()
        return loss.detach()

    def result(loss):
        return {"loss": loss, **{f"weight gradient {i}": g for i, g in enumerate(grads())}}

    return Variant(key, key, step, grads_to_none(module), result)


def make_mmoe_variants(size: MMoESize, with_compile: bool) -> list[Variant]:
    torch.manual_seed(SEED)
    tasks = [fastmtl.Task(f"ctr{t}", "binary") for t in range(size.num_tasks)]
    model = fastmtl.nn.MultiTaskModel(
        fastmtl.nn.MMoE(size.in_features, size.num_experts, list(size.expert_hidden), size.num_tasks),
        fastmtl.nn.MultiTaskHeads(size.expert_hidden[-1], tasks),
    )
    loop, stacked = LoopMMoE(model.trunk, model.heads), StackedMMoE(model.trunk, model.heads)
    x = torch.randn(size.batch, size.in_features)
    labels = (torch.rand(size.batch, size.num_tasks) < 0.3).float()
    packed = model.heads.pack_targets({t.name: labels[:, i] for i, t in enumerate(tasks)})
    variants = [
        backward_variant("loop", loop, lambda: loop.loss(x, labels), loop.expert_grads),
        backward_variant("bmm", stacked, lambda: stacked.loss(x, labels), stacked.expert_grads),
        backward_variant(
            "fastmtl", model, lambda: model.loss(x, packed), lambda: [w.grad for w in model.trunk.experts.weights]
        ),
    ]
    if with_compile:
        compiled = torch.compile(stacked.loss, fullgraph=True)
        variants.append(backward_variant("bmm compiled", stacked, lambda: compiled(x, labels), stacked.expert_grads))
    floor = make_mmoe_floor(size.batch, size.in_features, size.num_experts, size.expert_hidden, size.num_tasks)
    variants.append(Variant("gemm floor", "gemm floor", floor))
    return variants


def make_convert_variants(small: bool):
    """A plain PyTorch MTL model with a custom forward, and its conversion."""
    batch, d, widths, T, tower = (32, 16, (32, 32), 2, 8) if small else (512, 128, (256, 256, 256), 6, 64)
    torch.manual_seed(SEED)
    plain = PlainTowersMTL(d, widths, T, tower)
    converted, report = fastmtl.convert(plain)
    x, y = torch.randn(batch, d), torch.randn(batch, T)

    def variant(key, m):
        def first_grads():
            return [(m.trunk.weights[0] if isinstance(m.trunk, fastmtl.nn.FusedMLP) else m.trunk[0].weight).grad]

        return backward_variant(key, m, lambda: sum(F.mse_loss(o, y[:, t]) for t, o in enumerate(m(x))), first_grads)

    shape = f"B={batch} in={d} trunk {'x'.join(map(str, widths))} + {T} towers [{tower}, 1]"
    return [variant("original", plain), variant("converted", converted)], shape, str(report)


def timing_rows(timings: dict, speedups: dict | None = None) -> list[tuple]:
    rows = []
    for name, t in timings.items():
        row = (name, f"{t['median_ms']:.3f}", f"{t['p10_ms']:.3f}", f"{t['p90_ms']:.3f}")
        rows.append(row + ((ratio(speedups.get(name)),) if speedups is not None else ()))
    return rows


def run_mmoe(size: MMoESize, args) -> dict:
    variants = make_mmoe_variants(size, not args.no_compile)
    check_same_result(variants, "loop", CHECK_RTOL, CHECK_ATOL_SCALE)
    timings = time_variants(variants, args.repeats, args.warmup)
    fast = timings["fastmtl"]["median_ms"]
    speedups = {n: t["median_ms"] / fast for n, t in timings.items() if n not in ("fastmtl", "gemm floor")}
    by_key = {v.key: v for v in variants}
    return {
        "size": asdict(size),
        "description": size.describe(),
        "variants": timings,
        "speedup_of_fastmtl": speedups,
        "loop_over_gemm_floor": timings["loop"]["median_ms"] / timings["gemm floor"]["median_ms"],
        "gemm_share_fastmtl": op_time_share(by_key["fastmtl"], GEMM_OPS),
        "gemm_share_loop": op_time_share(by_key["loop"], GEMM_OPS),
        "goals": [goal.evaluate(speedups.get(key)) for key, goal in size.goals],
    }


def print_mmoe(result: dict) -> None:
    print(f"\nMMoE step, {result['description']}\n")
    headers = ("variant", "median ms", "p10 ms", "p90 ms", "fastmtl faster by")
    print(markdown_table(headers, timing_rows(result["variants"], result["speedup_of_fastmtl"])))
    print(
        f"\nGEMM share of the step (profiler): fastmtl {100 * result['gemm_share_fastmtl']:.0f}%, "
        f"loop {100 * result['gemm_share_loop']:.0f}%; loop / gemm floor {result['loop_over_gemm_floor']:.2f}x "
        "(the most any variant doing these GEMMs can gain)"
    )
    if result["goals"]:
        print(f"\n{goals_table(result['goals'])}")


def run_convert(args) -> dict:
    variants, shape, report = make_convert_variants(args.small)
    check_same_result(variants, "original", CHECK_RTOL, CHECK_ATOL_SCALE)
    timings = time_variants(variants, args.repeats, args.warmup)
    speedup = timings["original"]["median_ms"] / timings["converted"]["median_ms"]
    return {"convert": shape, "variants": timings, "speedup_of_converted": speedup, "report": report}


def print_convert(result: dict) -> None:
    print(f"\nconvert: {result['convert']}\n")
    print(markdown_table(("variant", "median ms", "p10 ms", "p90 ms"), timing_rows(result["variants"])))
    print(f"\nconverted {ratio(result['speedup_of_converted'])} faster\n{result['report']}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant (bmm compiled)")
    args = FLAGS.parse(parser, argv)
    print_header(args)
    results = []
    for size in [SMALL_SIZE] if args.small else list(SIZES.values()):
        results.append(run_mmoe(size, args))
        print_mmoe(results[-1])
    results.append(run_convert(args))
    print_convert(results[-1])
    settings = {
        "compile": not args.no_compile,
        "seed": SEED,
        "dtype": "float32",
        "zero_grad": "set_to_none=True, outside the timed region",
    }
    write_results("bench_arch", args, results, settings)


if __name__ == "__main__":
    main()
