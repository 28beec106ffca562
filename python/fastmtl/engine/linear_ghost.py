"""The Gram share of a Linear layer's weight without its T per-task gradients: the ghost product.

A Linear layer ``y = x W^T (+ b)`` over ``N`` rows gives task t the weight gradient
``g_t^T x`` (``g_t``: the task's ``[N, d_out]`` cotangent of y), so the layer's share of the Gram
matrix is ``<g_s^T x, g_t^T x> = sum((x x^T) * (g_s g_t^T))``: with ``K = x x^T`` it is
``<g_s, K g_t>``. That costs ``N^2 d_in + T N^2 d_out + T^2 N d_out`` multiply-adds against
``T N d_in d_out + T^2 d_in d_out`` for materialising the T gradients and their Gram share, so it
is cheaper when the batch is small against the layer's width (N below about
``T d_in d_out / (d_in + T d_out)``: 3/4 of the width for a square layer at T = 3). The fused FusedMLP path makes the same choice per layer
(``gram_path="auto"``); this is its counterpart for the streamed path of any trunk
(:func:`fastmtl.engine.trunk_gram.streamed_gram`), where the T x P Jacobian would not fit.

The layer is found in the autograd graph as ``AddmmBackward0`` (or ``MmBackward0``, a Linear
without bias) whose weight slot goes through ``TBackward0`` to the weight's ``AccumulateGrad``. The
share is the whole weight's only if the weight is used nowhere else: a weight with a second use
(tied embeddings, a layer applied twice) has cross terms between its uses, so it is materialised.
Convolutions are always materialised: their ghost product costs ``(B H W)^2`` per layer.
"""

from __future__ import annotations

import torch

__all__ = ["ghost_weights", "ghost_linear", "ghost_is_cheaper", "ghost_saving", "GHOST_STREAM_MIN_SAVING"]

# The backward node of a Linear layer, and the edge index of its transposed weight.
_WEIGHT_SLOT = {"AddmmBackward0": 2, "MmBackward0": 1}


def ghost_weights(order, nexts, leaf_index: dict[int, int]) -> dict:
    """``{linear node: input index of its weight}`` for the Linear nodes of a graph walk
    (``order``, ``nexts`` of :class:`~fastmtl.engine.batched_backward.GraphWalk`) whose weight is a
    requested leaf (``leaf_index``: ``id(leaf) -> input index``) used by that node alone."""
    uses: dict[object, int] = {}
    for node in order:
        for child in nexts[node]:
            uses[child] = uses.get(child, 0) + 1
    found = {}
    for node in order:
        slot = _WEIGHT_SLOT.get(node.name())
        if slot is None:
            continue
        edges = node.next_functions
        transpose = edges[slot][0] if slot < len(edges) else None
        if transpose is None or transpose.name() != "TBackward0" or uses.get(transpose) != 1:
            continue
        (accumulate, _), *_ = transpose.next_functions
        variable = getattr(accumulate, "variable", None)
        if variable is None or id(variable) not in leaf_index or uses.get(accumulate) != 1:
            continue
        found[node] = leaf_index[id(variable)]
    return found


def _costs(rows: int, d_in: int, d_out: int, num_tasks: int) -> tuple[int, int]:
    """Multiply-adds of a Linear weight's Gram share: (materialising the T gradients, the ghost product)."""
    ghost = rows * rows * d_in + num_tasks * rows * rows * d_out + num_tasks * num_tasks * rows * d_out
    materialise = num_tasks * rows * d_in * d_out + num_tasks * num_tasks * d_in * d_out
    return materialise, ghost


def ghost_is_cheaper(rows: int, d_in: int, d_out: int, num_tasks: int) -> bool:
    """The cost model: multiply-adds of the ghost product against materialising."""
    materialise, ghost = _costs(rows, d_in, d_out, num_tasks)
    return ghost < materialise


# The streamed path walks the graph in Python (a vmap per node): measured on the 2-core CI machine it
# cost 0.1-0.2 ms more than the vmapped backward on small MLP trunks, so the ghost product is worth
# a stream only where it saves clearly more than that (T=8, B=64, 2 x 256 wide: 27M multiply-adds
# saved, 1.15x faster than the vmapped backward; T=3, B=32, 2 x 256: 6M saved, 0.93x).
GHOST_STREAM_MIN_SAVING = 20_000_000


def ghost_saving(weights_of: dict, num_tasks: int) -> tuple[int, int]:
    """For the Linear nodes of :func:`ghost_weights`: (multiply-adds of materialising their weights'
    Gram shares, multiply-adds the ghost product saves where it is the cheaper)."""
    total = saved = 0
    for node in weights_of:
        if node.name() == "AddmmBackward0":
            rows, d_in = node._saved_mat1_sym_sizes
        else:
            rows, d_in = node._saved_self_sym_sizes
        d_out = node._saved_mat2_sym_sizes[1]
        materialise, ghost = _costs(int(rows), int(d_in), int(d_out), num_tasks)
        total += materialise
        saved += max(0, materialise - ghost)
    return total, saved


def ghost_linear(node, grad: torch.Tensor, needed: list[bool], gram_dtype: torch.dtype):
    """For a Linear node of :func:`ghost_weights` and its T-batched output cotangent ``grad``
    ``[T, N, d_out]``: ``(gradients of its inputs, the weight's [T, T] Gram share)``, the weight's
    gradient left None; None when the ghost product is not the cheaper way (or the node saved no
    2-D input)."""
    name = node.name()
    if name == "AddmmBackward0":
        x, weight_t = node._saved_mat1, node._saved_mat2
        alpha, beta = node._saved_alpha, node._saved_beta
    else:
        x, weight_t = node._saved_self, node._saved_mat2
        alpha, beta = 1, None
    input_slot = 1 if name == "AddmmBackward0" else 0
    if x is None or x.dim() != 2 or grad.dim() != 3 or (needed[input_slot] and weight_t is None):
        return None  # (autograd saves W only when the input's gradient is needed)
    T, rows, d_out = grad.shape
    if not ghost_is_cheaper(rows, x.shape[1], d_out, T):
        return None
    x_wide, g_wide = x.to(gram_dtype), grad.to(gram_dtype)
    kernel = x_wide @ x_wide.T  # [N, N]
    share = g_wide.reshape(T, -1) @ torch.matmul(kernel, g_wide).reshape(T, -1).T
    if alpha != 1:
        share = share * (alpha * alpha)
    grads = [None] * len(needed)
    if name == "AddmmBackward0":
        if needed[0]:
            grads[0] = grad if beta == 1 else grad * beta  # the bias: summed to its shape by the caller
        if needed[1]:
            grads[1] = torch.matmul(grad, weight_t.T) if alpha == 1 else torch.matmul(grad, weight_t.T) * alpha
    elif needed[0]:
        grads[0] = torch.matmul(grad, weight_t.T)
    return grads, share
