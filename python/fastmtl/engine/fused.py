"""The fused path of the engine, for a FusedMLP trunk and MultiTaskHeads: the step's forward once
(``fused_mlp``, ``multitask_head_loss``), the Gram matrix by the per-task ops (``mtl_trunk_gram``,
exact, layer by layer materialised or by the ghost product; ``mtl_representation_gram``, rep), the
aggregator, then one ``mtl_weighted_backward`` (heads: their own ``task.weight * L_t``; trunk:
``sum_t a_t task.weight_t dL_t``), accumulated into ``.grad``. No T x P Jacobian unless
``keep_jacobian`` (exact mode), ``ddp_gram="exact"`` under data parallelism, or a method that needs
the per-task gradients (``requires = "jacobian"``, issue 17: GradDrop, TrimmedMean, ExcessMTL, MoCo):
it gets ``jacobian=J`` and its update ``[P]`` is the trunk's gradient, with the refusals of
:func:`fastmtl.mtl_backward` (:func:`fastmtl.engine.options.supplied_requirement`).

:func:`fused_mlp_mtl_backward` takes the op arguments (``FusedMLP.op_arguments``,
``MultiTaskHeads.op_arguments``, packed targets), not a model; :func:`fused_model_backward` reads
them from a model's public members.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable

import torch

from .. import ops
from .._distributed import DataParallelSync
from .gradients import check_finite_losses, checked_weights, jacobian_update, write_gradients
from .options import MTLBackwardOptions, fail, supplied_requirement
from .result import MTLBackwardResult
from .schedule import WeightSchedule, schedule_of

__all__ = ["fused_mlp_mtl_backward", "fused_model_backward"]


def fused_model_backward(model, x: torch.Tensor, targets, aggregator: Callable, **options) -> MTLBackwardResult:
    """``model.mtl_backward`` for a MultiTaskModel with a FusedMLP trunk: :func:`fused_mlp_mtl_backward`
    on the model's trunk and heads, continuing the model's ``gram_every`` schedule. ``targets``: a
    dict name -> tensor or the packed tensor of ``model.heads.pack_targets``; ``options``: those of
    :class:`MTLBackwardOptions`."""
    opts = MTLBackwardOptions.of("MultiTaskModel.mtl_backward", options)
    heads = model.heads
    if isinstance(targets, Mapping):
        targets = heads.pack_targets(targets, ops.loss_dtype(x.dtype) if isinstance(x, torch.Tensor) else None)
    return fused_mlp_mtl_backward(
        x,
        model.trunk.op_arguments,
        heads.op_arguments,
        targets,
        aggregator,
        opts,
        schedule_of(model),
        head_parts=heads.parameter_parts(),
    )


def fused_mlp_mtl_backward(
    x: torch.Tensor,
    trunk: ops.MLPArguments,
    heads: ops.HeadArguments,
    targets: torch.Tensor,
    aggregator: Callable,
    options: MTLBackwardOptions,
    schedule: WeightSchedule,
    head_parts: tuple[list, list] | None = None,
) -> MTLBackwardResult:
    """One aggregated step of the model ``multitask_head_loss(fused_mlp(x, *trunk), *heads)``.
    ``head_parts``: ``(weights, biases)`` when the heads' stacked weight and bias are concatenations
    of per-task Parameters (:meth:`fastmtl.nn.MultiTaskHeads.parameter_parts`): their gradients go
    to those, each task's rows.

    ``targets``: packed ``[B, sum of target widths]`` in ``x``'s dtype. ``schedule``: the
    ``gram_every`` schedule to continue (a fresh :class:`WeightSchedule` for a one-off call).
    Parameters upstream of ``x`` (if ``x`` requires grad) get the trunk's weighted gradient through
    autograd: that of ``sum_t a_t task.weight_t L_t``; with a "jacobian" method, which has no
    weighting, that of ``sum_t task.weight_t L_t``, what :func:`fastmtl.mtl_backward` gives every
    parameter the losses depend on that is not shared (the trunk's parameters are the shared ones).
    Returns the unweighted losses ``L_t`` in the result; a "jacobian" method's ``weights`` are its
    ``last_weights``, else NaN, as in :func:`fastmtl.mtl_backward`.
    """
    if options.generic_only:
        fail(
            options.generic_only[0],
            "its default on the fused path of a FusedMLP trunk (it is an option of fastmtl.mtl_backward, any trunk)",
            "a value",
        )
    in_features = trunk.weights[0].shape[1]
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != in_features:
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        fail("x", f"a [B, {in_features}] tensor (the trunk's input)", str(got))
    weights, biases, activation = trunk
    num_outputs = heads.layout.num_outputs
    has_head_bias = heads.bias is not None
    sync = DataParallelSync(options.ddp_gram, options.process_group)
    key = (type(aggregator), options.mode, len(num_outputs), options.gram_every)
    # Issue 17: the same refusals as fastmtl.mtl_backward; a "jacobian" method gets the [T, P] Jacobian.
    requires = supplied_requirement(aggregator, options)
    if requires == "cross_gram":
        fail(
            "aggregator",
            "a method the fused path supplies (a cross-Gram of independent batches is not one: "
            "MultiTaskModel.mtl_backward gives it one from the batch's two halves, through fastmtl.mtl_backward)",
            type(aggregator).__name__,
        )
    needs_jacobian = requires == "jacobian"
    # The step's inputs in the dtype the fused ops compute in: the autocast dtype inside
    # torch.autocast (as its rule for the forward ops casts them), else their own. The engine ops
    # take the forward's outputs, so every argument must share that dtype; the gradients come back
    # in it and write_gradients casts them to the parameters' dtype.
    compute = _compute_dtype(x)
    x_c, head_weight, head_bias = _cast(x, compute), _cast(heads.weight, compute), _cast(heads.bias, compute)
    weights_c, biases_c = [_cast(w, compute) for w in weights], [_cast(b, compute) for b in biases]
    task_weights = heads.task_weights.to(ops.loss_dtype(x_c.dtype))

    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        out, saved = ops.fused_mlp_with_saved(x_c, weights_c, biases_c, activation)
        losses, logit_grad, count_scale = ops.multitask_head_loss_with_saved(
            out, head_weight, head_bias, targets, heads.layout
        )
        check_finite_losses(losses, [t.name for t in heads.layout.tasks])
        jacobian = None
        trunk_update = None  # a "jacobian" method's update of the trunk: flat blocks in parameters() order
        computed = schedule.due(key, options.gram_every)
        if computed:
            if options.mode == "exact":
                gram, jacobian, _paths = ops.mtl_trunk_gram(
                    x_c,
                    weights_c,
                    out,
                    saved,
                    activation,
                    trunk.has_bias,
                    head_weight,
                    logit_grad,
                    count_scale,
                    task_weights,
                    num_outputs,
                    options.gram_path,
                    options.keep_jacobian or sync.exact or needs_jacobian,
                )
                if sync.exact:
                    jacobian = sync.jacobian(jacobian)
                    gram = jacobian @ jacobian.T
                else:
                    gram = sync.gram(gram)
                if needs_jacobian:
                    # The Jacobian's columns: every layer's weight, then every bias (FusedMLP.parameters()).
                    sizes = [w.numel() for w in weights] + [b.numel() for b in biases]
                    trunk_update, method_weights = jacobian_update(aggregator, jacobian, gram, sizes)
                jacobian = jacobian if options.keep_jacobian else None
            else:
                gram = sync.gram(
                    ops.mtl_representation_gram(head_weight, logit_grad, count_scale, task_weights, num_outputs)
                )
            schedule.keep(method_weights if needs_jacobian else checked_weights(aggregator, gram), gram)
        # The trunk's task weights of the weighted backward: a_t task.weight_t; for a "jacobian" method
        # (no weighting) task.weight_t, so the input's gradient is that of sum_t task.weight_t L_t, what
        # the generic engine gives a parameter that is not shared (its trunk gradients are not used).
        trunk_task_weights = task_weights if needs_jacobian else schedule.weights.to(task_weights.dtype) * task_weights
        head_w, head_b, grad_x, grad_ws, grad_bs = ops.mtl_weighted_backward(
            x_c,
            weights_c,
            out,
            saved,
            activation,
            trunk.has_bias,
            head_weight,
            has_head_bias,
            logit_grad,
            count_scale,
            task_weights,
            trunk_task_weights,
            num_outputs,
            x.requires_grad,
        )
    if trunk_update is not None:
        grad_ws = [u.view_as(w) for u, w in zip(trunk_update, weights)]
        grad_bs = [u.view_as(b) for u, b in zip(trunk_update[len(weights) :], biases)]
    head_params, head_grads = _head_gradients(heads, head_parts, head_w, head_b if has_head_bias else None)
    params = head_params + list(weights) + list(biases)
    grads = head_grads + list(grad_ws) + list(grad_bs)
    # Owned: the op's fresh outputs; a method's update may be a tensor it keeps, so those are copied.
    write_gradients(params, grads, sync, owned=trunk_update is None)
    if x.requires_grad:
        torch.autograd.backward(x, grad_x.to(x.dtype))
    return MTLBackwardResult(
        losses=losses, weights=schedule.weights, gram=schedule.gram, jacobian=jacobian, gram_computed=computed
    )


def _head_gradients(heads: ops.HeadArguments, parts, weight_grad: torch.Tensor, bias_grad: torch.Tensor | None):
    """The heads' Parameters and their gradients: the stacked weight and bias, or, where they are
    concatenations of per-task Parameters (``parts``), each task's rows of the gradients (views,
    written as .grad without autograd: a backward through the concatenation would not trace under
    torch.compile)."""
    if parts is None:
        if bias_grad is None:
            return [heads.weight], [weight_grad]
        return [heads.weight, heads.bias], [weight_grad, bias_grad]
    weights, biases = parts
    rows = [p.shape[0] for p in weights]
    params, grads = list(weights), list(weight_grad.split(rows))
    if bias_grad is not None:
        params += list(biases)
        grads += list(bias_grad.split(rows))
    return params, grads


def _compute_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype of x's device when torch.autocast is on there and x is float32 (its
    rule casts float32 arguments only), else None: the fused ops run in the dtypes given."""
    device = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def _cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    return t if t is None or dtype is None or t.dtype != torch.float32 else t.to(dtype)
