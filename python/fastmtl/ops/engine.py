"""The per-task engine ops of fastmtl's own model (FusedMLP trunk + MultiTaskHeads): the Gram matrix
of the per-task gradients without T backward passes, and the weighted backward that applies an
aggregator's weights. They read what the forward ops returned (saved activations, logit gradients),
so a step runs each forward once; :func:`fastmtl.engine.fused_model_backward` strings them together.

They compute gradients rather than being differentiated: none has an autograd formula, and they are
meant to run under ``torch.no_grad()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional, Sequence

import torch

from ..tasks import Task
from . import _bias_list, _check_devices, _pack_targets, task_layout

__all__ = ["task_gram", "GRAM_PATHS", "GRAM_MODES"]

GRAM_PATHS = ("auto", "materialise", "ghost")
GRAM_MODES = ("exact", "rep")


def task_gram(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Optional[Sequence[torch.Tensor]],
    activation: str,
    head_weight: torch.Tensor,
    head_bias: Optional[torch.Tensor],
    targets,
    tasks: Sequence[Task],
    mode: str = "exact",
    gram_path: str = "auto",
) -> torch.Tensor:
    """The Gram matrix ``G[s, t] = <g_s, g_t>`` of the per-task gradients ``g_t`` of
    ``task.weight * L_t`` for the model ``multitask_head_loss(fused_mlp(x, ...), ...)``.

    ``mode="exact"``: gradients of the trunk's parameters (every weight and bias), computed with the
    T cotangents going down the trunk together; each layer's share is materialised or taken by the
    ghost product ``K = X X^T`` (``gram_path``: ``"auto"`` picks the cheaper by a cost model).
    ``mode="rep"``: gradients of the trunk output (MGDA-UB).

    >>> import torch, fastmtl
    >>> tasks = [fastmtl.Task("a", "regression"), fastmtl.Task("b", "binary")]
    >>> x, ws = torch.randn(8, 4), [torch.randn(6, 4), torch.randn(5, 6)]
    >>> head = torch.randn(2, 5)
    >>> targets = {"a": torch.randn(8), "b": torch.randint(0, 2, (8,)).float()}
    >>> fastmtl.ops.task_gram(x, ws, None, "relu", head, None, targets, tasks).shape
    torch.Size([2, 2])
    """
    if mode not in GRAM_MODES:
        raise ValueError(f"fastmtl.task_gram: argument 'mode' expected one of {GRAM_MODES}, got {mode!r}")
    tasks, losses, num_outputs = task_layout(tasks, "fastmtl.ops.task_gram")
    if isinstance(targets, Mapping):
        targets = _pack_targets(targets, tasks, losses, num_outputs, x.dtype)
    weights = list(weights)
    bias_list = _bias_list(biases, weights)
    task_weights = torch.tensor([t.weight for t in tasks], dtype=x.dtype, device=x.device)
    with torch.no_grad():
        out, saved = torch.ops.fastmtl.fused_mlp.default(x, weights, bias_list, activation)
        _losses, logit_grad, count_scale = torch.ops.fastmtl.multitask_head_loss.default(
            out, head_weight, head_bias, targets, losses, num_outputs
        )
        if mode == "rep":
            return torch.ops.fastmtl.mtl_representation_gram.default(
                head_weight, logit_grad, count_scale, task_weights, num_outputs
            )
        gram, _jacobian, _paths = torch.ops.fastmtl.mtl_trunk_gram.default(
            x, weights, out, saved, activation, bool(bias_list), head_weight, logit_grad, count_scale, task_weights,
            num_outputs, gram_path, False,
        )
        return gram


# ---- fake kernels (torch.compile tracing, meta tensors, opcheck)


@torch.library.register_fake("fastmtl::mtl_trunk_gram")
def _mtl_trunk_gram_fake(x, weights, out, saved, activation, has_bias, head_weight, logit_grad, count_scale,
                         task_weights, num_outputs, gram_path, keep_jacobian):
    _check_devices("mtl_trunk_gram", "x", x, weights=weights, out=out, saved=saved, head_weight=head_weight,
                   logit_grad=logit_grad, count_scale=count_scale, task_weights=task_weights)
    if gram_path not in GRAM_PATHS:
        raise ValueError(f"fastmtl.mtl_trunk_gram: argument 'gram_path' expected one of {GRAM_PATHS}, got {gram_path!r}")
    tasks = len(num_outputs)
    params = sum(w.numel() + (w.shape[0] if has_bias else 0) for w in weights)
    # 16-bit inputs: the engine computes in float32 and returns its Gram matrix and Jacobian in it.
    wide = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    jacobian = x.new_empty((tasks, params), dtype=wide) if keep_jacobian else x.new_empty((0,), dtype=wide)
    return x.new_empty((tasks, tasks), dtype=wide), jacobian, torch.empty((len(weights),), dtype=torch.int64)


@torch.library.register_fake("fastmtl::mtl_representation_gram")
def _mtl_representation_gram_fake(head_weight, logit_grad, count_scale, task_weights, num_outputs):
    _check_devices("mtl_representation_gram", "logit_grad", logit_grad, head_weight=head_weight,
                   count_scale=count_scale, task_weights=task_weights)
    wide = torch.float32 if logit_grad.dtype in (torch.float16, torch.bfloat16) else logit_grad.dtype
    return logit_grad.new_empty((len(num_outputs), len(num_outputs)), dtype=wide)


@torch.library.register_fake("fastmtl::mtl_weighted_backward")
def _mtl_weighted_backward_fake(x, weights, out, saved, activation, has_bias, head_weight, head_has_bias, logit_grad,
                                count_scale, head_task_weights, trunk_task_weights, num_outputs, need_input_grad):
    _check_devices("mtl_weighted_backward", "x", x, weights=weights, out=out, saved=saved, head_weight=head_weight,
                   logit_grad=logit_grad, count_scale=count_scale, head_task_weights=head_task_weights,
                   trunk_task_weights=trunk_task_weights)
    head_bias_grad = x.new_empty((head_weight.shape[0],)) if head_has_bias else x.new_empty((0,))
    input_grad = x.new_empty(x.shape) if need_input_grad else x.new_empty((0,))
    bias_grads = [x.new_empty((w.shape[0],)) for w in weights] if has_bias else []
    return head_weight.new_empty(head_weight.shape), head_bias_grad, input_grad, [w.new_empty(w.shape) for w in weights], bias_grads
