"""Mean: the average gradient."""

from __future__ import annotations

from ._base import Aggregator


class Mean(Aggregator):
    """``1/T`` for every task: the average gradient.

    >>> import torch
    >>> from fastmtl.aggregation import Mean
    >>> Mean()(torch.eye(4))
    tensor([0.2500, 0.2500, 0.2500, 0.2500])
    """

    properties = frozenset({"linear_under_scaling", "permutation_invariant"})

    _checks_values_in_op = False

    def _weights(self, gram):
        return gram.new_full(gram.shape[:2], 1.0 / gram.shape[-1])
