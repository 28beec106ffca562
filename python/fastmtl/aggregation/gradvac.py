"""GradVac: gradient vaccine, written on the Gram matrix."""

from __future__ import annotations

import torch

from .. import ops
from ._base import SeededAggregator, check_scalar
from ._surgery import draw_order


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
        order = draw_order(N, T, self._generator, exclude_self=True)
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
