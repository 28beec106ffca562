"""T cotangents through an autograd graph at once, with every op truly batched.

``torch.autograd.grad(..., is_grads_batched=True)`` runs the backward under ``vmap``. On a CPU
build of torch 2.13 the batching rules of several backward ops the MTL trunks are made of loop over
the T cotangents: ``convolution_backward`` (4 calls per conv at T = 3: one batched grad_input and
one grad_weight per task), ``native_batch_norm_backward``, ``native_layer_norm_backward`` and the
flash-attention backward (4 calls each), with a ``stack`` copy of the per-task results; the profile
in ``bench/bench_any_trunk.py --profile`` shows it. That made the "batched" backward slower than T
plain backward passes on conv and transformer trunks.

:func:`batched_grad` walks the graph itself (in topological order, from ``grad_fn.next_functions``)
and gives each backward node its T cotangents together. Nodes with a rule in ``_RULES`` fold the
task axis into an axis the op already batches over, so one call of the op serves all tasks:

  convolution   grad_input: T into the batch axis; grad_weight: T into the output channels (a
                conv with T*C_out filters over the same input has exactly the T weight gradients)
  batch norm    T into the channels (the per-channel statistics stay those of the task's rows)
  layer norm    the closed form with the task axis broadcast (no copy of the input)
  attention     T into the batch axis of the flash-attention backward (no parameters inside)
  embedding     one ``index_add_`` into a [T, num_embeddings, dim] gradient

Every other node runs once under ``torch.vmap`` (pointwise ops, views, matmuls batch well there);
a node that cannot be vmapped (an op without a batching rule) runs once per task.

The gradient of each requested input is handed to ``on_grad(index, grad[T, ...])`` as soon as it is
complete, so a caller can use it and drop it (the Gram matrix share of one parameter block) instead
of holding the T x P Jacobian. The graph's saved tensors are not freed (the caller's later backward
does that); tensor hooks inside the graph are not run (they would see T-batched tensors).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import torch

from .factored_cotangents import Factored, combine, dense, factored_rule
from .linear_ghost import ghost_linear, ghost_weights
from .task_jacobian import gram_dtype

__all__ = ["batched_grad", "graph_nodes", "GraphWalk"]


def _num_slots(node) -> int | None:
    """How many gradients the node takes (its forward op's outputs); torch exposes it as the
    node's input metadata."""
    metadata = getattr(node, "_input_metadata", None)
    return None if metadata is None else len(metadata)


def _call(node, grads):
    """node(*grads) for C++ nodes and Python autograd.Function nodes alike, always a tuple."""
    out = node(*grads) if callable(node) else node.apply(*grads)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _generic(node, slots: list[torch.Tensor | None], T: int):
    """The node's own backward over the T cotangents: once under vmap, else once per task."""
    present = [i for i, g in enumerate(slots) if g is not None]
    count = _num_slots(node) or len(slots)
    none_outputs: list[int] = []

    def one(*grads):
        full = [None] * count
        for i, g in zip(present, grads):
            full[i] = g
        out = _call(node, full)
        none_outputs[:] = [i for i, g in enumerate(out) if g is None]
        return tuple(g for g in out if g is not None), len(out)

    try:
        tensors, n_out = torch.vmap(lambda *g: one(*g)[0])(*[slots[i] for i in present]), None
        n_out = len(tensors) + len(none_outputs)
    except RuntimeError:
        rows = [one(*[slots[i][t] for i in present]) for t in range(T)]
        n_out = rows[0][1]
        tensors = tuple(torch.stack([r[0][j] for r in rows]) for j in range(len(rows[0][0])))
    out, it = [], iter(tensors)
    for i in range(n_out):
        out.append(None if i in none_outputs else next(it))
    return out


def _as_expected(g: torch.Tensor, node, slot: int, T: int) -> torch.Tensor:
    """What the autograd engine does to a node's output before passing it on (validate_outputs): a
    gradient of a broadcast input (an addmm bias, say) is summed to the input's shape, and cast."""
    metadata = getattr(node, "_input_metadata", None)
    if metadata is None or slot >= len(metadata):
        return g
    shape = (T,) + tuple(metadata[slot].shape)
    if tuple(g.shape) != shape:
        extra = g.dim() - len(shape)  # broadcasting added leading dims after the task axis
        if extra > 0:
            g = g.sum(dim=tuple(range(1, 1 + extra)))
        g = g.sum_to_size(shape)
    if g.dtype != metadata[slot].dtype:
        g = g.to(metadata[slot].dtype)
    return g


def _factored_as_expected(g, node, slot: int) -> bool:
    """Whether ``g`` is a :class:`Factored` cotangent the node takes as it is (its shape and dtype)."""
    if not isinstance(g, Factored):
        return False
    metadata = getattr(node, "_input_metadata", None)
    if metadata is None or slot >= len(metadata):
        return True
    return tuple(metadata[slot].shape) == g.shape and metadata[slot].dtype == g.dtype


def _per_task(T: int, mask, call) -> list:
    """``call(t)`` (a native backward of one task's cotangent) for every task, its outputs written
    into [T, ...] tensors allocated once (no list of T results and no stack copy)."""
    out = [None] * len(mask)
    for t in range(T):
        for i, grad in enumerate(call(t)):
            if mask[i]:
                if out[i] is None:
                    out[i] = grad.new_empty((T,) + tuple(grad.shape))
                out[i][t] = grad
    return out


def _conv_rule(node, slots, needed, T):
    """One ``convolution_backward`` per task with every gradient it needs, as T backward passes
    make. Measured on CPU (mkldnn), folding the tasks into the batch axis (grad_input) or into the
    output channels (grad_weight) is no faster (the GEMMs are already large); vmap's own rule is
    slower: it asks for grad_input and grad_weight in separate calls and feeds grad_input an
    expanded input, then stacks the tasks' results."""
    g = slots[0]
    x, w = node._saved_input, node._saved_weight
    if g is None or x is None or w is None or len(needed) != 3:
        return None
    mask = [bool(n) for n in needed]
    args = (
        node._saved_bias_sym_sizes_opt,
        node._saved_stride,
        node._saved_padding,
        node._saved_dilation,
        node._saved_transposed,
        node._saved_output_padding,
        node._saved_groups,
        mask,
    )
    return _per_task(T, mask, lambda t: torch.ops.aten.convolution_backward(g[t], x, w, *args))


def _batch_norm_rule(node, slots, needed, T):
    """One ``native_batch_norm_backward`` per task (vmap's rule does the same plus a stack copy);
    the closed form with the task axis broadcast measured slower (several passes over T x the
    activation)."""
    g = slots[0]
    x = node._saved_input
    if g is None or x is None or len(needed) != 3:
        return None
    mask = [bool(n) for n in needed]
    args = (
        x,
        node._saved_weight,
        node._saved_running_mean,
        node._saved_running_var,
        node._saved_result1,
        node._saved_result2,
        node._saved_training,
        node._saved_eps,
        mask,
    )
    return _per_task(T, mask, lambda t: torch.ops.aten.native_batch_norm_backward(g[t], *args))


def _layer_norm_rule(node, slots, needed, T):
    g = slots[0]
    x, w = node._saved_input, node._saved_weight
    if g is None or x is None or len(needed) != 3:
        return None
    k = len(node._saved_normalized_shape)
    mean, rstd = node._saved_result1, node._saved_result2  # [*batch, 1, ..., 1]
    xhat = (x - mean) * rstd
    dims = tuple(range(-k, 0))
    out = [None, None, None]
    if needed[0]:
        gx = g * w if w is not None else g
        out[0] = rstd * (gx - gx.mean(dim=dims, keepdim=True) - xhat * (gx * xhat).mean(dim=dims, keepdim=True))
    batch_dims = tuple(range(1, g.dim() - k))
    if needed[1]:
        out[1] = (g * xhat).sum(dim=batch_dims)
    if needed[2]:
        out[2] = g.sum(dim=batch_dims)
    return out


def _flash_attention_rule(node, slots, needed, T):
    g = slots[0]
    if g is None or node._saved_dropout_p > 0 or len(needed) != 3:
        return None

    def rep(t):
        return None if t is None else t.unsqueeze(0).expand((T,) + tuple(t.shape)).flatten(0, 1)

    q, k, v = node._saved_query, node._saved_key, node._saved_value
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        g.flatten(0, 1),
        rep(q),
        rep(k),
        rep(v),
        rep(node._saved_output),
        rep(node._saved_logsumexp),
        node._saved_dropout_p,
        node._saved_is_causal,
        attn_mask=rep(node._saved_attn_mask),
        scale=node._saved_scale,
    )
    return [gr.unflatten(0, (T, -1)) if n else None for gr, n in zip(grads, needed)]


