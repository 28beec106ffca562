"""The fused Mixture-of-Experts ops: ``fused_experts`` (E expert MLPs in one call) and
``gated_mixture`` (every task's softmax gate and mixture in one call), their fake kernels, and
typed wrappers. Autograd is registered in C++ (``csrc/ops/experts_autograd.cpp``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._checks import bias_list, check_devices
from .activations import PRE_ACTIVATION_SAVED, check_activation

__all__ = ["fused_experts", "gated_mixture", "gated_mixture_flat", "expert_index_list"]


def fused_experts(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None] | None,
    activation: str = "relu",
) -> torch.Tensor:
    """E expert MLPs in one call: expert e computes ``h_l = act(h_{l-1} W_l[e]^T + b_l[e])``.

    Per layer one GEMM over all experts (a single ``mm`` of ``E * out`` columns for the first layer
    when the experts share ``x``, a batched GEMM otherwise) and one fused bias + activation pass.

    Args:
        x: ``[B, d0]`` (the same input for every expert) or ``[E, B, d0]`` (one input per expert).
        weights: ``W_l`` of shape ``[E, out_l, in_l]``, chained layer to layer.
        biases: ``b_l`` of shape ``[E, out_l]`` per layer (``None`` entries for layers without),
            or ``None``.
        activation: as :func:`fastmtl.ops.fused_mlp`, after every layer.

    Returns: ``[E, B, out_L]``.

    >>> import torch, fastmtl
    >>> x = torch.randn(4, 3)
    >>> ws = [torch.randn(8, 5, 3), torch.randn(8, 2, 5)]
    >>> fastmtl.ops.fused_experts(x, ws, None, "relu").shape
    torch.Size([8, 4, 2])
    """
    weights = list(weights)
    out, _saved = torch.ops.fastmtl.fused_experts.default(
        x, weights, bias_list(biases, weights, "fused_experts"), activation
    )
    return out


def expert_index_list(expert_index) -> list:
    """``expert_index`` ([T, K] nested sequence or int tensor, or None) as the op's flat int list."""
    if expert_index is None:
        return []
    if isinstance(expert_index, torch.Tensor):
        if expert_index.dtype.is_floating_point or expert_index.dtype == torch.bool:
            raise TypeError(
                f"fastmtl.gated_mixture: argument 'expert_index' expected integers, got {expert_index.dtype}"
            )
        return [int(i) for i in expert_index.reshape(-1).tolist()]
    flat = []
    for row in expert_index:
        for i in row:
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"fastmtl.gated_mixture: argument 'expert_index' expected integers, got {i!r}")
            flat.append(i)
    return flat


def gated_mixture(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    experts: torch.Tensor,
    expert_index: None | Sequence[Sequence[int]] | torch.Tensor = None,
) -> torch.Tensor:
    """Every task's softmax gate over experts and its mixture, in one call.

    ``out[t] = sum_k softmax_k(x_t gate_weight[t]^T + gate_bias[t]) * experts[expert_index[t][k]]``,
    with the logits of all tasks from one GEMM.

    Args:
        x: gate input ``[B, d]`` shared by the tasks, or ``[T, B, d]`` one per task.
        gate_weight: ``[T, K, d]``; gate_bias: ``[T, K]`` or ``None``.
        experts: ``[E, B, h]`` (e.g. from :func:`fused_experts`).
        expert_index: ``[T, K]`` the expert each gate entry weighs (PLE's gates see a subset), or
            ``None`` for ``K = E`` and every gate over all experts (MMoE).

    Returns: ``[T, B, h]``.

    >>> import torch, fastmtl
    >>> x, experts = torch.randn(4, 3), torch.randn(5, 4, 2)
    >>> fastmtl.ops.gated_mixture(x, torch.randn(2, 5, 3), None, experts).shape
    torch.Size([2, 4, 2])
    """
    return gated_mixture_flat(x, gate_weight, gate_bias, experts, expert_index_list(expert_index))


def gated_mixture_flat(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    experts: torch.Tensor,
    flat_index: list[int],
) -> torch.Tensor:
    """:func:`gated_mixture` with ``expert_index`` already flattened by :func:`expert_index_list`
    (``[]`` for every gate over all experts): what a module checks once and keeps, so that its
    forward does not convert it again."""
    out, _gates = torch.ops.fastmtl.gated_mixture.default(x, gate_weight, gate_bias, experts, flat_index)
    return out


@torch.library.register_fake("fastmtl::fused_experts")
def _fused_experts_fake(x, weights, biases, activation):
    check_activation("fastmtl.fused_experts", activation)
    check_devices("fused_experts", "x", x, weights=weights, biases=biases)
    experts, rows = weights[0].shape[0], x.shape[-2]
    kept = weights if activation in PRE_ACTIVATION_SAVED else weights[:-1]
    return x.new_empty((experts, rows, weights[-1].shape[1])), [x.new_empty((experts, rows, w.shape[1])) for w in kept]


@torch.library.register_fake("fastmtl::fused_experts_backward")
def _fused_experts_backward_fake(grad_out, x, weights, out, saved, activation, has_bias, need_input_grad):
    check_devices("fused_experts_backward", "x", x, grad_out=grad_out, weights=weights, out=out, saved=saved)
    grad_x = x.new_empty(x.shape) if need_input_grad else x.new_empty((0,))
    grad_weights = [w.new_empty(w.shape) for w in weights]
    grad_biases = [x.new_empty(w.shape[:2]) for w in weights] if has_bias else []
    return grad_x, grad_weights, grad_biases


def _gate_shape(x, gate_weight):
    tasks, width = gate_weight.shape[0], gate_weight.shape[1]
    return (x.shape[0], tasks, width) if x.dim() == 2 else (tasks, x.shape[1], width)


@torch.library.register_fake("fastmtl::gated_mixture")
def _gated_mixture_fake(x, gate_weight, gate_bias, experts, expert_index):
    check_devices("gated_mixture", "x", x, gate_weight=gate_weight, gate_bias=gate_bias, experts=experts)
    mixtures = x.new_empty((gate_weight.shape[0], x.shape[-2], experts.shape[2]))
    return mixtures, x.new_empty(_gate_shape(x, gate_weight))


@torch.library.register_fake("fastmtl::gated_mixture_backward")
def _gated_mixture_backward_fake(grad_mixtures, x, gate_weight, experts, gates, expert_index, has_bias, need_x_grad):
    check_devices(
        "gated_mixture_backward",
        "x",
        x,
        grad_mixtures=grad_mixtures,
        gate_weight=gate_weight,
        experts=experts,
        gates=gates,
    )
    grad_x = x.new_empty(x.shape) if need_x_grad else x.new_empty((0,))
    grad_bias = x.new_empty(gate_weight.shape[:2]) if has_bias else x.new_empty((0,))
    return grad_x, gate_weight.new_empty(gate_weight.shape), grad_bias, experts.new_empty(experts.shape)
