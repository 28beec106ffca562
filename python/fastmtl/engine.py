"""Per-task gradients of the shared parameters, their Gram matrix and an aggregated update, for any
PyTorch trunk: ``fastmtl.mtl_backward``.

A multi-task model is a shared trunk ``z = f(x; theta)`` (``features``) and task-specific parts that
turn ``z`` into per-task losses ``L_t``. Gradient-aggregation methods need every task's gradient
``g_t = dL_t/dtheta``. Instead of T backward passes through the whole model (the LibMTL loop), the
T cotangents ``dL_t/dz`` are computed once and pushed through the trunk together with one vectorised
backward (``torch.autograd.grad(..., is_grads_batched=True)``); the Gram matrix ``G = J J^T`` of the
per-task gradients goes to the aggregator, and the update ``sum_t a_t g_t`` is written into
``.grad``. ``mode="rep"`` (MGDA-UB, Sener & Koltun 2018) aggregates the cotangents of the features
instead and needs one ordinary backward through the trunk.

This generic path forms the T x P Jacobian (in the parameters' dtype). The fused path for fastmtl's
own MultiTaskModel with a FusedMLP trunk (``model.mtl_backward``, :func:`fused_model_backward`)
never does unless asked: its C++ ops push the T cotangents down the trunk as one matrix, add each
layer's share of the Gram matrix (materialised or by the ghost product) and apply the weights with
one ordinary backward.

``gram_every=k`` recomputes the weights on every k-th call and reuses them in between (Nash-MTL's
``update_weights_every``): such a call is one ordinary backward with the kept weights.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

import torch

from . import ops
from ._distributed import DataParallelSync
from .ops import GRAM_PATHS

__all__ = ["MTLBackwardResult", "mtl_backward", "fused_model_backward"]

MODES = ("exact", "rep")


@dataclass
class MTLBackwardResult:
    """What one ``mtl_backward`` call computed (all detached): the losses ``[T]``, the aggregator's
    weights ``[T]``, the Gram matrix ``[T, T]`` it saw, and the Jacobian ``[T, P]`` of the shared
    parameters when ``keep_jacobian=True`` (exact mode). With ``gram_every > 1``, ``gram_computed``
    says whether this call computed the Gram matrix and weights (else they are the kept ones)."""

    losses: torch.Tensor
    weights: torch.Tensor
    gram: torch.Tensor
    jacobian: Optional[torch.Tensor] = None
    gram_computed: bool = True


def _fail(argument: str, expected: str, got: str):
    raise ValueError(f"fastmtl.mtl_backward: argument '{argument}' expected {expected}, got {got}")


def _as_tensors(features) -> list:
    if isinstance(features, torch.Tensor):
        return [features]
    if isinstance(features, (list, tuple)) and features and all(isinstance(f, torch.Tensor) for f in features):
        return list(features)
    _fail("features", "a tensor or a non-empty sequence of tensors (the trunk's outputs)", type(features).__name__)


def _graph_leaves(roots: Sequence[torch.Tensor]) -> list:
    """The leaf tensors that require grad and that the roots depend on, in a fixed order."""
    seen, leaves, stack = set(), [], [r.grad_fn for r in roots if r.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)  # AccumulateGrad nodes hold their leaf
        if variable is not None:
            leaves.append(variable)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    order = {id(t): i for i, t in enumerate(leaves)}
    return sorted(leaves, key=lambda t: order[id(t)])


def _batched_vjp(outputs, inputs, cotangents, retain_graph: bool):
    """sum_j <cotangents[t][j], d outputs[j] / d inputs> for every t, as [T, *input.shape] per input.
    One vectorised backward where every op on the way supports it; otherwise one backward per task.
    The vectorised attempt keeps the graph: when an op has no batching rule (fastmtl's own ops, for
    one) it fails part-way, after freeing buffers the per-task fallback still needs."""
    try:
        grads = torch.autograd.grad(outputs, inputs, grad_outputs=cotangents, is_grads_batched=True,
                                    retain_graph=True, allow_unused=True)
    except RuntimeError:
        T = cotangents[0].shape[0]
        rows = [torch.autograd.grad(outputs, inputs, grad_outputs=[c[t] for c in cotangents],
                                    retain_graph=retain_graph or t + 1 < T, allow_unused=True) for t in range(T)]
        grads = tuple(None if rows[0][i] is None else torch.stack([r[i] for r in rows]) for i in range(len(inputs)))
    return [torch.zeros((cotangents[0].shape[0],) + tuple(x.shape), dtype=x.dtype, device=x.device) if g is None else g
            for g, x in zip(grads, inputs)]


def _accumulate(param: torch.Tensor, update: torch.Tensor, owned: bool = False) -> None:
    """param.grad += update, as AccumulateGrad does; ``owned``: update is a fresh tensor nobody
    else holds, so it can become .grad without a copy."""
    if param.grad is None:
        param.grad = update.detach() if owned else update.detach().clone()
    else:
        param.grad.add_(update.detach())


def _checked_weights(aggregator, gram: torch.Tensor) -> torch.Tensor:
    weights = aggregator(gram)
    T = gram.shape[0]
    if not isinstance(weights, torch.Tensor) or weights.shape != (T,):
        got = list(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        _fail("aggregator", f"a callable returning weights of shape [{T}] for a [{T}, {T}] Gram matrix", str(got))
    if not bool(torch.isfinite(weights).all()):
        _fail("aggregator", "finite weights", str(weights.tolist()))
    return weights.detach()


class _WeightSchedule:
    """``gram_every=k``: whether this call recomputes the weights, and the weights (and Gram) kept
    from the last call that did. Changing the aggregator, mode, number of tasks or k starts over."""

    def __init__(self):
        self.calls, self.key, self.weights, self.gram = 0, None, None, None

    def due(self, key, every: int) -> bool:
        if key != self.key or self.weights is None:
            self.calls, self.key = 0, key
        due = self.calls % every == 0
        self.calls += 1
        return due

    def keep(self, weights: torch.Tensor, gram: torch.Tensor) -> None:
        self.weights, self.gram = weights, gram


# Schedules of the generic mtl_backward, one per aggregator object (dropped with it).
_schedules: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        _fail("mode", f"one of {MODES}", repr(mode))
    return mode


def _check_gram_every(gram_every) -> int:
    if isinstance(gram_every, bool) or not isinstance(gram_every, int) or gram_every < 1:
        _fail("gram_every", "an int >= 1 (recompute the weights every k calls)", repr(gram_every))
    return gram_every


def model_schedule(model) -> _WeightSchedule:
    """The gram_every schedule of a model's mtl_backward: kept on the model, so that any aggregator
    of the same type (a fresh ``UPGrad()`` per call, say) continues it."""
    return model.__dict__.setdefault("_mtl_weight_schedule", _WeightSchedule())


def _schedule_of(aggregator) -> _WeightSchedule:
    try:
        return _schedules.setdefault(aggregator, _WeightSchedule())
    except TypeError:
        _fail("aggregator", "an object that can be weakly referenced when gram_every > 1 (its weights are kept "
              "with it)", type(aggregator).__name__)


def mtl_backward(
    losses: torch.Tensor,
    features: Union[torch.Tensor, Sequence[torch.Tensor]],
    aggregator: Callable[[torch.Tensor], torch.Tensor],
    shared_params: Optional[Iterable[torch.Tensor]] = None,
    mode: str = "exact",
    keep_jacobian: bool = False,
    gram_every: int = 1,
    ddp_gram: str = "local",
    process_group=None,
) -> MTLBackwardResult:
    """Backward of a multi-task step with an aggregated update of the shared parameters.

    ``losses``: ``[T]`` per-task losses (task weights already applied). ``features``: the trunk's
    output(s) the task-specific parts read. ``aggregator``: Gram ``[T, T]`` -> weights ``[T]`` (any
    :mod:`fastmtl.aggregation` method). ``shared_params``: the trunk's parameters (default: every
    leaf that requires grad and that ``features`` depend on).

    Fills ``.grad`` like ``backward`` (accumulating into existing gradients): the shared parameters
    get ``sum_t a_t dL_t/dtheta``; every other parameter the losses depend on (the heads) gets the
    gradient of ``sum_t L_t``, its own task's gradient when heads are separate. ``mode="exact"``: G
    over the shared parameters; ``mode="rep"``: G of the per-task gradients of the features
    (MGDA-UB), then one ordinary backward of ``sum_t a_t dL_t/dz`` through the trunk.
    ``gram_every=k``: the weights are recomputed on every k-th call with this aggregator object and
    reused in between, where the call is one ordinary weighted backward. The graph is freed afterwards.

    Under data parallelism (an initialised ``torch.distributed`` group of several ranks) the
    gradients written are the mean over ranks, as DDP's; ``ddp_gram`` says how the Gram matrix
    covers the ranks: ``"local"`` (all-reduce the ranks' Grams), ``"exact"`` (all-reduce the
    per-task gradients) or ``"none"`` (no communication); see :mod:`fastmtl._distributed`.

    >>> import torch, fastmtl
    >>> from fastmtl.aggregation import UPGrad
    >>> trunk, heads = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
    >>> x, y = torch.randn(16, 4), torch.randn(16, 2)
    >>> z = trunk(x)
    >>> losses = ((heads(z) - y) ** 2).mean(0)             # two regression tasks
    >>> result = fastmtl.mtl_backward(losses, z, UPGrad())
    >>> result.gram.shape, trunk.weight.grad.shape, heads.weight.grad.shape
    (torch.Size([2, 2]), torch.Size([8, 4]), torch.Size([2, 8]))
    """
    _check_mode(mode)
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or losses.numel() < 1:
        got = list(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        _fail("losses", "a 1-D tensor [T] of per-task losses with T >= 1", str(got))
    if not losses.requires_grad:
        _fail("losses", "a tensor in an autograd graph (requires_grad)", "a tensor that does not require grad")
    schedule = _schedule_of(aggregator) if _check_gram_every(gram_every) > 1 else None
    return _generic_backward(losses, features, aggregator, shared_params, mode, keep_jacobian, gram_every, schedule,
                             DataParallelSync(ddp_gram, process_group))


def _write_gradients(params, grads, sync: DataParallelSync, owned: bool = False) -> None:
    """Accumulates the step's gradients into .grad, averaged over the ranks first when data-parallel."""
    for p, g in zip(params, sync.average(list(grads))):
        if g is not None and p.requires_grad:
            _accumulate(p, g, owned=owned and not sync.active)


