"""Constant: fixed weights given once."""

from __future__ import annotations

from ._base import Aggregator, check_vector


class Constant(Aggregator):
    """Fixed weights given once, e.g. hand-tuned task weights.

    >>> import torch
    >>> from fastmtl.aggregation import Constant
    >>> Constant([1.0, 0.5])(torch.eye(2, dtype=torch.float64))
    tensor([1.0000, 0.5000], dtype=torch.float64)
    """

    properties = frozenset({"linear_under_scaling"})

    _checks_values_in_op = False

    def __init__(self, weights):
        super().__init__()
        self.register_buffer("weights", check_vector("Constant", "weights", weights))

    def _check_num_tasks(self, T):
        if self.weights.shape[0] != T:
            raise ValueError(
                f"fastmtl.aggregation.Constant: argument 'gram' expected {self.weights.shape[0]} tasks (the length "
                f"of 'weights'), got T = {T}"
            )

    def _weights(self, gram):
        T = gram.shape[-1]
        self._check_num_tasks(T)
        return self.weights.to(gram.device, gram.dtype).expand(gram.shape[0], T).clone()

    def _hyperparameters(self):
        return {"weights": self.weights.tolist()}
