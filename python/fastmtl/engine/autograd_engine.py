"""Per-task gradients of the shared parameters, their Gram matrix and an aggregated update, for any
PyTorch trunk: :func:`fastmtl.mtl_backward`.

A multi-task model is a shared trunk ``z = f(x; theta)`` (``features``) and task-specific parts that
turn ``z`` into per-task losses ``L_t``. Gradient-aggregation methods need every task's gradient
``g_t = dL_t/dtheta``. Instead of T backward passes through the whole model (the LibMTL loop), the
T cotangents ``dL_t/dz`` are computed once and pushed through the trunk together with one vectorised
backward (``torch.autograd.grad(..., is_grads_batched=True)``); the Gram matrix ``G = J J^T`` of the
per-task gradients goes to the aggregator, and the update ``sum_t a_t g_t`` is written into
``.grad``. ``mode="rep"`` (MGDA-UB) aggregates the cotangents of the features instead and needs one
ordinary backward through the trunk.

This path forms the T x P Jacobian (in the parameters' dtype); the fused path of a FusedMLP trunk
(:mod:`fastmtl.engine.fused`) never does unless asked.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Callable

import torch

from .._distributed import DataParallelSync
from ..aggregation import requirement
from .gradients import checked_weights, write_gradients
from .options import MTLBackwardOptions, fail
from .result import MTLBackwardResult
from .schedule import WeightSchedule, schedule_of

__all__ = ["mtl_backward", "graph_leaves"]


def mtl_backward(
    losses: torch.Tensor,
    features: torch.Tensor | Sequence[torch.Tensor],
    aggregator: Callable[[torch.Tensor], torch.Tensor],
    shared_params: Iterable[torch.Tensor] | None = None,
    *,
    schedule_owner=None,
    **options,
) -> MTLBackwardResult:
    """Backward of a multi-task step with an aggregated update of the shared parameters.

    ``losses``: ``[T]`` per-task losses (task weights already applied). ``features``: the trunk's
    output(s) the task-specific parts read. ``aggregator``: Gram ``[T, T]`` -> weights ``[T]`` (any
    :mod:`fastmtl.aggregation` method). ``shared_params``: the trunk's parameters (default: every
    leaf that requires grad and that ``features`` depend on, in the order of :func:`graph_leaves`).
    ``options``: the keyword arguments of :class:`~fastmtl.engine.MTLBackwardOptions` (``mode``,
    ``gram_every``, ``keep_jacobian``, ``ddp_gram``, ``process_group``). ``schedule_owner``: whose
    ``gram_every`` schedule the call continues (default: the aggregator object's).

    Fills ``.grad`` like ``backward`` (accumulating into existing gradients): the shared parameters
    get ``sum_t a_t dL_t/dtheta``; every other parameter the losses depend on (the heads) gets the
    gradient of ``sum_t L_t``, its own task's gradient when heads are separate. The graph is not
    freed (its backward passes retain it, as ``backward(retain_graph=True)`` does): a second call on
    the same losses succeeds and accumulates the same gradients again, so call it once per forward
    (or zero the gradients in between). Returns an :class:`~fastmtl.engine.MTLBackwardResult`.

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
    opts = MTLBackwardOptions.of("fastmtl.mtl_backward", options)
    if opts.gram_path != "auto":
        fail("gram_path", "'auto' (the Gram paths belong to the fused path of a FusedMLP trunk)", repr(opts.gram_path))
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or losses.numel() < 1:
        got = list(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        fail("losses", "a 1-D tensor [T] of per-task losses with T >= 1", str(got))
    if not losses.requires_grad:
        fail("losses", "a tensor in an autograd graph (requires_grad)", "a tensor that does not require grad")
    # Issue 17: what the aggregator needs. The per-task gradients are materialised in exact mode anyway
    # and go to a "jacobian" method (its update is written into .grad); a cross-Gram needs a second,
    # independent batch, which this call has not got: refused, saying so, before any backward.
    requires = requirement(aggregator)
    if requires == "cross_gram":
        fail(
            "aggregator",
            "a method fastmtl.mtl_backward can supply (it needs the per-task gradients of two "
            "independent batches, a cross-Gram: call it on J1 @ J2.T yourself)",
            type(aggregator).__name__,
        )
    if requires == "jacobian" and (opts.mode != "exact" or opts.gram_every > 1):
        fail(
            "aggregator",
            "with mode='exact' and gram_every=1 a method that needs the per-task gradients (they exist only there)",
            f"{type(aggregator).__name__} with mode={opts.mode!r}, gram_every={opts.gram_every}",
        )
    schedule = None
    if opts.gram_every > 1:
        schedule = schedule_of(aggregator if schedule_owner is None else schedule_owner)
    feats = _as_tensors(features)
    for i, f in enumerate(feats):
        if not f.requires_grad:
            fail("features", "tensors that require grad (the trunk's outputs)", f"features[{i}] without grad")
    if shared_params is None:
        shared = graph_leaves(feats)
    else:
        shared = list(shared_params)
        for i, p in enumerate(shared):
            if not isinstance(p, torch.Tensor) or not p.requires_grad:
                fail("shared_params", "tensors that require grad", f"shared_params[{i}] that does not")
    if not shared:
        fail("shared_params", "at least one parameter the features depend on", "none")
    shared_ids = {id(p) for p in shared}
    heads = [p for p in graph_leaves([losses]) if id(p) not in shared_ids]
    sync = DataParallelSync(opts.ddp_gram, opts.process_group)

    T = losses.shape[0]
    if schedule is not None and not schedule.due((type(aggregator), opts.mode, T, opts.gram_every), opts.gram_every):
        return _reuse_weights(losses, feats, shared, heads, schedule, sync)
    return _aggregated_backward(losses, feats, shared, heads, aggregator, opts, schedule, sync)


def _as_tensors(features) -> list:
    if isinstance(features, torch.Tensor):
        return [features]
    if isinstance(features, (list, tuple)) and features and all(isinstance(f, torch.Tensor) for f in features):
        return list(features)
    fail("features", "a tensor or a non-empty sequence of tensors (the trunk's outputs)", type(features).__name__)


def graph_leaves(roots: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The leaf tensors that require grad and that the roots depend on, each once, in depth-first
    order: from the last root, a node's inputs last to first (the order of the Jacobian's columns)."""
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
    return leaves


def _batched_vjp(outputs, inputs, cotangents, retain_graph: bool):
    """sum_j <cotangents[t][j], d outputs[j] / d inputs> for every t, as [T, *input.shape] per input.
    One vectorised backward where every op on the way supports it; otherwise one backward per task.
    The vectorised attempt keeps the graph: when an op has no batching rule (fastmtl's own ops, for
    one) it fails part-way, after freeing buffers the per-task fallback still needs."""
    try:
        grads = torch.autograd.grad(
            outputs, inputs, grad_outputs=cotangents, is_grads_batched=True, retain_graph=True, allow_unused=True
        )
    except RuntimeError:
        T = cotangents[0].shape[0]
        rows = [
            torch.autograd.grad(
                outputs,
                inputs,
                grad_outputs=[c[t] for c in cotangents],
                retain_graph=retain_graph or t + 1 < T,
                allow_unused=True,
            )
            for t in range(T)
        ]
        grads = tuple(None if rows[0][i] is None else torch.stack([r[i] for r in rows]) for i in range(len(inputs)))
    return [
        torch.zeros((cotangents[0].shape[0],) + tuple(x.shape), dtype=x.dtype, device=x.device) if g is None else g
        for g, x in zip(grads, inputs)
    ]


def _aggregated_backward(
    losses,
    feats,
    shared,
    heads,
    aggregator,
    opts: MTLBackwardOptions,
    schedule: WeightSchedule | None,
    sync: DataParallelSync,
) -> MTLBackwardResult:
    """A call that computes the Gram matrix and the weights; ``schedule``: where the weights of
    ``gram_every`` are kept, None when every call computes them."""
    T = losses.shape[0]
    # Per-task cotangents of the features: [T, *feature.shape] each.
    eye = torch.eye(T, dtype=losses.dtype, device=losses.device)
    try:
        cotangents = _batched_vjp([losses], feats, [eye], retain_graph=True)
    except RuntimeError as error:
        raise ValueError(
            f"fastmtl.mtl_backward: argument 'features' could not be differentiated against 'losses' ({error})"
        ) from None

    # Heads: the gradient of sum_t L_t, through the task-specific parts only. The same backward
    # tells whether the losses depend on the features at all.
    summed = torch.autograd.grad(losses.sum(), heads + feats, retain_graph=True, allow_unused=True)
    if all(g is None for g in summed[len(heads) :]):
        fail(
            "features",
            "tensors in the graph of 'losses' (the losses must be computed from them)",
            "features the losses do not depend on",
        )
    head_grads = list(summed[: len(heads)])

    jacobian = None
    if opts.mode == "rep":
        flat = torch.cat([c.reshape(T, -1) for c in cotangents], dim=1)
        gram = sync.gram(flat @ flat.T)
        weights = checked_weights(aggregator, gram.detach())
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
        if requirement(aggregator) == "jacobian":
            update = aggregator(jacobian=flat.detach())  # [P]: the method's update of the shared parameters
            shared_grads = [
                u.view_as(g[0]).to(g.dtype)
                for u, g in zip(torch.split(update, [g[0].numel() for g in per_task]), per_task)
            ]
            weights = getattr(aggregator, "last_weights", None)  # ExcessMTL's; GradDrop, TrimmedMean have none
            weights = torch.full((T,), float("nan"), dtype=gram.dtype) if weights is None else weights.detach()
        else:
            weights = checked_weights(aggregator, gram.detach())
            # The mean over ranks of the local updates is the update of the mean per-task gradients.
            shared_grads = [torch.tensordot(weights.to(g.dtype), g, dims=1) for g in per_task]
        if opts.keep_jacobian:
            jacobian = flat.detach()
    write_gradients(heads + shared, head_grads + shared_grads, sync)
    if schedule is not None:
        schedule.keep(weights, gram.detach())
    return MTLBackwardResult(losses=losses.detach(), weights=weights, gram=gram.detach(), jacobian=jacobian)


def _reuse_weights(losses, feats, shared, heads, schedule: WeightSchedule, sync: DataParallelSync) -> MTLBackwardResult:
    """A call between Gram computations: heads get the gradient of sum_t L_t, the shared parameters
    that of sum_t a_t L_t with the kept weights a (one backward through the trunk)."""
    weights = schedule.weights
    head_grads = torch.autograd.grad(losses.sum(), heads, retain_graph=True, allow_unused=True) if heads else ()
    feature_grads = torch.autograd.grad(losses, feats, grad_outputs=weights.to(losses.dtype), retain_graph=True)
    shared_grads = torch.autograd.grad(feats, shared, grad_outputs=feature_grads, allow_unused=True)
    write_gradients(heads + shared, list(head_grads) + list(shared_grads), sync)
    return MTLBackwardResult(losses=losses.detach(), weights=weights, gram=schedule.gram, gram_computed=False)
