"""The exact per-task gradients and Gram matrix of any trunk's shared parameters, within a memory
budget: which path runs, and the three paths.

``mtl_backward`` needs ``G = J J^T`` for the T x P Jacobian ``J`` of the shared parameters, given
the T cotangents ``dL_t/dz`` of the trunk's outputs. The paths, chosen by :func:`plan_gram`:

  batched    one ``torch.autograd.grad(..., is_grads_batched=True)`` (vmap) over chunks of tasks: the
             T cotangents go down the trunk as one batch, so every op's GEMM is T times larger.
             Runs when every op on the way batches under vmap (Linear, activations, matmuls, ...).
             The chunk bounds the T-batched intermediates of the backward by the memory budget.
  task-loop  T ordinary backward passes, the t-th from task t's own loss (its edge into the
             ``torch.stack`` of the losses, :func:`task_loss_edges`), so it runs task t's head and
             the trunk: the T-pass loop minus its T^2 head work (a pass from the stacked losses
             with the cotangent e_t runs every head on zeros) and its final weighted backward (the
             update is the Jacobian's weighted sum). The heads' gradients come from one backward
             of sum_t L_t after the passes, as the loop takes them: asked in the passes, they were
             held through the later ones, which put the peak above the loop's.
             Runs when the trunk has an op whose vmap rule loops over the tasks anyway
             (convolution, batch norm, layer norm, flash attention, embedding on torch 2.13 CPU;
             fastmtl's experts, gates and norm towers, whose rule runs their kernel per task):
             there the vmapped backward made the same per-task calls plus stack copies, measured
             1.3-1.6x slower than T passes (CNN B=8, transformer B=32; on the transformer at B=8 it
             was 1.2x faster: the cost model is by op kind, not by size). Folding the tasks into the
             batch or channel axis of one conv backward measured slower still on CPU (mkldnn).
  factored   when the ops whose vmap rule loops (batch norm here) are reached only through a global
             average pool and ops that multiply the cotangents by task-independent tensors (ReLU,
             the residual add), and no gradient is asked below them (a partial Gram over the last
             BatchNorm of a pooled CNN, ``gram_params``): the T cotangents stay ``u_t * w`` with
             one ``w`` (:mod:`fastmtl.engine.factored_cotangents`) and one sweep of
             :func:`~fastmtl.engine.batched_backward.batched_grad` gives the T gradients with one
             pass over the activations for all tasks, where T passes make T of them.
  streamed   when the Jacobian itself would exceed the budget, or when the ghost product of the
             Linear layers saves most of the Gram's work (:mod:`fastmtl.engine.linear_ghost`): one
             sweep of :func:`fastmtl.engine.batched_backward.batched_grad` hands each parameter
             block's T gradients to a callback that adds their share ``g_b g_b^T`` to G and drops
             them (a Linear weight's share comes from the ghost product where that is cheaper, its
             T gradients never formed), so no T x P Jacobian exists; the update is then one
             ordinary backward of ``sum_t a_t dL_t/dz``.

In the first three, the per-task gradients are a :class:`~fastmtl.engine.task_jacobian.TaskJacobian`:
in the task loop each pass is copied into row t of one ``[T, P]`` matrix (the Gram matrix one GEMM,
the update one GEMV, the blocks views of its columns); the vmapped backward's ``[T, *shape]``
blocks are kept as they come (the Gram matrix summed block by block, no concatenation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .batched_backward import GraphWalk, batched_grad
from .factored_cotangents import factors_all_the_way
from .linear_ghost import GHOST_STREAM_MIN_SAVING, ghost_saving, ghost_weights
from .task_jacobian import TaskJacobian, gram_dtype

__all__ = [
    "depends_on",
    "GramPlan",
    "plan_gram",
    "per_task_gradients",
    "per_task_loss_gradients",
    "swept_gradients",
    "task_loss_edges",
    "streamed_gram",
    "update_cosine",
    "DEFAULT_MEMORY_BUDGET",
    "VMAP_LOOPING_NODES",
    "FUSED_LOOPING_NODES",
]

DEFAULT_MEMORY_BUDGET = 512 * 2**20

# fastmtl's own nodes whose batched rule runs the op's kernel once per task (csrc/ops/per_task_batched.cpp:
# the tasks share no work there): the experts, the gates and the towers with norm or dropout. The
# names are GCC's / Clang's (the builds this project makes); tests/test_batched_backward_fused_ops.py
# checks them against the graphs, as another compiler's would differ (its graphs would then take
# the vmapped path, correct and slower).
FUSED_LOOPING_NODES = frozenset(
    {
        "torch::autograd::CppNode<fastmtl::ops::LayerStackFunction<fastmtl::ops::(anonymous namespace)::FusedExpertsOps> >",
        "torch::autograd::CppNode<fastmtl::ops::(anonymous namespace)::GatedMixtureFunction>",
        "torch::autograd::CppNode<fastmtl::ops::(anonymous namespace)::NormTrunkFunction>",
    }
)

# Backward nodes whose vmap batching rule (torch 2.13, CPU) calls the op once per task and stacks the
# results (bench/bench_any_trunk.py --profile counts the calls): a trunk with one goes down the task
# loop, which makes the same calls without the stacks.
VMAP_LOOPING_NODES = (
    frozenset(
        {
            "ConvolutionBackward0",
            "NativeBatchNormBackward0",
            "NativeLayerNormBackward0",
            "ScaledDotProductFlashAttentionForCpuBackward0",
            "EmbeddingBackward0",
        }
    )
    | FUSED_LOOPING_NODES
)


@dataclass(frozen=True)
class GramPlan:
    """Which path computes the exact Gram matrix (``"batched"``, ``"task-loop"``, ``"factored"`` or ``"streamed"``),
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


