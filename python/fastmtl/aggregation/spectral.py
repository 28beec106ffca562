"""Closed-form methods of the Gram's eigendecomposition: IMTL-G, Aligned-MTL and ConFIG.

Eigenvalues within ``T * eps * max|lambda|`` of zero count as zero, ``eps`` being the machine epsilon of
the Gram's dtype (a float32 Gram matrix carries noise at ~1e-7 of its scale): the cut-off of
``torch.linalg.pinv`` and torchjd.
"""

from __future__ import annotations

from .. import ops
from ._base import Aggregator, check_vector, checked_pref

_SCALE_MODES = ("min", "median", "rmse")


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

    def _weights(self, gram):
        return ops.imtlg_weights(gram)


class AlignedMTL(Aggregator):
    """Aligned-MTL (Senushkin et al. 2023): aligns the principal components of the gradients, i.e.
    ``weights = sqrt(scale) V diag(lambda^-1/2) V^T pref`` over the Gram's non-null eigenpairs, so the
    update is a preference-weighted sum of singular directions all rescaled to the same length.
    ``scale_mode``: the smallest (``"min"``, default), the (lower) median, or the mean (``"rmse"``, as in
    the original code) kept eigenvalue. ``pref_vector`` defaults to ``1/T``.

    >>> import torch
    >>> from fastmtl.aggregation import AlignedMTL
    >>> AlignedMTL()(torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64)))
    tensor([0.2500, 0.5000], dtype=torch.float64)
    """

    def __init__(self, pref_vector=None, scale_mode: str = "min"):
        super().__init__()
        if scale_mode not in _SCALE_MODES:
            raise ValueError(
                f"fastmtl.aggregation.AlignedMTL: argument 'scale_mode' expected one of {_SCALE_MODES}, got {scale_mode!r}"
            )
        self.pref_vector = check_vector("AlignedMTL", "pref_vector", pref_vector)
        self.scale_mode = scale_mode

    def _weights(self, gram):
        T = gram.shape[-1]
        return ops.aligned_mtl_weights(gram, checked_pref("AlignedMTL", self.pref_vector, T, gram, 1.0 / T),
                                       self.scale_mode)

    def _hyperparameters(self):
        return {"scale_mode": self.scale_mode}


class ConFIG(Aggregator):
    """Conflict-free inverse gradients (Liu et al. 2024, eq. 2): the direction ``u`` whose cosine with
    every task's unit gradient is proportional to ``pref_vector`` (default all ones: equal angles),
    ``u = U^+ pref`` for the unit gradients ``U``, scaled to length ``sum_t <g_t, u/|u|>``. From the Gram
    matrix: the cosine matrix ``C = D^-1 G D^-1`` and its pseudo-inverse. Scale-invariant.

    >>> import torch
    >>> from fastmtl.aggregation import ConFIG
    >>> J = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    >>> (ConFIG()(J @ J.T) @ J).round(decimals=12)   # 45 degrees to both, length 1/sqrt2 + 3/sqrt2
    tensor([2., 2.], dtype=torch.float64)
    """

    def __init__(self, pref_vector=None):
        super().__init__()
        self.pref_vector = check_vector("ConFIG", "pref_vector", pref_vector)

    def _weights(self, gram):
        T = gram.shape[-1]
        return ops.config_weights(gram, checked_pref("ConFIG", self.pref_vector, T, gram, 1.0))
