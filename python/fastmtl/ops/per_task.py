"""The per-task Gram ops of fastmtl's own model (FusedMLP trunk + MultiTaskHeads): the Gram matrix
of the per-task gradients without T backward passes, and the weighted backward that applies an
aggregator's weights. They read what the forward ops returned (:func:`fused_mlp_with_saved`,
:func:`multitask_head_loss_with_saved`: saved activations, logit gradients), so a step runs each
forward once; the fused path of the engine (:mod:`fastmtl.engine.fused`) strings them together.

They compute gradients rather than being differentiated: none has an autograd formula, and they are
meant to run under ``torch.no_grad()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ._checks import bias_list, check_devices
from .heads import Tasks, loss_dtype, multitask_head_loss_with_saved, pack_targets, task_layout
from .trunk import fused_mlp_with_saved

__all__ = [
    "task_gram",
    "mtl_trunk_gram",
    "mtl_representation_gram",
    "mtl_weighted_backward",
    "GRAM_PATHS",
    "GRAM_MODES",
]

GRAM_PATHS = ("auto", "materialise", "ghost")
GRAM_MODES = ("exact", "rep")


def task_gram(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor] | None,
    activation: str,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None,
    targets,
    tasks: Tasks,
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
    # Checked for both modes: "rep" does not use it, but an invalid value is a mistake either way.
    if gram_path not in GRAM_PATHS:
        raise ValueError(f"fastmtl.task_gram: argument 'gram_path' expected one of {GRAM_PATHS}, got {gram_path!r}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fastmtl.task_gram: argument 'x' expected a tensor, got {type(x).__name__}")
    layout = task_layout(tasks, "fastmtl.ops.task_gram")
    _check_head(x, weights, head_weight, head_bias, layout)
    if isinstance(targets, Mapping):
        targets = pack_targets(targets, layout, loss_dtype(x.dtype))
    weights = list(weights)
    biases = bias_list(biases, weights, "task_gram")
    task_weights = torch.tensor([t.weight for t in layout.tasks], dtype=x.dtype, device=x.device)
    with torch.no_grad():
        out, saved = fused_mlp_with_saved(x, weights, biases, activation)
        _losses, logit_grad, count_scale = multitask_head_loss_with_saved(out, head_weight, head_bias, targets, layout)
        if mode == "rep":
            return mtl_representation_gram(head_weight, logit_grad, count_scale, task_weights, layout.num_outputs)
        gram, _jacobian, _paths = mtl_trunk_gram(
            x,
            weights,
            out,
            saved,
            activation,
            bool(biases),
            head_weight,
            logit_grad,
            count_scale,
            task_weights,
            layout.num_outputs,
            gram_path,
        )
        return gram


def _check_head(x, weights, head_weight, head_bias, layout) -> None:
    """task_gram's own check of the head arguments, so that errors name them as the caller passed
    them (``head_weight`` / ``head_bias``), not as the inner op's ``weight`` / ``bias``."""
    rows = sum(layout.num_outputs)
    width = None
    weights = list(weights) if isinstance(weights, (list, tuple)) else None
    if weights and isinstance(weights[-1], torch.Tensor) and weights[-1].dim() == 2:
        width = weights[-1].shape[0]
    if not isinstance(head_weight, torch.Tensor):
        raise TypeError(
            f"fastmtl.task_gram: argument 'head_weight' expected a tensor, got {type(head_weight).__name__}"
        )
    expected = (rows, width if width is not None else head_weight.shape[-1] if head_weight.dim() else 0)
    if head_weight.dim() != 2 or tuple(head_weight.shape) != expected:
        raise ValueError(
            f"fastmtl.task_gram: argument 'head_weight' expected shape [{expected[0]}, {expected[1]}] "
            f"([sum of num_outputs, trunk output width]), got {list(head_weight.shape)}"
        )
    if head_weight.dtype != x.dtype or head_weight.device != x.device:
        raise ValueError(
            f"fastmtl.task_gram: argument 'head_weight' expected dtype {x.dtype} on {x.device} (those of 'x'), "
            f"got {head_weight.dtype} on {head_weight.device}"
        )
    if head_bias is None:
        return
    if not isinstance(head_bias, torch.Tensor):
        raise TypeError(
            f"fastmtl.task_gram: argument 'head_bias' expected a tensor or None, got {type(head_bias).__name__}"
        )
    if tuple(head_bias.shape) != (rows,):
        raise ValueError(
            f"fastmtl.task_gram: argument 'head_bias' expected shape [{rows}], got {list(head_bias.shape)}"
        )
    if head_bias.dtype != x.dtype or head_bias.device != x.device:
        raise ValueError(
            f"fastmtl.task_gram: argument 'head_bias' expected dtype {x.dtype} on {x.device} (those of 'x'), "
            f"got {head_bias.dtype} on {head_bias.device}"
        )


