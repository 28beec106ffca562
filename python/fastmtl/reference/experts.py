"""Plain-PyTorch references of the Mixture-of-Experts ops: a Python loop over experts and tasks,
as the recommendation libraries write it. The oracle of tests/test_ops_experts.py."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .trunk import fused_mlp

__all__ = ["fused_experts", "gated_mixture"]


def fused_experts(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None] | None,
    activation: str = "relu",
) -> torch.Tensor:
    # Expert e is the plain MLP of its slices of the stacked parameters.
    biases = [None] * len(weights) if biases is None else list(biases)
    return torch.stack(
        [
            fused_mlp(
                x if x.dim() == 2 else x[e],
                [w[e] for w in weights],
                [None if b is None else b[e] for b in biases],
                activation,
            )
            for e in range(weights[0].shape[0])
        ]
    )


def gated_mixture(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    experts: torch.Tensor,
    expert_index=None,
) -> torch.Tensor:
    tasks, width = gate_weight.shape[0], gate_weight.shape[1]
    if expert_index is None:
        expert_index = [list(range(width))] * tasks
    elif isinstance(expert_index, torch.Tensor):
        expert_index = expert_index.tolist()
    mixtures = []
    for t in range(tasks):
        xt = x if x.dim() == 2 else x[t]
        gates = torch.softmax(F.linear(xt, gate_weight[t], None if gate_bias is None else gate_bias[t]), dim=-1)
        chosen = experts[list(expert_index[t])]  # [K, B, h]
        mixtures.append((gates.t().unsqueeze(-1) * chosen).sum(0))
    return torch.stack(mixtures)
