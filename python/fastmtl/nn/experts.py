"""Mixture-of-Experts trunks: MMoE (Ma et al. 2018) and PLE / CGC (Tang et al. 2020).

Every level's experts run in one :func:`fastmtl.ops.fused_experts` call and every level's task
gates and mixtures in one :func:`fastmtl.ops.gated_mixture` call, where the recommendation
libraries loop over experts and tasks in Python.

Both give one representation per task: ``forward(x)`` a list of ``T`` tensors ``[B, h]``,
``task_features(x)`` the same stacked ``[T, B, h]`` (what :class:`MultiTaskModel` reads).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .. import ops
from .._validation import check_int_at_least
from ._init import linear_init_
from ._legacy_state import split_stacked_ple_experts
from ._norm_layers import check_norm_options, make_norms, run_tower


def _widths(owner: str, expert_hidden) -> list[int]:
    widths = [expert_hidden] if isinstance(expert_hidden, int) else list(expert_hidden)
    if not widths:
        raise ValueError(f"{owner}: argument 'expert_hidden' expected at least one layer width, got []")
    for i, w in enumerate(widths):
        check_int_at_least(owner, f"expert_hidden[{i}]", w, 1)
    return widths


class ExpertBank(nn.Module):
    """E expert MLPs with the same widths, stored stacked (``weights[l]``: ``[E, out_l, in_l]``) and
    run by one fused op call. Each expert is initialised like its own ``nn.Linear`` layers.

    ``norm`` (``None``, ``"batch"``, ``"layer"``) and ``dropout``: every expert layer is ``Linear ->
    [BatchNorm1d | LayerNorm] -> activation -> [Dropout]``, each expert with its own normalisation
    (``self.norms[l]``: an ``nn.BatchNorm1d(E * out_l)`` whose channel ``e * out_l + j`` is expert
    e's feature j, or a :class:`StackedLayerNorm`), as torch-rechub's and DeepCTR's expert and tower
    MLPs. Plain experts run :func:`fastmtl.ops.fused_experts`, the others
    :func:`fastmtl.ops.fused_mlp_norm` on the stacked weights: one call either way."""

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        widths: Sequence[int],
        activation: str,
        bias: bool = True,
        norm: str | None = None,
        dropout: float = 0.0,
        norm_eps: float = 1e-5,
        norm_momentum: float | None = 0.1,
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_experts = num_experts
        self.activation = activation
        self.dropout = check_norm_options("ExpertBank", norm, dropout)
        self.norm = norm
        fan_ins = [in_features] + list(widths[:-1])
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.empty(num_experts, n, k, **factory)) for n, k in zip(widths, fan_ins)]
        )
        self.biases = (
            nn.ParameterList([nn.Parameter(torch.empty(num_experts, n, **factory)) for n in widths]) if bias else None
        )
        self.norms = make_norms(norm, widths, num_experts, norm_eps, norm_momentum, factory)
        self.reset_parameters()

    @property
    def out_features(self) -> int:
        return self.weights[-1].shape[1]

    @property
    def plain_layers(self) -> bool:
        """Whether every layer is ``act(x W^T + b)`` alone (no norm; dropout off or in eval)."""
        return self.norm is None and (self.dropout == 0.0 or not self.training)

    def reset_parameters(self) -> None:
        for i, w in enumerate(self.weights):
            for e in range(self.num_experts):
                linear_init_(w[e], self.biases[i][e] if self.biases is not None else None)
        if self.norms is not None:
            for m in self.norms:
                m.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[B, d]`` (shared) or ``[E, B, d]`` (one input per expert) -> ``[E, B, out]``."""
        # ParameterList's own iteration costs more than the op's dispatch (see FusedMLP.op_arguments).
        weights = list(self.weights._parameters.values())
        biases = list(self.biases._parameters.values()) if self.biases is not None else None
        if self.plain_layers:
            return ops.fused_experts(x, weights, biases, self.activation)
        return run_tower(x, weights, biases or [], self.norm, self.norms, self.activation, self.dropout, self.training)

    def extra_repr(self) -> str:
        text = f"num_experts={self.num_experts}, activation={self.activation!r}"
        if self.norm is not None:
            text += f", norm={self.norm!r}"
        return text + (f", dropout={self.dropout}" if self.dropout else "")


class TaskGates(nn.Module):
    """G softmax gates over experts (``weight`` ``[G, K, d]``, ``bias`` ``[G, K]``), each gate
    weighing the K experts of its row of ``expert_index`` (all experts when None). Initialised
    like one ``nn.Linear(d, K)`` per gate.

    ``hidden``: layer widths of a per-gate MLP before the softmax layer (``self.hidden``, an
    :class:`ExpertBank` of G towers with ``activation``, ``norm``, ``dropout``); by default the gate
    is one linear layer on the input, as in the MMoE and PLE papers. ``norm_eps``, ``norm_momentum``:
    of that MLP's normalisation."""

    def __init__(
        self,
        in_features: int,
        num_gates: int,
        width: int,
        expert_index=None,
        hidden: Sequence[int] = (),
        activation: str = "relu",
        norm: str | None = None,
        dropout: float = 0.0,
        norm_eps: float = 1e-5,
        norm_momentum: float | None = 0.1,
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        hidden = list(hidden)
        self.hidden = (
            ExpertBank(
                in_features,
                num_gates,
                hidden,
                activation,
                norm=norm,
                dropout=dropout,
                norm_eps=norm_eps,
                norm_momentum=norm_momentum,
                **factory,
            )
            if hidden
            else None
        )
        fan_in = hidden[-1] if hidden else in_features
        self.weight = nn.Parameter(torch.empty(num_gates, width, fan_in, **factory))
        self.bias = nn.Parameter(torch.empty(num_gates, width, **factory))
        self.expert_index = ops.expert_index_list(expert_index)  # flat, as the op takes it
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for g in range(self.weight.shape[0]):
            linear_init_(self.weight[g], self.bias[g])

    def forward(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x ``[B, d]`` or ``[G, B, d]``, experts ``[E, B, h]`` -> mixtures ``[G, B, h]``."""
        gate_input = x if self.hidden is None else self.hidden(x)  # [G, B, hidden[-1]]: one per gate
        return ops.gated_mixture_flat(gate_input, self.weight, self.bias, experts, self.expert_index)


class _TowerOptions:
    """The layer options MMoE and PLE share: normalisation and dropout of every expert, gate and
    tower layer (the MLPs of torch-rechub / DeepCTR), per-task towers after the mixtures, gates
    with hidden layers. Checked once, named as the owner's arguments."""

    def __init__(self, owner, activation, norm, dropout, tower_hidden, gate_hidden, norm_eps, norm_momentum):
        self.activation = activation
        self.dropout = check_norm_options(owner, norm, dropout)
        self.norm = norm
        self.tower_hidden = _optional_widths(owner, "tower_hidden", tower_hidden)
        self.gate_hidden = _optional_widths(owner, "gate_hidden", gate_hidden)
        self.norm_eps, self.norm_momentum = norm_eps, norm_momentum

    def bank(self, in_features, num, widths, factory) -> ExpertBank:
        return ExpertBank(
            in_features,
            num,
            widths,
            self.activation,
            norm=self.norm,
            dropout=self.dropout,
            norm_eps=self.norm_eps,
            norm_momentum=self.norm_momentum,
            **factory,
        )

    def gates(self, in_features, num_gates, width, expert_index, factory) -> TaskGates:
        return TaskGates(
            in_features,
            num_gates,
            width,
            expert_index,
            self.gate_hidden,
            self.activation,
            self.norm,
            self.dropout,
            self.norm_eps,
            self.norm_momentum,
            **factory,
        )

    def towers(self, in_features, num_tasks, factory) -> ExpertBank | None:
        return self.bank(in_features, num_tasks, self.tower_hidden, factory) if self.tower_hidden else None

    def describe(self) -> str:
        text = f", norm={self.norm!r}" if self.norm is not None else ""
        text += f", dropout={self.dropout}" if self.dropout else ""
        text += f", tower_hidden={list(self.tower_hidden)}" if self.tower_hidden else ""
        return text + (f", gate_hidden={list(self.gate_hidden)}" if self.gate_hidden else "")


def _optional_widths(owner: str, name: str, widths) -> tuple[int, ...]:
    """Layer widths that may be none: an int, a sequence, or empty / None."""
    if widths is None:
        return ()
    widths = [widths] if isinstance(widths, int) else list(widths)
    for i, w in enumerate(widths):
        check_int_at_least(owner, f"{name}[{i}]", w, 1)
    return tuple(widths)


def _check_input(owner: str, x: torch.Tensor, in_features: int) -> None:
    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(f"{owner}: input expected shape [B, {in_features}], got {list(x.shape)}")


class MMoE(nn.Module):
    """Multi-gate Mixture-of-Experts: ``num_experts`` expert MLPs on the input, one softmax gate per
    task over all of them; task t's representation is ``sum_e gate_t(x)_e * expert_e(x)``.

    Args:
        in_features: input width.
        num_experts: number of experts (>= 1).
        expert_hidden: the layer widths of every expert (an int for one layer).
        num_tasks: number of tasks (one gate each).
        activation: after every expert (gate, tower) layer, as :class:`FusedMLP`.
        norm, dropout: ``Linear -> [BatchNorm1d | LayerNorm] -> activation -> [Dropout]`` in every
            expert, gate hidden and tower layer, as torch-rechub's MLPs (``norm="batch"``) with their
            own statistics per expert (see :class:`ExpertBank`).
        tower_hidden: layer widths of a per-task tower on each mixture (task-specific parameters,
            one :class:`ExpertBank` of ``num_tasks`` towers); the one-unit output layer of the
            recommendation libraries' towers is the task's head in :class:`MultiTaskHeads`.
        gate_hidden: layer widths of a per-gate MLP before each gate's softmax layer.
        norm_eps, norm_momentum: of the normalisation (BatchNorm1d's).

    ``forward(x)`` -> list of ``num_tasks`` tensors ``[B, out_features]`` (``tower_hidden[-1]``,
    else ``expert_hidden[-1]``).

    >>> import torch, fastmtl
    >>> mmoe = fastmtl.nn.MMoE(16, num_experts=4, expert_hidden=[32, 8], num_tasks=3)
    >>> [z.shape for z in mmoe(torch.randn(5, 16))]
    [torch.Size([5, 8]), torch.Size([5, 8]), torch.Size([5, 8])]
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        expert_hidden: int | Sequence[int],
        num_tasks: int,
        activation: str = "relu",
        norm: str | None = None,
        dropout: float = 0.0,
        tower_hidden: int | Sequence[int] = (),
        gate_hidden: int | Sequence[int] = (),
        norm_eps: float = 1e-5,
        norm_momentum: float | None = 0.1,
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_int_at_least("MMoE", "in_features", in_features, 1)
        check_int_at_least("MMoE", "num_experts", num_experts, 1)
        check_int_at_least("MMoE", "num_tasks", num_tasks, 1)
        widths = _widths("MMoE", expert_hidden)
        ops.check_activation("MMoE", activation)
        self.in_features, self.num_experts, self.num_tasks = in_features, num_experts, num_tasks
        self.expert_hidden = tuple(widths)
        layers = _TowerOptions("MMoE", activation, norm, dropout, tower_hidden, gate_hidden, norm_eps, norm_momentum)
        self._layers = layers
        factory = {"device": device, "dtype": dtype}
        self.experts = layers.bank(in_features, num_experts, widths, factory)
        self.gates = layers.gates(in_features, num_tasks, num_experts, None, factory)
        self.towers = layers.towers(widths[-1], num_tasks, factory)

    @property
    def out_features(self) -> int:
        return self.towers.out_features if self.towers is not None else self.expert_hidden[-1]

    def task_features(self, x: torch.Tensor) -> torch.Tensor:
        """The task representations stacked: ``[num_tasks, B, out_features]``."""
        _check_input("MMoE", x, self.in_features)
        mixtures = self.gates(x, self.experts(x))
        return mixtures if self.towers is None else self.towers(mixtures)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.task_features(x).unbind(0))

    def shared_parameters(self) -> list[nn.Parameter]:
        """The parameters every task shares: the experts'. Gate t and tower t only feed task t, so
        they are task-specific (as in LibMTL) and get their own task's gradient in ``mtl_backward``."""
        return list(self.experts.parameters())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_experts={self.num_experts}, "
            f"expert_hidden={list(self.expert_hidden)}, num_tasks={self.num_tasks}" + self._layers.describe()
        )


class PLE(nn.Module):
    """Progressive Layered Extraction. Each level has ``num_shared_experts`` shared experts and
    ``num_task_experts`` experts per task; task t's gate mixes the shared experts and its own. With
    ``num_levels = 1`` this is CGC (Customized Gate Control). Below the last level a shared gate
    mixes all experts into the next level's shared input, and task t's experts and gate read task
    t's representation of the level below.

    ``activation``, ``norm``, ``dropout``, ``tower_hidden``, ``gate_hidden``, ``norm_eps``,
    ``norm_momentum``: as :class:`MMoE` (every level's experts and gates; the towers after the last).

    ``forward(x)`` -> list of ``num_tasks`` tensors ``[B, out_features]``.

    >>> import torch, fastmtl
    >>> ple = fastmtl.nn.PLE(16, num_shared_experts=2, num_task_experts=1, expert_hidden=[8], num_tasks=3, num_levels=2)
    >>> [z.shape for z in ple(torch.randn(5, 16))]
    [torch.Size([5, 8]), torch.Size([5, 8]), torch.Size([5, 8])]
    """

    def __init__(
        self,
        in_features: int,
        num_shared_experts: int,
        num_task_experts: int,
        expert_hidden: int | Sequence[int],
        num_tasks: int,
        num_levels: int = 1,
        activation: str = "relu",
        norm: str | None = None,
        dropout: float = 0.0,
        tower_hidden: int | Sequence[int] = (),
        gate_hidden: int | Sequence[int] = (),
        norm_eps: float = 1e-5,
        norm_momentum: float | None = 0.1,
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_int_at_least("PLE", "in_features", in_features, 1)
        check_int_at_least("PLE", "num_shared_experts", num_shared_experts, 0)
        check_int_at_least("PLE", "num_task_experts", num_task_experts, 0)
        check_int_at_least("PLE", "num_tasks", num_tasks, 1)
        check_int_at_least("PLE", "num_levels", num_levels, 1)
        if num_shared_experts + num_task_experts == 0:
            raise ValueError(
                "PLE: arguments 'num_shared_experts' and 'num_task_experts' expected at least one "
                "expert per gate, got 0 and 0"
            )
        widths = _widths("PLE", expert_hidden)
        ops.check_activation("PLE", activation)
        self.in_features, self.num_tasks, self.num_levels = in_features, num_tasks, num_levels
        self.num_shared_experts, self.num_task_experts = num_shared_experts, num_task_experts
        self.expert_hidden = tuple(widths)
        S, P, T = num_shared_experts, num_task_experts, num_tasks
        num_experts = S + T * P
        # The experts a gate mixes, [S + T P, B, h]: the S shared ones first, then task t's P at S + t P.
        task_index = [list(range(S)) + list(range(S + t * P, S + (t + 1) * P)) for t in range(T)]
        factory = {"device": device, "dtype": dtype}
        layers = _TowerOptions("PLE", activation, norm, dropout, tower_hidden, gate_hidden, norm_eps, norm_momentum)
        self._layers = layers
        # A level's shared and task experts are separate parameters (each one op call), so that
        # shared_parameters() holds the shared experts alone: the task experts are task-specific.
        self.shared_experts = nn.ModuleList()  # per level, S experts (empty when S = 0)
        self.task_experts = nn.ModuleList()  # per level, T P experts, task t's at t P (empty when P = 0)
        self.task_gates = nn.ModuleList()
        self.shared_gates = nn.ModuleList()
        fan_in = in_features
        for level in range(num_levels):
            if S:
                self.shared_experts.append(layers.bank(fan_in, S, widths, factory))
            if P:
                self.task_experts.append(layers.bank(fan_in, T * P, widths, factory))
            self.task_gates.append(layers.gates(fan_in, T, S + P, task_index, factory))
            if level + 1 < num_levels and S > 0:  # the next level's shared experts read its mixture
                self.shared_gates.append(layers.gates(fan_in, 1, num_experts, None, factory))
            fan_in = widths[-1]
        self.towers = layers.towers(widths[-1], T, factory)
        self._register_load_state_dict_pre_hook(split_stacked_ple_experts, with_module=True)

    @property
    def out_features(self) -> int:
        return self.towers.out_features if self.towers is not None else self.expert_hidden[-1]

    def task_features(self, x: torch.Tensor) -> torch.Tensor:
        """The task representations stacked: ``[num_tasks, B, out_features]``."""
        _check_input("PLE", x, self.in_features)
        tasks = self._mixtures(x)
        return tasks if self.towers is None else self.towers(tasks)

    def _mixtures(self, x: torch.Tensor) -> torch.Tensor:
        S, P = self.num_shared_experts, self.num_task_experts
        shared, tasks = x, None
        for level in range(self.num_levels):
            # Level 0 reads x; above it the shared experts read the shared representation and task
            # t's experts (and gate) task t's.
            parts = []
            if S:
                parts.append(self.shared_experts[level](shared))
            if P:
                own = x if level == 0 else (tasks if P == 1 else tasks.repeat_interleave(P, dim=0))
                parts.append(self.task_experts[level](own))
            experts = torch.cat(parts) if len(parts) == 2 else parts[0]  # [S + T P, B, h]
            new_tasks = self.task_gates[level](x if level == 0 else tasks, experts)
            if level + 1 < self.num_levels and S:
                shared = self.shared_gates[level](shared, experts)[0]
            tasks = new_tasks
        return tasks

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.task_features(x).unbind(0))

    def shared_parameters(self) -> list[nn.Parameter]:
        """The parameters aggregated by ``mtl_backward``: each level's shared experts and the shared
        gates (as LibMTL's PLE shares its shared experts). Task experts, task gates and towers are
        task-specific: they get the gradient of ``sum_t L_t`` by one ordinary backward, which for
        the last level's task-t experts is task t's own gradient (below it, task t's experts also
        feed the shared gate, so every task's loss reaches them)."""
        return list(self.shared_experts.parameters()) + list(self.shared_gates.parameters())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_shared_experts={self.num_shared_experts}, "
            f"num_task_experts={self.num_task_experts}, expert_hidden={list(self.expert_hidden)}, "
            f"num_tasks={self.num_tasks}, num_levels={self.num_levels}" + self._layers.describe()
        )
