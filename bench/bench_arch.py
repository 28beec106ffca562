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
import copy
import datetime
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import fastmtl
from _common import default_output_path, machine_description, write_json
from harness import summarise

CHECK_RTOL = 1e-4
SEED = 0
GEMM_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")


@dataclass(frozen=True)
class Size:
    name: str
    batch: int
    in_features: int
    num_experts: int
    expert_hidden: tuple
    num_tasks: int
    min_speedup_vs_loop: Optional[float] = None
    min_speedup_vs_bmm_compiled: Optional[float] = None

    def describe(self) -> str:
        return (f"B={self.batch} in={self.in_features} {self.num_experts} experts of "
                f"[{', '.join(map(str, self.expert_hidden))}] T={self.num_tasks}")


SIZES = {
    "1": Size("1", 512, 128, 8, (64, 32), 6, 2.5, 1.3),
    "2": Size("2", 2048, 256, 8, (256, 128), 4, 1.1, None),
}
SMALL_SIZE = Size("small", 32, 16, 3, (8, 4), 2)


# ---- the three plain PyTorch MMoEs


class LoopMMoE(nn.Module):
    """As the recommendation libraries write it."""

    def __init__(self, fused: fastmtl.nn.MMoE, heads: fastmtl.nn.MultiTaskHeads):
        super().__init__()
        bank = fused.experts
        self.experts = nn.ModuleList()
        for e in range(fused.num_experts):
            layers = []
            for w, b in zip(bank.weights, bank.biases):
                linear = nn.Linear(w.shape[2], w.shape[1])
                with torch.no_grad():
                    linear.weight.copy_(w[e])
                    linear.bias.copy_(b[e])
                layers += [linear, nn.ReLU()]
            self.experts.append(nn.Sequential(*layers))
        self.gates = nn.ModuleList()
        self.towers = nn.ModuleList()
        for t in range(fused.num_tasks):
            gate = nn.Linear(fused.in_features, fused.num_experts)
            tower = nn.Linear(heads.in_features, 1)
            with torch.no_grad():
                gate.weight.copy_(fused.gates.weight[t])
                gate.bias.copy_(fused.gates.bias[t])
                tower.weight.copy_(heads.weight[t:t + 1])
                tower.bias.copy_(heads.bias[t:t + 1])
            self.gates.append(gate)
            self.towers.append(tower)

    def expert_grads(self):
        return [torch.stack([e[2 * i].weight.grad for e in self.experts]) for i in range(len(self.experts[0]) // 2)]

    def loss(self, x, targets):
        outs = torch.stack([expert(x) for expert in self.experts], dim=1)  # [B, E, h]
        total = 0.0
        for t, (gate, tower) in enumerate(zip(self.gates, self.towers)):
            mixture = (torch.softmax(gate(x), dim=-1).unsqueeze(-1) * outs).sum(1)
            total = total + F.binary_cross_entropy_with_logits(tower(mixture).squeeze(-1), targets[:, t])
        return total


class StackedMMoE(nn.Module):
    """Stacked expert parameters, batched GEMMs, one gate GEMM, one head GEMM."""

    def __init__(self, fused: fastmtl.nn.MMoE, heads: fastmtl.nn.MultiTaskHeads):
        super().__init__()
        bank = fused.experts
        self.weights = nn.ParameterList([nn.Parameter(w.detach().clone()) for w in bank.weights])
        self.biases = nn.ParameterList([nn.Parameter(b.detach().clone()) for b in bank.biases])
        self.gate_weight = nn.Parameter(fused.gates.weight.detach().clone())
        self.gate_bias = nn.Parameter(fused.gates.bias.detach().clone())
        self.head_weight = nn.Parameter(heads.weight.detach().clone())
        self.head_bias = nn.Parameter(heads.bias.detach().clone())

    def expert_grads(self):
        return [w.grad for w in self.weights]

    def loss(self, x, targets):
        E = self.weights[0].shape[0]
        h = x.unsqueeze(0).expand(E, *x.shape)
        for w, b in zip(self.weights, self.biases):
            h = torch.relu(torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2)))
        T = self.gate_weight.shape[0]
        logits = F.linear(x, self.gate_weight.reshape(T * E, -1), self.gate_bias.reshape(-1))
        gates = torch.softmax(logits.view(-1, T, E), dim=-1)  # [B, T, E]
        mixtures = torch.einsum("bte,ebh->tbh", gates, h)
        # Head t on mixture t: [T, B, h] x [T, h] -> [T, B].
        out = torch.einsum("tbh,th->tb", mixtures, self.head_weight) + self.head_bias.unsqueeze(1)
        return F.binary_cross_entropy_with_logits(out, targets.t(), reduction="none").mean(1).sum()


