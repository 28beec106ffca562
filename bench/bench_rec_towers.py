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

With ``--mtl``, a gradient-aggregation step (UPGrad) of the same models too, float32:

  loop        LibMTL's way on the plain model: T torch.autograd.grad calls over a retained graph for
              the shared experts (MMoE: all experts; PLE: the shared ones), their T x P Jacobian, its
              Gram, UPGrad's weights (fastmtl's solver), w @ J into .grad; the gates, task experts and
              towers get the gradient of sum_t L_t (one more backward, as LibMTL gives them).
  exact       native.mtl_backward(x, targets, UPGrad()): the same step on the fastmtl.nn model.
  native sum  native.loss(x, targets).backward(): the plain step, the floor of both.

Before timing, in eval mode, exact's Gram matrix must equal the loop's (rtol 1e-3).

    python bench/bench_rec_towers.py             # B = 1024 and 4096, float32 and bf16 autocast
    python bench/bench_rec_towers.py --mtl       # ... and the aggregation step
    python bench/bench_rec_towers.py --small     # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import copy

import torch
import torch.nn.functional as F

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


def shared_and_specific(plain) -> tuple[list, list]:
    """The plain model's shared experts' parameters (what the Gram is over), and the rest."""
    shared = list((plain.experts if isinstance(plain, RecMMoE) else plain.shared).parameters())
    ids = {id(p) for p in shared}
    return shared, [p for p in plain.parameters() if id(p) not in ids]


def masked_bce_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The per-task losses [T] of :func:`masked_bce_loss`."""
    known = ~labels.isnan()
    per_entry = F.binary_cross_entropy_with_logits(logits, labels.nan_to_num(0.0), reduction="none") * known
    return per_entry.sum(0) / known.sum(0).clamp_min(1)


def make_mtl_variants(kind: str, batch: int, small: bool):
    torch.manual_seed(SEED)
    plain = make_model(kind, small)
    native = native_twin(plain, DROPOUT)
    x = torch.randn(batch, IN_FEATURES)
    labels = (torch.rand(batch, TASKS) < 0.3).float()
    labels[torch.rand(batch, TASKS) < MISSING] = float("nan")
    packed = native.heads.pack_targets({name: labels[:, t] for t, name in enumerate(native.heads.task_names)})
    shared, specific = shared_and_specific(plain)

    def loop_step():
        losses = masked_bce_losses(plain(x), labels)
        rows = [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[t], shared, retain_graph=True)])
            for t in range(TASKS)
        ]
        jacobian = torch.stack(rows)
        gram = jacobian @ jacobian.T
        update = fastmtl.aggregation.UPGrad()(gram) @ jacobian
        offset = 0
        for p in shared:
            p.grad = update[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        losses.sum().backward(inputs=specific)
        return gram

    def exact_step():
        return native.mtl_backward(x, packed, fastmtl.aggregation.UPGrad()).gram

    def native_sum():
        native.loss(x, packed).backward()

    plain.eval(), native.eval()
    want, got = loop_step(), exact_step()
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6 * float(want.abs().max()))
    plain.train(), native.train()

    def reset_of(model):
        return lambda: model.zero_grad(set_to_none=True)

    return [
        Variant("loop", "loop", loop_step, reset_of(plain), note="LibMTL's T passes on the plain model"),
        Variant("exact", "exact", exact_step, reset_of(native), note="native.mtl_backward"),
        Variant("native_sum", "native sum", native_sum, reset_of(native), note="the plain step"),
    ]


def run_mtl(kind: str, batch: int, args) -> dict:
    variants = make_mtl_variants(kind, batch, args.small)
    timings = time_variants(variants, args.repeats, args.warmup)
    memory = {v.key: peak_memory_bytes(v) for v in variants}
    exact = timings["exact"]["median_ms"]
    return {
        "model": kind,
        "batch": batch,
        "variants": timings,
        "peak_memory_bytes": memory,
        "exact_speedup_over_loop": timings["loop"]["median_ms"] / exact,
        "exact_over_plain_step": exact / timings["native_sum"]["median_ms"],
        "goals": [
            Goal(f"{kind} B={batch} UPGrad step: exact vs loop", 1.0).evaluate(timings["loop"]["median_ms"] / exact)
        ],
    }


def mtl_table(results) -> str:
    rows = [
        (
            r["model"], r["batch"], f"{r['variants']['loop']['median_ms']:.2f}",
            f"{r['variants']['exact']['median_ms']:.2f}", f"{r['variants']['native_sum']['median_ms']:.2f}",
            ratio(r["exact_speedup_over_loop"]), ratio(r["exact_over_plain_step"]),
            ratio(r["peak_memory_bytes"]["exact"] / r["peak_memory_bytes"]["loop"]),
        )
        for r in results
    ]  # fmt: skip
    headers = ("model", "B", "loop ms", "exact ms", "plain step ms", "exact vs loop", "exact / plain step",
               "exact / loop memory")  # fmt: skip
    return markdown_table(headers, rows)


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
    parser.add_argument("--mtl", action="store_true", help="also the UPGrad aggregation step (loop vs exact)")
    parser.add_argument("--only-mtl", action="store_true", help="only the UPGrad aggregation step")
    args = FLAGS.parse(parser, argv)
    print_header(args)
    results = []
    batches = [256] if args.small else [1024, 4096]
    mtl_results = []
    if args.mtl or args.only_mtl:
        mtl_results = [run_mtl(kind, batch, args) for kind in ("MMoE", "PLE") for batch in batches]
        print(mtl_table(mtl_results))
        print()
        print(goals_table([g for r in mtl_results for g in r["goals"]]))
        print()
    if args.only_mtl:
        write_results(
            "bench_rec_towers", args, {"mtl_step": mtl_results}, {"seed": SEED, "dropout": DROPOUT, "missing": MISSING}
        )
        return
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
    everything = {"train_step": results, "mtl_step": mtl_results} if mtl_results else results
    write_results("bench_rec_towers", args, everything, {"seed": SEED, "dropout": DROPOUT, "missing": MISSING})


if __name__ == "__main__":
    main()
