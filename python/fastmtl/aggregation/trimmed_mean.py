"""Trimmed mean: coordinate-wise robust averaging (Yin et al. 2018)."""

from __future__ import annotations

import torch

from ._base import JacobianAggregator, check_int


class TrimmedMean(JacobianAggregator):
    """Coordinate-wise trimmed mean (Yin et al. 2018, "Byzantine-Robust Distributed Learning"): for every
    parameter, the ``trim_number`` largest and smallest of the T task gradients' entries are dropped and
    the rest averaged.

    Needs the per-task gradients (``requires = "jacobian"``): the trimming is per coordinate. Needs
    ``T >= 2 trim_number + 1`` (a ValueError otherwise, T = 0 included, as torchjd).

    >>> import torch
    >>> from fastmtl.aggregation import TrimmedMean
    >>> TrimmedMean(trim_number=1)(jacobian=torch.tensor([[1.0, -5.0], [2.0, 0.0], [100.0, 1.0]]))
    tensor([2., 0.])
    """

    properties = frozenset({"permutation_invariant"})

    def __init__(self, trim_number: int):
        super().__init__()
        self.trim_number = check_int("TrimmedMean", "trim_number", trim_number, 0)

    def _check_num_tasks(self, T):
        if T < 2 * self.trim_number + 1:
            raise ValueError(
                f"fastmtl.aggregation.TrimmedMean: argument 'jacobian' expected at least 2 * trim_number + 1 = "
                f"{2 * self.trim_number + 1} rows, got T = {T}"
            )

    def _update(self, J):
        T = J.shape[0]
        self._check_num_tasks(T)
        ordered = torch.sort(J, dim=0).values
        return ordered.narrow(0, self.trim_number, T - 2 * self.trim_number).mean(dim=0)

    def _hyperparameters(self):
        return {"trim_number": self.trim_number}
