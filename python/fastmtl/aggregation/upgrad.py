"""UPGrad: the sum of the projections of the gradients onto their dual cone."""

from __future__ import annotations

from ._dual_cone import DualConeMethod


class UPGrad(DualConeMethod):
    """Unconflicting projection of gradients (Quinton & Rey 2024, "Jacobian Descent for Multi-Objective
    Optimization"): every gradient ``pref_t g_t`` is projected onto the dual cone of all gradients (the
    directions that conflict with none of them) and the projections are summed. The update has a
    non-negative inner product with every task gradient.

    Each projection is a quadratic program ``min v^T H v s.t. v >= u`` over the Gram matrix, normalised
    by its trace and regularised by ``reg_eps`` exactly as torchjd does (so results agree with torchjd's
    ``UPGrad`` to rounding); solved by an active-set method in C++ (exact in finitely many steps, KKT
    conditions to ~1e-13), the T projections in parallel. Scale-invariant.

    ``pref_vector``: the weights of the projected gradients (default ``1/T`` each).

    Linear under scaling (the update of ``diag(c) J`` is linear in ``c > 0``) for the exact projection,
    i.e. ``reg_eps=0`` (to ~1e-9); the default ``reg_eps=1e-4`` moves that by up to ~1e-2 relative.

    >>> import torch
    >>> from fastmtl.aggregation import UPGrad
    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    >>> w = UPGrad()(J @ J.T)
    >>> bool(torch.all(J @ (w @ J) >= 0))       # conflicts with no task
    True
    """

    properties = frozenset({"linear_under_scaling", "non_conflicting", "permutation_invariant"})
