"""AITM, the Adaptive Information Transfer Multi-task framework (Xi et al. 2021): tasks of a
sequential conversion funnel (impression -> click -> purchase -> ...) pass information down the
funnel through attention, and a calibrator keeps each step's probability below the previous one's."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ._arch_checks import check_activation, check_count, check_input, check_widths
from ._init import linear_init_
from .experts import ExpertBank
from .fused_mlp import FusedMLP


def calibrator_losses(logits) -> torch.Tensor:
    """The behavioural expectation calibrator per task: entry t (t >= 1) is
    ``mean_b relu(sigmoid(a_t) - sigmoid(a_{t-1}))``, entry 0 is 0; ``.sum()`` is the paper's
    ``L_lc``. ``logits``: task t's ``[B]`` or ``[B, 1]`` logits, as a sequence in funnel order or
    the dict of :class:`MultiTaskModel` (its task order). Every impression counts (the
    calibrator constrains predictions, not labels)."""
    if isinstance(logits, Mapping):
        logits = list(logits.values())
    if not isinstance(logits, (list, tuple)) or not logits or not all(isinstance(a, torch.Tensor) for a in logits):
        raise TypeError(
            f"AITM.calibrator_losses: argument 'logits' expected a non-empty sequence or dict of tensors, "
            f"got {type(logits).__name__}"
        )
    flat = [a.reshape(a.shape[0], -1) for a in logits]
    if any(f.shape != flat[0].shape or f.shape[1] != 1 for f in flat):
        raise ValueError(
            f"AITM.calibrator_losses: argument 'logits' expected one [B] or [B, 1] logit per task, "
            f"got shapes {[list(a.shape) for a in logits]}"
        )
    p = torch.sigmoid(torch.cat(flat, dim=1))  # [B, T]
    excess = torch.relu(p[:, 1:] - p[:, :-1]).mean(0)
    return torch.cat([excess.new_zeros(1), excess])


class AITM(nn.Module):
    """One tower per task on a shared input; down the funnel, task t's representation mixes its
    tower's output ``q_t`` with the information ``p_{t-1}`` transferred from task t-1:

    * ``z_1 = q_1``; ``p_{t-1} = relu(V_{t-1} z_{t-1} + c_{t-1})`` (the transfer layer, ``[h -> h]``);
    * ``z_t = AIT(p_{t-1}, q_t) = sum_{u in (p_{t-1}, q_t)} w_u h1(u)``, with
      ``w = softmax_u(<h2(u), h3(u)> / sqrt(h))`` and ``h1, h2, h3`` affine ``[h -> h]`` maps, one
      set per task t >= 2 (the paper's value, query and key).

    Task t's head in :class:`MultiTaskHeads` reads ``z_t`` (the paper's prediction layer,
    ``sigmoid`` of it the probability). The paper's loss is the tasks' bce plus
    ``alpha * L_lc`` (:func:`calibrator_losses`, also ``AITM.calibrator_losses``): with
    ``model(x)`` giving the logits, ``model.loss(x, y) + alpha * AITM.calibrator_losses(model(x)).sum()``.
    For gradient aggregation add the per-task calibrator terms to the per-task losses (entry t
    penalises task t exceeding task t-1) and call :func:`fastmtl.mtl_backward`;
    ``model.mtl_backward`` aggregates the task losses alone.

    Fused ops: the optional shared bottom in one :func:`fastmtl.ops.fused_mlp` call, all towers in
    one :func:`fastmtl.ops.fused_experts` call. The transfer and attention layers are plain PyTorch
    (one GEMM for ``h1, h2, h3`` of both inputs per step): each step needs the previous task's
    ``z``, so the T - 1 steps run one after another and no batched op spans them.

    Args:
        in_features: input width (the paper's shared embeddings, concatenated).
        tower_hidden: every task tower's widths (an int for one layer); ``h`` = the last one.
        num_tasks: T, the steps of the funnel in order (1 gives plain towers).
        shared_hidden: widths of an optional shared bottom MLP before the towers (None: the paper's
            towers read the embeddings directly).
        activation: of the tower and bottom layers, as :class:`FusedMLP`.

    Parameters: ``towers`` (an :class:`ExpertBank`), ``transfer_weight`` ``[T-1, h, h]``,
    ``transfer_bias`` ``[T-1, h]``, ``attention_weight`` ``[T-1, 3h, h]`` (rows: h1, h2, h3),
    ``attention_bias`` ``[T-1, 3h]``.

    >>> import torch, fastmtl
    >>> funnel = [fastmtl.Task("click", "binary"), fastmtl.Task("purchase", "binary")]
    >>> trunk = fastmtl.nn.AITM(12, tower_hidden=[16, 8], num_tasks=2)
    >>> model = fastmtl.nn.MultiTaskModel(trunk, fastmtl.nn.MultiTaskHeads(8, funnel))
    >>> x = torch.randn(6, 12)
    >>> targets = {"click": torch.tensor([1., 0., 1., 0., 0., 1.]), "purchase": torch.tensor([1., 0., 0., 0., 0., 0.])}
    >>> calibrator = fastmtl.nn.AITM.calibrator_losses(model(x))
    >>> calibrator.shape, calibrator[0].item()
    (torch.Size([2]), 0.0)
    >>> (model.loss(x, targets) + 0.6 * calibrator.sum()).backward()
    """

    calibrator_losses = staticmethod(calibrator_losses)

    def __init__(
        self,
        in_features: int,
        tower_hidden: int | Sequence[int],
        num_tasks: int,
        shared_hidden: int | Sequence[int] | None = None,
        activation: str = "relu",
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_count("AITM", "in_features", in_features, 1)
        towers = check_widths("AITM", "tower_hidden", tower_hidden)
        check_count("AITM", "num_tasks", num_tasks, 1)
        self.activation = check_activation("AITM", activation)
        self.in_features, self.num_tasks = in_features, num_tasks
        factory = {"device": device, "dtype": dtype}
        self.bottom = None
        fan_in = in_features
        if shared_hidden is not None:
            self.bottom = FusedMLP(
                in_features, check_widths("AITM", "shared_hidden", shared_hidden), activation, **factory
            )
            fan_in = self.bottom.out_features
        h, steps = towers[-1], num_tasks - 1
        self.towers = ExpertBank(fan_in, num_tasks, towers, activation, **factory)
        self.transfer_weight = nn.Parameter(torch.empty(steps, h, h, **factory))
        self.transfer_bias = nn.Parameter(torch.empty(steps, h, **factory))
        self.attention_weight = nn.Parameter(torch.empty(steps, 3 * h, h, **factory))
        self.attention_bias = nn.Parameter(torch.empty(steps, 3 * h, **factory))
        self.reset_parameters()

    @property
    def out_features(self) -> int:
        return self.towers.out_features

    def reset_parameters(self) -> None:
        if self.bottom is not None:
            self.bottom.reset_parameters()
        self.towers.reset_parameters()
        h = self.out_features
        for step in range(self.num_tasks - 1):
            linear_init_(self.transfer_weight[step], self.transfer_bias[step])
            for part in range(3):  # h1, h2, h3: each like its own nn.Linear(h, h)
                rows = slice(part * h, (part + 1) * h)
                linear_init_(self.attention_weight[step, rows], self.attention_bias[step, rows])

    def task_features(self, x: torch.Tensor) -> torch.Tensor:
        """Every task's ``z_t`` stacked: ``[num_tasks, B, out_features]``."""
        check_input("AITM", x, self.in_features)
        shared = x if self.bottom is None else self.bottom(x)
        towers = self.towers(shared)  # [T, B, h]: q_t
        h = towers.shape[2]
        z = [towers[0]]
        for step in range(self.num_tasks - 1):
            transferred = torch.relu(torch.addmm(self.transfer_bias[step], z[-1], self.transfer_weight[step].t()))
            inputs = torch.stack([transferred, towers[step + 1]])  # [2, B, h]: p_{t-1}, q_t
            value, query, key = torch.nn.functional.linear(
                inputs, self.attention_weight[step], self.attention_bias[step]
            ).split(h, dim=2)
            attention = torch.softmax((query * key).sum(2) / math.sqrt(h), dim=0)  # [2, B]
            z.append((attention.unsqueeze(2) * value).sum(0))
        return torch.stack(z)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.task_features(x).unbind(0))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_tasks={self.num_tasks}, out_features={self.out_features}"
