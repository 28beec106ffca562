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


def native_twin(plain: nn.Module, dropout: float) -> nn.Module:
    """The rechub-style model written with fastmtl.nn, carrying ``plain``'s weights and running
    statistics: MMoE / PLE(norm="batch", dropout, tower_hidden) under MultiTaskModel with one
    binary head per task (each tower's Linear(., 1))."""
    import fastmtl
    from fastmtl.nn import PLE, MMoE, MultiTaskHeads, MultiTaskModel

    towers = list(plain.towers)
    if isinstance(plain, RecMMoE):
        experts = list(plain.experts)
        expert_widths = [m.out_features for m in _linears(experts[0])]
        in_features = experts[0][0].in_features
        tower_widths = [m.out_features for m in _linears(towers[0])][:-1]
        trunk = MMoE(in_features, len(experts), expert_widths, len(towers), norm="batch", dropout=dropout,
                     tower_hidden=tower_widths)  # fmt: skip
        _load_bank(trunk.experts, experts)
        gate_order = list(range(len(experts)))
        gates = trunk.gates
    else:
        specific, shared = len(plain.specific[0]), len(plain.shared)
        own_experts = [e for own in plain.specific for e in own]  # task t's at t * specific, as fastmtl's PLE
        expert_widths = [m.out_features for m in _linears(own_experts[0])]
        in_features = own_experts[0][0].in_features
        tower_widths = [m.out_features for m in _linears(towers[0])][:-1]
        trunk = PLE(in_features, shared, specific, expert_widths, len(towers), norm="batch", dropout=dropout,
                    tower_hidden=tower_widths)  # fmt: skip
        if shared:
            _load_bank(trunk.shared_experts[0], list(plain.shared))
        _load_bank(trunk.task_experts[0], own_experts)
        gate_order = list(range(specific, specific + shared)) + list(range(specific))  # rechub: own, then shared
        gates = trunk.task_gates[0]
    heads = MultiTaskHeads(tower_widths[-1], [fastmtl.Task(f"task{t}", "binary") for t in range(len(towers))])
    with torch.no_grad():
        for t, gate in enumerate(plain.gates):
            gates.weight[t].copy_(gate[0].weight[gate_order])
            gates.bias[t].copy_(gate[0].bias[gate_order])
        _load_bank(trunk.towers, towers)
        for t, tower in enumerate(towers):
            heads.weight[t].copy_(tower[-1].weight[0])
            heads.bias[t].copy_(tower[-1].bias[0])
    return MultiTaskModel(trunk, heads)


def _linears(mlp: nn.Sequential) -> list[nn.Linear]:
    return [m for m in mlp if isinstance(m, nn.Linear)]


@torch.no_grad()
def _load_bank(bank, mlps) -> None:
    """rec_mlp e's Linear / BatchNorm1d layers into row e of a fastmtl ExpertBank (channels
    ``e * n .. (e + 1) * n`` of its flat BatchNorm1d)."""
    for e, mlp in enumerate(mlps):
        norms = [m for m in mlp if isinstance(m, nn.BatchNorm1d)]
        for i, (weight, norm) in enumerate(zip(bank.weights, bank.norms)):
            linear, bn, n = _linears(mlp)[i], norms[i], weight.shape[1]
            weight[e].copy_(linear.weight)
            bank.biases[i][e].copy_(linear.bias)
            rows = slice(e * n, (e + 1) * n)
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(norm, name)[rows].copy_(getattr(bn, name))
