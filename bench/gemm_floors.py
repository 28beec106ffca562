"""GEMM floors: only the GEMMs of a step (``torch.mm`` / ``torch.bmm`` on the step's shapes, into
preallocated outputs, on random data: GEMM time does not depend on the values). They bound what any
implementation of that arithmetic can reach on this machine; a step's time over its floor says how
much is left for everything that is not a GEMM. Each ``make_*`` returns the floor's step callable.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _randn(device, dtype):
    return lambda *shape: torch.randn(*shape, device=device, dtype=dtype)


def _trunk_backward(weights, activations, deltas, weight_grads) -> None:
    """Per layer from the top, dW, and dX on every layer but the first (x needs no gradient)."""
    for layer in reversed(range(len(weights))):
        torch.mm(deltas[layer + 1].t(), activations[layer], out=weight_grads[layer])
        if layer > 0:
            torch.mm(deltas[layer + 1], weights[layer], out=deltas[layer])


def _trunk_forward(weights, activations) -> None:
    for layer, w in enumerate(weights):
        torch.mm(activations[layer], w.t(), out=activations[layer + 1])


def _trunk_buffers(size, device, dtype):
    """Weights, layer inputs X_0 .. X_L (X_L the trunk output), the cotangent of each layer's output
    and the weight gradients of a size's MLP trunk."""
    new = _randn(device, dtype)
    widths = (size.in_features,) + tuple(size.hidden)
    weights = [new(fan_out, fan_in) for fan_in, fan_out in zip(widths[:-1], widths[1:])]
    activations = [new(size.batch, w) for w in widths]
    deltas = [new(size.batch, w) for w in widths]
    return weights, activations, deltas, [torch.empty_like(w) for w in weights]


def make_step_floor(size, head_rows: int, device="cpu", dtype=None) -> Callable[[], None]:
    """The summed-loss step's GEMMs: one per trunk layer and the head GEMM forward; backward the
    head's dW and dZ, then the trunk's (bias gradients are reductions, not GEMMs)."""
    new = _randn(device, dtype)
    weights, activations, deltas, weight_grads = _trunk_buffers(size, device, dtype)
    head, logits, logit_grad = new(head_rows, size.hidden[-1]), new(size.batch, head_rows), new(size.batch, head_rows)
    head_grad = new(head_rows, size.hidden[-1])

    def step_floor() -> None:
        _trunk_forward(weights, activations)
        torch.mm(activations[-1], head.t(), out=logits)
        torch.mm(logit_grad.t(), activations[-1], out=head_grad)
        torch.mm(logit_grad, head, out=deltas[-1])
        _trunk_backward(weights, activations, deltas, weight_grads)

    return step_floor


def make_trunk_floor(size, device="cpu", dtype=None) -> Callable[[], None]:
    """The trunk's GEMMs only (forward and backward, no head): the roofline's floor."""
    weights, activations, deltas, weight_grads = _trunk_buffers(size, device, dtype)

    def trunk_floor() -> None:
        _trunk_forward(weights, activations)
        _trunk_backward(weights, activations, deltas, weight_grads)

    return trunk_floor


def trunk_flops(size) -> int:
    """FLOPs of the trunk's GEMMs in forward + backward: per layer 2*B*in*out for the forward, the
    same for dW, and for dX on every layer but the first (x needs no gradient)."""
    widths = (size.in_features,) + tuple(size.hidden)
    per_layer = [2 * size.batch * fan_in * fan_out for fan_in, fan_out in zip(widths[:-1], widths[1:])]
    return 3 * sum(per_layer) - per_layer[0]


def ghost_is_cheaper(tasks: int, rows: int, d_in: int, d_out: int) -> bool:
    """The engine's cost model (csrc/cpu/mtl_engine.h), so the floor takes the path the engine takes."""
    materialise = tasks * rows * d_in * d_out + tasks * tasks * d_in * d_out
    ghost = rows * rows * d_in + tasks * rows * rows * d_out + tasks * tasks * rows * d_out
    return ghost < materialise


def make_loop_floor(size, tasks) -> Callable[[], None]:
    """The LibMTL loop's GEMMs (float32, CPU): the trunk forward and every head's; per task the head's
    cotangent and the trunk backward; the Gram of the stacked Jacobian and the weighted row sum; the
    heads' own backward, per task."""
    B, T = size.batch, len(tasks)
    weights, acts, deltas, weight_grads = _trunk_buffers(size, "cpu", torch.float32)
    d = size.hidden[-1]
    heads = [torch.randn(t.num_outputs, d) for t in tasks]
    num_params = sum(w.numel() for w in weights)
    jacobian, gram, update = torch.randn(T, num_params), torch.empty(T, T), torch.empty(1, num_params)
    head_logits = [torch.empty(B, t.num_outputs) for t in tasks]
    head_grads = [torch.randn(B, t.num_outputs) for t in tasks]
    head_weight_grads = [torch.empty_like(h) for h in heads]
    task_weights = torch.ones(1, T)

    def loop_floor() -> None:
        _trunk_forward(weights, acts)
        for h, out in zip(heads, head_logits):
            torch.mm(acts[-1], h.t(), out=out)
        for h, g in zip(heads, head_grads):
            torch.mm(g, h, out=deltas[-1])
            _trunk_backward(weights, acts, deltas, weight_grads)
        torch.mm(jacobian, jacobian.t(), out=gram)
        torch.mm(task_weights, jacobian, out=update)
        for g, out in zip(head_grads, head_weight_grads):
            torch.mm(g.t(), acts[-1], out=out)

    return loop_floor


