"""Krum and Multi-Krum: Byzantine-robust selection of gradients (Blanchard et al. 2017)."""

from __future__ import annotations

import torch

from ._base import Aggregator, check_int


class Krum(Aggregator):
    """Krum (Blanchard et al. 2017, "Machine Learning with Adversaries"): each gradient's score is the sum
    of its distances to its ``T - n_byzantine - 2`` nearest other gradients; the ``n_selected`` gradients
    of lowest score get weight ``1 / n_selected`` each (Multi-Krum), the others 0. Distances come from the
    Gram matrix, ``|g_s - g_t|^2 = G_ss + G_tt - 2 G_st`` (clamped at 0), as in torchjd's Krum.

    Needs ``T >= n_byzantine + 3`` and ``T >= n_selected`` (a ValueError otherwise, T = 0 included).

    >>> import torch
    >>> from fastmtl.aggregation import Krum
    >>> J = torch.tensor([[1.0, 0.0], [1.1, 0.0], [0.9, 0.1], [50.0, -50.0]], dtype=torch.float64)
    >>> Krum(n_byzantine=1)(J @ J.T)                      # the most central gradient; never the outlier
    tensor([0., 1., 0., 0.], dtype=torch.float64)
    """

    _checks_values_in_op = False

    def __init__(self, n_byzantine: int, n_selected: int = 1):
        super().__init__()
        self.n_byzantine = check_int("Krum", "n_byzantine", n_byzantine, 0)
        self.n_selected = check_int("Krum", "n_selected", n_selected, 1)

    def _check_num_tasks(self, T):
        least = max(self.n_byzantine + 3, self.n_selected)
        if T < least:
            raise ValueError(
                f"fastmtl.aggregation.Krum: argument 'gram' expected T >= {least} tasks (n_byzantine + 3 = "
                f"{self.n_byzantine + 3}, n_selected = {self.n_selected}), got T = {T}"
            )

    def _weights(self, gram):
        N, T = gram.shape[:2]
        self._check_num_tasks(T)
        norms = gram.diagonal(dim1=-2, dim2=-1)
        distances = (norms.unsqueeze(-2) + norms.unsqueeze(-1) - 2 * gram).clamp(min=0.0).sqrt()
        nearest = torch.topk(distances, k=T - self.n_byzantine - 1, dim=-1, largest=False).values
        scores = nearest[..., 1:].sum(dim=-1)  # the nearest is the gradient itself
        selected = torch.topk(scores, k=self.n_selected, dim=-1, largest=False).indices
        weights = gram.new_zeros(N, T)
        weights.scatter_(1, selected, 1.0 / self.n_selected)
        return weights

    def _hyperparameters(self):
        return {"n_byzantine": self.n_byzantine, "n_selected": self.n_selected}
