"""The exact per-task gradients and Gram matrix of any trunk's shared parameters, within a memory
budget: which path runs, and the three paths.

``mtl_backward`` needs ``G = J J^T`` for the T x P Jacobian ``J`` of the shared parameters, given
the T cotangents ``dL_t/dz`` of the trunk's outputs. The paths, chosen by :func:`plan_gram`:

  batched    one ``torch.autograd.grad(..., is_grads_batched=True)`` (vmap) over chunks of tasks: the
             T cotangents go down the trunk as one batch, so every op's GEMM is T times larger.
             Runs when every op on the way batches under vmap (Linear, activations, matmuls, ...).
             The chunk bounds the T-batched intermediates of the backward by the memory budget.
  task-loop  T ordinary backward passes from the losses (the T-pass loop without its stack and
             concatenation copies; no T x feature cotangents held). Runs when the trunk has an op
             whose vmap rule loops over the tasks anyway (convolution, batch norm, layer norm,
             flash attention, embedding on torch 2.13 CPU): there the vmapped backward made the same
             per-task calls plus stack copies, measured 1.3-1.6x slower than T passes (CNN B=8,
             transformer B=32; on the transformer at B=8 it was 1.2x faster: the cost model is
             by op kind, not by size).
  streamed   when the Jacobian itself would exceed the budget: one sweep of
             :func:`fastmtl.engine.batched_backward.batched_grad` hands each parameter block's T gradients
             to a callback that adds their share ``g_b g_b^T`` to G and drops them, so no T x P
             Jacobian exists; the update is then one ordinary backward of ``sum_t a_t dL_t/dz``.

In the first two, the per-task gradients stay as one ``[T, *shape]`` tensor per parameter block:
the Gram matrix is the sum of the blocks' ``g_b g_b^T`` (no concatenation into T x P), and the
update ``sum_t a_t g_t`` is one ``tensordot`` per block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .batched_backward import batched_grad, graph_nodes

__all__ = [
    "depends_on",
    "GramPlan",
    "plan_gram",
    "per_task_gradients",
    "blocks_gram",
    "streamed_gram",
    "weighted_sum",
    "update_cosine",
    "DEFAULT_MEMORY_BUDGET",
    "VMAP_LOOPING_NODES",
]

DEFAULT_MEMORY_BUDGET = 512 * 2**20

# Backward nodes whose vmap batching rule (torch 2.13, CPU) calls the op once per task and stacks the
# results (bench/bench_any_trunk.py --profile counts the calls).
VMAP_LOOPING_NODES = frozenset(
    {
        "ConvolutionBackward0",
        "NativeBatchNormBackward0",
        "NativeLayerNormBackward0",
        "ScaledDotProductFlashAttentionForCpuBackward0",
        "EmbeddingBackward0",
    }
)


@dataclass(frozen=True)
class GramPlan:
    """Which path computes the exact Gram matrix (``"batched"``, ``"task-loop"`` or ``"streamed"``),
    how many tasks go down the trunk together, and why."""

    path: str
    chunk: int
    reason: str


def _gradient_bytes(nodes) -> list[int]:
    """Bytes of the gradient each backward node takes in (its forward output), one task's worth."""
    sizes = []
    for node in nodes:
        for meta in getattr(node, "_input_metadata", ()) or ():
            numel = 1
            for s in meta.shape:
                numel *= int(s)
            sizes.append(numel * meta.dtype.itemsize if meta.dtype.is_floating_point else 0)
    return sizes


def _nodes_towards(outputs, inputs) -> list:
    """The backward nodes on a path from the outputs to one of the inputs: the part of the graph a
    backward with respect to the inputs runs (a partial Gram over the last layers stops early)."""
    leaves = {id(p) for p in inputs if p.grad_fn is None}
    slots = {p.grad_fn for p in inputs if p.grad_fn is not None}
    useful = []
    marked = set()
    for node in reversed(graph_nodes(outputs)):  # children first
        variable = getattr(node, "variable", None)
        if (
            (variable is not None and id(variable) in leaves)
            or node in slots
            or any(n in marked for n, _ in node.next_functions)
        ):
            marked.add(node)
            useful.append(node)
    return useful


