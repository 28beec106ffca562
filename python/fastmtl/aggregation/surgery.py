"""Gradient surgery in a random order: PCGrad and GradVac, written on the Gram matrix."""

from __future__ import annotations

import torch

from .. import ops
from ._base import SeededAggregator, check_scalar


def _draw_order(N: int, T: int, generator, exclude_self: bool) -> torch.Tensor:
    """One random visiting order per task, drawn task by task as torchjd draws them (so that the same
    seed gives the same orders): a permutation of all T tasks, or of the T - 1 others."""
    rows = []
    for _ in range(N):
        for i in range(T):
            if exclude_self:
                others = torch.tensor([j for j in range(T) if j != i], dtype=torch.int64)
                rows.append(others[torch.randperm(T - 1, generator=generator)])
            else:
                rows.append(torch.randperm(T, generator=generator))
    return torch.stack(rows).reshape(N, T, T - 1 if exclude_self else T)


class PCGrad(SeededAggregator):
    """Projecting conflicting gradients (Yu et al. 2020, Algorithm 1): for each task, in a random order
    of the others, remove from its (modified) gradient the component along any gradient it conflicts
    with; the update is the sum of the modified gradients. Equals the sum of the gradients when no two
    conflict. ``reduction="sum"`` (default) sums the modified gradients as the paper's Algorithm 1,
    torchjd and LibMTL do; ``"mean"`` averages them as the authors' PyTorch code does (then it equals
    :class:`Mean` when no two gradients conflict).

    Computed from the Gram matrix alone (each modified gradient kept as coefficients over the original
    ones) in C++: O(T^3) instead of O(T^2 P). ``seed=None`` uses the global torch RNG and draws the same
    orders as torchjd's PCGrad; an integer seeds a private generator once. Scale-invariant.

    >>> import torch
    >>> from fastmtl.aggregation import PCGrad
    >>> PCGrad(seed=0)(torch.tensor([[1.0, 0.5], [0.5, 1.0]]))    # no conflict: the sum
    tensor([1., 1.])
    """

    def __init__(self, seed: int | None = None, reduction: str = "sum"):
        super().__init__(seed)
        if reduction not in ("sum", "mean"):
            raise ValueError(f"fastmtl.aggregation.PCGrad: argument 'reduction' expected 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction

    def _weights(self, gram):
        N, T = gram.shape[:2]
        weights = ops.pcgrad_weights(gram, _draw_order(N, T, self._generator, exclude_self=False))
        return weights / T if self.reduction == "mean" else weights

    def _hyperparameters(self):
        return {"seed": self.seed, "reduction": self.reduction}


class GradVac(SeededAggregator):
    """Gradient vaccine (Wang et al. 2021): like PCGrad, but pulls each pair's cosine similarity up to an
    exponential moving average of the cosines seen so far instead of to zero.

    Stateful: the EMA targets (one per ordered pair of tasks, starting at 0) live in ``targets`` and
    round-trip through ``state_dict``/``load_state_dict``; they restart at 0 when the number of tasks or
    the batch shape changes, or on :meth:`reset`. Same arithmetic as torchjd's GradVac (same orders for
    the same seed of the global RNG). ``beta``: the EMA rate; ``eps``: added to denominators.

    >>> import torch
    >>> from fastmtl.aggregation import GradVac
    >>> vac = GradVac(seed=0)
    >>> w = vac(torch.tensor([[1.0, -0.5], [-0.5, 1.0]]))
    >>> vac.targets.shape
    torch.Size([2, 2])
    """

    def __init__(self, beta: float = 0.5, eps: float = 1e-8, seed: int | None = None):
        super().__init__(seed)
        self.beta = check_scalar("GradVac", "beta", beta, 0.0, 1.0)
        self.eps = check_scalar("GradVac", "eps", eps)
        self._targets = None  # [N, T, T] float64, created at the first call
        self._batched = False

    @property
    def targets(self):
        """The EMA cosine targets: [T, T], or [N, T, T] after a batched call; None before the first call."""
        if self._targets is None:
            return None
        return self._targets if self._batched else self._targets[0]

    def reset(self) -> None:
        self._targets = None

    def forward(self, gram):
        self._batched = isinstance(gram, torch.Tensor) and gram.dim() == 3
        return super().forward(gram)

    def _weights(self, gram):
        N, T = gram.shape[:2]
        if self._targets is None or self._targets.shape != (N, T, T):
            self._targets = torch.zeros(N, T, T, dtype=torch.float64)
        order = _draw_order(N, T, self._generator, exclude_self=True)
        weights, self._targets = ops.gradvac_weights(gram, order, self._targets, self.beta, self.eps)
        return weights

    def get_extra_state(self):
        state = super().get_extra_state()
        state.update(targets=self._targets, batched=self._batched)
        return state

    def set_extra_state(self, state):
        super().set_extra_state(state)
        self._targets = state["targets"]
        self._batched = state["batched"]

    def _hyperparameters(self):
        return {"beta": self.beta, "eps": self.eps, "seed": self.seed}
