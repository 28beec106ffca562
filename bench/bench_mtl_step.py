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
import copy
import datetime
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

import fastmtl
from _common import default_output_path, machine_description, write_json
from harness import summarise
from bench_step import make_fastmtl_model, make_plain_heads, make_plain_trunk, make_targets, make_tasks, masked_task_loss

CHECK_RTOL = 1e-3
SEED = 0


@dataclass(frozen=True)
class Size:
    name: str
    batch: int
    in_features: int
    hidden: tuple
    num_tasks: int
    min_speedup_vs_loop: Optional[float] = None  # goal: (a) / exact >= this
    min_speedup_vs_autogram: Optional[float] = None  # goal: (c) / exact >= this
    max_rep_over_plain: Optional[float] = None  # goal: rep / plain <= this
    max_memory_over_plain: Optional[float] = None  # goal: peak(exact) / peak(plain) <= this

    def describe(self) -> str:
        widths = set(self.hidden)
        trunk = f"{len(self.hidden)}x{self.hidden[0]}" if len(widths) == 1 else "x".join(map(str, self.hidden))
        return f"B={self.batch} in={self.in_features} trunk {trunk} T={self.num_tasks}"


SIZES = {
    "1": Size("1", 256, 128, (256, 256, 256), 40, 1.3, 2.0, 1.25, 1.5),
    "2": Size("2", 512, 128, (512, 512, 512), 8, 1.3, 2.0, 1.25, 1.5),
    "3": Size("3", 64, 256, (1024, 1024), 8, 1.8, 2.0, 1.25, 1.5),
}
SMALL_SIZE = Size("small", 32, 16, (32, 32), 3)


@dataclass
class Variant:
    key: str
    label: str
    run_step: Callable[[], None]
    params: List[torch.Tensor]  # what zero_grad clears
    trunk_grads: Callable[[], List[torch.Tensor]]  # the trunk's weight gradients after a step
    aggregates_exactly: bool = True  # its trunk gradients must match `exact`


def plain_model_losses(trunk, heads, tasks, x, targets):
    """(features, [task.weight * L_t for each task]) of the plain PyTorch model, a Python loop as
    LibMTL writes it."""
    z = trunk(x)
    return z, [task.weight * masked_task_loss(task, heads[task.name](z), targets[task.name]) for task in tasks]


