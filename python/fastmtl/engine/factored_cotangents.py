"""T cotangents that factor through a global average pool, for :func:`fastmtl.engine.batched_backward.batched_grad`.

A vision trunk typically ends ``relu(x + bn(conv(...)))`` then a global average pool. The T
cotangents of the pooled features ``u_t [B, C]`` come back through the pool as ``u_t / (H W)``
spread over every pixel, and every op on the way to the last BatchNorm's affine parameters only
multiplies them by a tensor that is the same for all tasks (the ReLU's mask), so the T cotangents
at the BatchNorm are ``g_t = u_t * w`` with one ``w [B, C, H, W]`` and ``u_t [B, C, 1, 1]``. Then

    dgamma_t[c] = sum_b u_t[b, c] * S1[b, c],  S1 = sum_hw w * xhat
    dbeta_t[c]  = sum_b u_t[b, c] * S0[b, c],  S0 = sum_hw w

costs one pass over the activation for all tasks, where T backward passes (or vmap, which loops
over the tasks in ``native_batch_norm_backward``) make T passes over it: at 40 tasks (CelebA) the
partial Gram over the last BatchNorm took 2.9x the plain step, T x the activation of elementwise
work. :class:`Factored` is such a cotangent; the rules here keep it factored through the mean, the
ReLU / threshold and the residual add, and end it at a BatchNorm whose input gradient is not needed.
Anywhere else it is materialised (``u * w`` as ``[T, *shape]``) and the sweep goes on as before, so
the factoring only changes how the same gradients are computed.

:func:`factors_all_the_way` says, from the graph alone, whether a sweep towards given inputs keeps
its cotangents factored into every BatchNorm on the way (the plan's "factored" path).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["Factored", "dense", "factored_rule", "factors_all_the_way", "combine"]


class Factored:
    """T cotangents ``g[t] = u[t] * w`` of a tensor of shape ``shape``: ``u [T, *s]`` with ``s``
    broadcasting to ``shape`` (size 1 on the pooled axes), ``w [*shape]`` the same for every task
    (``None``: ones)."""

    __slots__ = ("u", "w", "shape")

    def __init__(self, u: torch.Tensor, w: torch.Tensor | None, shape: Sequence[int]):
        self.u, self.w, self.shape = u, w, tuple(shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.u.dtype

    def scaled(self, alpha) -> Factored:
        return self if alpha == 1 else Factored(self.u * alpha, self.w, self.shape)


def dense(g):
    """A :class:`Factored` as the ``[T, *shape]`` tensor it stands for; anything else as it is."""
    if not isinstance(g, Factored):
        return g
    T = g.u.shape[0]
    full = g.u if g.w is None else g.u * g.w
    return full.expand((T,) + g.shape).contiguous()


def combine(a, b):
    """``a + b`` for cotangents of one slot, kept factored where both share ``w``."""
    if isinstance(a, Factored) and isinstance(b, Factored) and a.w is b.w and a.u.shape == b.u.shape:
        return Factored(a.u + b.u, a.w, a.shape)
    return dense(a) + dense(b)


def _mean(node, slots, needed, T):
    """``x.mean(dims)`` backward: the cotangent spread over the reduced axes, divided by their count."""
    g = slots[0]
    if isinstance(g, Factored) or g is None or len(needed) != 1:
        return None
    sizes = tuple(node._saved_self_sym_sizes)
    dims = sorted(d % len(sizes) for d in node._saved_dim)
    u = g
    if not node._saved_keepdim:
        for d in dims:
            u = u.unsqueeze(d + 1)
    count = 1
    for d in dims:
        count *= sizes[d]
    return [Factored(u / count, None, sizes)]


def _masked(g: Factored, keep: torch.Tensor) -> Factored:
    mask = keep.to(g.dtype)
    return Factored(g.u, mask if g.w is None else g.w * mask, g.shape)


def _relu(node, slots, needed, T):
    g = slots[0]
    if not isinstance(g, Factored) or tuple(node._saved_result.shape) != g.shape:
        return None
    return [_masked(g, node._saved_result > 0)]


def _threshold(node, slots, needed, T):
    g = slots[0]
    if not isinstance(g, Factored) or tuple(node._saved_self.shape) != g.shape:
        return None
    return [_masked(g, node._saved_self > node._saved_threshold)]


def _add(node, slots, needed, T):
    """Both operands get the cotangent (the other one times alpha). An operand of another shape (a
    broadcast add) is not special-cased here: the sweep materialises a factored cotangent wherever
    the receiving slot's shape differs, and sums it to that shape as for any gradient."""
    g = slots[0]
    if not isinstance(g, Factored):
        return None
    return [g, g.scaled(node._saved_alpha)]


