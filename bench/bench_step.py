"""One hard-sharing multi-task training step: fastmtl against the same model in plain PyTorch.

The step is: trunk forward, all task heads, every task's loss (mean over its labelled entries),
the weighted sum ``sum_t w_t L_t`` and ``.backward()`` into ``.grad``. Variants, all on the same
weights (copies), the same input ``x`` and the same targets dict (name -> tensor, ~10% missing):

  (a) eager           ``nn.Sequential(Linear, ReLU, ...)`` trunk, one ``nn.Linear`` per task in an
                      ``nn.ModuleDict``, a Python loop over tasks calling F.mse_loss /
                      F.binary_cross_entropy_with_logits / F.cross_entropy with masking.
  (b) compiled        (a)'s model + loss function under ``torch.compile`` (``.backward()`` outside,
                      which runs the backward graph AOTAutograd compiled with it).
  (c) fused compiled  the best hand-written PyTorch: one stacked ``nn.Linear`` for all heads (rows
                      grouped by loss kind), one masked loss call per kind, per-task means from
                      per-task counts, under ``torch.compile``.
  fastmtl             ``MultiTaskModel(FusedMLP, MultiTaskHeads).loss(x, targets).backward()``.
  (d) gemm floor      only the step's GEMMs (``torch.mm`` on the same shapes into preallocated
                      outputs): what no implementation of this step can beat by much.

Roofline (default on CUDA, ``--roofline`` elsewhere): the trunk alone, fastmtl's FusedMLP forward +
backward against only its GEMMs (``torch.mm``, same shapes), as achieved TFLOP/s of each and their
ratio: how close the fused trunk comes to the GEMM floor.

Before timing, every variant but (d) must give fastmtl's total loss and trunk weight gradients
(rtol 1e-4), so the table never compares different computations.

Timing: one process; each repeat runs every variant once in an order rotated per repeat (so
machine noise and cache state hit all variants alike); the median of the repeats is reported.
Compilation happens during the correctness check and compiled variants get extra warm-up steps,
so no compile time is timed. Gradients are zeroed (``set_to_none=True``) *outside* the timed
region for every variant: the timed region is exactly forward + losses + backward. (Zeroing is a
Python loop over parameters, which would favour fastmtl's few stacked parameters over the eager
model's two per task; leaving it out is the conservative choice.)

Run from the repository root:

    python bench/bench_step.py              # the three benchmark sizes (a few minutes with compile)
    python bench/bench_step.py --small      # a tiny size, a smoke run in well under a minute
    python bench/bench_step.py --sizes 2 --repeats 50 --no-compile --threads 1
    python bench/bench_step.py --device cuda --dtype bfloat16   # the CUDA sizes (4 and 2), roofline

Results go to ``bench/results/bench_step-<hostname>[-<device>][-small].json`` (``--out`` overrides).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict

import fastmtl
import torch
from baselines import (
    MISSING_FRACTION,
    LossGroups,
    Size,
    copies,
    describe_tasks,
    make_eager_loss,
    make_fastmtl_model,
    make_hand_fused_loss,
    make_plain_heads,
    make_plain_trunk,
    make_stacked_head,
    make_targets,
    make_tasks,
    trunk_weights_of,
)
from gemm_floors import make_step_floor, make_trunk_floor, trunk_flops
from harness import (
    Goal,
    SharedFlags,
    Variant,
    check_same_result,
    goals_table,
    grads_to_none,
    markdown_table,
    print_header,
    ratio,
    time_variants,
    write_results,
)
from torch import nn

# Agreement every variant must show with fastmtl before timing, by dtype: 16-bit variants round
# differently (where the bias is added, in which dtype losses are reduced).
CHECK_RTOL = {torch.float64: 1e-4, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
SEED = 0
FLAGS = SharedFlags(repeats=30, warmup=5, small_repeats=30, small_warmup=5, devices=("cpu", "cuda"))


def step_goals(vs_eager=None, vs_best_compiled=None, over_floor=None, trunk_over_floor=None) -> tuple:
    """(ratio key, goal) pairs; a None target is no goal."""
    goals = (
        ("speedup_vs_eager", vs_eager and Goal("fastmtl vs (a) eager", vs_eager)),
        ("speedup_vs_best_compiled", vs_best_compiled and Goal("fastmtl vs best of (b),(c)", vs_best_compiled)),
        ("fastmtl_over_floor", over_floor and Goal("fastmtl / (d) floor", over_floor, at_least=False)),
        ("trunk_over_floor", trunk_over_floor and Goal("trunk / its gemm floor", trunk_over_floor, at_least=False)),
    )
    return tuple((key, goal) for key, goal in goals if goal)


SIZES = {
    "1": Size("1", 256, 128, (256, 256, 256), 40, step_goals(3.0, 1.2, 1.5)),
    "2": Size("2", 256, 128, (128, 128), 8, step_goals(1.6, 1.1, 1.5)),
    "3": Size("3", 1024, 128, (512, 512, 512), 8, step_goals(1.15, 1.0, 1.5)),
}
# On CUDA (issue 3): the large T=40 size with its goals, and size 2 (no goals there).
CUDA_SIZES = {
    "4": Size("4", 4096, 512, (1024, 1024, 1024), 40, step_goals(3.0, 1.3, None, 1.2)),
    "2": Size("2", 256, 128, (128, 128), 8),
}
# A smoke run: small enough to compile and time in seconds; no goals (too small to mean anything).
SMALL_SIZE = Size("small", 64, 32, (64, 64), 3)


def sizes_for(device) -> dict[str, Size]:
    return CUDA_SIZES if torch.device(device).type == "cuda" else SIZES


def compile_loss(loss_fn, x, targets) -> tuple:
    """torch.compile(loss_fn, fullgraph=True), falling back to graph breaks if dynamo cannot
    capture one graph. Compiles now (one forward) so the check and the timing see no compile."""
    try:
        compiled = torch.compile(loss_fn, fullgraph=True)
        compiled(x, targets)
        return compiled, "fullgraph=True"
    except Exception as error:  # noqa: BLE001  (any capture failure: fall back, and say so)
        torch._dynamo.reset()
        compiled = torch.compile(loss_fn)
        compiled(x, targets)
        return compiled, f"fullgraph=False ({type(error).__name__})"


def loss_variant(key, label, loss_fn, x, targets, module: nn.Module, trunk: nn.Module, compiled_note=None) -> Variant:
    """A variant whose step is ``loss_fn(x, targets).backward()``; the check compares its total loss
    and its trunk's weight gradients."""

    def step() -> torch.Tensor:
        loss = loss_fn(x, targets)
        loss.backward()
        return loss.detach()

    def result(loss) -> dict:
        grads = {f"trunk layer {i} weight gradient": w.grad for i, w in enumerate(trunk_weights_of(trunk))}
        return {"total loss": loss, **grads}

    return Variant(
        key,
        label,
        step,
        grads_to_none(module),
        result,
        extra_warmup=3 if compiled_note else 0,
        note=compiled_note or "",
    )