def _generic_backward(losses, features, aggregator, shared_params, mode, keep_jacobian, gram_every,
                      schedule: Optional[_WeightSchedule], sync: DataParallelSync) -> MTLBackwardResult:
    """mtl_backward after the checks of its scalar arguments; ``schedule``: where the weights of
    ``gram_every`` are kept (the aggregator's, or a model's), None when every call computes them."""
    feats = _as_tensors(features)
    for i, f in enumerate(feats):
        if not f.requires_grad:
            _fail("features", "tensors that require grad (the trunk's outputs)", f"features[{i}] without grad")
    T = losses.shape[0]
    if shared_params is None:
        shared = _graph_leaves(feats)
    else:
        shared = list(shared_params)
        for i, p in enumerate(shared):
            if not isinstance(p, torch.Tensor) or not p.requires_grad:
                _fail("shared_params", "tensors that require grad", f"shared_params[{i}] that does not")
    if not shared:
        _fail("shared_params", "at least one parameter the features depend on", "none")
    shared_ids = {id(p) for p in shared}
    heads = [p for p in _graph_leaves([losses]) if id(p) not in shared_ids]

    if schedule is not None and not schedule.due((type(aggregator), mode, T, gram_every), gram_every):
        return _reuse_weights(losses, feats, shared, heads, schedule, sync)

    # Per-task cotangents of the features: [T, *feature.shape] each.
    eye = torch.eye(T, dtype=losses.dtype, device=losses.device)
    try:
        cotangents = _batched_vjp([losses], feats, [eye], retain_graph=True)
    except RuntimeError as error:
        raise ValueError(f"fastmtl.mtl_backward: argument 'features' could not be differentiated against "
                         f"'losses' ({error})") from None

    # Heads: the gradient of sum_t L_t, through the task-specific parts only. The same backward
    # tells whether the losses depend on the features at all.
    summed = torch.autograd.grad(losses.sum(), heads + feats, retain_graph=True, allow_unused=True)
    if all(g is None for g in summed[len(heads):]):
        _fail("features", "tensors in the graph of 'losses' (the losses must be computed from them)",
              "features the losses do not depend on")
    head_grads = list(summed[: len(heads)])

    jacobian = None
    if mode == "rep":
        flat = torch.cat([c.reshape(T, -1) for c in cotangents], dim=1)
        gram = sync.gram(flat @ flat.T)
        weights = _checked_weights(aggregator, gram.detach())
        combined = [torch.tensordot(weights.to(c.dtype), c, dims=1) for c in cotangents]
        shared_grads = list(torch.autograd.grad(feats, shared, grad_outputs=combined, allow_unused=True))
    else:
        per_task = _batched_vjp(feats, shared, cotangents, retain_graph=False)
        flat = torch.cat([g.reshape(T, -1) for g in per_task], dim=1)
        if sync.exact:
            flat = sync.jacobian(flat)
            gram = flat @ flat.T
        else:
            gram = sync.gram(flat @ flat.T)
        weights = _checked_weights(aggregator, gram.detach())
        # The mean over ranks of the local updates is the update of the mean per-task gradients.
        shared_grads = [torch.tensordot(weights.to(g.dtype), g, dims=1) for g in per_task]
        if keep_jacobian:
            jacobian = flat.detach()
    _write_gradients(heads + shared, head_grads + shared_grads, sync)
    if schedule is not None:
        schedule.keep(weights, gram.detach())
    return MTLBackwardResult(losses=losses.detach(), weights=weights, gram=gram.detach(), jacobian=jacobian)