def make_mmoe_variants(size: Size, with_compile: bool):
    torch.manual_seed(SEED)
    tasks = [fastmtl.Task(f"ctr{t}", "binary") for t in range(size.num_tasks)]
    model = fastmtl.nn.MultiTaskModel(
        fastmtl.nn.MMoE(size.in_features, size.num_experts, list(size.expert_hidden), size.num_tasks),
        fastmtl.nn.MultiTaskHeads(size.expert_hidden[-1], tasks))
    loop, stacked = LoopMMoE(model.trunk, model.heads), StackedMMoE(model.trunk, model.heads)
    x = torch.randn(size.batch, size.in_features)
    labels = (torch.rand(size.batch, size.num_tasks) < 0.3).float()
    packed = model.heads.pack_targets({t.name: labels[:, i] for i, t in enumerate(tasks)})
    variants = {
        "loop": (loop, lambda: loop.loss(x, labels), loop.expert_grads),
        "bmm": (stacked, lambda: stacked.loss(x, labels), stacked.expert_grads),
        "fastmtl": (model, lambda: model.loss(x, packed), lambda: [w.grad for w in model.trunk.experts.weights]),
    }
    if with_compile:
        compiled = torch.compile(stacked.loss, fullgraph=True)
        variants["bmm compiled"] = (stacked, lambda: compiled(x, labels), stacked.expert_grads)
    return variants


def make_gemm_floor(size: Size):
    """The GEMMs of fastmtl's MMoE step (forward and backward, x without gradient)."""
    B, d, E, T = size.batch, size.in_features, size.num_experts, size.num_tasks
    widths = size.expert_hidden
    x = torch.randn(B, d)
    w0 = torch.randn(E * widths[0], d)
    deeper = [(torch.randn(E, B, a), torch.randn(E, b, a), torch.randn(E, B, b)) for a, b in zip(widths, widths[1:])]
    gate_w, head_w = torch.randn(T * E, d), torch.randn(T, T * widths[-1])
    z_side, dlogits = torch.randn(B, T * widths[-1]), torch.randn(B, T)
    delta0, dgate = torch.randn(B, E * widths[0]), torch.randn(B, T * E)
    outs = {"h0": torch.empty(B, E * widths[0]), "dw0": torch.empty(E * widths[0], d), "g": torch.empty(B, T * E),
            "dg": torch.empty(T * E, d), "logits": torch.empty(B, T), "dz": torch.empty(B, T * widths[-1]),
            "dh": torch.empty(T, T * widths[-1])}
    deeper_outs = [(torch.empty(E, B, w.shape[1]), torch.empty(w.shape), torch.empty(E, B, w.shape[2]))
                   for _, w, _ in deeper]

    class Floor(nn.Module):
        def loss(self):
            torch.mm(x, w0.t(), out=outs["h0"])
            for (h, w, delta), (out, dw, dgrad) in zip(deeper, deeper_outs):
                torch.bmm(h, w.transpose(1, 2), out=out)
                torch.bmm(delta.transpose(1, 2), h, out=dw)
                torch.bmm(delta, w, out=dgrad)
            torch.mm(x, gate_w.t(), out=outs["g"])
            torch.mm(z_side, head_w.t(), out=outs["logits"])
            torch.mm(dlogits, head_w, out=outs["dz"])
            torch.mm(dlogits.t(), z_side, out=outs["dh"])
            torch.mm(dgate.t(), x, out=outs["dg"])
            torch.mm(delta0.t(), x, out=outs["dw0"])
            return _NoBackward()

    class _NoBackward:
        def backward(self):
            pass

    floor = Floor()
    return floor, floor.loss


def make_convert_variants(size_small: bool):
    """A plain PyTorch MTL model with a custom forward, and its conversion."""
    batch, d, widths, T, tower = (32, 16, (32, 32), 2, 8) if size_small else (512, 128, (256, 256, 256), 6, 64)

    class PlainMTL(nn.Module):
        def __init__(self):
            super().__init__()
            layers, fan_in = [], d
            for w in widths:
                layers += [nn.Linear(fan_in, w), nn.ReLU()]
                fan_in = w
            self.trunk = nn.Sequential(*layers)
            self.towers = nn.ModuleList(
                [nn.Sequential(nn.Linear(fan_in, tower), nn.ReLU(), nn.Linear(tower, 1)) for _ in range(T)])

        def forward(self, x):
            z = self.trunk(x)
            return [t(z).squeeze(-1) for t in self.towers]

    torch.manual_seed(SEED)
    plain = PlainMTL()
    converted, report = fastmtl.convert(plain)
    x = torch.randn(batch, d)
    y = torch.randn(batch, T)

    def step_of(m):
        return lambda: sum(F.mse_loss(o, y[:, t]) for t, o in enumerate(m(x)))

    def first_grads(m):
        return lambda: [(m.trunk.weights[0] if isinstance(m.trunk, fastmtl.nn.FusedMLP) else m.trunk[0].weight).grad]

    shape = f"B={batch} in={d} trunk {'x'.join(map(str, widths))} + {T} towers [{tower}, 1]"
    return {"original": (plain, step_of(plain), first_grads(plain)),
            "converted": (converted, step_of(converted), first_grads(converted))}, shape, str(report)


