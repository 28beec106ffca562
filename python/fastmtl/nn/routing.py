"""Heads over per-task representations: task t's head reads trunk output t ([T, B, d]), as after
an MMoE, PLE or SoftSharedLinear trunk.

The losses still run in the fused multitask_head_loss op: the representations side by side
([B, T * d]) against the block-diagonal head weight ([sum n_t, T * d], task t's rows in its own
column block) give each task's logits from its own representation in one GEMM. The zero blocks
cost T times the FLOPs of the heads proper, which for heads of a few outputs is small next to the
trunk; their gradients are discarded by block_diag's backward.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from .. import ops
from .heads import MultiTaskHeads


def check_task_features(heads: MultiTaskHeads, z: torch.Tensor) -> None:
    T = len(heads.tasks)
    if z.dim() != 3 or z.shape[0] != T or z.shape[2] != heads.in_features:
        raise ValueError(
            f"MultiTaskModel: the trunk's per-task representations expected shape "
            f"[{T}, B, {heads.in_features}] (one per task), got {list(z.shape)}"
        )


def routed_logits(heads: MultiTaskHeads, z: torch.Tensor) -> dict[str, torch.Tensor]:
    """Dict name -> logits of task t's head on ``z[t]``."""
    check_task_features(heads, z)
    weight, bias = heads.stacked_parameters()
    weights = weight.split(heads.num_outputs)
    biases = bias.split(heads.num_outputs)
    return {t.name: F.linear(z[i], weights[i], biases[i]) for i, t in enumerate(heads.tasks)}


def routed_losses(heads: MultiTaskHeads, z: torch.Tensor, targets: Mapping | torch.Tensor) -> torch.Tensor:
    """Per-task losses ``[T]``, task t's head on ``z[t]``, in one fused op."""
    check_task_features(heads, z)
    T, B, d = z.shape
    side_by_side = z.transpose(0, 1).reshape(B, T * d)
    weight, bias = heads.stacked_parameters()
    block_weight = torch.block_diag(*weight.split(heads.num_outputs))
    if isinstance(targets, Mapping):
        targets = heads.pack_targets(targets, ops.loss_dtype(z.dtype))
    return ops.multitask_head_loss(side_by_side, block_weight, bias, targets, heads.layout)