def make_exact_engine_floor(size, tasks) -> Callable[[], None]:
    """fastmtl's exact engine's GEMMs (float32, CPU): the trunk forward and the head GEMM; per layer
    from the top the Gram share by the path the cost model picks and the T cotangents' propagation;
    then the one weighted backward."""
    B, T = size.batch, len(tasks)
    weights, acts, deltas, weight_grads = _trunk_buffers(size, "cpu", torch.float32)
    dims = (size.in_features,) + tuple(size.hidden)
    C = sum(t.num_outputs for t in tasks)
    head, logits, logit_grad = torch.randn(C, dims[-1]), torch.empty(B, C), torch.randn(B, C)
    task_deltas = [torch.randn(B, T * w) for w in dims]
    per_task = [torch.empty(T * w.shape[0], w.shape[1]) for w in weights]
    kernels = torch.empty(B, B)
    kernel_deltas = [torch.empty(B, T * w) for w in dims]
    layer_gram, head_grad = torch.empty(T, T), torch.empty_like(head)
    ghost = [ghost_is_cheaper(T, B, w.shape[1], w.shape[0]) for w in weights]

    def exact_floor() -> None:
        _trunk_forward(weights, acts)
        torch.mm(acts[-1], head.t(), out=logits)
        for layer in reversed(range(len(weights))):
            d_out, d_in = weights[layer].shape
            delta = task_deltas[layer + 1]
            if ghost[layer]:
                torch.mm(acts[layer], acts[layer].t(), out=kernels)
                torch.mm(kernels, delta, out=kernel_deltas[layer + 1])
                torch.bmm(delta.view(B, T, d_out), kernel_deltas[layer + 1].view(B, T, d_out).transpose(1, 2))
            else:
                torch.mm(delta.t(), acts[layer], out=per_task[layer])
                flat = per_task[layer].view(T, -1)
                torch.mm(flat, flat.t(), out=layer_gram)
            if layer > 0:
                torch.mm(delta.view(B * T, d_out), weights[layer], out=task_deltas[layer].view(B * T, d_in))
        torch.mm(logit_grad.t(), acts[-1], out=head_grad)
        torch.mm(logit_grad, head, out=deltas[-1])
        _trunk_backward(weights, acts, deltas, weight_grads)

    return exact_floor


def make_mmoe_floor(batch: int, in_features: int, num_experts: int, expert_hidden, num_tasks: int):
    """The GEMMs of fastmtl's MMoE step (float32, CPU; forward and backward, x without gradient): the
    first expert layer of all experts as one GEMM, the deeper ones batched, the gates, the heads."""
    B, d, E, T, widths = batch, in_features, num_experts, num_tasks, tuple(expert_hidden)
    x, w0 = torch.randn(B, d), torch.randn(E * widths[0], d)
    deeper = [(torch.randn(E, B, a), torch.randn(E, b, a), torch.randn(E, B, b)) for a, b in zip(widths, widths[1:])]
    deeper_outs = [
        (torch.empty(E, B, w.shape[1]), torch.empty(w.shape), torch.empty(E, B, w.shape[2])) for _, w, _ in deeper
    ]
    gate_w, head_w = torch.randn(T * E, d), torch.randn(T, T * widths[-1])
    z_side, dlogits = torch.randn(B, T * widths[-1]), torch.randn(B, T)
    delta0, dgate = torch.randn(B, E * widths[0]), torch.randn(B, T * E)
    h0, dw0, g, dg = (
        torch.empty(B, E * widths[0]),
        torch.empty(E * widths[0], d),
        torch.empty(B, T * E),
        torch.empty(T * E, d),
    )
    logits, dz, dh = torch.empty(B, T), torch.empty(B, T * widths[-1]), torch.empty(T, T * widths[-1])

    def mmoe_floor() -> None:
        torch.mm(x, w0.t(), out=h0)
        for (h, w, delta), (out, dw, dgrad) in zip(deeper, deeper_outs):
            torch.bmm(h, w.transpose(1, 2), out=out)
            torch.bmm(delta.transpose(1, 2), h, out=dw)
            torch.bmm(delta, w, out=dgrad)
        torch.mm(x, gate_w.t(), out=g)
        torch.mm(z_side, head_w.t(), out=logits)
        torch.mm(dlogits, head_w, out=dz)
        torch.mm(dlogits.t(), z_side, out=dh)
        torch.mm(dgate.t(), x, out=dg)
        torch.mm(delta0.t(), x, out=dw0)

    return mmoe_floor