def make_variants(size: Size, tasks, x, targets) -> List[Variant]:
    import torchjd
    from torchjd.aggregation import UPGrad as TorchjdUPGrad, UPGradWeighting
    from torchjd.autogram import Engine
    from torchjd.autojac import jac_to_grad, mtl_backward as torchjd_mtl_backward

    torch.manual_seed(SEED)
    plain_trunk = make_plain_trunk(size, "cpu", torch.float32)
    plain_heads = make_plain_heads(tasks, size.hidden[-1], "cpu", torch.float32)
    aggregator = fastmtl.aggregation.UPGrad()
    variants = []

    def fastmtl_variant(key, label, step, aggregates=True):
        model = make_fastmtl_model(plain_trunk, plain_heads, tasks, size, "cpu", torch.float32)
        variants.append(Variant(key, label, lambda: step(model), list(model.parameters()),
                                lambda: list(model.trunk.weights), aggregates))

    fastmtl_variant("plain", "fastmtl plain step (summed loss)", lambda m: m.loss(x, targets).backward(), False)
    fastmtl_variant("exact", "fastmtl exact", lambda m: m.mtl_backward(x, targets, aggregator))
    fastmtl_variant("rep", "fastmtl rep", lambda m: m.mtl_backward(x, targets, aggregator, mode="rep"), False)

    def plain_copy():
        trunk, heads = copy.deepcopy(plain_trunk), copy.deepcopy(plain_heads)
        return trunk, heads, list(trunk.parameters()), list(heads.parameters())

    def trunk_weights(trunk):
        return lambda: [m.weight for m in trunk if isinstance(m, nn.Linear)]

    trunk_a, heads_a, shared_a, head_params_a = plain_copy()

    def loop_step():
        _, losses = plain_model_losses(trunk_a, heads_a, tasks, x, targets)
        rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[t], shared_a, retain_graph=True)])
                for t in range(len(tasks))]
        jacobian = torch.stack(rows)
        weights = aggregator(jacobian @ jacobian.T)
        update = weights @ jacobian
        offset = 0
        for p in shared_a:
            p.grad = update[offset: offset + p.numel()].view_as(p)
            offset += p.numel()
        torch.autograd.backward(sum(losses), inputs=head_params_a)

    variants.append(Variant("loop", "(a) LibMTL-style loop", loop_step, shared_a + head_params_a, trunk_weights(trunk_a)))

    trunk_b, heads_b, shared_b, head_params_b = plain_copy()
    torchjd_upgrad = TorchjdUPGrad()

    def autojac_step():
        z, losses = plain_model_losses(trunk_b, heads_b, tasks, x, targets)
        torchjd_mtl_backward(losses, features=z, shared_params=shared_b)
        jac_to_grad(shared_b, torchjd_upgrad)

    variants.append(Variant("autojac", "(b) torchjd autojac", autojac_step, shared_b + head_params_b,
                            trunk_weights(trunk_b)))

    def autogram_variant(key, label, weighting):
        trunk, heads, shared, head_params = plain_copy()
        engine = Engine(trunk, batch_dim=None)

        def step():
            _, losses = plain_model_losses(trunk, heads, tasks, x, targets)
            losses = torch.stack(losses)
            gramian = engine.compute_gramian(losses)
            losses.backward(weighting(gramian))

        variants.append(Variant(key, label, step, shared + head_params, trunk_weights(trunk)))

    autogram_variant("autogram", "(c) torchjd autogram", UPGradWeighting())
    autogram_variant("autogram_fastmtl", "(c') autogram + fastmtl UPGrad", lambda g: aggregator(g.detach()))
    del torchjd
    return variants


# GEMM floors: only the GEMMs of a step, on its shapes, into preallocated outputs (random data: GEMM
# time does not depend on the values). They bound what any implementation of that arithmetic can
# reach here; the ratio of the two floors is the most the engine can gain over the loop without
# doing less arithmetic.


def ghost_is_cheaper(tasks: int, rows: int, d_in: int, d_out: int) -> bool:
    """The engine's cost model (csrc/cpu/mtl_engine.h), so the floor takes the path the engine takes."""
    materialise = tasks * rows * d_in * d_out + tasks * tasks * d_in * d_out
    ghost = rows * rows * d_in + tasks * rows * rows * d_out + tasks * tasks * rows * d_out
    return ghost < materialise


