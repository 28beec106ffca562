"""Random: random loss weighting (RLW) as an aggregator."""

from __future__ import annotations

import torch

from ._base import SeededAggregator


class Random(SeededAggregator):
    """Random loss weighting as an aggregator (RLW; Lin et al. 2022, "Reasonable Effectiveness of
    Random Weighting"): ``softmax(randn(T))``, drawn anew at every call.

    ``seed=None`` draws from the global torch RNG (``torch.manual_seed`` makes it reproducible, and then
    it draws exactly what torchjd's ``Random`` draws); an integer seeds a private generator once.

    >>> import torch
    >>> from fastmtl.aggregation import Random
    >>> w = Random(seed=0)(torch.eye(3))
    >>> bool(torch.all(w > 0)), round(float(w.sum()), 6)
    (True, 1.0)
    """

    _checks_values_in_op = False

    def __init__(self, seed: int | None = None):
        super().__init__(seed)

    def _weights(self, gram):
        # One draw per matrix, so that a batch gives what the same number of single calls gives (and
        # what torchjd's Random gives after the same torch.manual_seed): torch.randn of a larger size
        # is not the concatenation of smaller draws.
        N, T = gram.shape[:2]
        draws = torch.stack([torch.randn(T, dtype=gram.dtype, generator=self._generator) for _ in range(N)])
        return torch.softmax(draws, dim=-1).to(gram.device)

    def _hyperparameters(self):
        return {"seed": self.seed}
