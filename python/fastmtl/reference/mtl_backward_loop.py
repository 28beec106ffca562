"""The plain reference of :func:`fastmtl.mtl_backward`: T separate ``torch.autograd.grad`` calls
over the retained graph for the per-task gradients (the LibMTL loop), their Gram matrix, the same
aggregator and the weighted sum."""

from __future__ import annotations

import torch

from ..engine.result import MTLBackwardResult

__all__ = ["mtl_backward", "leaves_of"]


def leaves_of(roots):
    """The leaves that require grad and that ``roots`` depend on, in the order the engine documents
    (:func:`fastmtl.engine.graph_leaves`): depth first from the last root, a node's
    inputs last to first, each node once. Written here again, recursively, so that the tests check
    the engine's discovery of the shared parameters rather than compare it with itself."""
    found, visited = [], set()

    def visit(node):
        if node is None or node in visited:
            return
        visited.add(node)
        if hasattr(node, "variable"):  # AccumulateGrad: the node of a leaf
            found.append(node.variable)
        for child, _ in reversed(node.next_functions):
            visit(child)

    for root in reversed(roots):
        visit(root.grad_fn)
    return found


def mtl_backward(losses, features, aggregator, shared_params=None, mode="exact", keep_jacobian=False):
    feats = [features] if isinstance(features, torch.Tensor) else list(features)
    shared = leaves_of(feats) if shared_params is None else list(shared_params)
    if getattr(aggregator, "requires", "gram") == "cross_gram":
        return _cross_batch_backward(losses, shared, aggregator, keep_jacobian)
    heads = [p for p in leaves_of([losses]) if all(p is not q for q in shared)]
    T = losses.shape[0]
    if mode == "rep":
        rows = [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[t], feats, retain_graph=True)])
            for t in range(T)
        ]
    else:
        rows = [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[t], shared, retain_graph=True)])
            for t in range(T)
        ]
    J = torch.stack(rows)
    gram = J @ J.T
    weights = aggregator(gram.detach()).detach()
    head_grads = torch.autograd.grad(losses.sum(), heads, retain_graph=True) if heads else ()
    if mode == "rep":
        grads = torch.autograd.grad(losses, shared, grad_outputs=weights.to(losses.dtype))
    else:
        grads = _split(weights.to(J.dtype) @ J, shared)
    _accumulate(heads + shared, list(head_grads) + list(grads))
    return MTLBackwardResult(losses.detach(), weights, gram.detach(), J.detach() if keep_jacobian else None)


def _split(update, params) -> list:
    """A flat update ``[P]`` as one view per parameter, in order."""
    grads, offset = [], 0
    for p in params:
        grads.append(update[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return grads


def _accumulate(params, grads) -> None:
    """``.grad += g`` as ``backward`` accumulates."""
    for p, g in zip(params, grads):
        p.grad = g.detach().clone() if p.grad is None else p.grad + g.detach()


def _per_task_rows(losses, params):
    """``[T, P]``: one ``torch.autograd.grad`` call per loss (zeros where a loss does not reach a
    parameter)."""
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]))
    return torch.stack(rows)


def _cross_batch_backward(losses, shared, aggregator, keep_jacobian):
    """A cross-Gram method on losses ``[K, T]`` of K = 2 or 3 independent batches, as its authors run
    it: ``w = method(cross_gram=J_1 J_2^T)``; the shared parameters get ``w`` applied to the mean of
    both batches' gradients (K = 2, MoDo eq. 2.9b) or to the third batch's (K = 3); the heads the
    gradient of the mean over the batches of ``sum_t L_kt``."""
    K = losses.shape[0]
    heads = [p for p in leaves_of([losses]) if all(p is not q for q in shared)]
    jacobians = [_per_task_rows(losses[k], shared) for k in range(K)]
    cross = jacobians[0] @ jacobians[1].T
    weights = aggregator(cross_gram=cross.detach()).detach()
    source = (jacobians[0] + jacobians[1]) / 2 if K == 2 else jacobians[2]
    head_grads = torch.autograd.grad(losses.sum() / K, heads, retain_graph=True) if heads else ()
    _accumulate(heads + shared, list(head_grads) + _split(weights.to(source.dtype) @ source, shared))
    jacobian = torch.cat(jacobians).detach() if keep_jacobian else None
    return MTLBackwardResult(losses.detach(), weights, cross.detach(), jacobian)
