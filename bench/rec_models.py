"""torch-rechub-style multi-task models in plain PyTorch, for bench_rec_towers.py: experts and
towers are rechub's MLP (Linear, BatchNorm1d, ReLU, Dropout per layer), gates are Linear + Softmax,
each task ends in a Linear(., 1); the loss is BCE with logits over the labelled rows of each task."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def rec_mlp(in_features: int, widths: Sequence[int], dropout: float, output_layer: bool) -> nn.Sequential:
    """torch_rechub.basic.layers.MLP as it builds its layers."""
    layers, d = [], in_features
    for w in widths:
        layers += [nn.Linear(d, w), nn.BatchNorm1d(w), nn.ReLU(), nn.Dropout(dropout)]
        d = w
    return nn.Sequential(*layers, *([nn.Linear(d, 1)] if output_layer else []))


class RecMMoE(nn.Module):
    """torch_rechub.models.multi_task.MMOE on a dense input: E expert MLPs, a softmax gate and a tower
    per task."""

    def __init__(self, in_features, num_experts, expert_widths, tower_widths, num_tasks, dropout):
        super().__init__()
        self.experts = nn.ModuleList([rec_mlp(in_features, expert_widths, dropout, False) for _ in range(num_experts)])
        self.gates = nn.ModuleList(
            [nn.Sequential(nn.Linear(in_features, num_experts), nn.Softmax(dim=1)) for _ in range(num_tasks)]
        )
        self.towers = nn.ModuleList([rec_mlp(expert_widths[-1], tower_widths, dropout, True) for _ in range(num_tasks)])

    def forward(self, x):
        experts = torch.stack([e(x) for e in self.experts], dim=1)  # [B, E, h]
        return torch.cat([t((g(x).unsqueeze(2) * experts).sum(1)) for g, t in zip(self.gates, self.towers)], dim=1)


class RecPLE(nn.Module):
    """torch_rechub.models.multi_task.PLE (one CGC level): per-task and shared expert MLPs, a gate per
    task over its own and the shared experts, a tower per task."""

    def __init__(self, in_features, specific, shared, expert_widths, tower_widths, num_tasks, dropout):
        super().__init__()
        self.specific = nn.ModuleList(
            [
                nn.ModuleList([rec_mlp(in_features, expert_widths, dropout, False) for _ in range(specific)])
                for _ in range(num_tasks)
            ]
        )
        self.shared = nn.ModuleList([rec_mlp(in_features, expert_widths, dropout, False) for _ in range(shared)])
        self.gates = nn.ModuleList(
            [nn.Sequential(nn.Linear(in_features, specific + shared), nn.Softmax(dim=1)) for _ in range(num_tasks)]
        )
        self.towers = nn.ModuleList([rec_mlp(expert_widths[-1], tower_widths, dropout, True) for _ in range(num_tasks)])

    def forward(self, x):
        shared = [e(x) for e in self.shared]
        outs = []
        for own, gate, tower in zip(self.specific, self.gates, self.towers):
            experts = torch.stack([e(x) for e in own] + shared, dim=1)
            outs.append(tower((gate(x).unsqueeze(2) * experts).sum(1)))
        return torch.cat(outs, dim=1)


def masked_bce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over tasks of the mean BCE over each task's labelled rows (NaN = missing), in float32."""
    known = ~labels.isnan()
    per_entry = F.binary_cross_entropy_with_logits(logits.float(), labels.nan_to_num(0.0), reduction="none") * known
    return (per_entry.sum(0) / known.sum(0).clamp_min(1)).sum()