def make_variants(size: Size, tasks, x, targets, device, dtype, with_compile: bool, roofline: bool) -> list[Variant]:
    plain_trunk = make_plain_trunk(size, device, dtype)
    plain_heads = make_plain_heads(tasks, size.hidden[-1], device, dtype)
    # Each variant gets its own copy of the weights: identical values, separate memory.
    trunk, heads = copies(plain_trunk, plain_heads)
    variants = [
        loss_variant(
            "eager", "(a) eager", make_eager_loss(trunk, heads, tasks), x, targets, nn.ModuleList([trunk, heads]), trunk
        )
    ]
    if with_compile:
        trunk, heads = copies(plain_trunk, plain_heads)
        loss, note = compile_loss(make_eager_loss(trunk, heads, tasks), x, targets)
        variants.append(
            loss_variant("compiled", "(b) compiled", loss, x, targets, nn.ModuleList([trunk, heads]), trunk, note)
        )
        groups = LossGroups.of(tasks)
        (trunk,) = copies(plain_trunk)
        head = make_stacked_head(plain_heads, groups.in_order(), device, dtype)
        loss, note = compile_loss(make_hand_fused_loss(trunk, head, groups, device, dtype), x, targets)
        variants.append(
            loss_variant(
                "fused_compiled", "(c) fused compiled", loss, x, targets, nn.ModuleList([trunk, head]), trunk, note
            )
        )

    model = make_fastmtl_model(plain_trunk, plain_heads, tasks, size, device, dtype)
    variants.append(loss_variant("fastmtl", "fastmtl", model.loss, x, targets, model, model.trunk))
    head_rows = sum(t.num_outputs for t in tasks)
    variants.append(Variant("gemm_floor", "(d) gemm floor", make_step_floor(size, head_rows, device, dtype)))
    if roofline:
        (trunk,) = copies(model.trunk)
        with torch.no_grad():
            grad_out = torch.randn_like(trunk(x))
        variants.append(
            Variant("trunk_fastmtl", "trunk: fastmtl", lambda: trunk(x).backward(grad_out), grads_to_none(trunk))
        )
        variants.append(Variant("trunk_floor", "trunk: gemm floor", make_trunk_floor(size, device, dtype)))
    return variants


def compute_ratios(medians: dict[str, float]) -> dict[str, float | None]:
    """fastmtl's speedups (other / fastmtl, > 1 = fastmtl faster), fastmtl / floor, and with the
    roofline the trunk's time over its GEMMs' time."""
    ours = medians["fastmtl"]
    compiled = [medians[k] for k in ("compiled", "fused_compiled") if k in medians]
    return {
        **{
            f"speedup_vs_{k}": medians[k] / ours if k in medians else None
            for k in ("eager", "compiled", "fused_compiled")
        },
        "speedup_vs_best_compiled": min(compiled) / ours if compiled else None,
        "fastmtl_over_floor": ours / medians["gemm_floor"],
        "trunk_over_floor": medians["trunk_fastmtl"] / medians["trunk_floor"] if "trunk_floor" in medians else None,
    }


