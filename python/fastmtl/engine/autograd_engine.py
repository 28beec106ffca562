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

This path keeps the per-task gradients as one ``[T, *shape]`` tensor per parameter block (the Gram
matrix is the sum of the blocks' shares), or streams them when they exceed a memory budget:
:mod:`fastmtl.engine.trunk_gram` says which path runs when. Neither this path nor the fused path of
a FusedMLP trunk (:mod:`fastmtl.engine.fused`) concatenates a T x P Jacobian unless asked.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Callable

import torch

from .._distributed import DataParallelSync
from ..aggregation import requirement
from .batched_backward import GraphWalk
from .cross_batches import CrossBatchStep
from .gradients import checked_weights, jacobian_update, write_gradients
from .options import MTLBackwardOptions, fail, supplied_requirement
from .result import MTLBackwardResult
from .schedule import WeightSchedule, schedule_of
from .task_jacobian import gram_of, weighted_sum
from .trunk_gram import (
    depends_on,
    per_task_gradients,
    per_task_loss_gradients,
    plan_gram,
    streamed_gram,
    swept_gradients,
    update_cosine,
)

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
    :mod:`fastmtl.aggregation` method; a "jacobian" method gets the ``[T, P]`` per-task gradients
    and its update is written; a "cross_gram" method, MoDo or SDMGrad, takes ``losses [K, T]``, the
    per-task losses of K = 2 or 3 independent batches computed through ``features``, and gets the
    cross-Gram ``J_1 J_2^T``: :mod:`fastmtl.engine.cross_batches`). ``shared_params``: the trunk's parameters (default: every
    leaf that requires grad and that ``features`` depend on, in the order of :func:`graph_leaves`).
    ``options``: the keyword arguments of :class:`~fastmtl.engine.MTLBackwardOptions` (``mode``,
    ``gram_every``, ``keep_jacobian``, ``ddp_gram``, ``process_group``, ``gram_params``,
    ``memory_budget``, ``report_cosine``). ``schedule_owner``: whose ``gram_every`` schedule the
    call continues (default: the aggregator object's).

    Exact mode's path (``result.path``; :func:`fastmtl.engine.trunk_gram.plan_gram` decides):
    "batched" (the T cotangents down the trunk in one vmapped backward, in task chunks that keep its
    intermediates within ``memory_budget``) when every op batches under vmap; "task-loop" (T plain
    backward passes through the trunk) when the trunk has an op whose vmap rule loops over the
    tasks anyway (conv, batch norm, layer norm, attention, embedding), each pass from its task's
    own loss, the passes' gradients copied into one [T, P] matrix; "factored" when those ops are
    batch norms reached only through a global average pool, ReLUs and residual adds and nothing
    below them is asked (a partial Gram over a pooled CNN's last BatchNorm): the T cotangents stay
    one task-independent tensor times a per-task [B, C], and one sweep serves all tasks
    (:mod:`fastmtl.engine.factored_cotangents`); "streamed" when the T x P
    Jacobian would exceed ``memory_budget`` bytes (default 512 MiB), or when the ghost product of
    the Linear layers saves most of the Gram's work: each parameter block's Gram share is added and
    dropped during one sweep (a Linear weight's by the ghost product where cheaper), then one
    weighted backward. The batched path keeps the per-task gradients as ``[T, *shape]`` blocks, the
    task loop as one ``[T, P]`` matrix, the streamed path not at all; ``keep_jacobian`` (or
    ``ddp_gram="exact"``) returns them as one ``[T, P]`` Jacobian.

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
    # Issue 17: what the aggregator needs, refused before any backward where no call can supply it. The
    # per-task gradients are materialised in exact mode anyway and go to a "jacobian" method (its update
    # is written into .grad); a "cross_gram" method takes the losses of independent batches, [K, T],
    # weighed as K T tasks (fastmtl.engine.cross_batches).
    cross = None
    if supplied_requirement(aggregator, opts) == "cross_gram":
        cross = CrossBatchStep(losses, aggregator)
        schedule_owner = aggregator if schedule_owner is None else schedule_owner
        aggregator, losses = cross.weighting, cross.flat
    elif not isinstance(losses, torch.Tensor) or losses.dim() != 1 or losses.numel() < 1:
        got = list(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        fail("losses", "a 1-D tensor [T] of per-task losses with T >= 1", str(got))
    if not losses.requires_grad:
        fail("losses", "a tensor in an autograd graph (requires_grad)", "a tensor that does not require grad")
    schedule = None
    if opts.gram_every > 1:
        schedule = schedule_of(aggregator if schedule_owner is None else schedule_owner)
    feats = _as_tensors(features)
    for i, f in enumerate(feats):
        if not f.requires_grad:
            fail("features", "tensors that require grad (the trunk's outputs)", f"features[{i}] without grad")
    walk = GraphWalk(feats)  # the trunk's graph, walked once for the shared parameters and the plan
    if shared_params is None:
        shared = walk.leaves
    else:
        shared = list(shared_params)
        for i, p in enumerate(shared):
            if not isinstance(p, torch.Tensor) or not p.requires_grad:
                fail("shared_params", "tensors that require grad", f"shared_params[{i}] that does not")
    if not shared:
        fail("shared_params", "at least one parameter the features depend on", "none")
    shared_ids = {id(p) for p in shared}
    if opts.gram_params is not None:
        for i, p in enumerate(opts.gram_params):
            if id(p) not in shared_ids:
                fail(
                    "gram_params",
                    "a subset of the shared parameters (the layers the Gram matrix is computed on)",
                    f"gram_params[{i}] that is not a shared parameter",
                )
    # With the default shared parameters every leaf behind the features is shared: the walk for the
    # heads need not go into the trunk.
    stop = [f for f in feats if f.grad_fn is not None] if shared_params is None else ()
    heads = [p for p in graph_leaves([losses], stop=stop) if id(p) not in shared_ids]
    sync = DataParallelSync(opts.ddp_gram, opts.process_group)

    T = losses.shape[0]
    method = type(aggregator if cross is None else cross.weighting.method)
    head_scale = 1.0 if cross is None else cross.head_scale
    # The engine is the step's backward: autocast, which the user's forward ran under, does not apply
    # to it (as PyTorch advises for backward passes). The per-task gradients come in the dtypes the
    # forward recorded, and the Gram matrix, weights and weighted sums are computed in float32 or
    # wider (trunk_gram._gram_dtype), not in the autocast dtype.
    with torch.autocast(losses.device.type, enabled=False):
        if schedule is not None and not schedule.due((method, opts.mode, T, opts.gram_every), opts.gram_every):
            result = _reuse_weights(losses, feats, shared, heads, schedule, sync, aggregator, opts, walk, head_scale)
        else:
            result = _aggregated_backward(
                losses, feats, shared, heads, aggregator, opts, schedule, sync, walk, head_scale
            )
    return result if cross is None else cross.result(result)


def _as_tensors(features) -> list:
    if isinstance(features, torch.Tensor):
        return [features]
    if isinstance(features, (list, tuple)) and features and all(isinstance(f, torch.Tensor) for f in features):
        return list(features)
    fail("features", "a tensor or a non-empty sequence of tensors (the trunk's outputs)", type(features).__name__)


def graph_leaves(roots: Sequence[torch.Tensor], stop: Sequence[torch.Tensor] = ()) -> list[torch.Tensor]:
    """The leaf tensors that require grad and that the roots depend on, each once, in depth-first
    order: from the last root, a node's inputs last to first (the order of the Jacobian's columns).
    ``stop``: tensors whose graph is not entered (their leaves are listed only if reached otherwise)."""
    seen = {s.grad_fn for s in stop if s.grad_fn is not None}
    leaves, stack = [], [r.grad_fn for r in roots if r.grad_fn is not None]
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


def _heads_gradient(losses, heads) -> list:
    """The gradient of ``sum_t L_t`` with respect to the task-specific parameters, graph kept."""
    return list(torch.autograd.grad(losses.sum(), heads, retain_graph=True, allow_unused=True))


def _weighted_backward(feats, shared, cotangents, weights) -> list:
    """One ordinary backward of sum_t a_t dL_t/dz through the trunk (frees the graph)."""
    return list(torch.autograd.grad(feats, shared, grad_outputs=weighted_sum(weights, cotangents), allow_unused=True))


def _feature_cotangents(losses, feats, memory_budget) -> list:
    """The per-task cotangents of the features: [T, *feature.shape] each (graph kept)."""
    T = losses.shape[0]
    eye = torch.eye(T, dtype=losses.dtype, device=losses.device)
    plan = plan_gram([losses], feats, T, memory_budget)
    try:
        if plan.path == "task-loop":  # the heads do not batch: T passes, one head each
            return per_task_loss_gradients(losses, feats, retain_graph=True)
        return per_task_gradients(
            [losses], feats, [eye], T if plan.path == "streamed" else plan.chunk, retain_graph=True
        )
    except RuntimeError as error:
        raise ValueError(
            f"fastmtl.mtl_backward: argument 'features' could not be differentiated against 'losses' ({error})"
        ) from None


def _exact_shared_update(feats, shared, cotangents, aggregator, memory_budget, sync, walk) -> list:
    """The exact mode's update of the shared parameters (for report_cosine), graph kept; the
    aggregator is a copy, so a stateful method's state moves on by the caller's step only."""
    try:
        aggregator = copy.deepcopy(aggregator)
    except Exception:
        fail(
            "aggregator",
            "an object copy.deepcopy can copy when report_cosine=True (the exact update is computed with a copy)",
            type(aggregator).__name__,
        )
    plan = plan_gram(feats, shared, cotangents[0].shape[0], memory_budget, walk)
    blocks = per_task_gradients(feats, shared, cotangents, plan.chunk, retain_graph=True)
    weights = checked_weights(aggregator, sync.gram(blocks.gram()).detach())
    return blocks.weighted(weights)


def _aggregated_backward(
    losses,
    feats,
    shared,
    heads,
    aggregator,
    opts: MTLBackwardOptions,
    schedule: WeightSchedule | None,
    sync: DataParallelSync,
    walk: GraphWalk,
    head_scale: float,
) -> MTLBackwardResult:
    """A call that computes the Gram matrix and the weights; ``schedule``: where the weights of
    ``gram_every`` are kept, None when every call computes them; ``walk``: the features' graph;
    ``head_scale``: the heads get ``head_scale`` times the gradient of ``sum_t L_t`` (1; 1/K for the
    K batches of a cross-Gram step). Which path computes the exact Gram matrix:
    :func:`fastmtl.engine.trunk_gram.plan_gram`."""
    T = losses.shape[0]
    partial = None if opts.gram_params is None else list(opts.gram_params)
    memory_budget = opts.memory_budget
    if not depends_on([losses], feats):
        fail(
            "features",
            "tensors in the graph of 'losses' (the losses must be computed from them)",
            "features the losses do not depend on",
        )
    wrt = shared if partial is None else partial
    plan = plan_gram(feats, wrt, T, memory_budget, walk) if opts.mode == "exact" else None
    # The task loop needs no cotangents of the features: T backward passes from the losses (as the
    # T-pass loop), so the T x feature cotangents are never held; the heads' gradients come from one
    # backward of sum_t L_t after them.
    direct = plan is not None and partial is None and plan.path == "task-loop" and not sync.exact
    # Heads: the gradient of sum_t L_t, through the task-specific parts only.
    head_grads = []
    if heads and not direct:
        head_grads = _heads_gradient(losses, heads)
    # Per-task cotangents of the features: [T, *feature.shape] each.
    cotangents = None if direct else _feature_cotangents(losses, feats, memory_budget)

    exact_update = None
    if opts.report_cosine and (opts.mode == "rep" or partial is not None):
        exact_update = _exact_shared_update(feats, shared, cotangents, aggregator, memory_budget, sync, walk)

    jacobian, fresh = None, False
    if opts.mode == "rep":
        flat = torch.cat([c.reshape(T, -1) for c in cotangents], dim=1)
        gram = sync.gram(gram_of(flat))
        weights = checked_weights(aggregator, gram.detach())
        shared_grads = _weighted_backward(feats, shared, cotangents, weights)
        path = "rep"
    else:
        path = plan.path if partial is None else "partial/" + plan.path
        # A "jacobian" method (issue 17) takes the per-task gradients themselves: never streamed.
        needs_jacobian = requirement(aggregator) == "jacobian"
        if plan.path == "streamed" and not opts.keep_jacobian and not sync.exact and not needs_jacobian:
            gram = sync.gram(streamed_gram(feats, wrt, cotangents))
            blocks = None
        else:
            if direct:
                blocks = per_task_loss_gradients(losses, wrt, retain_graph=True)
                if heads:
                    # After the passes, as the T-pass loop takes them: asked in the passes, each head's
                    # gradient was held through the later ones, their peak (transformer B=32: 1.7 KB
                    # over the loop's peak; the same or less time, the passes no longer ask them).
                    head_grads = _heads_gradient(losses, heads)
            elif plan.path == "factored":
                blocks = swept_gradients(feats, wrt, cotangents)
            else:
                blocks = per_task_gradients(feats, wrt, cotangents, plan.chunk, retain_graph=partial is not None)
            if sync.exact or opts.keep_jacobian or needs_jacobian:
                flat = blocks.jacobian()
            if sync.exact:
                flat = sync.jacobian(flat)
                gram = gram_of(flat)
            else:
                gram = sync.gram(blocks.gram())
            if opts.keep_jacobian:
                jacobian = flat.detach()
        if needs_jacobian:
            # [P]: the method's update of the shared parameters, split into their blocks.
            update, weights = jacobian_update(aggregator, flat, gram, blocks.sizes())
            shared_grads = [u.view_as(g[0]).to(g.dtype) for u, g in zip(update, blocks)]
        else:
            weights = checked_weights(aggregator, gram.detach())
            if blocks is None or partial is not None:
                shared_grads = _weighted_backward(feats, shared, cotangents, weights)
            else:
                # The mean over ranks of the local updates is the update of the mean per-task gradients.
                shared_grads = blocks.weighted(weights)
                fresh = blocks.flat is not None  # views of one new [P] update: .grad without copies
    head_grads = _scaled(head_grads, head_scale)
    cosine = None
    if opts.report_cosine:
        cosine = 1.0 if exact_update is None else update_cosine(shared_grads, exact_update)
    if fresh and not sync.active:  # (data-parallel: one coalesced all-reduce for all of them)
        write_gradients(heads, head_grads, sync)
        write_gradients(shared, shared_grads, sync, owned=True)
    else:
        write_gradients(heads + shared, head_grads + shared_grads, sync)
    if schedule is not None:
        schedule.keep(weights, gram.detach())
    return MTLBackwardResult(
        losses=losses.detach(), weights=weights, gram=gram.detach(), jacobian=jacobian, path=path, cosine=cosine
    )


def _reuse_weights(
    losses,
    feats,
    shared,
    heads,
    schedule: WeightSchedule,
    sync: DataParallelSync,
    aggregator,
    opts: MTLBackwardOptions,
    walk: GraphWalk,
    head_scale: float,
) -> MTLBackwardResult:
    """A call between Gram computations: heads get ``head_scale`` times the gradient of sum_t L_t, the
    shared parameters that of sum_t a_t L_t with the kept weights a (one backward through the trunk)."""
    weights = schedule.weights
    exact_update = None
    if opts.report_cosine:
        cotangents = _feature_cotangents(losses, feats, opts.memory_budget)
        exact_update = _exact_shared_update(feats, shared, cotangents, aggregator, opts.memory_budget, sync, walk)
    head_grads = _heads_gradient(losses, heads) if heads else []
    head_grads = _scaled(head_grads, head_scale)
    feature_grads = torch.autograd.grad(losses, feats, grad_outputs=weights.to(losses.dtype), retain_graph=True)
    shared_grads = torch.autograd.grad(feats, shared, grad_outputs=feature_grads, allow_unused=True)
    write_gradients(heads + shared, head_grads + list(shared_grads), sync)
    cosine = update_cosine(shared_grads, exact_update) if opts.report_cosine else None
    return MTLBackwardResult(
        losses=losses.detach(),
        weights=weights,
        gram=schedule.gram,
        gram_computed=False,
        path="kept weights",
        cosine=cosine,
    )


def _scaled(grads, scale: float) -> list:
    """``scale`` times each gradient (None kept), as a list; the gradients themselves when 1."""
    if scale == 1.0:
        return list(grads)
    return [None if g is None else g * scale for g in grads]
