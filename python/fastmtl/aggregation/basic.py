"""Weights that do not look at the Gram matrix's values: Mean, Sum, Constant and Random (RLW)."""

from __future__ import annotations

import torch

from ._base import Aggregator, SeededAggregator, check_vector


class Mean(Aggregator):
    """``1/T`` for every task: the average gradient.

    >>> import torch
    >>> from fastmtl.aggregation import Mean
    >>> Mean()(torch.eye(4))
    tensor([0.2500, 0.2500, 0.2500, 0.2500])
    """

    _checks_values_in_op = False

    def _weights(self, gram):
        return gram.new_full(gram.shape[:2], 1.0 / gram.shape[-1])


class Sum(Aggregator):
    """``1`` for every task: the sum of the gradients (what ``sum(losses).backward()`` gives).

    >>> import torch
    >>> from fastmtl.aggregation import Sum
    >>> Sum()(torch.eye(3))
    tensor([1., 1., 1.])
    """

    _checks_values_in_op = False

    def _weights(self, gram):
        return gram.new_ones(gram.shape[:2])


class Constant(Aggregator):
    """Fixed weights given once, e.g. hand-tuned task weights.

    >>> import torch
    >>> from fastmtl.aggregation import Constant
    >>> Constant([1.0, 0.5])(torch.eye(2, dtype=torch.float64))
    tensor([1.0000, 0.5000], dtype=torch.float64)
    """

    _checks_values_in_op = False

    def __init__(self, weights):
        super().__init__()
        self.register_buffer("weights", check_vector("Constant", "weights", weights))

    def _weights(self, gram):
        T = gram.shape[-1]
        if self.weights.shape[0] != T:
            raise ValueError(
                f"fastmtl.aggregation.Constant: argument 'gram' expected {self.weights.shape[0]} tasks (the length "
                f"of 'weights'), got T = {T}"
            )
        return self.weights.to(gram.device, gram.dtype).expand(gram.shape[0], T).clone()

    def _hyperparameters(self):
        return {"weights": self.weights.tolist()}


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
        draws = torch.stack([torch.randn(T, dtype=gram.dtype, generator=self._generator) for _ in range(N)]) if N else \
            gram.new_empty(0, T)
        return torch.softmax(draws, dim=-1).to(gram.device)

    def _hyperparameters(self):
        return {"seed": self.seed}