def make_gemm_floors(size: Size, tasks) -> List[Variant]:
    B, T = size.batch, len(tasks)
    dims = (size.in_features,) + tuple(size.hidden)
    d, C = dims[-1], sum(t.num_outputs for t in tasks)
    weights = [torch.randn(d_out, d_in) for d_in, d_out in zip(dims[:-1], dims[1:])]
    acts = [torch.randn(B, w) for w in dims]
    head = torch.randn(C, d)
    heads = [torch.randn(t.num_outputs, d) for t in tasks]
    logits, logit_grad = torch.empty(B, C), torch.randn(B, C)
    deltas = [torch.randn(B, w) for w in dims]
    weight_grads = [torch.empty_like(w) for w in weights]

    def forward():
        for l, w in enumerate(weights):
            torch.mm(acts[l], w.t(), out=acts[l + 1])

    # (a): per task, the head's cotangent, then every layer's dW and (above the first) dX; the Gram
    # of the stacked Jacobian and the weighted row sum; the heads' own backward, per task.
    num_params = sum(w.numel() for w in weights)
    jacobian, gram, update = torch.randn(T, num_params), torch.empty(T, T), torch.empty(1, num_params)
    head_logits = [torch.empty(B, t.num_outputs) for t in tasks]
    head_grads = [torch.randn(B, t.num_outputs) for t in tasks]
    head_weight_grads = [torch.empty_like(h) for h in heads]
    task_weights = torch.ones(1, T)

    def loop_gemms():
        forward()
        for h, out in zip(heads, head_logits):
            torch.mm(acts[-1], h.t(), out=out)
        for h, g in zip(heads, head_grads):
            torch.mm(g, h, out=deltas[-1])
            for l in reversed(range(len(weights))):
                torch.mm(deltas[l + 1].t(), acts[l], out=weight_grads[l])
                if l > 0:
                    torch.mm(deltas[l + 1], weights[l], out=deltas[l])
        torch.mm(jacobian, jacobian.t(), out=gram)
        torch.mm(task_weights, jacobian, out=update)
        for g, out in zip(head_grads, head_weight_grads):
            torch.mm(g.t(), acts[-1], out=out)

    # exact: the head GEMM, then per layer the Gram share by the path the cost model picks and the
    # T cotangents' propagation, then the one weighted backward.
    task_deltas = [torch.randn(B, T * w) for w in dims]
    per_task = [torch.empty(T * w.shape[0], w.shape[1]) for w in weights]
    kernels = torch.empty(B, B)
    kernel_deltas = [torch.empty(B, T * w) for w in dims]
    layer_gram, head_grad = torch.empty(T, T), torch.empty_like(head)
    ghost = [ghost_is_cheaper(T, B, w.shape[1], w.shape[0]) for w in weights]

    def exact_gemms():
        forward()
        torch.mm(acts[-1], head.t(), out=logits)
        for l in reversed(range(len(weights))):
            d_out, d_in = weights[l].shape
            delta = task_deltas[l + 1]
            if ghost[l]:
                torch.mm(acts[l], acts[l].t(), out=kernels)
                torch.mm(kernels, delta, out=kernel_deltas[l + 1])
                torch.bmm(delta.view(B, T, d_out), kernel_deltas[l + 1].view(B, T, d_out).transpose(1, 2))
            else:
                torch.mm(delta.t(), acts[l], out=per_task[l])
                flat = per_task[l].view(T, -1)
                torch.mm(flat, flat.t(), out=layer_gram)
            if l > 0:
                torch.mm(delta.view(B * T, d_out), weights[l], out=task_deltas[l].view(B * T, d_in))
        torch.mm(logit_grad.t(), acts[-1], out=head_grad)
        torch.mm(logit_grad, head, out=deltas[-1])
        for l in reversed(range(len(weights))):
            torch.mm(deltas[l + 1].t(), acts[l], out=weight_grads[l])
            if l > 0:
                torch.mm(deltas[l + 1], weights[l], out=deltas[l])

    return [Variant("loop_gemms", "GEMM floor of (a)", loop_gemms, [], lambda: [], False),
            Variant("exact_gemms", "GEMM floor of exact", exact_gemms, [], lambda: [], False)]


def zero_grad(variant: Variant) -> None:
    for p in variant.params:
        p.grad = None


def check_same_update(variants: List[Variant]) -> None:
    by_key = {v.key: v for v in variants}
    for v in variants:
        zero_grad(v)
        v.run_step()
    expected = by_key["exact"].trunk_grads()
    for v in variants:
        if not v.aggregates_exactly or v.key == "exact":
            continue
        for layer, (got, want) in enumerate(zip(v.trunk_grads(), expected)):
            torch.testing.assert_close(got, want, rtol=CHECK_RTOL, atol=CHECK_RTOL * want.abs().max().item(),
                                       msg=lambda m: f"{v.key}: trunk layer {layer} gradient differs from exact\n{m}")


def timed_step(variant: Variant) -> float:
    zero_grad(variant)
    start = time.perf_counter()
    variant.run_step()
    return time.perf_counter() - start


def time_round_robin(variants: List[Variant], repeats: int) -> Dict[str, List[float]]:
    samples = {v.key: [] for v in variants}
    for repeat in range(repeats):
        shift = repeat % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            samples[variant.key].append(timed_step(variant) * 1e3)
    return samples


