"""IMTL-G: equal projections of the update on the unit gradients.

Eigenvalues within ``T * eps * max|lambda|`` of zero count as zero, ``eps`` being the machine epsilon of
the Gram's dtype (a float32 Gram matrix carries noise at ~1e-7 of its scale): the cut-off of
``torch.linalg.pinv`` and torchjd.
"""

from __future__ import annotations

from .. import ops
from ._base import Aggregator


class IMTLG(Aggregator):
    """Impartial MTL, gradient part (Liu et al. 2021), in the form that allows linearly dependent
    gradients (Quinton & Rey 2024): weights on which the update has the same projection on every task's
    unit gradient, ``v / sum(v)`` with ``v = G^+ d``, ``d_t = |g_t|``. Scale-invariant.

    >>> import torch
    >>> from fastmtl.aggregation import IMTLG
    >>> J = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    >>> w = IMTLG()(J @ J.T)
    >>> u = w @ J
    >>> torch.allclose(J @ u / J.norm(dim=1), (J @ u / J.norm(dim=1))[0].expand(2))   # equal projections
    True
    """

    properties = frozenset({"permutation_invariant"})

    def _weights(self, gram):
        return ops.imtlg_weights(gram)