def _batch_norm(node, slots, needed, T):
    """The affine parameters' T gradients of a factored cotangent (the input's is not asked)."""
    g = slots[0]
    if not isinstance(g, Factored) or len(needed) != 3 or needed[0] or node._saved_weight is None:
        return None
    x = node._saved_input
    if x is None or tuple(x.shape) != g.shape or x.dim() < 2:
        return None
    view = (1, -1) + (1,) * (x.dim() - 2)
    if node._saved_training:
        mean, invstd = node._saved_result1, node._saved_result2
    else:
        mean = node._saved_running_mean
        invstd = torch.rsqrt(node._saved_running_var + node._saved_eps)
    xhat = (x.to(g.dtype) - mean.to(g.dtype).view(view)) * invstd.to(g.dtype).view(view)
    # The axes u is broadcast over (the pooled ones) are summed once, for all tasks.
    pooled = tuple(d for d in range(x.dim()) if g.u.shape[d + 1] == 1 and x.shape[d] != 1)
    weighted = xhat if g.w is None else g.w * xhat
    s1 = weighted.sum(dim=pooled, keepdim=True)
    s0 = (torch.ones_like(xhat) if g.w is None else g.w).sum(dim=pooled, keepdim=True)
    keep = tuple(d + 1 for d in range(x.dim()) if d != 1)  # every axis but the task's and the channel's
    out = [None, None, None]
    if needed[1]:
        out[1] = (g.u * s1).sum(dim=keep)
    if needed[2]:
        out[2] = (g.u * s0).sum(dim=keep)
    return out


FACTORED_RULES = {
    "MeanBackward1": _mean,
    "ReluBackward0": _relu,
    "ThresholdBackward0": _threshold,
    "AddBackward0": _add,
    "NativeBatchNormBackward0": _batch_norm,
}


def factored_rule(name: str, node, slots, needed, T):
    """The gradients of ``node`` (its ``name()``) with factored cotangents kept factored, or None
    (the sweep then materialises its cotangents and runs its ordinary rule)."""
    rule = FACTORED_RULES.get(name)
    if rule is None:
        return None
    if name != "MeanBackward1" and not any(isinstance(s, Factored) for s in slots):
        return None
    return rule(node, slots, needed, T)


_KEEPS_FACTORED = frozenset({"ReluBackward0", "ThresholdBackward0", "AddBackward0"})


def factors_all_the_way(walk, useful: Sequence, looping: frozenset) -> bool:
    """Whether a sweep over the ``useful`` nodes (those on a path to the inputs, children first, as
    :meth:`GraphWalk.towards` gives them) reaches every node of ``looping`` (those whose vmap rule
    loops over the tasks) with factored cotangents only, ending there (a BatchNorm whose input
    gradient is not needed): decided from the node kinds, before any backward."""
    on_path = set(useful)
    state: dict = {}  # node -> whether its incoming cotangents are factored (every one of them)
    met_batch_norm = False
    for node in reversed(useful):  # parents first
        factored = state.get(node, False)
        name = node.name()
        if name == "NativeBatchNormBackward0":
            input_edge = node.next_functions[0][0]
            if not factored or (input_edge is not None and input_edge in on_path):
                return False
            met_batch_norm = True
            continue
        if name in looping:
            return False
        out = name == "MeanBackward1" or (factored and name in _KEEPS_FACTORED)
        for child in walk.nexts.get(node, ()):
            if child in on_path:
                state[child] = (state[child] and out) if child in state else out
    return met_batch_norm
