"""DSelect-k (Hazimeh et al. 2021): a Mixture-of-Experts whose task gates select k experts through
a differentiable binary encoding, instead of MMoE's dense softmax over all of them."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ._arch_checks import check_activation, check_count, check_float, check_input, check_widths
from ._init import linear_init_
from .experts import ExpertBank


def smooth_step(t: torch.Tensor, gamma: float) -> torch.Tensor:
    """The paper's smooth-step: 0 below ``-gamma/2``, 1 above ``gamma/2``, the cubic
    ``-2/gamma^3 t^3 + 3/(2 gamma) t + 1/2`` in between (continuously differentiable)."""
    cubic = (-2.0 / gamma**3) * t**3 + (1.5 / gamma) * t + 0.5
    return torch.where(t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), cubic))


class DSelectK(nn.Module):
    """``num_experts`` expert MLPs on the input; task t's representation is ``sum_e q_t(x)_e
    expert_e(x)`` with the DSelect-k gate (the per-example gate of the paper):

    * ``m = ceil(log2 E)`` bits; each of task t's ``k`` selectors has logits ``z_i = Z_{t,i} x``
      (``[m]``) and picks expert e with weight ``r(z_i)_e = prod_j (S(z_ij) if bit j of e else 1 - S(z_ij))``
      (S: :func:`smooth_step`); with ``E`` not a power of two ``r`` is renormalised over the E
      existing codes (as the authors' code does; a selector pointing wholly at a missing code gives 0);
    * the selectors are mixed by ``softmax(W_t x)`` (``[k]``): ``q_t = sum_i softmax(W_t x)_i r(z_i)``.

    Once training drives every ``S(z_ij)`` to 0 or 1 each selector is one expert: at most k nonzero
    gates per task. :meth:`selector_entropy` is the paper's regulariser that pushes them there
    (add ``coef * model.trunk.selector_entropy(x)`` to the loss).

    Where fused ops run: all experts in one :func:`fastmtl.ops.fused_experts` call; every task's
    selector and mixing logits in one plain GEMM (``x`` against ``[T * k * (m + 1), d]``); the
    smooth-step, products and the mixture ``[B, T, E] x [B, E, h]`` are plain PyTorch
    (:func:`fastmtl.ops.gated_mixture` is a softmax gate, not this one).

    Args:
        in_features, num_experts, expert_hidden, num_tasks, activation: as :class:`MMoE`.
        k: selectors per task (the most experts a task uses), ``1 <= k``.
        gamma: the smooth-step's width (> 0); the paper's default 1.

    Parameters: ``experts`` (an :class:`ExpertBank`), ``selector_weight`` ``[T, k, m, d]``,
    ``selector_bias`` ``[T, k, m]``, ``mixing_weight`` ``[T, k, d]``, ``mixing_bias`` ``[T, k]``.

    >>> import torch, fastmtl
    >>> trunk = fastmtl.nn.DSelectK(10, num_experts=5, expert_hidden=[16, 8], num_tasks=2, k=2)
    >>> tasks = [fastmtl.Task("a", "regression"), fastmtl.Task("b", "multiclass", num_outputs=3)]
    >>> model = fastmtl.nn.MultiTaskModel(trunk, fastmtl.nn.MultiTaskHeads(8, tasks))
    >>> x, targets = torch.randn(6, 10), {"a": torch.randn(6), "b": torch.tensor([0, 2, 1, -100, 0, 1])}
    >>> (model.loss(x, targets) + 1e-3 * trunk.selector_entropy(x)).backward()
    >>> gates = trunk.gates(x)
    >>> gates.shape, bool(torch.allclose(gates.sum(-1), torch.ones(2, 6)))
    (torch.Size([2, 6, 5]), True)
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        expert_hidden: int | Sequence[int],
        num_tasks: int,
        k: int = 2,
        gamma: float = 1.0,
        activation: str = "relu",
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_count("DSelectK", "in_features", in_features, 1)
        check_count("DSelectK", "num_experts", num_experts, 1)
        widths = check_widths("DSelectK", "expert_hidden", expert_hidden)
        check_count("DSelectK", "num_tasks", num_tasks, 1)
        check_count("DSelectK", "k", k, 1)
        self.gamma = check_float("DSelectK", "gamma", gamma, 0.0, math.inf, low_open=True)
        if gamma == math.inf:
            raise ValueError(f"DSelectK: argument 'gamma' expected a finite float > 0, got {gamma!r}")
        self.activation = check_activation("DSelectK", activation)
        self.in_features, self.num_experts, self.num_tasks, self.k = in_features, num_experts, num_tasks, k
        self.expert_hidden = tuple(widths)
        self.num_bits = math.ceil(math.log2(num_experts)) if num_experts > 1 else 0
        factory = {"device": device, "dtype": dtype}
        T, m = num_tasks, self.num_bits
        self.experts = ExpertBank(in_features, num_experts, widths, activation, **factory)
        self.selector_weight = nn.Parameter(torch.empty(T, k, m, in_features, **factory))
        self.selector_bias = nn.Parameter(torch.empty(T, k, m, **factory))
        self.mixing_weight = nn.Parameter(torch.empty(T, k, in_features, **factory))
        self.mixing_bias = nn.Parameter(torch.empty(T, k, **factory))
        # codes[e, j] = bit j of e.
        codes = [[(e >> j) & 1 for j in range(m)] for e in range(num_experts)]
        self.register_buffer(
            "codes",
            torch.tensor(codes, dtype=self.selector_weight.dtype, device=device).reshape(num_experts, m),
            persistent=False,
        )
        self.reset_parameters()

    @property
    def out_features(self) -> int:
        return self.expert_hidden[-1]

    def reset_parameters(self) -> None:
        self.experts.reset_parameters()
        # Selector logits start near 0, inside the smooth-step's cubic zone, as the authors' code
        # (U(-gamma/100, gamma/100)): every selector starts spread over all experts with gradient
        # to move; nn.Linear's init would start many selectors saturated on one code, with none.
        bound = self.gamma / 100
        nn.init.uniform_(self.selector_weight, -bound, bound)
        nn.init.uniform_(self.selector_bias, -bound, bound)
        for t in range(self.num_tasks):  # mixing logits like one nn.Linear(d, k) per task
            linear_init_(self.mixing_weight[t], self.mixing_bias[t])

    def _selectors(self, x: torch.Tensor):
        """(selector choices r ``[T, B, k, E]``, mixing weights ``[T, B, k]``)."""
        T, k, m, d = self.num_tasks, self.k, self.num_bits, self.in_features
        weight = torch.cat([self.selector_weight.reshape(T, k * m, d), self.mixing_weight], dim=1)
        bias = torch.cat([self.selector_bias.reshape(T, k * m), self.mixing_bias], dim=1)
        logits = torch.nn.functional.linear(x, weight.reshape(-1, d), bias.reshape(-1))  # [B, T * k * (m + 1)]
        B = x.shape[0]
        logits = logits.view(B, T, k * (m + 1)).transpose(0, 1)
        z, mixing = logits[..., : k * m].reshape(T, B, k, 1, m), logits[..., k * m :]
        bit = smooth_step(z, self.gamma)  # [T, B, k, 1, m]
        codes = self.codes.to(bit.dtype)
        choice = (codes * bit + (1 - codes) * (1 - bit)).prod(-1)  # [T, B, k, E]
        if self.num_experts != 1 << m:
            # A selector wholly on missing codes has total 0 (and choice 0): divide by 1 there, which
            # keeps its zero gradient finite (a clamped tiny total would blow it up to inf * 0).
            total = choice.sum(-1, keepdim=True)
            choice = choice / torch.where(total > 0, total, torch.ones_like(total))
        return choice, torch.softmax(mixing, dim=-1)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Every task's gate over the experts: ``[T, B, num_experts]``, rows summing to 1."""
        check_input("DSelectK", x, self.in_features)
        choice, mixing = self._selectors(x)
        return (mixing.unsqueeze(-1) * choice).sum(2)

    def selector_entropy(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's regulariser: the entropy of every selector's choice ``r(z_i)`` over the
        experts, summed over tasks and selectors, mean over the batch. 0 when every selector has
        settled on one expert."""
        check_input("DSelectK", x, self.in_features)
        choice, _ = self._selectors(x)
        # log of the clamped choice: a saturated selector has exact zeros, where x log x has an
        # infinite derivative that would turn the zero gradient of the smooth-step into NaN.
        log_choice = torch.log(choice.clamp_min(torch.finfo(choice.dtype).tiny))
        return -(choice * log_choice).sum((0, 2, 3)).mean()

    def task_features(self, x: torch.Tensor) -> torch.Tensor:
        """The task representations stacked: ``[num_tasks, B, out_features]``."""
        gates = self.gates(x)  # [T, B, E]
        experts = self.experts(x)  # [E, B, h]
        return torch.bmm(gates.transpose(0, 1), experts.transpose(0, 1)).transpose(0, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.task_features(x).unbind(0))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_experts={self.num_experts}, "
            f"expert_hidden={list(self.expert_hidden)}, num_tasks={self.num_tasks}, k={self.k}, gamma={self.gamma}"
        )
