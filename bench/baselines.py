"""The plain-PyTorch side of the benchmarks: the workload (tasks, targets, sizes) and the models and
steps people write today without fastmtl, each on weights copied from one source so that every
variant computes the same thing.

The masked per-task loss here is not :func:`fastmtl.reference.multitask_head_loss`: the reference is
the tests' oracle, written the obvious way (boolean indexing, a Python ``if`` on "any labelled?"),
which a fast hand-written step would not do and ``torch.compile(fullgraph=True)`` cannot capture.
The baseline masks with ``torch.where`` / loss weights / ``ignore_index`` instead: fixed shapes, the
same values.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import fastmtl
import torch
import torch.nn.functional as F
from torch import nn

MISSING_FRACTION = 0.1  # share of each task's labels set missing (NaN or -100)
MULTICLASS_CLASSES = 5
IGNORE_INDEX = -100  # missing multiclass label, as torch.nn.functional.cross_entropy's default
# The kinds tasks cycle through: (kind, loss, num_outputs).
TASK_KINDS = (("regression", "mse", 1), ("binary", "bce", 1), ("multiclass", "ce", MULTICLASS_CLASSES))

# ----------------------------------------------------------------------------------------------
# the workload


@dataclass(frozen=True)
class Size:
    """One benchmark configuration of an MLP-trunk multi-task step, and its goals: (the key of the
    measured ratio, harness.Goal) pairs."""

    name: str
    batch: int
    in_features: int
    hidden: tuple
    num_tasks: int
    goals: tuple = ()

    def describe(self) -> str:
        widths = set(self.hidden)
        trunk = f"{len(self.hidden)}x{self.hidden[0]}" if len(widths) == 1 else "x".join(map(str, self.hidden))
        return f"B={self.batch} in={self.in_features} trunk {trunk} T={self.num_tasks}"


def make_tasks(num_tasks: int) -> list[fastmtl.Task]:
    """Tasks cycling regression (mse), binary (bce), multiclass (ce); unequal weights so the
    weighted sum is exercised."""
    tasks = []
    for i in range(num_tasks):
        kind, loss, outputs = TASK_KINDS[i % len(TASK_KINDS)]
        weight = 1.0 + 0.25 * (i % 4)
        tasks.append(fastmtl.Task(f"task{i:02d}_{kind}", kind, num_outputs=outputs, loss=loss, weight=weight))
    return tasks


def describe_tasks(tasks) -> str:
    counts = {kind: sum(t.kind == kind for t in tasks) for kind, _, _ in TASK_KINDS}
    return f"{counts['regression']} mse, {counts['binary']} bce, {counts['multiclass']} ce/{MULTICLASS_CLASSES}"


def make_targets(tasks: Sequence[fastmtl.Task], batch: int, device, dtype) -> dict[str, torch.Tensor]:
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


# ----------------------------------------------------------------------------------------------
# the plain model: nn.Sequential trunk, one nn.Linear per task, a Python loop of masked losses


def make_plain_trunk(size: Size, device, dtype) -> nn.Sequential:
    layers = []
    for fan_in, fan_out in zip((size.in_features,) + size.hidden[:-1], size.hidden):
        layers += [nn.Linear(fan_in, fan_out, device=device, dtype=dtype), nn.ReLU()]
    return nn.Sequential(*layers)


def make_plain_heads(tasks, in_features: int, device, dtype) -> nn.ModuleDict:
    return nn.ModuleDict({t.name: nn.Linear(in_features, t.num_outputs, device=device, dtype=dtype) for t in tasks})


def make_fastmtl_model(plain_trunk, plain_heads, tasks, size: Size, device, dtype) -> fastmtl.nn.MultiTaskModel:
    """fastmtl's model of the same shape, on the plain model's weights."""
    model = fastmtl.nn.MultiTaskModel(
        fastmtl.nn.FusedMLP(size.in_features, list(size.hidden), activation="relu", device=device, dtype=dtype),
        fastmtl.nn.MultiTaskHeads(size.hidden[-1], tasks, device=device, dtype=dtype),
    )
    return model.load_plain_weights(plain_trunk, dict(plain_heads.items()))


def trunk_weights_of(module: nn.Module) -> list[torch.Tensor]:
    """The trunk's weight matrices in layer order (Linear.weight or FusedMLP.weights)."""
    if isinstance(module, fastmtl.nn.FusedMLP):
        return list(module.weights)
    return [m.weight for m in module if isinstance(m, nn.Linear)]


