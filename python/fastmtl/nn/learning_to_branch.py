"""Learning to Branch (Guo, Lee & Ulbricht 2020): a tree of layers whose branching is learned;
every node picks its parent in the layer below through a Gumbel-softmax over learned logits."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._arch_checks import check_activation, check_count, check_float, check_input, check_widths
from ._init import linear_init_


class LearningToBranch(nn.Module):
    """Layer ``l`` has ``N_l`` nodes, each one ``act(W x + b)`` layer of width ``hidden_features[l]``;
    ``N_1 .. N_{L-1}`` are ``branches``, the last layer has one node per task. Node j of layer
    ``l > 1`` reads ``sum_i g_l[j, i] out_{l-1, i}``: ``g_l[j]`` is a Gumbel-softmax sample of the
    learned ``branch_logits[l][j]`` over the ``N_{l-1}`` parents, hard (one-hot forward,
    straight-through gradient) by default. In ``eval()`` mode each node takes its most likely
    parent, the discrete tree the paper keeps after the search. ``tau`` (the temperature) is a
    plain attribute, for annealing schedules.

    Where fused ops run: each layer's nodes in one :func:`fastmtl.ops.fused_experts` call (nodes
    as experts, the first layer on the shared input); routing parents to children is one
    ``[N_l, N_{l-1}] x [N_{l-1}, B * width]`` GEMM; the Gumbel sampling is plain PyTorch.

    Args:
        in_features: input width.
        hidden_features: the width of every layer (length L >= 1).
        num_tasks: T, the nodes of the last layer.
        branches: ``N_1 .. N_{L-1}``, the nodes of each layer below the last (length L - 1).
        tau: Gumbel-softmax temperature (> 0).
        hard: one-hot samples with straight-through gradients (True) or the soft samples.

    Parameters: ``weights[l]`` ``[N_l, out_l, in_l]``, ``biases[l]`` ``[N_l, out_l]`` (each node
    like its own ``nn.Linear``), ``branch_logits[l - 1]`` ``[N_l, N_{l-1}]`` for ``l >= 2``
    (zeros: every parent equally likely). ``task_features(x, gates=None)``: ``[T, B, out]``,
    drawing the gates with :meth:`branch_gates` unless given.

    >>> import torch, fastmtl
    >>> trunk = fastmtl.nn.LearningToBranch(10, [16, 16, 8], num_tasks=3, branches=[1, 2])
    >>> tasks = [fastmtl.Task(f"t{i}", "regression") for i in range(3)]
    >>> model = fastmtl.nn.MultiTaskModel(trunk, fastmtl.nn.MultiTaskHeads(8, tasks))
    >>> x, targets = torch.randn(5, 10), {t.name: torch.randn(5) for t in tasks}
    >>> model.loss(x, targets).backward()
    >>> [g.shape for g in trunk.branch_gates()], trunk.branch_logits[1].grad.shape
    ([torch.Size([2, 1]), torch.Size([3, 2])], torch.Size([3, 2]))
    >>> _ = trunk.eval(); trunk.parents()
    [[0, 0], [0, 0, 0]]
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | Sequence[int],
        num_tasks: int,
        branches: Sequence[int] = (),
        tau: float = 1.0,
        hard: bool = True,
        activation: str = "relu",
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_count("LearningToBranch", "in_features", in_features, 1)
        widths = check_widths("LearningToBranch", "hidden_features", hidden_features)
        check_count("LearningToBranch", "num_tasks", num_tasks, 1)
        if not isinstance(branches, (list, tuple)) or len(branches) != len(widths) - 1:
            raise ValueError(
                f"LearningToBranch: argument 'branches' expected {len(widths) - 1} node counts (one per "
                f"layer below the last), got {branches!r}"
            )
        for i, n in enumerate(branches):
            check_count("LearningToBranch", f"branches[{i}]", n, 1)
        self.tau = check_float("LearningToBranch", "tau", tau, 0.0, float("inf"), low_open=True)
        if not isinstance(hard, bool):
            raise TypeError(f"LearningToBranch: argument 'hard' expected a bool, got {type(hard).__name__}")
        self.hard = hard
        self.activation = check_activation("LearningToBranch", activation)
        self.in_features, self.hidden_features, self.num_tasks = in_features, tuple(widths), num_tasks
        self.nodes = tuple(branches) + (num_tasks,)
        factory = {"device": device, "dtype": dtype}
        fan_ins = [in_features] + widths[:-1]
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.empty(n, w, k, **factory)) for n, w, k in zip(self.nodes, widths, fan_ins)]
        )
        self.biases = nn.ParameterList([nn.Parameter(torch.empty(n, w, **factory)) for n, w in zip(self.nodes, widths)])
        self.branch_logits = nn.ParameterList(
            [nn.Parameter(torch.zeros(n, parents, **factory)) for n, parents in zip(self.nodes[1:], self.nodes[:-1])]
        )
        self.reset_parameters()

    @property
    def out_features(self) -> int:
        return self.hidden_features[-1]

    def reset_parameters(self) -> None:
        for w, b in zip(self.weights, self.biases):
            for node in range(w.shape[0]):
                linear_init_(w[node], b[node])
        for logits in self.branch_logits:
            nn.init.zeros_(logits)

    def branch_gates(self, noise: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """``g_l`` ``[N_l, N_{l-1}]`` for every layer above the first: in training mode (or with
        ``noise``, the Gumbel noise ``[N_l, N_{l-1}]`` per layer) ``softmax((logits + noise) / tau)``,
        one-hot with a straight-through gradient when ``hard``; in eval mode without noise the
        one-hot of each node's most likely parent."""
        if noise is not None and (
            not isinstance(noise, (list, tuple))
            or len(noise) != len(self.branch_logits)
            or any(n.shape != p.shape for n, p in zip(noise, self.branch_logits))
        ):
            raise ValueError(
                f"LearningToBranch.branch_gates: argument 'noise' expected one tensor per layer of shapes "
                f"{[list(p.shape) for p in self.branch_logits]}, got {noise!r}"
            )
        gates = []
        for layer, logits in enumerate(self.branch_logits):
            if noise is None and not self.training:
                gates.append(torch.nn.functional.one_hot(logits.argmax(1), logits.shape[1]).to(logits.dtype))
                continue
            # Gumbel(0, 1) noise: -log(Exponential(1)).
            g = noise[layer] if noise is not None else -torch.empty_like(logits).exponential_().log()
            soft = torch.softmax((logits + g) / self.tau, dim=1)
            if self.hard:
                one_hot = torch.nn.functional.one_hot(soft.argmax(1), soft.shape[1]).to(soft.dtype)
                soft = one_hot - soft.detach() + soft
            gates.append(soft)
        return gates

    def parents(self) -> list[list[int]]:
        """Every node's most likely parent, per layer above the first: the tree found so far."""
        return [logits.argmax(1).tolist() for logits in self.branch_logits]

    def task_features(self, x: torch.Tensor, gates: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """The last layer's nodes, one per task: ``[T, B, out_features]``."""
        check_input("LearningToBranch", x, self.in_features)
        if gates is None:
            gates = self.branch_gates()
        elif len(gates) != len(self.branch_logits) or any(
            g.shape != p.shape for g, p in zip(gates, self.branch_logits)
        ):
            raise ValueError(
                f"LearningToBranch: argument 'gates' expected one tensor per layer of shapes "
                f"{[list(p.shape) for p in self.branch_logits]}, got {[list(g.shape) for g in gates]}"
            )
        weights, biases = list(self.weights._parameters.values()), list(self.biases._parameters.values())
        h = torch.ops.fastmtl.fused_experts.default(x, [weights[0]], [biases[0]], self.activation)[0]
        for layer in range(1, len(weights)):
            children = torch.mm(gates[layer - 1], h.reshape(h.shape[0], -1)).view(-1, *h.shape[1:])
            h = torch.ops.fastmtl.fused_experts.default(children, [weights[layer]], [biases[layer]], self.activation)[0]
        return h

    def forward(self, x: torch.Tensor, gates: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        return list(self.task_features(x, gates).unbind(0))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, hidden_features={list(self.hidden_features)}, "
            f"nodes={list(self.nodes)}, tau={self.tau}, hard={self.hard}"
        )
