"""ConFIG: conflict-free inverse gradients.

Eigenvalues within ``T * eps * max|lambda|`` of zero count as zero, ``eps`` being the machine epsilon of
the Gram's dtype (a float32 Gram matrix carries noise at ~1e-7 of its scale): the cut-off of
``torch.linalg.pinv`` and torchjd.
"""

from __future__ import annotations

from .. import ops
from ._base import Aggregator, check_vector, checked_pref


class ConFIG(Aggregator):
    """Conflict-free inverse gradients (Liu et al. 2024, eq. 2): the direction ``u`` whose cosine with
    every task's unit gradient is proportional to ``pref_vector`` (default all ones: equal angles),
    ``u = U^+ pref`` for the unit gradients ``U``, scaled to length ``sum_t <g_t, u/|u|>``. From the Gram
    matrix: the cosine matrix ``C = D^-1 G D^-1`` and its pseudo-inverse. Scale-invariant.

    Accuracy: solved in double precision, but a float32 Gram matrix carries the float32 rounding of its
    entries, which the pseudo-inverse amplifies by cond(C): the update's relative error against the
    exact one (float64 gradients and Gram) is at most ``10 cond(C) u`` (``u = 6e-8``, float32's unit
    roundoff; 1e-3 at cond(C) ~ 1.7e3, where torchjd, working on J itself, keeps ~1e-5). Pass a float64
    Gram matrix of float64 gradients where the gradients are nearly dependent.

    >>> import torch
    >>> from fastmtl.aggregation import ConFIG
    >>> J = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    >>> (ConFIG()(J @ J.T) @ J).round(decimals=12)   # 45 degrees to both, length 1/sqrt2 + 3/sqrt2
    tensor([2., 2.], dtype=torch.float64)
    """

    properties = frozenset({"permutation_invariant"})

    def __init__(self, pref_vector=None):
        super().__init__()
        self.pref_vector = check_vector("ConFIG", "pref_vector", pref_vector)

    def _weights(self, gram):
        T = gram.shape[-1]
        return ops.config_weights(gram, checked_pref("ConFIG", self.pref_vector, T, gram, 1.0))
