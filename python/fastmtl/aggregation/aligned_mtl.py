"""Aligned-MTL: the aligned principal components of the gradients.

Eigenvalues within ``T * eps * max|lambda|`` of zero count as zero, ``eps`` being the machine epsilon of
the Gram's dtype (a float32 Gram matrix carries noise at ~1e-7 of its scale): the cut-off of
``torch.linalg.pinv`` and torchjd.
"""

from __future__ import annotations

from .. import ops
from ._base import Aggregator, check_vector, checked_pref

_SCALE_MODES = ("min", "median", "rmse")


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

    properties = frozenset({"permutation_invariant"})

    def __init__(self, pref_vector=None, scale_mode: str = "min"):
        super().__init__()
        if scale_mode not in _SCALE_MODES:
            raise ValueError(
                f"fastmtl.aggregation.AlignedMTL: Invalid scale_mode={scale_mode!r}, expected one of "
                f"{', '.join(repr(m) for m in _SCALE_MODES)} (argument 'scale_mode')"
            )
        self.pref_vector = check_vector("AlignedMTL", "pref_vector", pref_vector)
        self.scale_mode = scale_mode

    def _weights(self, gram):
        T = gram.shape[-1]
        return ops.aligned_mtl_weights(
            gram, checked_pref("AlignedMTL", self.pref_vector, T, gram, 1.0 / T), self.scale_mode
        )

    def _hyperparameters(self):
        return {"scale_mode": self.scale_mode}