def mtl_trunk_gram(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    out: torch.Tensor,
    saved: Sequence[torch.Tensor],
    activation: str,
    has_bias: bool,
    head_weight: torch.Tensor,
    logit_grad: torch.Tensor,
    count_scale: torch.Tensor,
    task_weights: torch.Tensor,
    num_outputs: Sequence[int],
    gram_path: str = "auto",
    keep_jacobian: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Gram matrix ``[T, T]`` of the per-task gradients of ``task_weights[t] * L_t`` over the
    trunk's parameters, from the forward's results (``out, saved`` of :func:`fused_mlp_with_saved`;
    ``logit_grad, count_scale`` of :func:`multitask_head_loss_with_saved`). Returns ``(gram,
    jacobian, paths)``: the ``[T, P]`` per-task gradients (weights then biases, layer by layer) when
    ``keep_jacobian`` (else empty) and the per-layer algorithm taken (int64 ``[L]``: 0 materialised,
    1 ghost; ``gram_path="auto"`` picks by a cost model)."""
    return torch.ops.fastmtl.mtl_trunk_gram.default(
        x,
        list(weights),
        out,
        list(saved),
        activation,
        has_bias,
        head_weight,
        logit_grad,
        count_scale,
        task_weights,
        list(num_outputs),
        gram_path,
        keep_jacobian,
    )


def mtl_representation_gram(
    head_weight: torch.Tensor,
    logit_grad: torch.Tensor,
    count_scale: torch.Tensor,
    task_weights: torch.Tensor,
    num_outputs: Sequence[int],
) -> torch.Tensor:
    """The Gram matrix ``[T, T]`` of the per-task gradients of ``task_weights[t] * L_t`` with
    respect to the trunk output (MGDA-UB's representation mode)."""
    return torch.ops.fastmtl.mtl_representation_gram.default(
        head_weight, logit_grad, count_scale, task_weights, list(num_outputs)
    )


def mtl_weighted_backward(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    out: torch.Tensor,
    saved: Sequence[torch.Tensor],
    activation: str,
    has_bias: bool,
    head_weight: torch.Tensor,
    head_has_bias: bool,
    logit_grad: torch.Tensor,
    count_scale: torch.Tensor,
    head_task_weights: torch.Tensor,
    trunk_task_weights: torch.Tensor,
    num_outputs: Sequence[int],
    need_input_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """One backward of the model with per-task weights: the heads get the gradient of
    ``sum_t head_task_weights[t] L_t``, the trunk that of ``sum_t trunk_task_weights[t] L_t``.
    Returns ``(head_weight_grad, head_bias_grad (empty without bias), input_grad (empty unless
    need_input_grad), trunk weight grads, trunk bias grads)``."""
    return torch.ops.fastmtl.mtl_weighted_backward.default(
        x,
        list(weights),
        out,
        list(saved),
        activation,
        has_bias,
        head_weight,
        head_has_bias,
        logit_grad,
        count_scale,
        head_task_weights,
        trunk_task_weights,
        list(num_outputs),
        need_input_grad,
    )


# ---- fake kernels (torch.compile tracing, meta tensors, opcheck)


@torch.library.register_fake("fastmtl::mtl_trunk_gram")
def _mtl_trunk_gram_fake(
    x,
    weights,
    out,
    saved,
    activation,
    has_bias,
    head_weight,
    logit_grad,
    count_scale,
    task_weights,
    num_outputs,
    gram_path,
    keep_jacobian,
):
    check_devices(
        "mtl_trunk_gram",
        "x",
        x,
        weights=weights,
        out=out,
        saved=saved,
        head_weight=head_weight,
        logit_grad=logit_grad,
        count_scale=count_scale,
        task_weights=task_weights,
    )
    if gram_path not in GRAM_PATHS:
        raise ValueError(
            f"fastmtl.mtl_trunk_gram: argument 'gram_path' expected one of {GRAM_PATHS}, got {gram_path!r}"
        )
    tasks = len(num_outputs)
    params = sum(w.numel() + (w.shape[0] if has_bias else 0) for w in weights)
    # 16-bit inputs: the engine computes in float32 and returns its Gram matrix and Jacobian in it.
    wide = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    jacobian = x.new_empty((tasks, params), dtype=wide) if keep_jacobian else x.new_empty((0,), dtype=wide)
    return x.new_empty((tasks, tasks), dtype=wide), jacobian, torch.empty((len(weights),), dtype=torch.int64)


@torch.library.register_fake("fastmtl::mtl_representation_gram")
def _mtl_representation_gram_fake(head_weight, logit_grad, count_scale, task_weights, num_outputs):
    check_devices(
        "mtl_representation_gram",
        "logit_grad",
        logit_grad,
        head_weight=head_weight,
        count_scale=count_scale,
        task_weights=task_weights,
    )
    wide = torch.float32 if logit_grad.dtype in (torch.float16, torch.bfloat16) else logit_grad.dtype
    return logit_grad.new_empty((len(num_outputs), len(num_outputs)), dtype=wide)


@torch.library.register_fake("fastmtl::mtl_weighted_backward")
def _mtl_weighted_backward_fake(
    x,
    weights,
    out,
    saved,
    activation,
    has_bias,
    head_weight,
    head_has_bias,
    logit_grad,
    count_scale,
    head_task_weights,
    trunk_task_weights,
    num_outputs,
    need_input_grad,
):
    check_devices(
        "mtl_weighted_backward",
        "x",
        x,
        weights=weights,
        out=out,
        saved=saved,
        head_weight=head_weight,
        logit_grad=logit_grad,
        count_scale=count_scale,
        head_task_weights=head_task_weights,
        trunk_task_weights=trunk_task_weights,
    )
    head_bias_grad = x.new_empty((head_weight.shape[0],)) if head_has_bias else x.new_empty((0,))
    input_grad = x.new_empty(x.shape) if need_input_grad else x.new_empty((0,))
    bias_grads = [x.new_empty((w.shape[0],)) for w in weights] if has_bias else []
    return (
        head_weight.new_empty(head_weight.shape),
        head_bias_grad,
        input_grad,
        [w.new_empty(w.shape) for w in weights],
        bias_grads,
    )
