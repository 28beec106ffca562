"""The shared hyperparameters of UPGrad and DualProj (Quinton & Rey 2024): the dual-cone projections."""

from __future__ import annotations

import functools

import torch

from .. import ops
from ._base import Aggregator, check_scalar, check_vector, checked_pref

_DTYPES = (torch.float32, torch.float64)


@functools.lru_cache(maxsize=64)
def _uniform(T: int) -> torch.Tensor:
    # Read-only by the op: one default preference per T instead of a new tensor per call.
    return torch.full((T,), 1.0 / T, dtype=torch.float64)


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

    def forward(self, gram):
        # The lean path of an unbatched [T, T] Gram matrix: one op call that checks the matrix and returns
        # the weights (issue 17: the fixed cost of the general path dominated a 5-20 us solve).
        if (
            type(gram) is torch.Tensor
            and gram.dim() == 2
            and gram.shape[0] > 0
            and gram.dtype in _DTYPES
            and not gram.requires_grad
            and gram.device.type != "meta"
        ):
            T = gram.shape[0]
            pref = _uniform(T) if self.pref_vector is None else self._checked_pref_vector(T)
            try:
                return ops.dual_cone_weights(gram, pref, self.norm_eps, self.reg_eps, self._each)
            except (ValueError, TypeError) as error:  # the op names its argument; say whose call it was
                raise type(error)(f"fastmtl.aggregation.{type(self).__name__}: {error}") from None
        return super().forward(gram)

    def _weights(self, gram):
        return ops.dual_cone_weights(gram, self._pref(gram), self.norm_eps, self.reg_eps, self._each)

    def _checked_pref_vector(self, T):
        if self.pref_vector.shape[0] != T:
            raise ValueError(
                f"fastmtl.aggregation.{type(self).__name__}: argument 'pref_vector' expected shape [{T}] (one entry "
                f"per task of 'gram'), got {list(self.pref_vector.shape)}"
            )
        return self.pref_vector

    def _pref(self, gram):
        T = gram.shape[-1]
        return checked_pref(type(self).__name__, self.pref_vector, T, gram, 1.0 / T)

    def _hyperparameters(self):
        return {"norm_eps": self.norm_eps, "reg_eps": self.reg_eps}
