"""The CUDA benchmark of issue 14: for the hard-sharing training step and for the per-task engine,
fastmtl with its custom CUDA kernels (FASTMTL_KERNELS=custom), fastmtl with the portable ATen steps
(FASTMTL_KERNELS=portable, the default on CUDA until verified), plain PyTorch eager and plain
PyTorch under torch.compile, in float32 and bfloat16; each GEMM-bound variant also as a fraction
of the GPU's measured GEMM rate (the step's GEMM FLOPs / its time / the rate torch.mm reaches on
the same shapes, measured in the same process).

    python bench/bench_cuda.py --out /tmp/bench_cuda.json          # on a GPU machine
    python bench/bench_cuda.py --device cpu --small --no-compile   # a smoke run anywhere

Plain code on purpose (no harness): one process, variants interleaved per repeat, medians, CUDA
events around each call on the current stream. Never run on a GPU yet.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import fastmtl
from fastmtl import Task
from fastmtl.aggregation import UPGrad
from fastmtl.nn import FusedMLP, MultiTaskHeads, MultiTaskModel

SIZES = {
    "small": dict(batch=64, in_features=32, widths=[64, 64], tasks=4),
    "step": dict(batch=4096, in_features=256, widths=[1024, 1024, 1024], tasks=16),
}


def make_tasks(count):
    kinds = [Task("r{}", "regression"), Task("b{}", "binary"), Task("c{}", "multiclass", num_outputs=8)]
    return [
        Task(kinds[i % 3].name.format(i), kinds[i % 3].kind, num_outputs=kinds[i % 3].num_outputs) for i in range(count)
    ]


def make_targets(tasks, batch, device, gen):
    out = {}
    for t in tasks:
        if t.kind == "multiclass":
            v = torch.randint(0, t.num_outputs, (batch,), generator=gen)
        elif t.kind == "binary":
            v = torch.randint(0, 2, (batch,), generator=gen).float()
        else:
            v = torch.randn(batch, generator=gen)
        out[t.name] = v.to(device)
    return out


class PlainModel(nn.Module):
    """The same model in plain PyTorch: Linear + ReLU trunk, one Linear per task, a loss loop."""

    def __init__(self, fused: MultiTaskModel):
        super().__init__()
        layers = []
        for w, b in zip(fused.trunk.weights, fused.trunk.biases):
            lin = nn.Linear(w.shape[1], w.shape[0]).to(w.device, w.dtype)
            with torch.no_grad():
                lin.weight.copy_(w)
                lin.bias.copy_(b)
            layers += [lin, nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.tasks = fused.heads.tasks
        self.heads = nn.ModuleDict()
        row = 0
        for t in self.tasks:
            lin = nn.Linear(fused.heads.weight.shape[1], t.num_outputs).to(w.device, w.dtype)
            with torch.no_grad():
                lin.weight.copy_(fused.heads.weight[row : row + t.num_outputs])
                lin.bias.copy_(fused.heads.bias[row : row + t.num_outputs])
            self.heads[t.name] = lin
            row += t.num_outputs

    def forward(self, x, targets):
        z = self.trunk(x)
        total = 0.0
        for t in self.tasks:
            y = self.heads[t.name](z).float()
            if t.kind == "multiclass":
                total = total + F.cross_entropy(y, targets[t.name])
            elif t.kind == "binary":
                total = total + F.binary_cross_entropy_with_logits(y[:, 0], targets[t.name])
            else:
                total = total + F.mse_loss(y[:, 0], targets[t.name])
        return total


def step_gemm_flops(size, tasks):
    """Multiply-adds x 2 of the step's GEMMs: forward, and backward's two per layer (dW, dx)."""
    dims = [size["in_features"], *size["widths"], sum(t.num_outputs for t in tasks)]
    flops = 0
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        flops += 2 * size["batch"] * a * b * (3 if i > 0 else 2)  # no dx for the input layer
    return flops


def gemm_rate(size, tasks, device, dtype, repeats):
    """FLOP/s torch.mm reaches on the step's GEMM shapes (the floor no step implementation beats)."""
    dims = [size["in_features"], *size["widths"], sum(t.num_outputs for t in tasks)]
    mats = [
        (
            torch.randn(size["batch"], a, device=device, dtype=dtype),
            torch.randn(a, b, device=device, dtype=dtype),
            torch.randn(size["batch"], b, device=device, dtype=dtype),
        )
        for a, b in zip(dims[:-1], dims[1:])
    ]

    def run():
        for a, w, g in mats:  # the forward, dW and dx shapes of one layer
            torch.mm(a, w)
            torch.mm(a.t(), g)
            torch.mm(g, w.t())

    seconds = timed(run, device, repeats)
    flops = sum(3 * 2 * size["batch"] * a.shape[1] * w.shape[1] for a, w, _ in mats)
    return flops / seconds