def peak_step_memory(variant: Variant) -> int:
    """Peak bytes allocated minus freed by torch's CPU allocator during one step."""
    from torch.profiler import ProfilerActivity, profile

    zero_grad(variant)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        variant.run_step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def evaluate_goals(size: Size, medians: Dict[str, float], memory: Dict[str, int]) -> List[dict]:
    checks = [
        ("(a) loop / exact", medians["loop"] / medians["exact"], size.min_speedup_vs_loop, ">="),
        ("(c) autogram / exact", medians["autogram"] / medians["exact"], size.min_speedup_vs_autogram, ">="),
        ("rep / plain", medians["rep"] / medians["plain"], size.max_rep_over_plain, "<="),
        ("peak memory exact / plain", memory["exact"] / memory["plain"], size.max_memory_over_plain, "<="),
    ]
    goals = []
    for name, value, bound, sense in checks:
        if bound is None:
            continue
        met = value >= bound if sense == ">=" else value <= bound
        goals.append({"goal": f"{name} {sense} {bound}", "value": value, "met": met})
    return goals


def run_size(size: Size, repeats: int, warmup: int) -> dict:
    torch.manual_seed(SEED)
    tasks = make_tasks(size.num_tasks)
    x = torch.randn(size.batch, size.in_features)
    targets = make_targets(tasks, size.batch, "cpu", torch.float32)
    variants = make_variants(size, tasks, x, targets)
    check_same_update(variants)
    variants += make_gemm_floors(size, tasks)
    for _ in range(warmup):
        for v in variants:
            timed_step(v)
    samples = time_round_robin(variants, repeats)
    stats = {key: summarise(values) for key, values in samples.items()}
    medians = {key: s["median_ms"] for key, s in stats.items()}
    memory = {v.key: peak_step_memory(v) for v in variants}
    return {
        "size": asdict(size), "description": size.describe(), "repeats": repeats,
        "labels": {v.key: v.label for v in variants}, "stats": stats, "peak_memory_bytes": memory,
        "goals": evaluate_goals(size, medians, memory) if size.name != "small" else [],
    }


def print_result(result: dict) -> None:
    stats, memory, labels = result["stats"], result["peak_memory_bytes"], result["labels"]
    exact, plain_memory = stats["exact"]["median_ms"], memory["plain"]
    print(f"\n{result['description']}  (median of {result['repeats']} interleaved steps, float32)")
    print(f"| variant | median ms | p10-p90 ms | time / exact | peak MB | memory / plain |")
    print(f"|---|---|---|---|---|---|")
    for key, s in stats.items():
        print(f"| {labels[key]} | {s['median_ms']:.2f} | {s['p10_ms']:.2f}-{s['p90_ms']:.2f} | "
              f"{s['median_ms'] / exact:.2f}x | {memory[key] / 2**20:.1f} | {memory[key] / plain_memory:.2f}x |")
    floors = stats["loop_gemms"]["median_ms"] / stats["exact_gemms"]["median_ms"]
    print(f"  GEMM floors, (a) / exact: {floors:.2f} (above 1 only where the engine does less GEMM work than (a))")
    for goal in result["goals"]:
        print(f"  goal {goal['goal']}: {goal['value']:.2f} {'met' if goal['met'] else 'MISSED'}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=sorted(SIZES))
    parser.add_argument("--small", action="store_true", help="one tiny size instead, for a quick smoke run")
    parser.add_argument("--repeats", type=int, default=30, help="interleaved rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=None, help="JSON path (default: bench/results/bench_mtl_step-<host>.json)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [SMALL_SIZE] if args.small else [SIZES[name] for name in args.sizes]
    repeats = 5 if args.small else args.repeats
    results = []
    for size in sizes:
        result = run_size(size, repeats, 1 if args.small else args.warmup)
        print_result(result)
        results.append(result)
    path = args.out or default_output_path("bench_mtl_step", "cpu", args.small)
    write_json(path, {"benchmark": "bench_mtl_step", "date": datetime.datetime.now().isoformat(timespec="seconds"),
                      "machine": machine_description("cpu"), "results": results})
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