def masked_task_loss(task: fastmtl.Task, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_t as fastmtl defines it: mean over labelled entries, 0 when none; fixed shapes (see the
    module docstring)."""
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


def plain_model_losses(trunk, heads, tasks, x, targets):
    """(features, [task.weight * L_t for each task]) of the plain model, a Python loop over tasks."""
    z = trunk(x)
    return z, [task.weight * masked_task_loss(task, heads[task.name](z), targets[task.name]) for task in tasks]


def make_eager_loss(trunk: nn.Sequential, heads: nn.ModuleDict, tasks) -> Callable:
    """The plain model's weighted total loss ``sum_t w_t L_t``."""

    def eager_loss(x: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        features = trunk(x)
        total = 0.0
        for task in tasks:
            total = total + task.weight * masked_task_loss(task, heads[task.name](features), targets[task.name])
        return total

    return eager_loss


def make_libmtl_loop_step(trunk, heads, tasks, x, targets, aggregator) -> Callable[[], None]:
    """The per-task-gradient step as LibMTL writes it: T ``torch.autograd.grad`` calls over a retained
    graph, the Gram of the stacked T x P Jacobian, ``aggregator``'s weights, ``w @ J`` into the trunk's
    .grad, and the summed loss's backward into the heads."""
    shared, head_params = list(trunk.parameters()), list(heads.parameters())

    def loop_step() -> None:
        _, losses = plain_model_losses(trunk, heads, tasks, x, targets)
        rows = [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)]) for loss in losses
        ]
        jacobian = torch.stack(rows)
        update = aggregator(jacobian @ jacobian.T) @ jacobian
        offset = 0
        for p in shared:
            p.grad = update[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        torch.autograd.backward(sum(losses), inputs=head_params)

    return loop_step


# ----------------------------------------------------------------------------------------------
# the hand-fused model: one stacked head, one loss call per kind


@dataclass
class LossGroups:
    """Tasks grouped by loss, in the row order of the stacked head (so each group's logits are a
    contiguous column block)."""

    mse: list[fastmtl.Task] = field(default_factory=list)
    bce: list[fastmtl.Task] = field(default_factory=list)
    ce_by_classes: dict[int, list[fastmtl.Task]] = field(default_factory=dict)

    @classmethod
    def of(cls, tasks) -> LossGroups:
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

    def in_order(self) -> list[fastmtl.Task]:
        ordered = self.mse + self.bce
        for classes in sorted(self.ce_by_classes):
            ordered += self.ce_by_classes[classes]
        return ordered


def make_stacked_head(plain_heads: nn.ModuleDict, ordered_tasks, device, dtype) -> nn.Linear:
    """All per-task heads as one nn.Linear, rows in ``ordered_tasks`` order."""
    in_features = next(iter(plain_heads.values())).in_features
    stacked = nn.Linear(in_features, sum(t.num_outputs for t in ordered_tasks), device=device, dtype=dtype)
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

    def hand_fused_loss(x: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
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
# MMoE in plain PyTorch, on the weights of a fastmtl MMoE + MultiTaskHeads (one output per task)


class LoopMMoE(nn.Module):
    """As the recommendation libraries (torch-rechub, DeepCTR-Torch, LibMTL) write it: a ModuleList
    of expert nn.Sequential(Linear, ReLU, ...), a Python loop over experts and over task gates, one
    nn.Linear tower per task."""

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
        self.gates, self.towers = nn.ModuleList(), nn.ModuleList()
        for t in range(fused.num_tasks):
            gate, tower = nn.Linear(fused.in_features, fused.num_experts), nn.Linear(heads.in_features, 1)
            with torch.no_grad():
                gate.weight.copy_(fused.gates.weight[t])
                gate.bias.copy_(fused.gates.bias[t])
                tower.weight.copy_(heads.weight[t : t + 1])
                tower.bias.copy_(heads.bias[t : t + 1])
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
    """Stacked expert parameters [E, out, in] run by torch.baddbmm, one gate GEMM, the mixtures by
    einsum, the heads stacked."""

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


# ----------------------------------------------------------------------------------------------
# a plain multi-task model with a custom forward (what fastmtl.convert takes)


class PlainTowersMTL(nn.Module):
    """An nn.Sequential trunk of (Linear, ReLU) and per-task towers nn.Sequential(Linear, ReLU, Linear);
    forward returns one [B] output per task."""

    def __init__(self, in_features: int, widths: Sequence[int], num_tasks: int, tower: int):
        super().__init__()
        layers, fan_in = [], in_features
        for w in widths:
            layers += [nn.Linear(fan_in, w), nn.ReLU()]
            fan_in = w
        self.trunk = nn.Sequential(*layers)
        self.towers = nn.ModuleList(
            [nn.Sequential(nn.Linear(fan_in, tower), nn.ReLU(), nn.Linear(tower, 1)) for _ in range(num_tasks)]
        )

    def forward(self, x):
        z = self.trunk(x)
        return [t(z).squeeze(-1) for t in self.towers]


def copies(*modules: nn.Module):
    """Deep copies: identical values in separate memory, so no variant finds another's weights in cache."""
    return tuple(copy.deepcopy(m) for m in modules)
