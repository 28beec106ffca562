"""The shared hyperparameters of UPGrad and DualProj (Quinton & Rey 2024): the dual-cone projections."""

from __future__ import annotations

import torch

from .. import ops
from ._base import Aggregator, check_scalar, check_vector, checked_pref

_unbatched = ops.dual_cone_weights_unbatched
_is_dynamo_compiling = torch.compiler.is_dynamo_compiling


class DualConeMethod(Aggregator):
    """The shared hyperparameters of UPGrad and DualProj: the preference vector and torchjd's
    normalisation (``norm_eps``) and regularisation (``reg_eps``) of the Gram matrix.

    ``norm_eps`` (default 0): a Gram matrix whose trace is below it counts as zero (then the projection
    of ``u`` is ``u`` itself, the preference-weighted mean). torchjd's default is 1e-4, which makes a
    small-scale problem (``tr(G) < 1e-4``, e.g. ``Task(weight=0.01)`` or small losses) return the mean,
    conflicting updates included; fastmtl's 0 normalises every non-zero Gram matrix by its trace, so the
    method is scale-invariant at every scale float64 represents. ``norm_eps=1e-4`` reproduces torchjd
    there. ``reg_eps`` (default 1e-4, as torchjd): ``G / tr(G) + reg_eps I``; values below 1e-11 (0
    included) are raised to 1e-11, the least at which the QP of a rank-deficient Gram matrix is still
    solved to rounding level (with 0 it has no unique solution and a solver can stop at a conflicting
    point)."""

    def __init__(self, pref_vector=None, norm_eps: float = 0.0, reg_eps: float = 1e-4):
        super().__init__()
        name = type(self).__name__
        self.pref_vector = check_vector(name, "pref_vector", pref_vector)
        self.norm_eps = check_scalar(name, "norm_eps", norm_eps)
        self.reg_eps = check_scalar(name, "reg_eps", reg_eps)

    #: UPGrad: the sum of the projections of each pref_t g_t; DualProj: the projection of their sum.
    _each = True

    def __call__(self, gram=None, *, jacobian=None, cross_gram=None):
        # The lean path of an unbatched [T, T] Gram matrix on the CPU: one C++ call that checks the matrix
        # and returns the weights, or None (then the general path: the op). Issue 17: the fixed cost of
        # the general path dominated a 5-20 us solve. torch.compile traces the general path; tensors
        # of torch.export, functorch and dispatch modes are not plain, so the C++ call returns None.
        if jacobian is None and cross_gram is None and not _is_dynamo_compiling():
            try:
                weights = _unbatched(gram, self.pref_vector, self.norm_eps, self.reg_eps, self._each)
            except (ValueError, TypeError) as error:  # the op names its argument; say whose call it was
                raise type(error)(f"fastmtl.aggregation.{type(self).__name__}: {error}") from None
            if weights is not None:
                return weights
        return super().__call__(gram, jacobian=jacobian, cross_gram=cross_gram)

    def _weights(self, gram):
        return ops.dual_cone_weights(gram, self._pref(gram), self.norm_eps, self.reg_eps, self._each)

    def _pref(self, gram):
        T = gram.shape[-1]
        return checked_pref(type(self).__name__, self.pref_vector, T, gram, 1.0 / T)

    def _hyperparameters(self):
        return {"norm_eps": self.norm_eps, "reg_eps": self.reg_eps}