def depends_on(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> bool:
    """Whether a backward from the outputs reaches any of the inputs. Stops at the first input it
    meets: from the losses to the features it walks the heads, not the trunk."""
    if any(o is i for o in outputs for i in inputs):
        return True
    leaves = {id(p) for p in inputs if p.grad_fn is None}
    slots = {p.grad_fn for p in inputs if p.grad_fn is not None}
    seen, stack = set(), [o.grad_fn for o in outputs if o.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if node in slots:
            return True
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in leaves:
            return True
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions)
    return False


def plan_gram(
    outputs: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    num_tasks: int,
    memory_budget: int | None = None,
    walk: GraphWalk | None = None,
) -> GramPlan:
    """The path for the per-task gradients of ``inputs`` given ``num_tasks`` cotangents of ``outputs``
    (``walk``: the outputs' :class:`~fastmtl.engine.batched_backward.GraphWalk`, if at hand)."""
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
    jacobian_bytes = num_tasks * sum(p.numel() * p.element_size() for p in inputs)
    if jacobian_bytes > budget:
        return GramPlan(
            "streamed",
            num_tasks,
            f"the Jacobian ({jacobian_bytes} bytes) exceeds the memory budget "
            f"({budget}): per-block Gram shares, then one weighted backward",
        )
    walk = GraphWalk(outputs) if walk is None else walk
    nodes = walk.towards(inputs)
    looping = sorted({n.name() for n in nodes} & VMAP_LOOPING_NODES)
    if looping and num_tasks > 1 and factors_all_the_way(walk, nodes, VMAP_LOOPING_NODES):
        return GramPlan(
            "factored",
            num_tasks,
            "the cotangents factor through the global pool into every BatchNorm on the way "
            "(fastmtl.engine.factored_cotangents): one sweep for all tasks",
        )
    if looping or num_tasks == 1:
        why = f"vmap loops over the tasks in {', '.join(looping)}" if looping else "one task"
        return GramPlan("task-loop", 1, why)
    leaf_index = {id(p): i for i, p in enumerate(inputs) if p.grad_fn is None}
    total, saved = ghost_saving(ghost_weights(walk.order, walk.nexts, leaf_index), num_tasks)
    if saved >= GHOST_STREAM_MIN_SAVING and 2 * saved >= total:
        return GramPlan(
            "streamed",
            num_tasks,
            f"the ghost product of the Linear layers saves {saved:.3g} of the {total:.3g} multiply-adds of "
            "their Gram shares (fastmtl.engine.linear_ghost): per-block Gram shares, then one weighted backward",
        )
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
) -> TaskJacobian:
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
                return TaskJacobian(
                    [
                        torch.zeros((T,) + tuple(x.shape), dtype=x.dtype, device=x.device) if g is None else g
                        for g, x in zip(grads, inputs)
                    ]
                )
            return _chunked(outputs, inputs, cotangents, chunk, True)
        except RuntimeError:
            pass
    return _chunked(outputs, inputs, cotangents, 1, retain_graph)


