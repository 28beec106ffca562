"""Sum: the sum of the gradients."""

from __future__ import annotations

from ._base import Aggregator


class Sum(Aggregator):
    """``1`` for every task: the sum of the gradients (what ``sum(losses).backward()`` gives).

    >>> import torch
    >>> from fastmtl.aggregation import Sum
    >>> Sum()(torch.eye(3))
    tensor([1., 1., 1.])
    """

    properties = frozenset({"linear_under_scaling", "permutation_invariant"})

    _checks_values_in_op = False

    def _weights(self, gram):
        return gram.new_ones(gram.shape[:2])
