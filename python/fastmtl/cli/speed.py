"""What fastmtl's speed buys: the time of one training step of every gradient method (aggregator)
done by fastmtl against the same method done the usual way, and against the plain summed-loss step.

The usual way is LibMTL's: the plain PyTorch model (an ``nn.Sequential`` trunk, one ``nn.Linear``
head per task, each task's loss written with ``torch.nn.functional``), then T ``autograd.grad``
calls over the retained graph for the per-task gradients, their Gram matrix, the aggregator and the
weighted sum (``fastmtl.reference.mtl_backward``). Every variant starts from the same weights, has
its own Adam optimizer and aggregator instance, and takes one step on the same batch in turn
(interleaved, so a change of the machine's load hits all of them alike); the table gives medians.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import reference
from ..data.dataset import IGNORE_INDEX, MultiTaskDataset
from .names import make_method
from .training import TrainingConfig, build_model

WARMUP_ROUNDS = 3  # untimed rounds first: allocator, thread pool and the aggregators' first calls
_ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


class PlainModel(nn.Module):
    """The plain PyTorch equivalent of a fastmtl model with a FusedMLP trunk, with its weights:
    ``trunk`` an ``nn.Sequential`` of Linear + activation pairs, ``heads`` one ``nn.Linear`` per task,
    ``losses`` a Python loop over the tasks (mean over labelled entries, 0 when none), as LibMTL
    writes it."""

    def __init__(self, model):
        super().__init__()
        trunk, heads = model.trunk, model.heads
        layers = []
        biases = list(trunk.biases) if trunk.biases is not None else [None] * len(trunk.weights)
        for weight, bias in zip(trunk.weights, biases):
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if bias is not None:
                    linear.bias.copy_(bias)
            layers += [linear, _ACTIVATIONS[trunk.activation]()]
        self.trunk = nn.Sequential(*layers)
        self.tasks = list(heads.tasks)
        self.heads = nn.ModuleDict(heads.to_linears())
        self.to(trunk.weights[0].device)

    def features_and_losses(self, x, targets):
        z = self.trunk(x)
        return z, torch.stack(
            [task.weight * task_loss(task, self.heads[task.name](z), targets[task.name]) for task in self.tasks]
        )


def task_loss(task, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_t as fastmtl defines it (mean over the labelled entries, 0 when none) in plain PyTorch."""
    if task.kind == "multiclass":
        labelled = (target != IGNORE_INDEX).sum().clamp_min(1)
        return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum") / labelled
    prediction = logits.squeeze(-1) if target.dim() == 1 else logits
    mask = ~torch.isnan(target)
    labelled = mask.sum().clamp_min(1)
    filled = torch.where(mask, target, 0.0)
    if task.kind == "binary":
        return (
            F.binary_cross_entropy_with_logits(prediction, filled, weight=mask.to(prediction.dtype), reduction="sum")
            / labelled
        )
    losses = {"mse": F.mse_loss, "l1": F.l1_loss, "huber": F.smooth_l1_loss}
    return losses[task.loss](torch.where(mask, prediction, 0.0), filled, reduction="sum") / labelled


@dataclass
class Variant:
    name: str
    step: Callable[[torch.Tensor, dict[str, torch.Tensor]], None]
    model: nn.Module  # the model the step trains (fastmtl's MultiTaskModel or a PlainModel)


def _plain_step(plain: PlainModel, optimizer):
    def step(x, targets):
        optimizer.zero_grad(set_to_none=True)
        _, losses = plain.features_and_losses(x, targets)
        losses.sum().backward()
        optimizer.step()

    return step


def _fastmtl_step(model, optimizer, aggregator, mode):
    def step(x, targets):
        optimizer.zero_grad(set_to_none=True)
        if aggregator is None:
            model.loss(x, targets).backward()
        else:
            model.mtl_backward(x, targets, aggregator, mode=mode)
        optimizer.step()

    return step


def _loop_step(plain: PlainModel, optimizer, aggregator, mode):
    shared = list(plain.trunk.parameters())

    def step(x, targets):
        optimizer.zero_grad(set_to_none=True)
        z, losses = plain.features_and_losses(x, targets)
        reference.mtl_backward(losses, z, aggregator, shared_params=shared, mode=mode)
        optimizer.step()

    return step