def run_size(size: Size, args, dtype) -> dict:
    torch.manual_seed(SEED)
    tasks = make_tasks(size.num_tasks)
    x = torch.randn(size.batch, size.in_features, device=args.device, dtype=dtype)
    targets = make_targets(tasks, size.batch, args.device, dtype)
    started = time.perf_counter()
    variants = make_variants(size, tasks, x, targets, args.device, dtype, not args.no_compile, args.roofline)
    check_same_result(variants, "fastmtl", CHECK_RTOL[dtype])
    setup_s = time.perf_counter() - started
    stats = time_variants(variants, args.repeats, args.warmup, args.device)
    ratios = compute_ratios({key: s["median_ms"] for key, s in stats.items()})
    result = {
        "size": asdict(size),
        "description": size.describe(),
        "tasks": describe_tasks(tasks),
        "setup_and_compile_s": setup_s,
        "variants": {v.key: {"label": v.label, "compile": v.note, **stats[v.key]} for v in variants},
        "ratios": ratios,
        "goals": [goal.evaluate(ratios[key]) for key, goal in size.goals],
    }
    if args.roofline:
        flops = trunk_flops(size)
        result["roofline"] = {
            "trunk_gemm_flops": flops,
            "fastmtl_tflops": flops / (stats["trunk_fastmtl"]["median_ms"] * 1e-3) / 1e12,
            "floor_tflops": flops / (stats["trunk_floor"]["median_ms"] * 1e-3) / 1e12,
        }
    return result


def print_result(result: dict, device: str, dtype: torch.dtype) -> None:
    print(
        f"\nsize {result['size']['name']}: {result['description']} ({result['tasks']}), "
        f"{str(dtype).replace('torch.', '')} {device}\n"
    )
    fastmtl_ms = result["variants"]["fastmtl"]["median_ms"]
    rows = [
        (
            v["label"],
            f"{v['median_ms']:.3f}",
            f"{v['p10_ms']:.3f}",
            f"{v['p90_ms']:.3f}",
            ratio(v["median_ms"] / fastmtl_ms),
            v["compile"],
        )
        for v in result["variants"].values()
    ]
    print(markdown_table(("variant", "median ms", "p10 ms", "p90 ms", "/ fastmtl", "compile"), rows))
    r = result["ratios"]
    print(
        f"\nfastmtl speedup: vs (a) {ratio(r['speedup_vs_eager'])}, vs (b) {ratio(r['speedup_vs_compiled'])}, "
        f"vs (c) {ratio(r['speedup_vs_fused_compiled'])}, vs best(b,c) {ratio(r['speedup_vs_best_compiled'])}; "
        f"fastmtl / floor (d) {ratio(r['fastmtl_over_floor'])}"
    )
    if "roofline" in result:
        roof = result["roofline"]
        print(
            f"roofline: trunk fwd+bwd {roof['fastmtl_tflops']:.3g} TFLOP/s, its GEMMs alone (torch.mm) "
            f"{roof['floor_tflops']:.3g} TFLOP/s; trunk / floor {ratio(r['trunk_over_floor'])}"
        )
    print(f"\n{goals_table(result['goals'])}" if result["goals"] else "goals: none for this size")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        nargs="+",
        choices=sorted(set(SIZES) | set(CUDA_SIZES)),
        help=f"benchmark sizes (default: all of the device's: cpu {sorted(SIZES)}, cuda {sorted(CUDA_SIZES)})",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "float64", "bfloat16", "float16"),
        help="float32 (default), float64; bfloat16 and float16 on CUDA only",
    )
    parser.add_argument(
        "--roofline",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time the trunk alone against its GEMMs (default: on for cuda, off for cpu)",
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants (b) and (c)")
    args = FLAGS.parse(parser, argv)
    on_cuda = torch.device(args.device).type == "cuda"
    if args.dtype in ("bfloat16", "float16") and not on_cuda:
        parser.error(f"--dtype {args.dtype}: fastmtl's 16-bit kernels are CUDA only")
    table = sizes_for(args.device)
    args.sizes = args.sizes or sorted(table)
    unknown = [name for name in args.sizes if name not in table]
    if unknown:
        parser.error(f"--sizes {' '.join(unknown)}: not a {args.device} size (choose from {sorted(table)})")
    if args.roofline is None:
        args.roofline = on_cuda
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    print_header(args)
    results = []
    for size in [SMALL_SIZE] if args.small else [sizes_for(args.device)[name] for name in args.sizes]:
        results.append(run_size(size, args, dtype))
        print_result(results[-1], args.device, dtype)
    settings = {
        "dtype": args.dtype,
        "roofline": args.roofline,
        "compile": not args.no_compile,
        "missing_fraction": MISSING_FRACTION,
        "zero_grad": "set_to_none=True, outside the timed region",
        "seed": SEED,
        "fastmtl": fastmtl.__version__,
    }
    # float32 and bfloat16 runs side by side
    write_results("bench_step", args, results, settings, suffix="" if args.dtype == "float32" else f"-{args.dtype}")


if __name__ == "__main__":
    main()