def swept_gradients(
    outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], cotangents: Sequence[torch.Tensor]
) -> TaskJacobian:
    """The per-task gradients of :func:`per_task_gradients` by one sweep of
    :func:`fastmtl.engine.batched_backward.batched_grad` (the "factored" plan: its cotangents stay
    factored through the global pool, so the tasks share each pass over the activations)."""
    blocks: list = [None] * len(inputs)

    def keep(i: int, grad: torch.Tensor) -> None:
        blocks[i] = grad

    batched_grad(outputs, cotangents, inputs, keep)
    return TaskJacobian(blocks)


def _chunked(outputs, inputs, cotangents, chunk: int, retain_graph: bool) -> TaskJacobian:
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
    return TaskJacobian(blocks)


def _one_task_at_a_time(outputs, inputs, cotangents, retain_graph: bool) -> TaskJacobian:
    """T backward passes, the t-th with the cotangents ``c[t]``."""
    T = cotangents[0].shape[0]

    def one_task(t: int, retain: bool):
        grad_outputs = [c[t] for c in cotangents]
        return torch.autograd.grad(outputs, inputs, grad_outputs=grad_outputs, retain_graph=retain, allow_unused=True)

    return TaskJacobian.from_task_passes(T, inputs, one_task, retain_graph)


def task_loss_edges(losses: torch.Tensor) -> list | None:
    """Each task's own loss as an edge of the autograd graph, when ``losses`` is ``torch.stack`` of
    the T scalar losses (or ``torch.cat`` of T one-element ones), the way multi-task code builds it;
    ``None`` for a task whose loss is a constant; the whole result is None when ``losses`` was built
    otherwise. A backward pass from task t's edge runs task t's head only, where one from ``losses``
    with the one-hot cotangent e_t runs every head (the stack hands the others zero gradients,
    which autograd does not skip): T passes cost T heads, not T^2."""
    node = losses.grad_fn
    T = losses.shape[0]
    if node is None or node.name() not in ("StackBackward0", "CatBackward0") or node._saved_dim not in (0, -1):
        return None
    edges = node.next_functions
    if len(edges) != T:
        return None
    out = []
    for fn, nr in edges:
        if fn is None:
            out.append(None)
            continue
        if getattr(fn, "variable", None) is not None:  # a leaf stacked as a loss: no head to skip
            return None
        metadata = getattr(fn, "_input_metadata", None)
        if metadata is None or nr >= len(metadata):
            return None
        numel = 1
        for s in metadata[nr].shape:
            numel *= int(s)
        if numel != 1:
            return None
        out.append((torch.autograd.graph.GradientEdge(fn, nr), metadata[nr]))
    return out


def per_task_loss_gradients(losses: torch.Tensor, inputs: Sequence[torch.Tensor], retain_graph: bool) -> TaskJacobian:
    """``[T, *input.shape]`` per input: ``dL_t/d input`` for every task t (zeros where unused), by T
    backward passes, each from task t's own loss when :func:`task_loss_edges` finds them (so each
    pass runs one head), else from ``losses`` with the cotangent e_t."""
    edges = task_loss_edges(losses)
    T = losses.shape[0]
    eye = None if edges is not None else torch.eye(T, dtype=losses.dtype, device=losses.device)

    def one_task(t: int, retain: bool):
        if edges is None:
            outputs, grad_outputs = [losses], [eye[t]]
        elif edges[t] is None:
            return [None] * len(inputs)
        else:
            edge, metadata = edges[t]
            outputs = [edge]
            grad_outputs = [torch.ones(metadata.shape, dtype=metadata.dtype, device=metadata.device)]
        return torch.autograd.grad(outputs, inputs, grad_outputs=grad_outputs, retain_graph=retain, allow_unused=True)

    return TaskJacobian.from_task_passes(T, inputs, one_task, retain_graph)


def streamed_gram(
    outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], cotangents: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``J J^T`` without J: each input's ``[T, *shape]`` gradient adds its share and is dropped; a
    Linear layer's weight adds its share by the ghost product where that is cheaper
    (:mod:`fastmtl.engine.linear_ghost`), without its T gradients."""
    T = cotangents[0].shape[0]
    dtype = gram_dtype(list(inputs))
    gram = torch.zeros((T, T), dtype=dtype, device=cotangents[0].device)

    def add_share(_index: int, grad: torch.Tensor) -> None:
        flat = grad.reshape(T, -1).to(dtype)
        gram.addmm_(flat, flat.T)

    def add_ghost_share(_index: int, share: torch.Tensor) -> None:  # a Linear weight's, by the ghost product
        gram.add_(share.to(dtype))

    batched_grad(outputs, cotangents, inputs, add_share, add_ghost_share)
    return gram


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
