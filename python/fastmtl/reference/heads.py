"""Plain-PyTorch references of :func:`fastmtl.ops.multitask_head_loss` and
:func:`fastmtl.ops.pack_targets`: one ``nn.functional`` loss per task over its labelled entries."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..ops.heads import TaskLayout
from ..tasks import Task, check_tasks

__all__ = ["multitask_head_loss", "pack_targets"]


def task_list(tasks):
    """The Task list of ``tasks``: the ops take a task list or its TaskLayout, and so do their references."""
    return tasks.tasks if isinstance(tasks, TaskLayout) else tasks


def pack_targets(targets: Mapping[str, torch.Tensor], tasks: Sequence[Task], dtype: torch.dtype = torch.float32):
    tasks = check_tasks(task_list(tasks), "fastmtl.reference.pack_targets")
    columns = []
    for task in tasks:
        t = targets[task.name]
        columns.append(t.reshape(t.shape[0], task.target_width).to(dtype))
    return torch.cat(columns, dim=1)


def _task_loss(task: Task, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean loss of one task over its labelled entries; 0 (with zero gradient) if there are none."""
    if task.loss == "ce":
        index = target[:, 0]
        labelled = index != -100
        if not bool(labelled.any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits[labelled], index[labelled].long())
    labelled = ~torch.isnan(target)
    if not bool(labelled.any()):
        return logits.sum() * 0.0
    y, t = logits[labelled], target[labelled]
    if task.loss == "bce":
        return F.binary_cross_entropy_with_logits(y, t)
    if task.loss == "mse":
        return F.mse_loss(y, t)
    if task.loss == "l1":
        return F.l1_loss(y, t)
    if task.loss == "huber":
        return F.smooth_l1_loss(y, t, beta=1.0)
    raise ValueError(f"unknown loss {task.loss!r}")


def multitask_head_loss(
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets,
    tasks: Sequence[Task],
) -> torch.Tensor:
    tasks = check_tasks(task_list(tasks), "fastmtl.reference.multitask_head_loss")
    if isinstance(targets, Mapping):
        targets = pack_targets(targets, tasks, z.dtype)
    logits = F.linear(z, weight, bias)
    losses = []
    col = tcol = 0
    for task in tasks:
        losses.append(
            _task_loss(task, logits[:, col : col + task.num_outputs], targets[:, tcol : tcol + task.target_width])
        )
        col += task.num_outputs
        tcol += task.target_width
    return torch.stack(losses)