def _embedding_rule(node, slots, needed, T):
    g = slots[0]
    if g is None or node._saved_scale_grad_by_freq or node._saved_sparse or len(needed) != 1:
        return None
    indices = node._saved_indices.reshape(-1)
    num = node._saved_weight_sym_argsize_0
    rows = g.reshape(T, indices.numel(), g.shape[-1])
    padding = node._saved_padding_idx  # no padding: -1, seen as 2**64 - 1
    if 0 <= padding < num:
        rows = rows * (indices != padding).unsqueeze(-1).to(rows.dtype)
    return [rows.new_zeros((T, num, g.shape[-1])).index_add_(1, indices, rows)]


_RULES: dict[str, Callable] = {
    "ConvolutionBackward0": _conv_rule,
    "NativeBatchNormBackward0": _batch_norm_rule,
    "NativeLayerNormBackward0": _layer_norm_rule,
    "ScaledDotProductFlashAttentionForCpuBackward0": _flash_attention_rule,
    "EmbeddingBackward0": _embedding_rule,
}


class GraphWalk:
    """One depth-first walk of the autograd graph behind ``roots``, each node's inputs read once
    (``next_functions`` builds a fresh tuple on every access: reading it once per node made the
    engine's several walks of a small transformer's graph cost 0.3 ms a step).

    ``order``: the nodes, parents before children. ``nexts[node]``: its input nodes (None dropped).
    ``leaves``: the leaf tensors that require grad, each once, in the walk's pre-order: from the last
    root, a node's inputs last to first (the order of :func:`fastmtl.engine.graph_leaves`)."""

    def __init__(self, roots: Sequence[torch.Tensor]):
        order, leaves, seen, nexts = [], [], set(), {}
        stack = [(r.grad_fn, False) for r in roots if r.grad_fn is not None]
        while stack:
            node, done = stack.pop()
            if done:
                order.append(node)
                continue
            if node in seen:
                continue
            seen.add(node)
            children = tuple([n for n, _ in node.next_functions if n is not None])
            if not children:  # AccumulateGrad nodes (no inputs) hold their leaf; asked only of them,
                variable = getattr(node, "variable", None)  # as a missing attribute costs an exception
                if variable is not None:
                    leaves.append(variable)
            nexts[node] = children
            stack.append((node, True))
            stack.extend([(n, False) for n in children if n not in seen])
        order.reverse()
        self.order, self.nexts, self.leaves = order, nexts, leaves

    def towards(self, inputs: Sequence[torch.Tensor]) -> list:
        """The nodes on a path to one of ``inputs`` (leaves or intermediate tensors), children first:
        the part of the graph a backward with respect to them runs."""
        leaf_ids = {id(p) for p in inputs if p.grad_fn is None}
        slots = {p.grad_fn for p in inputs if p.grad_fn is not None}
        if not slots and leaf_ids.issuperset(id(v) for v in self.leaves):
            # Every node of an autograd graph leads to a leaf that requires grad: with all of them
            # asked for, every node runs (the default shared parameters of mtl_backward).
            return list(reversed(self.order))
        useful, marked = [], set()
        for node in reversed(self.order):
            variable = getattr(node, "variable", None)
            if (
                (variable is not None and id(variable) in leaf_ids)
                or node in slots
                or any(n in marked for n in self.nexts[node])
            ):
                marked.add(node)
                useful.append(node)
        return useful


