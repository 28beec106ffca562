"""fastmtl.mtl_backward on real trunks (a residual CNN with BatchNorm, a TransformerEncoder, a
CelebA-shaped 40-task CNN) against the ways people compute per-task gradients today (issue 16).

Variants, on copies of the same weights and batch, one gradient-aggregation step each (forward, all
losses, the aggregated update of the trunk in .grad, the heads' own gradients):

  plain     sum(losses).backward() (no aggregation: the floor)
  exact     fastmtl.mtl_backward(losses, z, method)
  partial   ... gram_params = the trunk's last block (the update still reaches every parameter)
  rep       ... mode="rep" (MGDA-UB: Gram of the feature gradients)
  loop      LibMTL's way: T torch.autograd.grad calls over a retained graph, the stacked T x P
            Jacobian, its Gram, the method's weights, w @ J into .grad
  autojac   torchjd 0.18 autojac.mtl_backward + jac_to_grad, weights by the fastmtl method
  autogram  torchjd 0.18 autogram.Engine(trunk).compute_gramian(losses), the fastmtl method's weights,
            losses.backward(weights)

All variants use fastmtl's solver for the method, so the table compares the engines. Timing: one
process, each repeat runs every variant once (order rotated per repeat), median over repeats.
Peak memory: bytes allocated by torch's CPU allocator during one step (the profiler's allocation
events). cos: cosine of the variant's trunk update to exact's (the partial and rep approximations;
about 1 for the exact ones, the float32 rounding of different summation orders).

    python bench/bench_any_trunk.py --threads 1            # all sizes, all methods
    python bench/bench_any_trunk.py --small                # a smoke run
    python bench/bench_any_trunk.py --profile              # op counts of exact vs loop per size
"""

from __future__ import annotations

import argparse
import copy
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

import fastmtl
import fastmtl.aggregation as agg
from fastmtl.engine import update_cosine
from harness import (
    Goal,
    SharedFlags,
    Variant,
    goals_table,
    markdown_table,
    peak_memory_bytes,
    print_header,
    time_variants,
    write_results,
)

METHODS = {
    "UPGrad": agg.UPGrad,
    "PCGrad": lambda: agg.PCGrad(seed=0),
    "MGDA": agg.MGDA,
    "CAGrad": agg.CAGrad,
    "NashMTL": agg.NashMTL,
}
VARIANTS = ("plain", "exact", "partial", "rep", "loop", "autojac", "autogram")
PROFILED_OPS = (
    "convolution_backward",
    "native_batch_norm_backward",
    "native_layer_norm_backward",
    "flash_attention_for_cpu_backward",
    "embedding_dense_backward",
    "aten::cat",
    "aten::stack",
)


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
        )

    def forward(self, x):
        return F.relu(x + self.body(x))


def cnn_trunk(c: int, pooled: bool) -> nn.Sequential:
    layers = [nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), Block(c), Block(c), Block(c)]
    return nn.Sequential(*layers, *([nn.AdaptiveAvgPool2d(1), nn.Flatten()] if pooled else []))


class DenseHeads(nn.Module):
    """Segmentation (13 classes per pixel, CE), depth (L1 per pixel), classification (10, CE)."""

    def __init__(self, c: int):
        super().__init__()
        self.seg, self.depth, self.cls = nn.Conv2d(c, 13, 1), nn.Conv2d(c, 1, 1), nn.Linear(c, 10)

    def forward(self, z, y):
        return [
            F.cross_entropy(self.seg(z), y["seg"]),
            (self.depth(z)[:, 0] - y["depth"]).abs().mean(),
            F.cross_entropy(self.cls(z.mean((2, 3))), y["cls"]),
        ]


class SequenceHeads(nn.Module):
    """Three heads on the mean token: 5 classes (CE), a regression (MSE), a binary label (BCE)."""

    def __init__(self, d: int):
        super().__init__()
        self.cls, self.reg, self.bin = nn.Linear(d, 5), nn.Linear(d, 1), nn.Linear(d, 1)

    def forward(self, z, y):
        h = z.mean(1)
        return [
            F.cross_entropy(self.cls(h), y["cls"]),
            F.mse_loss(self.reg(h)[:, 0], y["reg"]),
            F.binary_cross_entropy_with_logits(self.bin(h)[:, 0], y["bin"]),
        ]


