"""One training step of torch-rechub-style MMoE and PLE (BatchNorm + Dropout experts and towers,
softmax gates, 3 binary tasks with missing labels): fastmtl.convert-ed against the same model in
plain PyTorch, eager and compiled, in float32 and under bfloat16 autocast (issue 15).

Variants (copies of the same weights, the same data):

  eager       the plain model (rec_models.py: rechub's MLP layers), loss.backward().
  compiled    the plain model's loss under torch.compile (backward compiled with it by AOTAutograd).
  fastmtl     fastmtl.convert(plain model): every expert, gate and tower MLP (Linear, BatchNorm1d,
              ReLU | Softmax, Dropout runs) one fastmtl.ops.fused_mlp_norm call; each tower's output
              Linear(., 1) stays plain.
  native      the same model written with fastmtl.nn (MMoE / PLE with norm="batch", dropout and
              tower_hidden, the towers' Linear(., 1) as MultiTaskHeads' binary heads) carrying the
              plain model's weights: all experts in one stacked fused_mlp_norm call, all gates in one
              gated_mixture call, all towers in one stacked call, heads and losses in one
              multitask_head_loss call; MultiTaskModel.loss.

Before timing, eager and fastmtl must agree in eval mode (outputs, rtol 1e-4); dropout makes the
training steps random, so the timed steps are compared by shape only. One process; each repeat runs
every variant once in a rotated order; medians of the repeats.

    python bench/bench_rec_towers.py             # B = 1024 and 4096, float32 and bf16 autocast
    python bench/bench_rec_towers.py --small     # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import copy

import torch

import fastmtl
from harness import (
    Goal,
    SharedFlags,
    Variant,
    goals_table,
    markdown_table,
    peak_memory_bytes,
    print_header,
    ratio,
    time_variants,
    write_results,
)
from rec_models import RecMMoE, RecPLE, masked_bce_loss, native_twin

FLAGS = SharedFlags(repeats=20, warmup=3, small_repeats=3, small_warmup=1)
SEED = 0
IN_FEATURES, TASKS, DROPOUT, MISSING = 64, 3, 0.2, 0.3
GOALS = {"eager": 1.5, "compiled": 1.2}  # issue 15: fastmtl's speedup over each


def make_model(kind: str, small: bool):
    expert, tower = ((16,), (8,)) if small else ((256, 128), (64,))
    if kind == "MMoE":
        return RecMMoE(IN_FEATURES, 4 if small else 8, expert, tower, TASKS, DROPOUT)
    return RecPLE(IN_FEATURES, 1, 2 if small else 4, expert, tower, TASKS, DROPOUT)


def make_variants(kind: str, batch: int, dtype: torch.dtype, small: bool, with_compile: bool):
    torch.manual_seed(SEED)
    plain = make_model(kind, small)
    fused, report = fastmtl.convert(plain)
    native = native_twin(plain, DROPOUT)
    x = torch.randn(batch, IN_FEATURES)
    labels = (torch.rand(batch, TASKS) < 0.3).float()
    labels[torch.rand(batch, TASKS) < MISSING] = float("nan")
    packed = native.heads.pack_targets({name: labels[:, t] for t, name in enumerate(native.heads.task_names)})
    autocast = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext

    plain.eval(), fused.eval(), native.eval()
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    with torch.no_grad(), autocast():
        expected = plain(x).float()
        torch.testing.assert_close(fused(x).float(), expected, rtol=tolerance, atol=tolerance)
        native_logits = torch.stack([z.reshape(-1) for z in native(x).values()], dim=1).float()
        torch.testing.assert_close(native_logits, expected, rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(
            native.loss(x, packed), masked_bce_loss(expected, labels), rtol=tolerance, atol=tolerance
        )
    plain.train(), fused.train(), native.train()

    def loss_of(model):
        def loss():
            with autocast():
                return masked_bce_loss(model(x), labels)

        return loss

    def variant(key, model, loss_fn, note=""):
        def step():
            loss = loss_fn()
            loss.backward()
            return loss.detach()

        return Variant(key, key, step, lambda: model.zero_grad(set_to_none=True), note=note)

    compiled_model = copy.deepcopy(plain)

    def native_loss():
        with autocast():
            return native.loss(x, packed)

    variants = [
        variant("eager", plain, loss_of(plain)),
        variant("fastmtl", fused, loss_of(fused), "fastmtl.convert"),
        variant("native", native, native_loss, "fastmtl.nn MMoE / PLE + MultiTaskHeads"),
    ]
    if with_compile:
        compiled_loss = torch.compile(loss_of(compiled_model))
        variants.append(variant("compiled", compiled_model, compiled_loss, "torch.compile, default mode"))
    replaced = len(report.replaced)
    return variants, replaced


def run(kind: str, batch: int, dtype: torch.dtype, args) -> dict:
    variants, replaced = make_variants(kind, batch, dtype, args.small, not args.no_compile)
    timings = time_variants(variants, args.repeats, args.warmup)
    memory = {v.key: peak_memory_bytes(v) for v in variants}
    fast, native = timings["fastmtl"]["median_ms"], timings["native"]["median_ms"]
    speedups = {k: t["median_ms"] / fast for k, t in timings.items() if k not in ("fastmtl", "native")}
    native_speedups = {k: t["median_ms"] / native for k, t in timings.items() if k not in ("fastmtl", "native")}
    return {
        "model": kind,
        "batch": batch,
        "dtype": str(dtype).removeprefix("torch."),
        "mlps_replaced": replaced,
        "variants": timings,
        "peak_memory_bytes": memory,
        "speedup_of_fastmtl": speedups,
        "speedup_of_native": native_speedups,
        "goals": [
            Goal(f"{kind} B={batch} {str(dtype).removeprefix('torch.')}: {who} vs {k}", GOALS[k]).evaluate(v)
            for who, ratios in (("fastmtl", speedups), ("native", native_speedups))
            for k, v in ratios.items()
            if k in GOALS
        ],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    args = FLAGS.parse(parser, argv)
    print_header(args)
    results = []
    batches = [256] if args.small else [1024, 4096]
    for kind in ("MMoE", "PLE"):
        for batch in batches:
            for dtype in (torch.float32, torch.bfloat16):
                results.append(run(kind, batch, dtype, args))
    rows = []
    for r in results:
        t = r["variants"]
        rows.append(
            (
                r["model"], r["batch"], r["dtype"], r["mlps_replaced"],
                f"{t['eager']['median_ms']:.2f}",
                f"{t['compiled']['median_ms']:.2f}" if "compiled" in t else "-",
                f"{t['fastmtl']['median_ms']:.2f}",
                f"{t['native']['median_ms']:.2f}",
                ratio(r["speedup_of_fastmtl"].get("eager")),
                ratio(r["speedup_of_fastmtl"].get("compiled")),
                ratio(r["speedup_of_native"].get("eager")),
                ratio(r["speedup_of_native"].get("compiled")),
                f"{r['peak_memory_bytes']['eager'] / 2**20:.1f}",
                ratio(r["peak_memory_bytes"]["fastmtl"] / r["peak_memory_bytes"]["eager"]),
                ratio(r["peak_memory_bytes"]["native"] / r["peak_memory_bytes"]["eager"]),
            )
        )  # fmt: skip
    headers = (
        "model", "B", "dtype", "MLPs fused", "eager ms", "compiled ms", "convert ms", "native ms",
        "convert vs eager", "convert vs compiled", "native vs eager", "native vs compiled",
        "eager peak MiB", "convert / eager memory", "native / eager memory",
    )  # fmt: skip
    print(markdown_table(headers, rows))
    print()
    print(goals_table([g for r in results for g in r["goals"]]))
    write_results("bench_rec_towers", args, results, {"seed": SEED, "dropout": DROPOUT, "missing": MISSING})


if __name__ == "__main__":
    main()
