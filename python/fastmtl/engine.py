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

The fused path for fastmtl's own MultiTaskModel (``model.mtl_backward``), which never forms the
T x P Jacobian, is not built yet; this generic path does form it (T x P in the parameters' dtype).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

import torch

__all__ = ["MTLBackwardResult", "mtl_backward"]

MODES = ("exact", "rep")


@dataclass
class MTLBackwardResult:
    """What one ``mtl_backward`` call computed (all detached): the losses ``[T]``, the aggregator's
    weights ``[T]``, the Gram matrix ``[T, T]`` it saw, and the Jacobian ``[T, P]`` of the shared
    parameters when ``keep_jacobian=True`` (exact mode)."""

    losses: torch.Tensor
    weights: torch.Tensor
    gram: torch.Tensor
    jacobian: Optional[torch.Tensor] = None


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
    One vectorised backward where every op on the way supports it; otherwise one backward per task."""
    try:
        grads = torch.autograd.grad(outputs, inputs, grad_outputs=cotangents, is_grads_batched=True,
                                    retain_graph=retain_graph, allow_unused=True)
    except RuntimeError:
        T = cotangents[0].shape[0]
        rows = [torch.autograd.grad(outputs, inputs, grad_outputs=[c[t] for c in cotangents], retain_graph=True,
                                    allow_unused=True) for t in range(T)]
        grads = tuple(None if rows[0][i] is None else torch.stack([r[i] for r in rows]) for i in range(len(inputs)))
    return [torch.zeros((cotangents[0].shape[0],) + tuple(x.shape), dtype=x.dtype, device=x.device) if g is None else g
            for g, x in zip(grads, inputs)]


def _accumulate(param: torch.Tensor, update: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = update.detach().clone()
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


def mtl_backward(
    losses: torch.Tensor,
    features: Union[torch.Tensor, Sequence[torch.Tensor]],
    aggregator: Callable[[torch.Tensor], torch.Tensor],
    shared_params: Optional[Iterable[torch.Tensor]] = None,
    mode: str = "exact",
    keep_jacobian: bool = False,
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
    (MGDA-UB), then one ordinary backward of ``sum_t a_t dL_t/dz`` through the trunk. The graph is
    freed afterwards.

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
    if mode not in MODES:
        _fail("mode", f"one of {MODES}", repr(mode))
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or losses.numel() < 1:
        got = list(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        _fail("losses", "a 1-D tensor [T] of per-task losses with T >= 1", str(got))
    if not losses.requires_grad:
        _fail("losses", "a tensor in an autograd graph (requires_grad)", "a tensor that does not require grad")
    feats = _as_tensors(features)
    for i, f in enumerate(feats):
        if not f.requires_grad:
            _fail("features", "tensors that require grad (the trunk's outputs)", f"features[{i}] without grad")
    T = losses.shape[0]
    eye = torch.eye(T, dtype=losses.dtype, device=losses.device)

    # Per-task cotangents of the features: [T, *feature.shape] each.
    try:
        cotangents = _batched_vjp([losses], feats, [eye], retain_graph=True)
    except RuntimeError as error:
        raise ValueError(f"fastmtl.mtl_backward: argument 'features' could not be differentiated against "
                         f"'losses' ({error})") from None
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

    # Heads: the gradient of sum_t L_t, through the task-specific parts only. The same backward
    # tells whether the losses depend on the features at all.
    summed = torch.autograd.grad(losses.sum(), heads + feats, retain_graph=True, allow_unused=True)
    if all(g is None for g in summed[len(heads):]):
        _fail("features", "tensors in the graph of 'losses' (the losses must be computed from them)",
              "features the losses do not depend on")
    for p, g in zip(heads, summed[: len(heads)]):
        if g is not None:
            _accumulate(p, g)

    jacobian = None
    if mode == "rep":
        flat = torch.cat([c.reshape(T, -1) for c in cotangents], dim=1)
        gram = flat @ flat.T
        weights = _checked_weights(aggregator, gram.detach())
        combined = [torch.tensordot(weights.to(c.dtype), c, dims=1) for c in cotangents]
        grads = torch.autograd.grad(feats, shared, grad_outputs=combined, allow_unused=True)
        for p, g in zip(shared, grads):
            if g is not None:
                _accumulate(p, g)
    else:
        per_task = _batched_vjp(feats, shared, cotangents, retain_graph=False)
        flat = torch.cat([g.reshape(T, -1) for g in per_task], dim=1)
        gram = flat @ flat.T
        weights = _checked_weights(aggregator, gram.detach())
        for p, g in zip(shared, per_task):
            _accumulate(p, torch.tensordot(weights.to(g.dtype), g, dims=1))
        if keep_jacobian:
            jacobian = flat.detach()
    return MTLBackwardResult(losses=losses.detach(), weights=weights, gram=gram.detach(), jacobian=jacobian)