def depends_on(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> bool:
    """Whether a backward from the outputs reaches any of the inputs."""
    return bool(_nodes_towards(outputs, inputs)) or any(o is i for o in outputs for i in inputs)


def plan_gram(
    outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], num_tasks: int, memory_budget: int | None = None
) -> GramPlan:
    """The path for the per-task gradients of ``inputs`` given ``num_tasks`` cotangents of ``outputs``."""
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
    jacobian_bytes = num_tasks * sum(p.numel() * p.element_size() for p in inputs)
    if jacobian_bytes > budget:
        return GramPlan(
            "streamed",
            num_tasks,
            f"the Jacobian ({jacobian_bytes} bytes) exceeds the memory budget "
            f"({budget}): per-block Gram shares, then one weighted backward",
        )
    nodes = _nodes_towards(outputs, inputs)
    looping = sorted({n.name() for n in nodes} & VMAP_LOOPING_NODES)
    if looping or num_tasks == 1:
        why = f"vmap loops over the tasks in {', '.join(looping)}" if looping else "one task"
        return GramPlan("task-loop", 1, why)
    # A backward holds a few gradients at a time: the largest two bound what one task adds.
    sizes = sorted(_gradient_bytes(nodes), reverse=True)
    per_task = max(1, sum(sizes[:2]))
    chunk = int(max(1, min(num_tasks, (budget - jacobian_bytes) // per_task)))
    if chunk == 1:
        return GramPlan("task-loop", 1, f"one task's intermediates ({per_task} bytes) fill the memory budget")
    return GramPlan(
        "batched",
        chunk,
        f"{chunk} of {num_tasks} tasks per vmapped backward ({per_task} bytes of intermediates per task)",
    )


def per_task_gradients(
    outputs: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    cotangents: Sequence[torch.Tensor],
    chunk: int,
    retain_graph: bool,
) -> list[torch.Tensor]:
    """``[T, *input.shape]`` per input: for every t the gradient of ``sum_j <cotangents[j][t], outputs[j]>``
    (zeros where an input is unused), ``chunk`` tasks per backward (vmapped when ``chunk > 1``). A
    vmapped backward that fails (an op without a batching rule) is redone one task at a time."""
    T = cotangents[0].shape[0]
    if chunk > 1:
        try:
            # retain_graph: a vmapped backward can fail part-way, after freeing buffers the retry needs.
            if chunk >= T:
                grads = torch.autograd.grad(
                    outputs,
                    inputs,
                    grad_outputs=list(cotangents),
                    is_grads_batched=True,
                    retain_graph=True,
                    allow_unused=True,
                )
                return [
                    torch.zeros((T,) + tuple(x.shape), dtype=x.dtype, device=x.device) if g is None else g
                    for g, x in zip(grads, inputs)
                ]
            return _chunked(outputs, inputs, cotangents, chunk, True)
        except RuntimeError:
            pass
    return _chunked(outputs, inputs, cotangents, 1, retain_graph)


def _chunked(outputs, inputs, cotangents, chunk: int, retain_graph: bool) -> list[torch.Tensor]:
    T = cotangents[0].shape[0]
    if chunk == 1:
        return _one_task_at_a_time(outputs, inputs, cotangents, retain_graph)
    blocks = [torch.zeros((T,) + tuple(x.shape), dtype=x.dtype, device=x.device) for x in inputs]
    for start in range(0, T, chunk):
        stop = min(T, start + chunk)
        batched = stop - start > 1
        part = [c[start:stop] if batched else c[start] for c in cotangents]
        grads = torch.autograd.grad(
            outputs,
            inputs,
            grad_outputs=part,
            is_grads_batched=batched,
            retain_graph=retain_graph or stop < T,
            allow_unused=True,
        )
        for block, g in zip(blocks, grads):
            if g is not None:
                block[start:stop] = g
    return blocks


def _one_task_at_a_time(outputs, inputs, cotangents, retain_graph: bool) -> list[torch.Tensor]:
    """T backward passes; each block's T gradients are stacked only after the last pass, and each
    task's copy is dropped as its block is stacked, so memory peaks at T x P plus one block (the
    T-pass loop's stack of concatenated rows peaks at 2 T x P)."""
    T = cotangents[0].shape[0]
    rows = []
    for t in range(T):
        grads = torch.autograd.grad(
            outputs,
            inputs,
            grad_outputs=[c[t] for c in cotangents],
            retain_graph=retain_graph or t + 1 < T,
            allow_unused=True,
        )
        rows.append(list(grads))
    blocks = []
    for i, x in enumerate(inputs):
        parts = [torch.zeros_like(x) if row[i] is None else row[i] for row in rows]
        blocks.append(torch.stack(parts))
        for row in rows:
            row[i] = None
        del parts
    return blocks


def _gram_dtype(tensors) -> torch.dtype:
    """The dtype a Gram matrix of these gradients is summed in: their promoted dtype, float32 for
    16-bit gradients (a bfloat16 Gram keeps 3 digits, fewer than the aggregators need)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def gram_of(flat: torch.Tensor) -> torch.Tensor:
    """``flat @ flat.T`` of a ``[T, N]`` matrix, summed in :func:`_gram_dtype`."""
    flat = flat.to(_gram_dtype([flat]))
    return flat @ flat.T


def blocks_gram(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """``J J^T`` of the Jacobian whose column blocks are ``blocks`` (each ``[T, *shape]``)."""
    T = blocks[0].shape[0]
    dtype = _gram_dtype(blocks)
    gram = torch.zeros((T, T), dtype=dtype, device=blocks[0].device)
    for block in blocks:
        flat = block.reshape(T, -1).to(dtype)
        gram.addmm_(flat, flat.T)
    return gram


def streamed_gram(
    outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], cotangents: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``J J^T`` without J: each input's ``[T, *shape]`` gradient adds its share and is dropped."""
    T = cotangents[0].shape[0]
    dtype = _gram_dtype(list(inputs))
    gram = torch.zeros((T, T), dtype=dtype, device=cotangents[0].device)

    def add_share(_index: int, grad: torch.Tensor) -> None:
        flat = grad.reshape(T, -1).to(dtype)
        gram.addmm_(flat, flat.T)

    batched_grad(outputs, cotangents, inputs, add_share)
    return gram


def weighted_sum(weights: torch.Tensor, stacked: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``sum_t weights[t] x[t]`` for every ``[T, ...]`` tensor x."""
    return [torch.tensordot(weights.to(x.dtype), x, dims=1) for x in stacked]


def update_cosine(update: Sequence[torch.Tensor | None], exact: Sequence[torch.Tensor | None]) -> float:
    """The cosine between two updates of the same parameters, over all their blocks (a missing
    block is zero); 1.0 when both are zero, 0.0 when one is."""
    dot = norm_u = norm_e = 0.0
    for u, e in zip(update, exact):
        u64 = None if u is None else u.detach().double()
        e64 = None if e is None else e.detach().double()
        if u64 is not None:
            norm_u += float((u64 * u64).sum())
        if e64 is not None:
            norm_e += float((e64 * e64).sum())
        if u64 is not None and e64 is not None:
            dot += float((u64 * e64).sum())
    if norm_u == 0.0 and norm_e == 0.0:
        return 1.0
    if norm_u == 0.0 or norm_e == 0.0:
        return 0.0
    return dot / (norm_u**0.5 * norm_e**0.5)
