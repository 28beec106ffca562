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
import copy
import datetime
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import fastmtl
from _common import cpu_model, default_output_path, machine_description, write_json
from harness import summarise

MISSING_FRACTION = 0.1  # share of each task's labels set missing (NaN or -100)
MULTICLASS_CLASSES = 5
IGNORE_INDEX = -100  # missing multiclass label, as torch.nn.functional.cross_entropy's default
# Agreement every variant must show with fastmtl before timing, by dtype: 16-bit variants round
# differently (where the bias is added, in which dtype losses are reduced).
CHECK_RTOL = {torch.float64: 1e-4, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
SEED = 0

# The kinds tasks cycle through: (kind, loss, num_outputs).
TASK_KINDS = (("regression", "mse", 1), ("binary", "bce", 1), ("multiclass", "ce", MULTICLASS_CLASSES))


# ----------------------------------------------------------------------------------------------
# sizes and goals


@dataclass(frozen=True)
class Size:
    """One benchmark configuration and the speed goals fastmtl should meet on it."""

    name: str
    batch: int
    in_features: int
    hidden: tuple
    num_tasks: int
    min_speedup_vs_eager: Optional[float] = None  # goal: median(a) / median(fastmtl) >= this
    min_speedup_vs_best_compiled: Optional[float] = None  # goal: min(b, c) / fastmtl >= this
    max_ratio_to_floor: Optional[float] = None  # goal: fastmtl / median(d) <= this
    max_trunk_ratio_to_floor: Optional[float] = None  # goal (roofline): trunk fwd+bwd / its GEMMs <= this

    def describe(self) -> str:
        widths = set(self.hidden)
        trunk = f"{len(self.hidden)}x{self.hidden[0]}" if len(widths) == 1 else "x".join(map(str, self.hidden))
        return f"B={self.batch} in={self.in_features} trunk {trunk} T={self.num_tasks}"


SIZES = {
    "1": Size("1", 256, 128, (256, 256, 256), 40, 3.0, 1.2, 1.5),
    "2": Size("2", 256, 128, (128, 128), 8, 1.6, 1.1, 1.5),
    "3": Size("3", 1024, 128, (512, 512, 512), 8, 1.15, 1.0, 1.5),
}
# On CUDA (issue 3): the large T=40 size with its goals, and size 2 (no goals there).
CUDA_SIZES = {
    "4": Size("4", 4096, 512, (1024, 1024, 1024), 40, 3.0, 1.3, None, 1.2),
    "2": Size("2", 256, 128, (128, 128), 8),
}
# A smoke run: small enough to compile and time in seconds; no goals (too small to mean anything).
SMALL_SIZE = Size("small", 64, 32, (64, 64), 3)


def sizes_for(device) -> Dict[str, Size]:
    return CUDA_SIZES if torch.device(device).type == "cuda" else SIZES


# ----------------------------------------------------------------------------------------------
# tasks, data and the models


def make_tasks(num_tasks: int) -> List[fastmtl.Task]:
    """Tasks cycling regression (mse), binary (bce), multiclass (ce); unequal weights so the
    weighted sum is exercised."""
    tasks = []
    for i in range(num_tasks):
        kind, loss, outputs = TASK_KINDS[i % len(TASK_KINDS)]
        weight = 1.0 + 0.25 * (i % 4)
        tasks.append(fastmtl.Task(f"task{i:02d}_{kind}", kind, num_outputs=outputs, loss=loss, weight=weight))
    return tasks


def make_targets(tasks: Sequence[fastmtl.Task], batch: int, device, dtype) -> Dict[str, torch.Tensor]:
    """The targets dict as users pass it: float [B] (NaN = missing) for regression and binary,
    int64 class indices [B] (-100 = missing) for multiclass."""
    targets = {}
    for task in tasks:
        missing = torch.rand(batch, device=device) < MISSING_FRACTION
        if task.kind == "regression":
            value = torch.randn(batch, device=device, dtype=dtype).masked_fill(missing, float("nan"))
        elif task.kind == "binary":
            value = torch.randint(0, 2, (batch,), device=device).to(dtype).masked_fill(missing, float("nan"))
        else:
            value = torch.randint(0, task.num_outputs, (batch,), device=device).masked_fill(missing, IGNORE_INDEX)
        targets[task.name] = value
    return targets


def make_plain_trunk(size: Size, device, dtype) -> nn.Sequential:
    layers = []
    for fan_in, fan_out in zip((size.in_features,) + size.hidden[:-1], size.hidden):
        layers += [nn.Linear(fan_in, fan_out, device=device, dtype=dtype), nn.ReLU()]
    return nn.Sequential(*layers)


def make_plain_heads(tasks, in_features: int, device, dtype) -> nn.ModuleDict:
    return nn.ModuleDict({t.name: nn.Linear(in_features, t.num_outputs, device=device, dtype=dtype) for t in tasks})


def make_fastmtl_model(plain_trunk, plain_heads, tasks, size: Size, device, dtype) -> fastmtl.nn.MultiTaskModel:
    model = fastmtl.nn.MultiTaskModel(
        fastmtl.nn.FusedMLP(size.in_features, list(size.hidden), activation="relu", device=device, dtype=dtype),
        fastmtl.nn.MultiTaskHeads(size.hidden[-1], tasks, device=device, dtype=dtype),
    )
    return model.load_plain_weights(plain_trunk, dict(plain_heads.items()))


def trunk_weights_of(module: nn.Module) -> List[torch.Tensor]:
    """The trunk's weight matrices in layer order (Linear.weight or FusedMLP.weights)."""
    if isinstance(module, fastmtl.nn.FusedMLP):
        return list(module.weights)
    return [m.weight for m in module if isinstance(m, nn.Linear)]


# ----------------------------------------------------------------------------------------------
# (a) eager: a Python loop over tasks, one loss call each


def masked_task_loss(task: fastmtl.Task, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_t as fastmtl defines it: mean over labelled entries, 0 when none. Masks with
    torch.where / weights / ignore_index rather than boolean indexing, so shapes never depend on
    the data (cheap, and torch.compile(fullgraph=True) friendly)."""
    if task.kind == "multiclass":
        # reduction="mean" would give NaN for an all-missing batch; fastmtl gives 0.
        labelled = (target != IGNORE_INDEX).sum().clamp_min(1)
        return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum") / labelled
    prediction = logits.squeeze(-1)
    mask = ~torch.isnan(target)
    labelled = mask.sum().clamp_min(1)
    filled = torch.where(mask, target, 0.0)  # NaN * 0 would still be NaN: replace, don't weight
    if task.kind == "binary":
        per_entry_weight = mask.to(prediction.dtype)
        summed = F.binary_cross_entropy_with_logits(prediction, filled, weight=per_entry_weight, reduction="sum")
        return summed / labelled
    return F.mse_loss(torch.where(mask, prediction, 0.0), filled, reduction="sum") / labelled


def make_eager_loss(trunk: nn.Sequential, heads: nn.ModuleDict, tasks) -> Callable:
    def eager_loss(x: torch.Tensor, targets: Dict[str, torch.Tensor]) -> torch.Tensor:
        features = trunk(x)
        total = 0.0
        for task in tasks:
            total = total + task.weight * masked_task_loss(task, heads[task.name](features), targets[task.name])
        return total

    return eager_loss


# ----------------------------------------------------------------------------------------------
# (c) hand-fused: one stacked head, one loss call per kind


@dataclass
class LossGroups:
    """Tasks grouped by loss, in the row order of the stacked head (so each group's logits are a
    contiguous column block)."""

    mse: List[fastmtl.Task] = field(default_factory=list)
    bce: List[fastmtl.Task] = field(default_factory=list)
    ce_by_classes: Dict[int, List[fastmtl.Task]] = field(default_factory=dict)

    @classmethod
    def of(cls, tasks) -> "LossGroups":
        groups = cls()
        for task in tasks:
            if task.loss == "mse":
                if task.num_outputs != 1:
                    raise ValueError("the hand-fused variant handles single-output regression tasks only")
                groups.mse.append(task)
            elif task.loss == "bce":
                groups.bce.append(task)
            elif task.loss == "ce":
                groups.ce_by_classes.setdefault(task.num_outputs, []).append(task)
            else:
                raise ValueError(f"the hand-fused variant has no loss {task.loss!r}")
        return groups

    def in_order(self) -> List[fastmtl.Task]:
        ordered = self.mse + self.bce
        for classes in sorted(self.ce_by_classes):
            ordered += self.ce_by_classes[classes]
        return ordered


def make_stacked_head(plain_heads: nn.ModuleDict, ordered_tasks, device, dtype) -> nn.Linear:
    """All per-task heads as one nn.Linear, rows in ``ordered_tasks`` order."""
    in_features = next(iter(plain_heads.values())).in_features
    total = sum(t.num_outputs for t in ordered_tasks)
    stacked = nn.Linear(in_features, total, device=device, dtype=dtype)
    with torch.no_grad():
        stacked.weight.copy_(torch.cat([plain_heads[t.name].weight for t in ordered_tasks]))
        stacked.bias.copy_(torch.cat([plain_heads[t.name].bias for t in ordered_tasks]))
    return stacked


def grouped_mse(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-task mse [k] from logits and NaN-masked targets, both [B, k]."""
    mask = ~torch.isnan(targets)
    squared = F.mse_loss(torch.where(mask, logits, 0.0), torch.where(mask, targets, 0.0), reduction="none")
    return squared.sum(0) / mask.sum(0).clamp_min(1)


def grouped_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-task bce [k] from logits and NaN-masked 0/1 targets, both [B, k]."""
    mask = ~torch.isnan(targets)
    per_entry = F.binary_cross_entropy_with_logits(
        logits, torch.where(mask, targets, 0.0), weight=mask.to(logits.dtype), reduction="none"
    )
    return per_entry.sum(0) / mask.sum(0).clamp_min(1)


def grouped_ce(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-task ce [k] from logits [B, k * C] (task-major columns) and class targets [B, k]."""
    batch, num_tasks = targets.shape
    # cross_entropy wants the class dimension second: [B, C, k] against targets [B, k].
    per_class = logits.reshape(batch, num_tasks, num_classes).transpose(1, 2)
    per_row = F.cross_entropy(per_class, targets, ignore_index=IGNORE_INDEX, reduction="none")
    return per_row.sum(0) / (targets != IGNORE_INDEX).sum(0).clamp_min(1)


def make_hand_fused_loss(trunk: nn.Sequential, stacked_head: nn.Linear, groups: LossGroups, device, dtype) -> Callable:
    ordered = groups.in_order()
    task_weights = torch.tensor([t.weight for t in ordered], device=device, dtype=dtype)

    def stack(targets, tasks):
        # The step gets the same targets dict as the other variants; under compile the stack
        # fuses into the loss kernels.
        return torch.stack([targets[t.name] for t in tasks], dim=1)

    def hand_fused_loss(x: torch.Tensor, targets: Dict[str, torch.Tensor]) -> torch.Tensor:
        logits = stacked_head(trunk(x))
        per_task, column = [], 0
        for tasks, group_loss in ((groups.mse, grouped_mse), (groups.bce, grouped_bce)):
            if tasks:
                per_task.append(group_loss(logits[:, column : column + len(tasks)], stack(targets, tasks)))
                column += len(tasks)
        for classes in sorted(groups.ce_by_classes):
            tasks = groups.ce_by_classes[classes]
            width = len(tasks) * classes
            per_task.append(grouped_ce(logits[:, column : column + width], stack(targets, tasks), classes))
            column += width
        return torch.dot(torch.cat(per_task), task_weights)

    return hand_fused_loss


# ----------------------------------------------------------------------------------------------
# (d) the GEMM floor


def make_gemm_floor_step(size: Size, head_rows: int, device, dtype) -> Callable:
    """Only the step's GEMMs, on the step's shapes, into preallocated outputs. Forward: one GEMM
    per trunk layer and the head GEMM. Backward: head dW and dZ, then per trunk layer dW and dX
    (no dX for the first layer: x needs no gradient). Bias gradients are reductions, not GEMMs."""
    widths = (size.in_features,) + size.hidden
    B = size.batch
    new = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    weights = [new(fan_out, fan_in) for fan_in, fan_out in zip(widths[:-1], widths[1:])]
    head = new(head_rows, widths[-1])
    activations = [new(B, w) for w in widths]  # layer inputs X_0 .. X_L (X_L = trunk output)
    logit_grad = new(B, head_rows)
    logits = new(B, head_rows)
    head_grad = new(head_rows, widths[-1])
    deltas = [new(B, w) for w in widths]  # cotangent of each layer's output (index = layer output)
    weight_grads = [torch.empty_like(w) for w in weights]

    def gemm_floor_step() -> None:
        for layer, w in enumerate(weights):
            torch.mm(activations[layer], w.t(), out=activations[layer + 1])
        torch.mm(activations[-1], head.t(), out=logits)
        torch.mm(logit_grad.t(), activations[-1], out=head_grad)
        torch.mm(logit_grad, head, out=deltas[-1])
        for layer in reversed(range(len(weights))):
            torch.mm(deltas[layer + 1].t(), activations[layer], out=weight_grads[layer])
            if layer > 0:
                torch.mm(deltas[layer + 1], weights[layer], out=deltas[layer])

    return gemm_floor_step


def trunk_flops(size: Size) -> int:
    """FLOPs of the trunk's GEMMs in forward + backward: per layer 2*B*in*out for the forward, the
    same for dW, and for dX on every layer but the first (x needs no gradient)."""
    widths = (size.in_features,) + size.hidden
    per_layer = [2 * size.batch * fan_in * fan_out for fan_in, fan_out in zip(widths[:-1], widths[1:])]
    return 3 * sum(per_layer) - per_layer[0]


def make_trunk_floor_step(size: Size, device, dtype) -> Callable:
    """The trunk's GEMMs only (as in (d), without the head): the roofline's floor."""
    widths = (size.in_features,) + size.hidden
    new = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    weights = [new(fan_out, fan_in) for fan_in, fan_out in zip(widths[:-1], widths[1:])]
    activations = [new(size.batch, w) for w in widths]
    deltas = [new(size.batch, w) for w in widths]
    weight_grads = [torch.empty_like(w) for w in weights]

    def trunk_floor_step() -> None:
        for layer, w in enumerate(weights):
            torch.mm(activations[layer], w.t(), out=activations[layer + 1])
        for layer in reversed(range(len(weights))):
            torch.mm(deltas[layer + 1].t(), activations[layer], out=weight_grads[layer])
            if layer > 0:
                torch.mm(deltas[layer + 1], weights[layer], out=deltas[layer])

    return trunk_floor_step


def make_trunk_step(trunk: nn.Module, x: torch.Tensor) -> Callable:
    """fastmtl's trunk alone: forward, then backward of a fixed output gradient into .grad."""
    with torch.no_grad():
        grad_out = torch.randn_like(trunk(x))

    def trunk_step() -> None:
        trunk(x).backward(grad_out)

    return trunk_step


# ----------------------------------------------------------------------------------------------
# variants


@dataclass
class Variant:
    """One way of running the step. ``run_step`` does forward + losses + backward and returns the
    (detached) total loss; ``module`` holds the parameters to zero and, for the check, ``trunk``."""

    key: str
    label: str
    run_step: Callable[[], Optional[torch.Tensor]]
    module: Optional[nn.Module] = None
    trunk: Optional[nn.Module] = None
    compiled: bool = False
    compile_note: str = ""

    def zero_grad(self) -> None:
        if self.module is not None:
            self.module.zero_grad(set_to_none=True)


def compile_loss(loss_fn: Callable, x, targets) -> tuple:
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


def backward_step(loss_fn: Callable, x, targets) -> Callable:
    def run_step() -> torch.Tensor:
        loss = loss_fn(x, targets)
        loss.backward()
        return loss.detach()

    return run_step


def make_variants(size: Size, tasks, x, targets, device, dtype, with_compile: bool, roofline: bool) -> List[Variant]:
    plain_trunk = make_plain_trunk(size, device, dtype)
    plain_heads = make_plain_heads(tasks, size.hidden[-1], device, dtype)
    variants = []

    # Each variant gets its own copy of the weights: identical values, separate memory, so no
    # variant finds another's weights already in cache.
    eager_module = nn.ModuleDict({"trunk": copy.deepcopy(plain_trunk), "heads": copy.deepcopy(plain_heads)})
    eager_loss = make_eager_loss(eager_module["trunk"], eager_module["heads"], tasks)
    variants.append(Variant("eager", "(a) eager", backward_step(eager_loss, x, targets),
                            eager_module, eager_module["trunk"]))

    if with_compile:
        compiled_module = nn.ModuleDict({"trunk": copy.deepcopy(plain_trunk), "heads": copy.deepcopy(plain_heads)})
        compiled_loss, note = compile_loss(
            make_eager_loss(compiled_module["trunk"], compiled_module["heads"], tasks), x, targets
        )
        variants.append(Variant("compiled", "(b) compiled", backward_step(compiled_loss, x, targets),
                                compiled_module, compiled_module["trunk"], True, note))

        groups = LossGroups.of(tasks)
        fused_module = nn.ModuleDict({
            "trunk": copy.deepcopy(plain_trunk),
            "head": make_stacked_head(plain_heads, groups.in_order(), device, dtype),
        })
        fused_loss, note = compile_loss(
            make_hand_fused_loss(fused_module["trunk"], fused_module["head"], groups, device, dtype), x, targets
        )
        variants.append(Variant("fused_compiled", "(c) fused compiled",
                                backward_step(fused_loss, x, targets),
                                fused_module, fused_module["trunk"], True, note))

    model = make_fastmtl_model(plain_trunk, plain_heads, tasks, size, device, dtype)
    variants.append(Variant("fastmtl", "fastmtl", backward_step(model.loss, x, targets), model, model.trunk))

    head_rows = sum(t.num_outputs for t in tasks)
    variants.append(Variant("gemm_floor", "(d) gemm floor", make_gemm_floor_step(size, head_rows, device, dtype)))
    if roofline:
        trunk = copy.deepcopy(model.trunk)
        variants.append(Variant("trunk_fastmtl", "trunk: fastmtl", make_trunk_step(trunk, x), trunk))
        variants.append(Variant("trunk_floor", "trunk: gemm floor", make_trunk_floor_step(size, device, dtype)))
    return variants


# ----------------------------------------------------------------------------------------------
# correctness check and timing


def check_same_computation(variants: List[Variant], dtype) -> None:
    """Every variant with a loss must match fastmtl's total loss and trunk weight gradients
    (compared in float64: a 16-bit model's fastmtl loss is float32, the others' 16-bit)."""
    rtol = CHECK_RTOL[dtype]
    results = {}
    for variant in variants:
        if variant.trunk is None:
            continue
        variant.zero_grad()
        loss = variant.run_step()
        results[variant.key] = (loss.double(), [w.grad.detach().double() for w in trunk_weights_of(variant.trunk)])
        variant.zero_grad()
    expected_loss, expected_grads = results["fastmtl"]
    for key, (loss, grads) in results.items():
        torch.testing.assert_close(loss, expected_loss, rtol=rtol, atol=0.0,
                                   msg=lambda m: f"{key}: total loss differs from fastmtl's\n{m}")
        for layer, (grad, expected) in enumerate(zip(grads, expected_grads)):
            # atol relative to the gradient's scale: entries near zero carry rounding noise only.
            atol = rtol * expected.abs().max().item()
            torch.testing.assert_close(grad, expected, rtol=rtol, atol=atol,
                                       msg=lambda m: f"{key}: trunk layer {layer} weight gradient differs\n{m}")


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_step(variant: Variant, device) -> float:
    """Seconds of one step; grads zeroed before the clock starts (see the module docstring)."""
    variant.zero_grad()
    synchronize(device)
    start = time.perf_counter()
    variant.run_step()
    synchronize(device)
    return time.perf_counter() - start


def warm_up(variants: List[Variant], steps: int, device) -> None:
    # Compiled variants were already compiled; extra steps settle their caches and allocator.
    for variant in variants:
        for _ in range(steps + (3 if variant.compiled else 0)):
            timed_step(variant, device)


def time_round_robin(variants: List[Variant], repeats: int, device) -> Dict[str, List[float]]:
    """Per variant, ``repeats`` step times in ms; each repeat runs all variants, order rotated."""
    samples = {v.key: [] for v in variants}
    for repeat in range(repeats):
        shift = repeat % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            samples[variant.key].append(timed_step(variant, device) * 1e3)
    return samples


# ----------------------------------------------------------------------------------------------
# ratios and goals


def compute_ratios(medians: Dict[str, float]) -> Dict[str, Optional[float]]:
    """fastmtl's speedups (other / fastmtl, > 1 = fastmtl faster), fastmtl / floor, and with the
    roofline the trunk's time over its GEMMs' time."""
    ours = medians["fastmtl"]
    speedup = lambda key: medians[key] / ours if key in medians else None  # noqa: E731
    compiled = [medians[k] for k in ("compiled", "fused_compiled") if k in medians]
    return {
        "speedup_vs_eager": speedup("eager"),
        "speedup_vs_compiled": speedup("compiled"),
        "speedup_vs_fused_compiled": speedup("fused_compiled"),
        "speedup_vs_best_compiled": min(compiled) / ours if compiled else None,
        "fastmtl_over_floor": ours / medians["gemm_floor"],
        "trunk_over_floor": (medians["trunk_fastmtl"] / medians["trunk_floor"]) if "trunk_floor" in medians else None,
    }


def evaluate_goals(size: Size, ratios: Dict[str, Optional[float]]) -> List[dict]:
    goals = []

    def add(description, value, target, at_least):
        if target is None:
            return
        if value is None:
            status = "SKIP"
        else:
            status = "PASS" if (value >= target if at_least else value <= target) else "MISS"
        goals.append({"goal": description, "target": target, "value": value, "status": status})

    add(f"fastmtl vs (a) eager >= {size.min_speedup_vs_eager}x",
        ratios["speedup_vs_eager"], size.min_speedup_vs_eager, True)
    add(f"fastmtl vs best of (b),(c) >= {size.min_speedup_vs_best_compiled}x",
        ratios["speedup_vs_best_compiled"], size.min_speedup_vs_best_compiled, True)
    add(f"fastmtl / (d) floor <= {size.max_ratio_to_floor}x",
        ratios["fastmtl_over_floor"], size.max_ratio_to_floor, False)
    add(f"trunk / its gemm floor <= {size.max_trunk_ratio_to_floor}x",
        ratios["trunk_over_floor"], size.max_trunk_ratio_to_floor, False)
    return goals


# ----------------------------------------------------------------------------------------------
# one size, end to end


def describe_tasks(tasks) -> str:
    counts = {kind: sum(t.kind == kind for t in tasks) for kind, _, _ in TASK_KINDS}
    return f"{counts['regression']} mse, {counts['binary']} bce, {counts['multiclass']} ce/{MULTICLASS_CLASSES}"


def run_size(size: Size, args, device, dtype) -> dict:
    torch.manual_seed(SEED)
    tasks = make_tasks(size.num_tasks)
    x = torch.randn(size.batch, size.in_features, device=device, dtype=dtype)
    targets = make_targets(tasks, size.batch, device, dtype)

    started = time.perf_counter()
    variants = make_variants(size, tasks, x, targets, device, dtype, with_compile=not args.no_compile,
                             roofline=args.roofline)
    check_same_computation(variants, dtype)
    setup_s = time.perf_counter() - started

    warm_up(variants, args.warmup, device)
    samples = time_round_robin(variants, args.repeats, device)
    stats = {v.key: summarise(samples[v.key]) for v in variants}
    ratios = compute_ratios({k: s["median_ms"] for k, s in stats.items()})
    result = {
        "size": asdict(size),
        "description": size.describe(),
        "tasks": describe_tasks(tasks),
        "setup_and_compile_s": setup_s,
        "variants": {v.key: {"label": v.label, "compile": v.compile_note, **stats[v.key]} for v in variants},
        "ratios": ratios,
        "goals": evaluate_goals(size, ratios),
    }
    if args.roofline:
        flops = trunk_flops(size)
        result["roofline"] = {
            "trunk_gemm_flops": flops,
            "fastmtl_tflops": flops / (stats["trunk_fastmtl"]["median_ms"] * 1e-3) / 1e12,
            "floor_tflops": flops / (stats["trunk_floor"]["median_ms"] * 1e-3) / 1e12,
        }
    return result


# ----------------------------------------------------------------------------------------------
# output


def format_ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def print_result(result: dict, device: str, dtype: torch.dtype) -> None:
    print(f"\nsize {result['size']['name']}: {result['description']} ({result['tasks']}), "
          f"{str(dtype).replace('torch.', '')} {device}")
    fastmtl_ms = result["variants"]["fastmtl"]["median_ms"]
    print(f"  {'variant':<20} {'median ms':>10} {'p10 ms':>9} {'p90 ms':>9} {'/ fastmtl':>10}  compile")
    for entry in result["variants"].values():
        print(f"  {entry['label']:<20} {entry['median_ms']:>10.3f} {entry['p10_ms']:>9.3f} {entry['p90_ms']:>9.3f} "
              f"{entry['median_ms'] / fastmtl_ms:>9.2f}x  {entry['compile']}")
    r = result["ratios"]
    print(f"  fastmtl speedup: vs (a) {format_ratio(r['speedup_vs_eager'])}, "
          f"vs (b) {format_ratio(r['speedup_vs_compiled'])}, "
          f"vs (c) {format_ratio(r['speedup_vs_fused_compiled'])}, "
          f"vs best(b,c) {format_ratio(r['speedup_vs_best_compiled'])}; "
          f"fastmtl / floor (d) {format_ratio(r['fastmtl_over_floor'])}")
    if not result["goals"]:
        print("  goals: none for this size")
    if "roofline" in result:
        roof = result["roofline"]
        print(f"  roofline: trunk fwd+bwd {roof['fastmtl_tflops']:.3g} TFLOP/s, its GEMMs alone (torch.mm) "
              f"{roof['floor_tflops']:.3g} TFLOP/s; trunk / floor {format_ratio(r['trunk_over_floor'])}")
    for goal in result["goals"]:
        print(f"  goal {goal['goal']:<40} {format_ratio(goal['value']):>8}  {goal['status']}")


# ----------------------------------------------------------------------------------------------
# command line


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(set(SIZES) | set(CUDA_SIZES)),
                        help=f"which benchmark sizes to run (default: all of the device's: cpu {sorted(SIZES)}, "
                             f"cuda {sorted(CUDA_SIZES)})")
    parser.add_argument("--small", action="store_true", help="one tiny size instead, for a quick smoke run")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16", "float16"),
                        help="float32 (default), float64; bfloat16 and float16 on CUDA only")
    parser.add_argument("--roofline", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the trunk alone against its GEMMs (default: on for cuda, off for cpu)")
    parser.add_argument("--repeats", type=int, default=30, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant (compiled: +3)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants (b) and (c)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for all variants (default: torch's)")
    parser.add_argument("--out", help="JSON output path (default: bench/results/bench_step-<hostname>.json)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if torch.device(args.device).type == "cuda" and not fastmtl.build_info().get("cuda"):
        parser.error("--device cuda: this fastmtl build has no CUDA kernels (fastmtl.build_info()['cuda'] is False)")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
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
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sizes = [SMALL_SIZE] if args.small else [sizes_for(args.device)[name] for name in args.sizes]
    gpu = f", {torch.cuda.get_device_name()}" if torch.device(args.device).type == "cuda" else ""
    print(f"fastmtl {fastmtl.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{cpu_model()}{gpu}; {args.repeats} repeats, {args.warmup} warm-up steps")
    if args.repeats < 20:
        print("note: fewer than 20 repeats: a smoke run, not a measurement")
    results = []
    for size in sizes:
        result = run_size(size, args, args.device, dtype)
        print_result(result, args.device, dtype)
        results.append(result)
    path = args.out or default_output_path("bench_step", args.device, args.small)
    if args.out is None and args.dtype != "float32":
        path = path[: -len(".json")] + f"-{args.dtype}.json"  # float32 and bfloat16 runs side by side
    write_json(path, {
        "benchmark": "bench_step",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(args.device),
        "settings": {"dtype": args.dtype, "repeats": args.repeats, "warmup": args.warmup, "roofline": args.roofline,
                     "compile": not args.no_compile, "threads": torch.get_num_threads(),
                     "missing_fraction": MISSING_FRACTION,
                     "zero_grad": "set_to_none=True, outside the timed region", "seed": SEED},
        "results": results,
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
