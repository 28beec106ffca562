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
        update = weights.to(J.dtype) @ J
        grads, offset = [], 0
        for p in shared:
            grads.append(update[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    for p, g in list(zip(heads, head_grads)) + list(zip(shared, grads)):
        p.grad = g.detach().clone() if p.grad is None else p.grad + g.detach()
    return MTLBackwardResult(losses.detach(), weights, gram.detach(), J.detach() if keep_jacobian else None)
