"""Plain PyTorch twins of fastmtl's expert trunks, written as the recommendation libraries write
them (one nn.Sequential per expert / gate / tower, a Python loop over them), built from a fused
module's parameters in float64; and the map from their gradients / buffers back to the fused
module's stacked layout. The oracle of test_nn_experts.py and test_nn_experts_towers.py."""

import torch
from torch import nn

from conftest import PLAIN_ACTIVATIONS, assert_rel_close


def plain_expert(bank, e, activation=None):
    """Tower e of an ExpertBank as nn.Sequential(Linear, [BatchNorm1d | LayerNorm], Act, [Dropout],
    ...) in float64 with its parameters and running statistics; ``.linears`` / ``.norms`` list the
    layers' modules for :func:`stacked_grads`."""
    activation = activation or bank.activation
    layers, linears, norms = [], [], []
    for i, w in enumerate(bank.weights):
        n = w.shape[1]
        linear = nn.Linear(w.shape[2], n, bias=bank.biases is not None).double()
        with torch.no_grad():
            linear.weight.copy_(w[e])
            if bank.biases is not None:
                linear.bias.copy_(bank.biases[i][e])
        layers.append(linear)
        linears.append(linear)
        if bank.norm is not None:
            fused = bank.norms[i]
            if bank.norm == "batch":
                norm = nn.BatchNorm1d(n, eps=fused.eps, momentum=fused.momentum).double()
                rows = slice(e * n, (e + 1) * n)  # channel e * n + j is tower e's feature j
                with torch.no_grad():
                    for name in ("weight", "bias", "running_mean", "running_var"):
                        getattr(norm, name).copy_(getattr(fused, name)[rows])
                    norm.num_batches_tracked.copy_(fused.num_batches_tracked)
            else:
                norm = nn.LayerNorm(n, eps=fused.eps).double()
                with torch.no_grad():
                    norm.weight.copy_(fused.weight[e])
                    norm.bias.copy_(fused.bias[e])
            layers.append(norm)
            norms.append(norm)
        layers.append(PLAIN_ACTIVATIONS[activation]())
        if bank.dropout:
            layers.append(nn.Dropout(bank.dropout))
    plain = nn.Sequential(*layers)
    plain.linears, plain.norms = linears, norms
    return plain


def plain_bank(bank):
    return nn.ModuleList([plain_expert(bank, e) for e in range(bank.weights[0].shape[0])])


def stacked_grads(bank, plains, prefix=""):
    """The gradients of the plain towers in the ExpertBank's layout: ``{name: tensor}`` keyed as
    ``bank.named_parameters()``, plus the BatchNorm running statistics (``running_mean`` /
    ``running_var`` of ``norms.i``) when the bank has them."""
    out = {}
    for i in range(len(bank.weights)):
        out[f"{prefix}weights.{i}"] = torch.stack([p.linears[i].weight.grad for p in plains])
        if bank.biases is not None:
            out[f"{prefix}biases.{i}"] = torch.stack([p.linears[i].bias.grad for p in plains])
        if bank.norm is None:
            continue
        join = torch.cat if bank.norm == "batch" else torch.stack  # BatchNorm1d(E * n) vs [E, n]
        for name in ("weight", "bias"):
            out[f"{prefix}norms.{i}.{name}"] = join([getattr(p.norms[i], name).grad for p in plains])
        if bank.norm == "batch":
            for name in ("running_mean", "running_var"):
                out[f"{prefix}norms.{i}.{name}"] = join([getattr(p.norms[i], name) for p in plains])
    return out


class PlainGate(nn.Module):
    """Gate g of a TaskGates: its hidden tower (if any), then its Linear, as softmax logits."""

    def __init__(self, gates, g):
        super().__init__()
        self.hidden = plain_expert(gates.hidden, g) if gates.hidden is not None else None
        self.linear = nn.Linear(gates.weight.shape[2], gates.weight.shape[1]).double()
        with torch.no_grad():
            self.linear.weight.copy_(gates.weight[g])
            self.linear.bias.copy_(gates.bias[g])

    def forward(self, x):
        return self.linear(x if self.hidden is None else self.hidden(x))


def plain_gates(gates):
    return nn.ModuleList([PlainGate(gates, g) for g in range(gates.weight.shape[0])])


def gate_grads(gates, plains, prefix=""):
    """The plain gates' gradients in the TaskGates' layout (and its hidden bank's buffers)."""
    out = {
        f"{prefix}weight": torch.stack([p.linear.weight.grad for p in plains]),
        f"{prefix}bias": torch.stack([p.linear.bias.grad for p in plains]),
    }
    if gates.hidden is not None:
        out.update(stacked_grads(gates.hidden, [p.hidden for p in plains], prefix + "hidden."))
    return out