def check_same(variants) -> None:
    reference_name = next(iter(variants))
    results = {}
    for name, (module, step, grads) in variants.items():
        module.zero_grad(set_to_none=True)
        loss = step()
        loss.backward()
        results[name] = (loss.detach(), [g.clone() for g in grads()])
        module.zero_grad(set_to_none=True)
    ref_loss, ref_grads = results[reference_name]
    for name, (loss, grads) in results.items():
        torch.testing.assert_close(loss, ref_loss, rtol=CHECK_RTOL, atol=1e-6, msg=f"{name}: loss differs")
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=CHECK_RTOL, atol=1e-6 * float(r.abs().max()), msg=f"{name}: gradient")


def time_variants(variants, repeats: int, warmup: int) -> Dict[str, dict]:
    names = list(variants)
    samples = {n: [] for n in names}
    for r in range(warmup + repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            module, step, _ = variants[name]
            module.zero_grad(set_to_none=True)
            start = time.perf_counter()
            step().backward()
            elapsed = (time.perf_counter() - start) * 1e3
            if r >= warmup:
                samples[name].append(elapsed)
    return {n: summarise(s) for n, s in samples.items()}


def gemm_share(module, step, steps: int = 10) -> float:
    """Self CPU time in GEMM calls over the wall time of the profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            module.zero_grad(set_to_none=True)
            step().backward()
        wall_us = (time.perf_counter() - start) * 1e6
    gemm_us = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in GEMM_OPS)
    return gemm_us / wall_us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's). On a machine shared with other jobs, 1: OpenMP "
                             "barriers of 2+ threads on busy cores cost more than the work")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sizes = [SMALL_SIZE] if args.small else list(SIZES.values())
    repeats, warmup = (5, 2) if args.small else (args.repeats, args.warmup)

    results = []
    for size in sizes:
        variants = make_mmoe_variants(size, not args.no_compile)
        check_same(variants)
        variants["gemm floor"] = make_gemm_floor(size) + (None,)
        timings = time_variants(variants, repeats, warmup)
        fast = timings["fastmtl"]["median_ms"]
        speedups = {n: t["median_ms"] / fast for n, t in timings.items() if n not in ("fastmtl", "gemm floor")}
        loop_over_floor = timings["loop"]["median_ms"] / timings["gemm floor"]["median_ms"]
        share = gemm_share(variants["fastmtl"][0], variants["fastmtl"][1])
        loop_share = gemm_share(variants["loop"][0], variants["loop"][1])
        goals = {}
        if size.min_speedup_vs_loop is not None:
            goals["vs loop"] = {"goal": size.min_speedup_vs_loop, "got": speedups["loop"],
                                "met": speedups["loop"] >= size.min_speedup_vs_loop}
        if size.min_speedup_vs_bmm_compiled is not None and "bmm compiled" in speedups:
            got = speedups["bmm compiled"]
            goals["vs bmm compiled"] = {"goal": size.min_speedup_vs_bmm_compiled, "got": got,
                                        "met": got >= size.min_speedup_vs_bmm_compiled}
        results.append({"size": asdict(size), "description": size.describe(), "variants": timings,
                        "speedup_of_fastmtl": speedups, "loop_over_gemm_floor": loop_over_floor, "gemm_share_fastmtl": share, "gemm_share_loop": loop_share,
                        "goals": goals})
        print(f"\nMMoE step, {size.describe()}")
        for name, t in timings.items():
            ratio = f"   fastmtl {speedups[name]:.2f}x faster" if name in speedups else ""
            print(f"  {name:14s} {t['median_ms']:8.3f} ms (p10 {t['p10_ms']:.3f}, p90 {t['p90_ms']:.3f}){ratio}")
        print(f"  GEMM share of the step (profiler): fastmtl {100 * share:.0f}%, loop {100 * loop_share:.0f}%; "
              f"loop / gemm floor {loop_over_floor:.2f}x (the most any variant doing these GEMMs can gain)")
        for goal, g in goals.items():
            print(f"  goal {goal} >= {g['goal']}x: {g['got']:.2f}x {'met' if g['met'] else 'MISSED'}")

    variants, shape, report = make_convert_variants(args.small)
    check_same(variants)
    timings = time_variants(variants, repeats, warmup)
    speedup = timings["original"]["median_ms"] / timings["converted"]["median_ms"]
    results.append({"convert": shape, "variants": timings, "speedup_of_converted": speedup, "report": report})
    print(f"\nconvert: {shape}")
    for name, t in timings.items():
        print(f"  {name:14s} {t['median_ms']:8.3f} ms (p10 {t['p10_ms']:.3f}, p90 {t['p90_ms']:.3f})")
    print(f"  converted {speedup:.2f}x faster\n{report}")

    payload = {"benchmark": "bench_arch", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": machine_description("cpu"),
               "settings": {"repeats": repeats, "warmup": warmup, "compile": not args.no_compile, "seed": SEED,
                            "zero_grad": "set_to_none=True, outside the timed region", "dtype": "float32",
                            "threads": torch.get_num_threads()},
               "results": results}
    path = args.out or default_output_path("bench_arch", "cpu", args.small)
    write_json(path, payload)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