def timed(fn, device, repeats):
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def with_kernels(mode, fn):
    def run():
        old = os.environ.get("FASTMTL_KERNELS")
        os.environ["FASTMTL_KERNELS"] = mode
        try:
            fn()
        finally:
            if old is None:
                os.environ.pop("FASTMTL_KERNELS")
            else:
                os.environ["FASTMTL_KERNELS"] = old

    return run


def bench(size_name, device, dtype, repeats, compile_plain):
    size = SIZES[size_name]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    tasks = make_tasks(size["tasks"])
    model = MultiTaskModel(FusedMLP(size["in_features"], size["widths"]), MultiTaskHeads(size["widths"][-1], tasks))
    model = model.to(device, dtype)
    plain = PlainModel(model)
    x = torch.randn(size["batch"], size["in_features"], generator=gen).to(device, dtype)
    targets = make_targets(tasks, size["batch"], device, gen)

    def fastmtl_step():
        model.zero_grad(set_to_none=True)
        model.loss(x, targets).backward()

    def engine_step():
        model.zero_grad(set_to_none=True)
        model.mtl_backward(x, targets, UPGrad())

    def plain_step(m):
        m.zero_grad(set_to_none=True)
        m(x, targets).backward()

    variants = {
        "step fastmtl custom": with_kernels("custom", fastmtl_step),
        "step fastmtl portable": with_kernels("portable", fastmtl_step),
        "step plain eager": lambda: plain_step(plain),
        "engine fastmtl custom": with_kernels("custom", engine_step),
        "engine fastmtl portable": with_kernels("portable", engine_step),
    }
    if compile_plain:
        compiled = torch.compile(plain)
        variants["step plain compiled"] = lambda: plain_step(compiled)
    for fn in variants.values():  # warm-up (and compilation)
        for _ in range(3):
            fn()
    results = {name: [] for name in variants}
    names = list(variants)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            results[name].append(timed(variants[name], device, 1))
    rate = gemm_rate(size, tasks, device, dtype, max(3, repeats // 2))
    flops = step_gemm_flops(size, tasks)
    rows = []
    for name, times in results.items():
        median = statistics.median(times)
        row = {"variant": name, "size": size_name, "dtype": str(dtype).replace("torch.", ""), "ms": 1e3 * median}
        if name.startswith("step"):
            row["gemm_fraction"] = flops / median / rate
        rows.append(row)
    return rows, rate


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="a tiny size: a smoke run")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "fastmtl": fastmtl.build_info(),
        "rows": [],
    }
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        if device.type == "cpu" and dtype != torch.float32:
            continue  # the CPU ops are float32 / float64 only
        rows, rate = bench("small" if args.small else "step", device, dtype, args.repeats, not args.no_compile)
        report["rows"] += rows
        print(f"{dtype_name}: torch.mm on the step's shapes reaches {rate / 1e12:.2f} TFLOP/s")
        for row in rows:
            frac = f"  {100 * row['gemm_fraction']:.0f}% of the GEMM rate" if "gemm_fraction" in row else ""
            print(f"  {row['variant']:<26} {row['ms']:9.3f} ms{frac}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()