def mix(gate, x, outs):
    """softmax(gate(x)) over the experts' outputs ``outs`` ``[B, E, h]``."""
    return (torch.softmax(gate(x), dim=-1).unsqueeze(-1) * outs).sum(1)


class PlainMMoE(nn.Module):
    def __init__(self, fused, activation=None):
        super().__init__()
        if activation is not None:
            assert activation == fused.experts.activation
        self.experts = plain_bank(fused.experts)
        self.gates = plain_gates(fused.gates)
        self.towers = plain_bank(fused.towers) if fused.towers is not None else None

    def forward(self, x):
        outs = torch.stack([expert(x) for expert in self.experts], dim=1)  # [B, E, h]
        mixtures = [mix(gate, x, outs) for gate in self.gates]
        return mixtures if self.towers is None else [tower(m) for tower, m in zip(self.towers, mixtures)]

    def grads(self, fused):
        """Every gradient (and running statistic) in the fused MMoE's named_parameters layout."""
        out = stacked_grads(fused.experts, self.experts, "experts.")
        out.update(gate_grads(fused.gates, self.gates, "gates."))
        if self.towers is not None:
            out.update(stacked_grads(fused.towers, self.towers, "towers."))
        return out


class PlainPLE(nn.Module):
    def __init__(self, fused, activation=None):
        super().__init__()
        self.S, self.P, self.T, self.L = (
            fused.num_shared_experts,
            fused.num_task_experts,
            fused.num_tasks,
            fused.num_levels,
        )
        # Level l's experts in the gates' order: the S shared ones, then task t's P at S + t P.
        self.experts = nn.ModuleList(
            [
                nn.ModuleList(
                    (list(plain_bank(fused.shared_experts[level])) if self.S else [])
                    + (list(plain_bank(fused.task_experts[level])) if self.P else [])
                )
                for level in range(self.L)
            ]
        )
        self.task_gates = nn.ModuleList([plain_gates(g) for g in fused.task_gates])
        self.shared_gates = nn.ModuleList([plain_gates(g) for g in fused.shared_gates])
        self.towers = plain_bank(fused.towers) if fused.towers is not None else None

    def forward(self, x):
        S, P, T = self.S, self.P, self.T
        shared, tasks = x, [x] * T
        for level in range(self.L):
            shared_out = [self.experts[level][e](shared) for e in range(S)]
            task_out = [[self.experts[level][S + t * P + p](tasks[t]) for p in range(P)] for t in range(T)]
            new_tasks = [
                mix(self.task_gates[level][t], tasks[t], torch.stack(shared_out + task_out[t], dim=1)) for t in range(T)
            ]
            if level + 1 < self.L and S:
                everything = torch.stack(shared_out + [o for outs in task_out for o in outs], dim=1)
                shared = mix(self.shared_gates[level][0], shared, everything)
            tasks = new_tasks
        return tasks if self.towers is None else [tower(t) for tower, t in zip(self.towers, tasks)]

    def grads(self, fused):
        out = {}
        S = self.S
        for level, bank in enumerate(fused.shared_experts):
            out.update(stacked_grads(bank, self.experts[level][:S], f"shared_experts.{level}."))
        for level, bank in enumerate(fused.task_experts):
            out.update(stacked_grads(bank, self.experts[level][S:], f"task_experts.{level}."))
        for level, gates in enumerate(fused.task_gates):
            out.update(gate_grads(gates, self.task_gates[level], f"task_gates.{level}."))
        for level, gates in enumerate(fused.shared_gates):
            out.update(gate_grads(gates, self.shared_gates[level], f"shared_gates.{level}."))
        if self.towers is not None:
            out.update(stacked_grads(fused.towers, self.towers, "towers."))
        return out


def assert_grads_match(fused, expected, rtol=1e-5):
    """Every parameter gradient (and BatchNorm running statistic) of ``fused`` equals the plain
    twin's ``expected`` (``{name: tensor}``, from its ``grads``), and none is left unchecked."""
    checked = set()
    for name, p in fused.named_parameters():
        assert name in expected, f"no plain gradient for {name}"
        weight_grad = expected.get(name.replace("biases.", "weights."))
        if ".biases." in name and expected[name].abs().max() < 1e-9 * weight_grad.abs().max():
            # A bias before a training-mode BatchNorm: its gradient is 0 (the batch mean cancels
            # it); the float32 sum of cancelling terms is judged at the layer's gradient scale.
            assert p.grad.abs().max() <= rtol * weight_grad.abs().max(), f"gradient of {name}: expected ~0"
        else:
            assert_rel_close(p.grad, expected[name], rtol=rtol, what=f"gradient of {name}")
        checked.add(name)
    for name, buffer in fused.named_buffers():
        if name in expected:
            assert_rel_close(buffer, expected[name], rtol=rtol, what=name)
            checked.add(name)
    assert checked == set(expected), f"plain values never compared: {set(expected) - checked}"
