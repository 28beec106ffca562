"""Per-task test metrics and the multi-task performance measure Delta_m% (Maninis et al. 2019).

Metrics by task kind: multiclass and binary ``accuracy`` (higher is better), regression ``rmse``
and ``mae`` (lower is better), each over the task's labelled entries only (missing labels as in
ARCHITECTURE.md: NaN, or -100 for multiclass). A task with no labelled entry gets NaN metrics.

``Delta_m% = 100 / T * sum_t mean_{k in metrics of t} s_k (M_k - B_k) / B_k``: the mean relative change
of every task's metrics against its single-task baseline, ``s_k = +1`` where higher is better and
``-1`` where lower is better, so that a positive Delta_m means the multi-task model is better on
average. Maninis, Radosavovic, Kokkinos, "Attentive Single-Tasking of Multiple Tasks", CVPR 2019;
a task with several metrics counts once, with the mean of its metrics' changes (as LibMTL does).

>>> import math
>>> baseline = {"a": {"accuracy": 0.80}, "b": {"rmse": 2.0, "mae": 1.0}}
>>> model = {"a": {"accuracy": 0.88}, "b": {"rmse": 1.0, "mae": 1.5}}
>>> round(delta_m(model, baseline), 6)  # a: +10%; b: mean(+50%, -50%) = 0 -> mean 5%
5.0
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Dict, Sequence

import torch

from .data.dataset import labelled_mask
from .tasks import Task

#: Whether a larger value of the metric is better.
HIGHER_IS_BETTER = {"accuracy": True, "rmse": False, "mae": False}
METRICS_BY_KIND = {"multiclass": ("accuracy",), "binary": ("accuracy",), "regression": ("rmse", "mae")}


def predictions(task: Task, logits: torch.Tensor) -> torch.Tensor:
    """The model's answer from a head's logits ``[B, n]``: a class index (multiclass), 0/1 (binary,
    logit > 0), the values (regression, ``[B]`` when the task has one output)."""
    if task.kind == "multiclass":
        return logits.argmax(dim=1)
    if task.kind == "binary":
        return (logits[:, 0] > 0).to(logits.dtype)
    return logits[:, 0] if task.num_outputs == 1 else logits


def task_metrics(task: Task, logits: torch.Tensor, target: torch.Tensor) -> Dict[str, float]:
    """The metrics of one task (see the module docstring) from its logits and targets."""
    if logits.dim() != 2 or logits.shape[0] != target.shape[0]:
        raise ValueError(f"fastmtl.metrics: task {task.name!r}: argument 'logits' expected [{target.shape[0]}, n] "
                         f"(one row per target), got {list(logits.shape)}")
    predicted = predictions(task, logits.detach())
    labelled = labelled_mask(task, target)
    if task.kind == "regression" and predicted.shape != target.shape:
        raise ValueError(f"fastmtl.metrics: task {task.name!r}: targets of shape {list(target.shape)} do not match "
                         f"predictions of shape {list(predicted.shape)}")
    count = int(labelled.sum())
    if count == 0:
        return {name: math.nan for name in METRICS_BY_KIND[task.kind]}
    if task.kind in ("multiclass", "binary"):
        correct = predicted[labelled] == target[labelled].to(predicted.dtype)
        return {"accuracy": float(correct.double().mean())}
    error = (predicted[labelled] - target[labelled]).double()
    return {"rmse": float(error.square().mean().sqrt()), "mae": float(error.abs().mean())}


def all_task_metrics(tasks: Sequence[Task], logits: Mapping, targets: Mapping) -> Dict[str, Dict[str, float]]:
    """``{task name: {metric: value}}`` for every task, from dicts name -> logits and name -> targets."""
    return {task.name: task_metrics(task, logits[task.name], targets[task.name]) for task in tasks}


def relative_change(metric: str, value: float, baseline: float) -> float:
    """``s (value - baseline) / baseline`` with ``s = +1`` if higher is better, else ``-1``."""
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"fastmtl.metrics: unknown metric {metric!r}; known: {', '.join(HIGHER_IS_BETTER)}")
    if baseline == 0 or not math.isfinite(baseline):
        raise ValueError(f"fastmtl.metrics.delta_m: the baseline's {metric} is {baseline}: a relative change needs "
                         f"a finite, non-zero baseline")
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    return sign * (value - baseline) / baseline


def delta_m(metrics: Mapping, baseline: Mapping) -> float:
    """Delta_m% of ``metrics`` against ``baseline`` (both ``{task: {metric: value}}``, as
    :func:`all_task_metrics` returns), over the baseline's tasks and metrics."""
    if not baseline:
        raise ValueError("fastmtl.metrics.delta_m: argument 'baseline' expected at least one task, got none")
    per_task = []
    for task, base in baseline.items():
        if task not in metrics:
            raise ValueError(f"fastmtl.metrics.delta_m: argument 'metrics' has no task {task!r} (baseline tasks: "
                             f"{list(baseline)})")
        missing = [m for m in base if m not in metrics[task]]
        if missing:
            raise ValueError(f"fastmtl.metrics.delta_m: argument 'metrics' has no {missing} for task {task!r}")
        changes = [relative_change(m, metrics[task][m], b) for m, b in base.items()]
        per_task.append(sum(changes) / len(changes))
    return 100.0 * sum(per_task) / len(per_task)