def _reuse_weights(losses, feats, shared, heads, schedule: _WeightSchedule, sync: DataParallelSync) -> MTLBackwardResult:
    """A call between Gram computations: heads get the gradient of sum_t L_t, the shared parameters
    that of sum_t a_t L_t with the kept weights a (one backward through the trunk)."""
    weights = schedule.weights
    head_grads = torch.autograd.grad(losses.sum(), heads, retain_graph=True, allow_unused=True) if heads else ()
    feature_grads = torch.autograd.grad(losses, feats, grad_outputs=weights.to(losses.dtype), retain_graph=True)
    shared_grads = torch.autograd.grad(feats, shared, grad_outputs=feature_grads, allow_unused=True)
    _write_gradients(heads + shared, list(head_grads) + list(shared_grads), sync)
    return MTLBackwardResult(losses=losses.detach(), weights=weights, gram=schedule.gram, gram_computed=False)


def fused_model_backward(
    model,
    x: torch.Tensor,
    targets,
    aggregator: Callable[[torch.Tensor], torch.Tensor],
    mode: str = "exact",
    gram_every: int = 1,
    keep_jacobian: bool = False,
    gram_path: str = "auto",
    ddp_gram: str = "local",
    process_group=None,
) -> MTLBackwardResult:
    """``model.mtl_backward`` for a MultiTaskModel with a FusedMLP trunk: the step's forward once
    (fused_mlp, multitask_head_loss), the Gram matrix by ``fastmtl::mtl_trunk_gram`` (exact) or
    ``fastmtl::mtl_representation_gram`` (rep), the aggregator, then ``fastmtl::mtl_weighted_backward``
    (heads: their own ``task.weight * L_t``; trunk: ``sum_t a_t task.weight_t dL_t``), accumulated
    into ``.grad``. Parameters upstream of ``x`` (if ``x`` requires grad) get the trunk's weighted
    gradient through autograd. No T x P Jacobian unless ``keep_jacobian`` (exact mode) or
    ``ddp_gram="exact"`` under data parallelism (see :mod:`fastmtl._distributed`)."""
    _check_mode(mode)
    if gram_path not in GRAM_PATHS:
        _fail("gram_path", f"one of {GRAM_PATHS}", repr(gram_path))
    gram_every = _check_gram_every(gram_every)
    trunk, heads = model.trunk, model.heads
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != trunk.in_features:
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        _fail("x", f"a [B, {trunk.in_features}] tensor (the trunk's input)", str(got))
    weights, biases, activation = trunk.op_arguments
    packed = heads.pack_targets(targets, x.dtype) if isinstance(targets, Mapping) else targets
    num_outputs = heads.num_outputs
    task_weights = heads.task_weights.to(x.dtype)
    schedule = model_schedule(model)
    sync = DataParallelSync(ddp_gram, process_group)

    with torch.no_grad():
        out, saved = ops.fused_mlp_with_saved(x, weights, biases, activation)
        losses, logit_grad, count_scale = ops.multitask_head_loss_with_saved(out, heads.weight, heads.bias, packed,
                                                                              heads.layout)
        jacobian = None
        computed = schedule.due((type(aggregator), mode, len(num_outputs), gram_every), gram_every)
        if computed:
            if mode == "exact":
                gram, jacobian, _paths = ops.mtl_trunk_gram(
                    x, weights, out, saved, activation, bool(biases), heads.weight, logit_grad, count_scale,
                    task_weights, num_outputs, gram_path, keep_jacobian or sync.exact,
                )
                if sync.exact:
                    jacobian = sync.jacobian(jacobian)
                    gram = jacobian @ jacobian.T
                else:
                    gram = sync.gram(gram)
                jacobian = jacobian if keep_jacobian else None
            else:
                gram = sync.gram(ops.mtl_representation_gram(
                    heads.weight, logit_grad, count_scale, task_weights, num_outputs
                ))
            schedule.keep(_checked_weights(aggregator, gram), gram)
        head_w, head_b, grad_x, grad_ws, grad_bs = ops.mtl_weighted_backward(
            x, weights, out, saved, activation, bool(biases), heads.weight, heads.bias is not None, logit_grad,
            count_scale, task_weights, schedule.weights.to(x.dtype) * task_weights, num_outputs, x.requires_grad,
        )
    params = [heads.weight] + ([heads.bias] if heads.bias is not None else []) + weights + biases
    grads = [head_w] + ([head_b] if heads.bias is not None else []) + list(grad_ws) + list(grad_bs)
    _write_gradients(params, grads, sync, owned=True)
    if x.requires_grad:
        torch.autograd.backward(x, grad_x)
    return MTLBackwardResult(losses=losses, weights=schedule.weights, gram=schedule.gram, jacobian=jacobian,
                             gram_computed=computed)
