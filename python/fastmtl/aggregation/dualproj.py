"""DualProj: the projection of the mean gradient onto the dual cone of the gradients."""

from __future__ import annotations

from ._dual_cone import DualConeMethod


class DualProj(DualConeMethod):
    """The projection of the preference-weighted mean gradient onto the dual cone of the gradients (the
    update of GEM, Lopez-Paz & Ranzato 2017, eq. 11). Same solver and normalisation as :class:`UPGrad`,
    one projection instead of T.

    >>> import torch
    >>> from fastmtl.aggregation import DualProj
    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    >>> w = DualProj()(J @ J.T)
    >>> bool(torch.all(J @ (w @ J) >= -1e-12))
    True
    """

    properties = frozenset({"non_conflicting", "permutation_invariant"})

    _each = False