def make_variants(train: MultiTaskDataset, methods: Sequence[str], config: TrainingConfig) -> list[Variant]:
    """``plain`` (plain PyTorch, summed loss), ``fastmtl summed`` and, per aggregator in ``methods``,
    ``fastmtl <m>`` and ``loop <m>``: fresh models with the same initial weights."""

    def fastmtl_model():
        return build_model(train.num_features, train.tasks, config)

    def adam(module):
        return torch.optim.Adam(module.parameters(), lr=config.lr)

    plain = PlainModel(fastmtl_model())
    model = fastmtl_model()
    variants = [
        Variant("plain", _plain_step(plain, adam(plain)), plain),
        Variant("fastmtl summed", _fastmtl_step(model, adam(model), None, config.mode), model),
    ]
    for method in methods:
        model, plain = fastmtl_model(), PlainModel(fastmtl_model())
        variants.append(
            Variant(
                f"fastmtl {method}",
                _fastmtl_step(model, adam(model), make_method(method, len(train.tasks), config.seed), config.mode),
                model,
            )
        )
        variants.append(
            Variant(
                f"loop {method}",
                _loop_step(plain, adam(plain), make_method(method, len(train.tasks), config.seed), config.mode),
                plain,
            )
        )
    return variants


def time_steps(
    train: MultiTaskDataset, methods: Sequence[str], config: TrainingConfig, rounds: int, progress=None
) -> dict:
    """Median ms per step of every variant of :func:`make_variants` over ``rounds`` interleaved rounds
    (after ``WARMUP_ROUNDS``); round r uses batch r of the training data. Returns the table's rows
    (one per aggregator: fastmtl, loop, how many times faster, each against the plain step) and the
    plain steps' medians."""
    if config.arch != "SharedBottom" or train.field_cardinalities is not None:
        raise ValueError(
            "the speed comparison needs a SharedBottom (FusedMLP) trunk on dense features: it compares "
            "fastmtl's fused engine with the plain PyTorch model"
        )
    variants = make_variants(train, methods, config)
    generator = torch.Generator().manual_seed(config.seed)
    batches = []
    while len(batches) < WARMUP_ROUNDS + rounds:
        batches += [
            (x.to(config.device), {k: v.to(config.device) for k, v in t.items()})
            for x, t in train.batches(config.batch_size, shuffle=True, generator=generator)
            if x.shape[0] == config.batch_size
        ]  # a full batch every round: same work
    samples: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(WARMUP_ROUNDS + rounds):
        x, targets = batches[r]
        # Rotate the order each round, so that no variant always runs right after the same other one.
        for variant in variants[r % len(variants) :] + variants[: r % len(variants)]:
            if torch.device(config.device).type == "cuda":
                torch.cuda.synchronize()
            begin = time.perf_counter()
            variant.step(x, targets)
            if torch.device(config.device).type == "cuda":
                torch.cuda.synchronize()
            if r >= WARMUP_ROUNDS:
                samples[variant.name].append(1000 * (time.perf_counter() - begin))
        if progress is not None:
            progress.update(1)
    median = {name: statistics.median(values) for name, values in samples.items()}
    plain = median["plain"]
    rows = [
        {
            "method": m,
            "fastmtl_ms": median[f"fastmtl {m}"],
            "loop_ms": median[f"loop {m}"],
            "times_faster": median[f"loop {m}"] / median[f"fastmtl {m}"],
            "fastmtl_over_plain": median[f"fastmtl {m}"] / plain,
            "loop_over_plain": median[f"loop {m}"] / plain,
        }
        for m in methods
    ]
    return {
        "rows": rows,
        "plain_ms": plain,
        "fastmtl_summed_ms": median["fastmtl summed"],
        "rounds": rounds,
        "batch_size": config.batch_size,
    }


def markdown_table(speed: dict) -> str:
    lines = [
        "| method | fastmtl ms/step | usual way (LibMTL loop) ms/step | × faster | fastmtl / plain step | "
        "loop / plain step |",
        "|---|---|---|---|---|---|",
    ]
    for row in speed["rows"]:
        lines.append(
            f"| {row['method']} | {row['fastmtl_ms']:.2f} | {row['loop_ms']:.2f} | "
            f"**{row['times_faster']:.2f}×** | {row['fastmtl_over_plain']:.2f} | {row['loop_over_plain']:.2f} |"
        )
    lines.append(
        f"| summed loss, no gradient method (fastmtl / plain PyTorch) | {speed['fastmtl_summed_ms']:.2f} | "
        f"{speed['plain_ms']:.2f} | {speed['plain_ms'] / speed['fastmtl_summed_ms']:.2f}× | "
        f"{speed['fastmtl_summed_ms'] / speed['plain_ms']:.2f} | 1.00 |"
    )
    return "\n".join(lines)
