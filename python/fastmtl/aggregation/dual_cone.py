"""UPGrad and DualProj: projections onto the dual cone of the task gradients (Quinton & Rey 2024)."""

from __future__ import annotations

import torch

from .. import ops
from ._base import Aggregator, check_scalar, check_vector, checked_pref


class _DualConeMethod(Aggregator):
    """The shared hyperparameters of UPGrad and DualProj: the preference vector and torchjd's
    normalisation (``norm_eps``) and regularisation (``reg_eps``) of the Gram matrix."""

    def __init__(self, pref_vector=None, norm_eps: float = 1e-4, reg_eps: float = 1e-4):
        super().__init__()
        name = type(self).__name__
        self.pref_vector = check_vector(name, "pref_vector", pref_vector)
        self.norm_eps = check_scalar(name, "norm_eps", norm_eps)
        self.reg_eps = check_scalar(name, "reg_eps", reg_eps)

    def _pref(self, gram):
        T = gram.shape[-1]
        return checked_pref(type(self).__name__, self.pref_vector, T, gram, 1.0 / T)

    def _hyperparameters(self):
        return {"norm_eps": self.norm_eps, "reg_eps": self.reg_eps}


class UPGrad(_DualConeMethod):
    """Unconflicting projection of gradients (Quinton & Rey 2024, "Jacobian Descent for Multi-Objective
    Optimization"): every gradient ``pref_t g_t`` is projected onto the dual cone of all gradients (the
    directions that conflict with none of them) and the projections are summed. The update has a
    non-negative inner product with every task gradient.

    Each projection is a quadratic program ``min v^T H v s.t. v >= u`` over the Gram matrix, normalised
    by its trace and regularised by ``reg_eps`` exactly as torchjd does (so results agree with torchjd's
    ``UPGrad`` to rounding); solved by an active-set method in C++ (exact in finitely many steps, KKT
    conditions to ~1e-13), the T projections in parallel. Scale-invariant.

    ``pref_vector``: the weights of the projected gradients (default ``1/T`` each).

    >>> import torch
    >>> from fastmtl.aggregation import UPGrad
    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    >>> w = UPGrad()(J @ J.T)
    >>> bool(torch.all(J @ (w @ J) >= 0))       # conflicts with no task
    True
    """

    def _weights(self, gram):
        u = torch.diag_embed(self._pref(gram))  # [N, T, T]: row t projects pref_t g_t
        return ops.dual_cone_projection(gram, u, self.norm_eps, self.reg_eps).sum(dim=1).to(gram.dtype)


class DualProj(_DualConeMethod):
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

    def _weights(self, gram):
        return ops.dual_cone_projection(gram, self._pref(gram).unsqueeze(1), self.norm_eps, self.reg_eps).squeeze(1).to(gram.dtype)
