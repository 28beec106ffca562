"""FairGrad: alpha-fair weights G x = x^(-1/alpha), solved by Newton's method in C++."""

from __future__ import annotations

from .. import ops
from ._base import Aggregator, _check_values, check_scalar


class FairGrad(Aggregator):
    """Fair resource allocation in MTL (Ban & Ji 2024, eq. 4): alpha-fair weights, the ``x >= 0`` with
    ``G x = x^(-1/alpha)``. ``alpha = 1`` is proportional fairness (the Nash-MTL system), large alpha
    approaches max-min fairness, ``alpha = 0`` is the mean (linear scalarisation, as in torchjd).
    Solved to rounding level by Newton's method in C++ (torchjd uses scipy's least_squares), on the
    positive-definite-shifted Gram matrix described in :class:`NashMTL` (a warning where it does not
    converge).

    >>> import torch
    >>> from fastmtl.aggregation import FairGrad
    >>> FairGrad(alpha=1.0)(torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    tensor([0.5000, 1.0000], dtype=torch.float64)
    """

    properties = frozenset({"non_conflicting", "permutation_invariant"})

    def __init__(self, alpha: float = 1.0):
        super().__init__()
        self.alpha = check_scalar("FairGrad", "alpha", alpha)

    def _weights(self, gram):
        if self.alpha == 0:
            _check_values("FairGrad", gram)  # no op call to check the values on this path
            return gram.new_full(gram.shape[:2], 1.0 / gram.shape[-1])
        return ops.power_system_weights(gram, 1.0 / self.alpha)

    def _hyperparameters(self):
        return {"alpha": self.alpha}
