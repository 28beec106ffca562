"""MGDA: the minimum-norm point of the convex hull of the task gradients."""

from __future__ import annotations

from .. import ops
from ._base import Aggregator


class MGDA(Aggregator):
    """Multiple-gradient descent (Desideri 2012; Sener & Koltun 2018): the weights on the simplex whose
    combination of gradients has minimum norm, a common descent direction whenever one exists.

    Solved exactly (Wolfe's algorithm in C++, double precision), not by Frank-Wolfe iterations as in
    Sener & Koltun's and torchjd's implementations, which stop 1e-3 to 5e-2 away from the optimum. The
    minimum-norm point is unique; its weights need not be (duplicated or dependent gradients), and then
    a minimiser supported on affinely independent gradients is returned. Scale-invariant.

    >>> import torch
    >>> from fastmtl.aggregation import MGDA
    >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    >>> MGDA()(J @ J.T)
    tensor([0.8000, 0.2000], dtype=torch.float64)
    """

    properties = frozenset({"non_conflicting", "permutation_invariant"})

    def _weights(self, gram):
        return ops.min_norm_weights(gram)
