"""SharedBottom (Caruana 1997; torch-rechub's and DeepCTR's baseline): a shared bottom MLP and one
tower MLP per task."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._arch_checks import check_activation, check_count, check_input, check_widths
from ._norm_layers import check_norm_options
from .experts import ExpertBank
from .fused_mlp import FusedMLP


class SharedBottom(nn.Module):
    """``bottom`` (a :class:`FusedMLP`, shared) then ``towers`` (an :class:`ExpertBank` of T tower
    MLPs with the same widths, one per task); task t's representation is ``tower_t(bottom(x))``.

    The towers of the recommendation libraries end in a one-unit output layer: here that layer is
    task t's head in :class:`MultiTaskHeads`. Without towers SharedBottom is just
    ``MultiTaskModel(FusedMLP(...), heads)`` (hard sharing, the fused path of ``mtl_backward``);
    with them the towers are per-task parameters, so it is a trunk with one representation per task.

    Fused ops: the bottom in one :func:`fastmtl.ops.fused_mlp` call, all towers in one
    :func:`fastmtl.ops.fused_experts` call (towers as experts on the shared bottom output); with
    ``norm`` (``"batch"`` / ``"layer"``) or ``dropout``, every bottom and tower layer is ``Linear ->
    norm -> activation -> Dropout`` (torch-rechub's SharedBottom: ``norm="batch"``), one
    :func:`fastmtl.ops.fused_mlp_norm` call each for the bottom and the stacked towers.

    >>> import torch, fastmtl
    >>> trunk = fastmtl.nn.SharedBottom(10, bottom_hidden=[32], tower_hidden=[16, 8], num_tasks=2)
    >>> tasks = [fastmtl.Task("click", "binary"), fastmtl.Task("buy", "binary")]
    >>> model = fastmtl.nn.MultiTaskModel(trunk, fastmtl.nn.MultiTaskHeads(8, tasks))
    >>> model.losses(torch.randn(4, 10), {"click": torch.tensor([0., 1., 1., 0.]), "buy": torch.zeros(4)}).shape
    torch.Size([2])
    """

    def __init__(
        self,
        in_features: int,
        bottom_hidden: int | Sequence[int],
        tower_hidden: int | Sequence[int],
        num_tasks: int,
        activation: str = "relu",
        norm: str | None = None,
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_count("SharedBottom", "in_features", in_features, 1)
        bottom = check_widths("SharedBottom", "bottom_hidden", bottom_hidden)
        towers = check_widths("SharedBottom", "tower_hidden", tower_hidden)
        check_count("SharedBottom", "num_tasks", num_tasks, 1)
        self.activation = check_activation("SharedBottom", activation)
        self.in_features, self.num_tasks = in_features, num_tasks
        check_norm_options("SharedBottom", norm, dropout)  # named as this module's arguments
        factory = {"device": device, "dtype": dtype}
        self.bottom = FusedMLP(in_features, bottom, activation, norm=norm, dropout=dropout, **factory)
        self.towers = ExpertBank(bottom[-1], num_tasks, towers, activation, norm=norm, dropout=dropout, **factory)

    @property
    def out_features(self) -> int:
        return self.towers.out_features

    def task_features(self, x: torch.Tensor) -> torch.Tensor:
        """The towers' outputs stacked: ``[num_tasks, B, out_features]``."""
        check_input("SharedBottom", x, self.in_features)
        return self.towers(self.bottom(x))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.task_features(x).unbind(0))

    def shared_parameters(self) -> list[nn.Parameter]:
        """The parameters every task shares: the bottom's. Tower t only feeds task t, so the towers
        are task-specific and get their own task's gradient in ``mtl_backward``."""
        return list(self.bottom.parameters())

    def extra_repr(self) -> str:
        text = f"in_features={self.in_features}, num_tasks={self.num_tasks}"
        if self.bottom.norm is not None:
            text += f", norm={self.bottom.norm!r}"
        return text + (f", dropout={self.bottom.dropout}" if self.bottom.dropout else "")
