"""Plain-PyTorch reference of :func:`fastmtl.ops.fused_mlp`: ``nn.functional.linear`` and the
activation, layer by layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["fused_mlp", "activation_fn"]


def activation_fn(name: str):
    """The torch function of an activation name of :func:`fastmtl.ops.fused_mlp`."""
    table = {
        "relu": F.relu,
        "gelu": F.gelu,
        "gelu_tanh": lambda a: F.gelu(a, approximate="tanh"),
        "silu": F.silu,
        "tanh": torch.tanh,
        "identity": lambda a: a,
    }
    if name not in table:
        raise ValueError(
            f"fastmtl.reference.fused_mlp: argument 'activation' expected one of {', '.join(table)}, got {name!r}"
        )
    return table[name]


def fused_mlp(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None] | None,
    activation: str = "relu",
) -> torch.Tensor:
    act = activation_fn(activation)
    biases = [None] * len(weights) if biases is None else list(biases)
    h = x
    for w, b in zip(weights, biases):
        h = act(F.linear(h, w, b))
    return h