def graph_nodes(roots: Sequence[torch.Tensor]) -> list:
    """The backward nodes reachable from the roots, parents before children."""
    return GraphWalk(roots).order


def batched_grad(
    outputs: Sequence[torch.Tensor],
    cotangents: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    on_grad: Callable[[int, torch.Tensor], None],
    on_gram: Callable[[int, torch.Tensor], None] | None = None,
) -> None:
    """For every t: the gradient of ``sum_j <cotangents[j][t], outputs[j]>`` with respect to each of
    ``inputs``, as ``[T, *input.shape]``, passed to ``on_grad(i, grad)`` once per input (zeros for an
    input the outputs do not depend on). ``inputs``: leaves or intermediate tensors of the graph.
    ``on_gram``: when given, a Linear layer's weight whose ghost product is cheaper
    (:mod:`fastmtl.engine.linear_ghost`) gets ``on_gram(i, share)`` with its ``[T, T]`` Gram share
    instead of ``on_grad``, and its T gradients are never formed."""
    with torch.no_grad():
        _sweep(outputs, cotangents, inputs, on_grad, on_gram)


def _sweep(outputs, cotangents, inputs, on_grad, on_gram) -> None:
    T = cotangents[0].shape[0]
    leaf_index = {id(p): i for i, p in enumerate(inputs) if p.grad_fn is None}
    slot_index = {(p.grad_fn, p.output_nr): i for i, p in enumerate(inputs) if p.grad_fn is not None}
    slot_nodes = {node for node, _ in slot_index}
    walk = GraphWalk(outputs)
    nodes = walk.order
    ghosts = {} if on_gram is None else ghost_weights(nodes, walk.nexts, leaf_index)
    share_dtype = gram_dtype(list(inputs))

    # Nodes with a path to an input; children come after parents in ``nodes``, so one backward sweep.
    useful = set()
    for node in reversed(nodes):
        variable = getattr(node, "variable", None)
        if (
            (variable is not None and id(variable) in leaf_index)
            or node in slot_nodes
            or any(n in useful for n, _ in node.next_functions)
        ):
            useful.add(node)

    pending: dict[object, list[torch.Tensor | None]] = {}
    delivered = set()

    def deliver(i, g):
        delivered.add(i)
        on_grad(i, dense(g))

    def add(node, slot, g):
        slots = pending.setdefault(node, [])
        if len(slots) <= slot:
            slots.extend([None] * (slot + 1 - len(slots)))
        slots[slot] = g if slots[slot] is None else combine(slots[slot], g)

    for out, cot in zip(outputs, cotangents):
        if out.grad_fn is None:
            if id(out) in leaf_index:
                deliver(leaf_index[id(out)], cot)
        elif out.grad_fn in useful:
            add(out.grad_fn, out.output_nr, cot)

    for node in nodes:
        slots = pending.pop(node, None)
        if slots is None or node not in useful:
            continue
        variable = getattr(node, "variable", None)
        if variable is not None:  # AccumulateGrad of a leaf
            if id(variable) in leaf_index and slots[0] is not None:
                deliver(leaf_index[id(variable)], slots[0])
            continue
        if node in slot_nodes:
            for (n, nr), i in slot_index.items():
                if n is node and nr < len(slots) and slots[nr] is not None:
                    deliver(i, slots[nr])
        nexts = node.next_functions
        needed = [n is not None and n in useful for n, _ in nexts]
        if not any(needed):
            continue
        count = _num_slots(node)
        if count is not None and len(slots) < count:
            slots = slots + [None] * (count - len(slots))
        # Cotangents that factor through a global pool stay factored where a rule keeps them so
        # (fastmtl.engine.factored_cotangents); everywhere else they are materialised first.
        name = node.name()
        grads = factored_rule(name, node, slots, needed, T)
        if grads is None:
            slots = [dense(g) for g in slots]
        if grads is None and node in ghosts and slots[0] is not None:
            ghost = ghost_linear(node, slots[0], needed, share_dtype)
            if ghost is not None:
                grads, share = ghost
                delivered.add(ghosts[node])
                on_gram(ghosts[node], share)
        rule = _RULES.get(name)
        if grads is None and rule is not None:
            grads = rule(node, slots, needed, T)
        if grads is None:
            grads = _generic(node, slots, T)
        del slots
        for (n, nr), g, need in zip(nexts, grads, needed):
            if need and g is not None:
                add(n, nr, g if _factored_as_expected(g, n, nr) else _as_expected(dense(g), n, nr, T))

    for i, p in enumerate(inputs):
        if i not in delivered:
            on_grad(i, torch.zeros((T,) + tuple(p.shape), dtype=p.dtype, device=p.device))
