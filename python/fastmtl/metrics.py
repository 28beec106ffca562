"""Per-task test metrics and the multi-task performance measure Delta_m% (Maninis et al. 2019).

Metrics by task kind: multiclass and binary ``accuracy`` (higher is better), regression ``rmse``
and ``mae`` (lower is better), each over the task's labelled entries only (missing labels as in
ARCHITECTURE.md: NaN, or -100 for multiclass). A task with no labelled entry gets NaN metrics.
Binary tasks can also be scored by ``auc`` (the area under the ROC curve, higher is better: the
probability that a random positive scores above a random negative, ties counting one half), the
metric of click and conversion prediction, where positives are rare and accuracy says little; a
data set says which metrics its tasks use (``MultiTaskDataset.metrics``).

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
from collections.abc import Mapping, Sequence

import torch

from .data.dataset import labelled_mask
from .tasks import Task

#: Whether a larger value of the metric is better.
HIGHER_IS_BETTER = {"accuracy": True, "auc": True, "rmse": False, "mae": False}
#: The default metrics of each task kind.
METRICS_BY_KIND = {"multiclass": ("accuracy",), "binary": ("accuracy",), "regression": ("rmse", "mae")}
#: The metrics each task kind can be scored by.
VALID_METRICS = {"multiclass": ("accuracy",), "binary": ("accuracy", "auc"), "regression": ("rmse", "mae")}


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """The area under the ROC curve of ``scores`` (any monotone score: logits, probabilities) for the
    0/1 ``labels``, over the entries whose label is not NaN: the Mann-Whitney statistic
    ``(sum of the positives' ranks - P (P + 1) / 2) / (P N)`` with tied scores given their mean rank
    (so ties count one half). NaN when the labelled entries hold no positive or no negative.

    >>> auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0.0, 0.0, 1.0, 1.0]))
    0.75
    >>> auc(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([0.0, 1.0, float("nan")]))  # a tie: one half
    0.5
    """
    if not isinstance(scores, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(
            f"fastmtl.metrics.auc: arguments 'scores' and 'labels' expected tensors, got "
            f"{type(scores).__name__} and {type(labels).__name__}"
        )
    if scores.dim() != 1 or scores.shape != labels.shape:
        raise ValueError(
            f"fastmtl.metrics.auc: arguments 'scores' and 'labels' expected two 1-d tensors of the same "
            f"length, got shapes {list(scores.shape)} and {list(labels.shape)}"
        )
    labels = labels.double()
    labelled = ~torch.isnan(labels)
    scores, labels = scores.detach().double()[labelled], labels[labelled]
    if bool(((labels != 0) & (labels != 1)).any()):
        raise ValueError("fastmtl.metrics.auc: argument 'labels' expected 0/1 (NaN = missing), got other values")
    if bool(torch.isnan(scores).any()):
        raise ValueError("fastmtl.metrics.auc: argument 'scores' holds NaN at a labelled entry")
    positives = int(labels.sum())
    negatives = labels.numel() - positives
    if positives == 0 or negatives == 0:
        return math.nan
    # Mean ranks of tied scores: sort, find each distinct value's run of equal entries, give every
    # entry of a run the mean of the run's 1-based positions.
    ordered, order = torch.sort(scores)
    _, inverse, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
    run_end = counts.cumsum(0).double()
    mean_rank = run_end - (counts.double() - 1) / 2
    ranks = torch.empty_like(scores)
    ranks[order] = mean_rank[inverse]
    positive_rank_sum = float(ranks[labels == 1].sum())
    return (positive_rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def predictions(task: Task, logits: torch.Tensor) -> torch.Tensor:
    """The model's answer from a head's logits ``[B, n]``: a class index (multiclass), 0/1 (binary,
    logit > 0), the values (regression, ``[B]`` when the task has one output)."""
    if task.kind == "multiclass":
        return logits.argmax(dim=1)
    if task.kind == "binary":
        return (logits[:, 0] > 0).to(logits.dtype)
    return logits[:, 0] if task.num_outputs == 1 else logits


def task_metrics(
    task: Task, logits: torch.Tensor, target: torch.Tensor, metrics: Sequence[str] | None = None
) -> dict[str, float]:
    """The metrics of one task (see the module docstring) from its logits and targets: ``metrics``
    (names, default ``METRICS_BY_KIND[task.kind]``)."""
    names = check_metric_names(task, metrics)
    if logits.dim() != 2 or logits.shape[0] != target.shape[0]:
        raise ValueError(
            f"fastmtl.metrics: task {task.name!r}: argument 'logits' expected [{target.shape[0]}, n] "
            f"(one row per target), got {list(logits.shape)}"
        )
    predicted = predictions(task, logits.detach())
    labelled = labelled_mask(task, target)
    if task.kind == "regression" and predicted.shape != target.shape:
        raise ValueError(
            f"fastmtl.metrics: task {task.name!r}: targets of shape {list(target.shape)} do not match "
            f"predictions of shape {list(predicted.shape)}"
        )
    count = int(labelled.sum())
    if count == 0:
        return {name: math.nan for name in names}
    values = {}
    if task.kind in ("multiclass", "binary"):
        correct = predicted[labelled] == target[labelled].to(predicted.dtype)
        values["accuracy"] = float(correct.double().mean())
        if "auc" in names:
            values["auc"] = auc(logits.detach()[:, 0], target)
    else:
        error = (predicted[labelled] - target[labelled]).double()
        values.update(rmse=float(error.square().mean().sqrt()), mae=float(error.abs().mean()))
    return {name: values[name] for name in names}


def check_metric_names(task: Task, metrics: Sequence[str] | None) -> tuple:
    """``metrics`` as a tuple (default: the task kind's), ValueError if the kind has no such metric."""
    if metrics is None:
        return METRICS_BY_KIND[task.kind]
    names = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    wrong = [m for m in names if m not in VALID_METRICS[task.kind]]
    if not names or wrong:
        raise ValueError(
            f"fastmtl.metrics: task {task.name!r}: argument 'metrics' expected names among "
            f"{', '.join(VALID_METRICS[task.kind])} for a {task.kind} task, got {list(names)}"
        )
    return names


def all_task_metrics(
    tasks: Sequence[Task], logits: Mapping, targets: Mapping, metrics: Mapping | None = None
) -> dict[str, dict[str, float]]:
    """``{task name: {metric: value}}`` for every task, from dicts name -> logits and name -> targets;
    ``metrics``: dict task name -> metric names (tasks left out: their kind's default)."""
    metrics = metrics or {}
    return {
        task.name: task_metrics(task, logits[task.name], targets[task.name], metrics.get(task.name)) for task in tasks
    }


def relative_change(metric: str, value: float, baseline: float) -> float:
    """``s (value - baseline) / baseline`` with ``s = +1`` if higher is better, else ``-1``."""
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"fastmtl.metrics: unknown metric {metric!r}; known: {', '.join(HIGHER_IS_BETTER)}")
    if baseline == 0 or not math.isfinite(baseline):
        raise ValueError(
            f"fastmtl.metrics.delta_m: the baseline's {metric} is {baseline}: a relative change needs "
            f"a finite, non-zero baseline"
        )
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
            raise ValueError(
                f"fastmtl.metrics.delta_m: argument 'metrics' has no task {task!r} (baseline tasks: {list(baseline)})"
            )
        missing = [m for m in base if m not in metrics[task]]
        if missing:
            raise ValueError(f"fastmtl.metrics.delta_m: argument 'metrics' has no {missing} for task {task!r}")
        changes = [relative_change(m, metrics[task][m], b) for m, b in base.items()]
        per_task.append(sum(changes) / len(changes))
    return 100.0 * sum(per_task) / len(per_task)
