"""The fused trunk op: ``fused_mlp`` (a stack of Linear + activation layers in one call), its typed
wrappers and its fake (meta) kernels. Autograd is registered in C++ (``csrc/ops/``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from ._checks import bias_list, check_devices
from .activations import PRE_ACTIVATION_SAVED, check_activation

__all__ = ["fused_mlp", "fused_mlp_with_saved", "MLPArguments"]


class MLPArguments(NamedTuple):
    """A trunk as the fused ops take it: ``weights`` ``[out_l, in_l]`` per layer, ``biases`` one per
    layer or an empty list for none (the op takes all or none), and the activation name.
    :attr:`fastmtl.nn.FusedMLP.op_arguments` gives those of a module."""

    weights: list[torch.Tensor]
    biases: list[torch.Tensor]
    activation: str

    @property
    def has_bias(self) -> bool:
        return bool(self.biases)


def fused_mlp(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None] | None,
    activation: str = "relu",
) -> torch.Tensor:
    """The whole trunk in one call: ``z_l = act(z_{l-1} W_l^T + b_l)`` for every layer.

    Args:
        x: ``[B, in_features]``, float32, float64, bfloat16 or float16 (16-bit: float32 math, one
            rounding; under ``torch.autocast`` float32 inputs are cast to its dtype).
        weights: ``W_l`` of shape ``[out_l, in_l]`` (as ``nn.Linear.weight``), chained layer to layer.
        biases: ``b_l`` of shape ``[out_l]`` per layer, ``None`` entries for layers without bias, or
            ``None`` for no bias at all.
        activation: ``relu``, ``gelu`` (erf), ``gelu_tanh``, ``silu``, ``tanh`` or ``identity``,
            applied after every layer.

    Returns: ``[B, out_L]``.

    >>> import torch, fastmtl
    >>> x = torch.randn(4, 3)
    >>> ws = [torch.randn(5, 3), torch.randn(2, 5)]
    >>> fastmtl.ops.fused_mlp(x, ws, None, "relu").shape
    torch.Size([4, 2])
    """
    out, _saved = fused_mlp_with_saved(x, weights, biases, activation)
    return out


def fused_mlp_with_saved(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None] | None,
    activation: str = "relu",
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """:func:`fused_mlp` and the activations its backward reads (``saved``: the pre-activations of
    every layer for gelu / gelu_tanh / silu, else the outputs of all but the last layer), which the
    per-task Gram ops (:mod:`fastmtl.ops.per_task`) read instead of running the forward again."""
    weights = list(weights)
    return torch.ops.fastmtl.fused_mlp.default(x, weights, bias_list(biases, weights), activation)


# ---- fake kernels (torch.compile tracing, meta tensors, opcheck)


@torch.library.register_fake("fastmtl::fused_mlp")
def _fused_mlp_fake(x, weights, biases, activation):
    check_activation("fastmtl.fused_mlp", activation)
    check_devices("fused_mlp", "x", x, weights=weights, biases=biases)
    rows = x.shape[0]
    out = x.new_empty((rows, weights[-1].shape[0]))
    kept = weights if activation in PRE_ACTIVATION_SAVED else weights[:-1]
    return out, [x.new_empty((rows, w.shape[0])) for w in kept]


@torch.library.register_fake("fastmtl::fused_mlp_backward")
def _fused_mlp_backward_fake(grad_out, x, weights, out, saved, activation, has_bias, need_input_grad):
    check_devices("fused_mlp_backward", "x", x, grad_out=grad_out, weights=weights, out=out, saved=saved)
    grad_x = x.new_empty(x.shape) if need_input_grad else x.new_empty((0,))
    grad_weights = [w.new_empty(w.shape) for w in weights]
    grad_biases = [x.new_empty((w.shape[0],)) for w in weights] if has_bias else []
    return grad_x, grad_weights, grad_biases
