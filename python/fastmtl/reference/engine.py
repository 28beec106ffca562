"""The plain reference of :func:`fastmtl.mtl_backward`: T separate ``torch.autograd.grad`` calls
over the retained graph for the per-task gradients (the LibMTL loop), their Gram matrix, the same
aggregator and the weighted sum."""

from __future__ import annotations

import torch

from ..engine import MTLBackwardResult, _as_tensors, _graph_leaves


def mtl_backward(losses, features, aggregator, shared_params=None, mode="exact", keep_jacobian=False):
    feats = _as_tensors(features)
    shared = _graph_leaves(feats) if shared_params is None else list(shared_params)
    shared_ids = {id(p) for p in shared}
    heads = [p for p in _graph_leaves([losses]) if id(p) not in shared_ids]
    T = losses.shape[0]
    if mode == "rep":
        rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[t], feats, retain_graph=True)])
                for t in range(T)]
    else:
        rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[t], shared, retain_graph=True)])
                for t in range(T)]
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


def task_gram(x, weights, biases, activation, head_weight, head_bias, targets, tasks, mode="exact", gram_path="auto"):
    """The reference of :func:`fastmtl.ops.task_gram`: T ``autograd.grad`` calls through the plain
    model for the per-task gradients of ``task.weight * L_t``, stacked, ``J J^T``. ``gram_path``
    is the op's choice of algorithm and changes nothing here."""
    from . import fused_mlp, multitask_head_loss

    leaves = [w.detach().requires_grad_() for w in weights]
    bias_leaves = [b.detach().requires_grad_() for b in biases] if biases is not None else []
    with torch.enable_grad():
        z = fused_mlp(x.detach(), leaves, bias_leaves or None, activation)
        losses = multitask_head_loss(z, head_weight.detach(), None if head_bias is None else head_bias.detach(),
                                     targets, tasks)
        losses = losses * torch.tensor([t.weight for t in tasks], dtype=losses.dtype)
        wrt = [z] if mode == "rep" else leaves + bias_leaves
        rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[t], wrt, retain_graph=True)])
                for t in range(len(tasks))]
    J = torch.stack(rows)
    return J @ J.T