class BinaryHeads(nn.Module):
    def __init__(self, d: int, tasks: int):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(d, 1) for _ in range(tasks))

    def forward(self, z, y):
        return [F.binary_cross_entropy_with_logits(h(z)[:, 0], y[:, t]) for t, h in enumerate(self.heads)]


class Transformer(nn.Module):
    def __init__(self, d: int, vocab: int = 100):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=2 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)

    def forward(self, tokens):
        return self.encoder(self.embed(tokens))


def make_case(name: str, batch: int, small: bool):
    """(trunk, heads, input, targets, last block's parameters) of one size, seeded. The heads
    return the list of per-task losses."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    side, c = (8, 8) if small else (32, 16)
    if name == "cnn":
        trunk, heads = cnn_trunk(c, pooled=False), DenseHeads(c)
        x = torch.randn(batch, 3, side, side, generator=g)
        y = {
            "seg": torch.randint(0, 13, (batch, side, side), generator=g),
            "depth": torch.rand(batch, side, side, generator=g),
            "cls": torch.randint(0, 10, (batch,), generator=g),
        }
        last = trunk[5].body[4].parameters()  # the last block's last BatchNorm
    elif name == "transformer":
        trunk, heads = Transformer(16 if small else 64), SequenceHeads(16 if small else 64)
        x = torch.randint(0, 100, (batch, 8 if small else 32), generator=g)
        y = {
            "cls": torch.randint(0, 5, (batch,), generator=g),
            "reg": torch.randn(batch, generator=g),
            "bin": torch.randint(0, 2, (batch,), generator=g).float(),
        }
        top = trunk.encoder.layers[-1]
        last = list(top.linear2.parameters()) + list(top.norm2.parameters())  # the last feed-forward out + norm
    else:  # celeba: the CNN trunk pooled, 40 binary attributes
        trunk, heads = cnn_trunk(c, pooled=True), BinaryHeads(c, 40)
        x = torch.randn(batch, 3, side, side, generator=g)
        y = torch.randint(0, 2, (batch, 40), generator=g).float()
        last = trunk[5].body[4].parameters()
    return trunk, heads, x, y, list(last)


def make_step(variant: str, case, method):
    """A fresh copy of the model and the step function of one variant."""
    trunk0, heads0, x, y, last0 = case
    model = copy.deepcopy(nn.ModuleDict({"trunk": trunk0, "heads": heads0}))
    trunk, heads = model["trunk"], model["heads"]
    index = {id(p): i for i, p in enumerate(trunk0.parameters())}
    shared = list(trunk.parameters())
    last = [shared[index[id(p)]] for p in last0]
    aggregator = method()

    def forward(stacked=True):
        z = trunk(x)
        losses = heads(z, y)
        return z, torch.stack(losses) if stacked else losses

    if variant == "plain":

        def step():
            forward()[1].sum().backward()
    elif variant in ("exact", "partial", "rep"):

        def step():
            z, losses = forward()
            fastmtl.mtl_backward(
                losses,
                z,
                aggregator,
                mode="rep" if variant == "rep" else "exact",
                gram_params=last if variant == "partial" else None,
            )
    elif variant == "loop":

        def step():
            _, losses = forward()
            rows = [
                torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[t], shared, retain_graph=True)])
                for t in range(len(losses))
            ]
            jacobian = torch.stack(rows)
            update = aggregator(jacobian @ jacobian.T) @ jacobian
            offset = 0
            for p in shared:
                p.grad = update[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
            losses.sum().backward(inputs=list(heads.parameters()))
    elif variant == "autojac":
        from torchjd.aggregation import GramianWeightedAggregator, Weighting
        from torchjd.autojac import jac_to_grad, mtl_backward

        class FastmtlWeighting(Weighting):
            def forward(self, gramian):
                return aggregator(gramian)

        torchjd_aggregator = GramianWeightedAggregator(FastmtlWeighting())

        def step():
            z, losses = forward(stacked=False)
            mtl_backward(losses, features=z, shared_params=shared)
            jac_to_grad(shared, torchjd_aggregator)
    else:
        from torchjd.autogram import Engine

        engine = Engine(trunk, batch_dim=None)

        def step():
            _, losses = forward()
            losses.backward(aggregator(engine.compute_gramian(losses).detach()))

    return model, step


def trunk_update(model):
    return [p.grad.detach().clone() for p in model["trunk"].parameters()]


def op_counts(model, step) -> Counter:
    from torch.profiler import ProfilerActivity, profile

    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    counts = Counter()
    for event in prof.key_averages():
        for op in PROFILED_OPS:
            if op in event.key and not event.key.startswith("autograd::"):
                counts[op] += event.count
    return counts


def run_size(label, case, methods, variants, args, repeats):
    """One table per size: every method, every variant; goals of issue 16 per method."""
    print(f"\n### {label}\n")
    rows, goals, results = [], [], {}
    for method_name in methods:
        steps = {v: make_step(v, case, METHODS[method_name]) for v in variants}
        runs = [
            Variant(v, v, step, lambda m=model: m.zero_grad(set_to_none=True)) for v, (model, step) in steps.items()
        ]
        updates = {}
        for run in runs:  # the update of identical weights, before any timing
            run.run()
            updates[run.key] = trunk_update(steps[run.key][0])
        memory = {run.key: peak_memory_bytes(run) for run in runs}
        stats = time_variants(runs, repeats, args.warmup)
        ms = {v: stats[v]["median_ms"] for v in variants}
        for v in variants:
            cos = update_cosine(updates[v], updates["exact"]) if v != "plain" else float("nan")
            rows.append(
                (
                    method_name,
                    v,
                    f"{ms[v]:.1f}",
                    f"{ms[v] / ms['exact']:.2f}x",
                    f"{ms[v] / ms['plain']:.2f}x",
                    f"{memory[v] / 2**20:.2f}",
                    f"{memory[v] / memory['loop']:.2f}x" if "loop" in memory else "-",
                    f"{cos:.6f}",
                )
            )
        if "loop" in ms:
            goals.append(Goal(f"{method_name}: loop / exact time", 1.0).evaluate(ms["loop"] / ms["exact"]))
            goals.append(
                Goal(f"{method_name}: exact / loop memory", 1.0, False).evaluate(memory["exact"] / memory["loop"])
            )
        if "autogram" in ms:
            goals.append(Goal(f"{method_name}: autogram / exact time", 1.5).evaluate(ms["autogram"] / ms["exact"]))
        if label.startswith("celeba"):
            for v in ("partial", "rep"):
                if v in ms:
                    goals.append(Goal(f"{method_name}: {v} / plain time", 1.3, False).evaluate(ms[v] / ms["plain"]))
        results[method_name] = {
            "stats": stats,
            "peak_memory_bytes": memory,
            "cosine_to_exact": {v: update_cosine(updates[v], updates["exact"]) for v in variants},
        }
        print(
            markdown_table(
                (
                    "method",
                    "variant",
                    "median ms",
                    "time / exact",
                    "time / plain",
                    "peak MB",
                    "memory / loop",
                    "cos to exact",
                ),
                rows[-len(variants) :],
            ),
            flush=True,
        )
    print("\n" + goals_table(goals))
    return {"results": results, "goals": goals}


FLAGS = SharedFlags(repeats=7, warmup=1, small_repeats=2, small_warmup=0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", action="store_true", help="op counts of one UPGrad step per variant")
    parser.add_argument("--celeba-repeats", type=int, default=3, help="repeats of the 40-task size (its loop is slow)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--sizes", default="cnn8,cnn32,transformer8,transformer32,celeba64")
    args = FLAGS.parse(parser, argv)
    print_header(args)
    methods, variants = args.methods.split(","), args.variants.split(",")
    everything = {}
    for size in args.sizes.split(","):
        name, batch = size.rstrip("0123456789"), int(size[len(size.rstrip("0123456789")) :])
        case = make_case(name, 4 if args.small else batch, args.small)
        label = f"{name}, B={batch}" + (" (small)" if args.small else "")
        if args.profile:
            print(f"\n### op calls of one UPGrad step, {label}\n")
            counts = {
                v: op_counts(*make_step(v, case, METHODS["UPGrad"]))
                for v in ("loop", "exact", "partial", "rep", "plain")
            }
            print(
                markdown_table(
                    ("variant",) + PROFILED_OPS, [(v,) + tuple(c[op] for op in PROFILED_OPS) for v, c in counts.items()]
                )
            )
            continue
        repeats = min(args.repeats, args.celeba_repeats) if name == "celeba" else args.repeats
        everything[size] = run_size(label, case, methods, variants, args, repeats)
    if not args.profile:
        write_results("bench_any_trunk", args, everything, {"methods": methods, "variants": variants})


if __name__ == "__main__":
    main()
