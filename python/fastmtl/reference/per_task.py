"""The plain reference of the per-task Gram op, :func:`fastmtl.ops.task_gram`: T
``torch.autograd.grad`` calls through the plain model for the per-task gradients, stacked, ``J J^T``."""

from __future__ import annotations

import torch

from .heads import multitask_head_loss, task_list
from .trunk import fused_mlp

__all__ = ["task_gram"]


def task_gram(x, weights, biases, activation, head_weight, head_bias, targets, tasks, mode="exact", gram_path="auto"):
    """The reference of :func:`fastmtl.ops.task_gram`: T ``autograd.grad`` calls through the plain
    model for the per-task gradients of ``task.weight * L_t``, stacked, ``J J^T``. ``gram_path``
    is the op's choice of algorithm and changes nothing here."""
    leaves = [w.detach().requires_grad_() for w in weights]
    bias_leaves = [b.detach().requires_grad_() for b in biases] if biases is not None else []
    with torch.enable_grad():
        z = fused_mlp(x.detach(), leaves, bias_leaves or None, activation)
        losses = multitask_head_loss(
            z, head_weight.detach(), None if head_bias is None else head_bias.detach(), targets, tasks
        )
        losses = losses * torch.tensor([t.weight for t in task_list(tasks)], dtype=losses.dtype)
        wrt = [z] if mode == "rep" else leaves + bias_leaves
        rows = [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[t], wrt, retain_graph=True)])
            for t in range(len(losses))
        ]
    J = torch.stack(rows)
    return J @ J.T
