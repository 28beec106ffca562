"""The fused heads-and-losses op: ``multitask_head_loss`` (every task's head and loss in one call),
the packing of per-task targets into one tensor, their typed wrappers and fake (meta) kernels.
Autograd is registered in C++ (``csrc/ops/``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple, Union

import torch

from ..tasks import Task, check_tasks
from ._checks import check_devices

__all__ = [
    "multitask_head_loss",
    "multitask_head_loss_with_saved",
    "pack_targets",
    "loss_dtype",
    "task_layout",
    "TaskLayout",
    "HeadArguments",
]


class TaskLayout(NamedTuple):
    """A checked task list as the C++ ops take it: the tasks, each task's loss name and its number
    of outputs (rows of the stacked head weight), in task order. :func:`task_layout` makes one;
    :attr:`fastmtl.nn.MultiTaskHeads.layout` is that of a module. Wherever the ops take ``tasks``
    they also take a TaskLayout (and skip checking the tasks again)."""

    tasks: tuple[Task, ...]
    loss_names: list[str]
    num_outputs: list[int]


Tasks = Union[Sequence[Task], TaskLayout]


class HeadArguments(NamedTuple):
    """Task heads as the fused ops take them: the stacked ``weight`` ``[sum n_t, d]``, ``bias``
    ``[sum n_t]`` or None, the :class:`TaskLayout` and the task weights ``[T]`` (``task.weight``,
    what the per-task ops scale each task's loss by). :attr:`fastmtl.nn.MultiTaskHeads.op_arguments`
    gives those of a module."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    layout: TaskLayout
    task_weights: torch.Tensor


def task_layout(tasks: Tasks, where: str = "fastmtl.ops.multitask_head_loss") -> TaskLayout:
    """The :class:`TaskLayout` of a task list, checked (``where`` names the caller in errors)."""
    if isinstance(tasks, TaskLayout):
        return tasks
    tasks = check_tasks(tasks, where)
    return TaskLayout(tasks, [t.loss for t in tasks], [t.num_outputs for t in tasks])


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the per-task losses (and of the packed targets) for inputs of ``dtype``: the
    same dtype, except float32 for float16 / bfloat16 inputs (on every device): their losses are
    accumulated and returned in float32, and class indices above 256 are not exact in bfloat16."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def pack_targets(targets: Mapping[str, torch.Tensor], tasks: Tasks, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packs per-task targets (dict name -> tensor) into one ``[B, sum of target widths]`` tensor.

    Regression: float ``[B]`` or ``[B, n]`` (NaN = missing); binary: float or bool ``[B]`` (NaN =
    missing); multiclass: integer class indices ``[B]`` (-100 = missing), stored as floats.
    """
    layout = task_layout(tasks, "fastmtl.ops.pack_targets")
    if not isinstance(targets, Mapping):
        raise TypeError(
            f"fastmtl: argument 'targets' expected a dict of task name -> tensor, got {type(targets).__name__}"
        )
    names = [t.name for t in layout.tasks]
    unknown = [key for key in targets.keys() if key not in names]
    if unknown:
        # A typo'd task name would otherwise be a task silently trained without its labels.
        raise ValueError(
            f"fastmtl.ops.pack_targets: argument 'targets' has keys {unknown} that name no task; "
            f"expected keys among the tasks {names}"
        )
    values = []
    for task in layout.tasks:
        if task.name not in targets:
            raise ValueError(
                f"fastmtl: argument 'targets' has no entry for task {task.name!r}; "
                f"expected keys {[t.name for t in layout.tasks]}, got {list(targets.keys())}"
            )
        value = targets[task.name]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"fastmtl: argument 'targets[{task.name!r}]' expected a tensor, got {type(value).__name__}")
        if value.requires_grad:
            # The fused loss gives targets no gradient (they are labels): refuse rather than drop it.
            raise ValueError(
                f"fastmtl.ops.pack_targets: argument 'targets[{task.name!r}]' expected a tensor that does "
                "not require grad (targets get no gradient: pass target.detach()), got one that requires grad"
            )
        values.append(value)
    return torch.ops.fastmtl.pack_targets.default(values, names, layout.loss_names, layout.num_outputs, dtype)


def multitask_head_loss(
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets,
    tasks: Tasks,
) -> torch.Tensor:
    """All task heads and all per-task losses in one call.

    Args:
        z: trunk output ``[B, d]``.
        weight: all heads stacked, ``[sum of num_outputs, d]``, in task order.
        bias: ``[sum of num_outputs]`` or ``None``.
        targets: packed ``[B, sum of target widths]`` in ``loss_dtype(z.dtype)`` (see
            :func:`pack_targets`), or a dict of task name -> tensor, packed here.
        tasks: the :class:`fastmtl.Task` list, in the order of the rows of ``weight`` (or its
            :class:`TaskLayout`).

    Returns: the per-task losses ``[T]`` (mean over each task's labelled entries; 0 for a task
    with none) in ``loss_dtype(z.dtype)``. Backward with upstream weights ``w`` gives
    ``dz = sum_t w_t dL_t/dz``.

    Targets: regression a finite value, bce a probability in [0, 1] (soft labels allowed), ce a
    class index; NaN (regression, bce) or -100 (ce) = missing. An invalid target value (bce outside
    [0, 1], ce not a class index or -100, regression +-inf) raises
    ValueError on CPU. On CUDA, where checking would need a host synchronisation every step (and
    break CUDA-graph capture), it makes that task's loss NaN instead.

    >>> import torch, fastmtl
    >>> tasks = [fastmtl.Task("y", "regression"), fastmtl.Task("c", "multiclass", num_outputs=3)]
    >>> z, weight = torch.randn(4, 8), torch.randn(4, 8)   # 1 + 3 head rows
    >>> targets = {"y": torch.randn(4), "c": torch.tensor([0, 2, -100, 1])}
    >>> fastmtl.ops.multitask_head_loss(z, weight, None, targets, tasks).shape
    torch.Size([2])
    """
    losses, _logit_grad, _scale = multitask_head_loss_with_saved(z, weight, bias, targets, tasks)
    return losses


def multitask_head_loss_with_saved(
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets,
    tasks: Tasks,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`multitask_head_loss` and what its backward reads: ``(losses [T], logit_grad [B, sum
    n_t], count_scale [T])``, the gradient of each task's loss sum with respect to its logits and
    the ``1 / labelled count`` of each task, which the per-task Gram ops
    (:mod:`fastmtl.ops.per_task`) read instead of running the forward again."""
    layout = task_layout(tasks)
    if isinstance(targets, Mapping):
        targets = pack_targets(targets, layout, loss_dtype(z.dtype))
    elif isinstance(targets, torch.Tensor) and targets.requires_grad:
        raise ValueError(
            "fastmtl.ops.multitask_head_loss: argument 'targets' expected a tensor that does not require grad "
            "(targets get no gradient: pass targets.detach()), got one that requires grad"
        )
    return torch.ops.fastmtl.multitask_head_loss.default(
        z, weight, bias, targets, layout.loss_names, layout.num_outputs
    )


# ---- fake kernels (torch.compile tracing, meta tensors, opcheck)


@torch.library.register_fake("fastmtl::pack_targets")
def _pack_targets_fake(targets, names, losses, num_outputs, dtype):
    if len(targets) == 0:
        raise ValueError("fastmtl.pack_targets: argument 'targets' expected at least one tensor, got an empty list")
    check_devices("pack_targets", "targets[0]", targets[0], targets=targets)
    width = sum(1 if loss in ("bce", "ce") else n for loss, n in zip(losses, num_outputs))
    return targets[0].new_empty((targets[0].shape[0], width), dtype=dtype)


@torch.library.register_fake("fastmtl::multitask_head_loss")
def _multitask_head_loss_fake(z, weight, bias, targets, losses, num_outputs):
    check_devices("multitask_head_loss", "z", z, weight=weight, bias=bias, targets=targets)
    num_tasks = len(losses)
    # Losses and 1/count scales: float32 for 16-bit z, as the CUDA kernel returns them; the
    # logit gradient stays in z's dtype.
    per_task = loss_dtype(z.dtype)
    return (
        z.new_empty((num_tasks,), dtype=per_task),
        z.new_empty((z.shape[0], weight.shape[0])),
        z.new_empty((num_tasks,), dtype=per_task),
    )


@torch.library.register_fake("fastmtl::multitask_head_loss_backward")
def _multitask_head_loss_backward_fake(grad_losses, z, weight, logit_grad, scale, num_outputs, has_bias, need_z_grad):
    check_devices(
        "multitask_head_loss_backward",
        "z",
        z,
        grad_losses=grad_losses,
        weight=weight,
        logit_grad=logit_grad,
        scale=scale,
    )
    grad_z = z.new_empty(z.shape) if need_z_grad else z.new_empty((0,))
    grad_bias = z.new_empty((weight.shape[0],)) if has_bias else z.new_empty((0,))
    return grad_z, weight.new_empty(weight.shape), grad_bias
