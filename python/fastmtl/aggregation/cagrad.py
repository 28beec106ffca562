"""CAGrad: the best worst-case improvement in a ball around the mean gradient."""

from __future__ import annotations

from .. import ops
from ._base import Aggregator, check_scalar


class CAGrad(Aggregator):
    """Conflict-averse gradient descent (Liu et al. 2021): the update ``d`` maximising the smallest
    improvement ``min_t <g_t, d>`` within ``|d - g_0| <= c |g_0|`` of the mean gradient ``g_0``.

    Weights ``1/T + (phi / |g_w|) w`` where ``w`` minimises ``<g_w, g_0> + phi |g_w|`` over the simplex,
    ``phi = c |g_0|``, on the trace-normalised Gram matrix as in torchjd (zeros when ``|g_w| < norm_eps`` on that
    matrix: the gradients are on the Pareto front). Unlike torchjd, which also returns zeros whenever
    ``tr(G) < norm_eps`` (e.g. ``Task(weight=0.01)``: the whole trunk then gets no gradient), only an
    exactly zero Gram matrix gives zeros: every other one is normalised, at every scale. Solved exactly in C++ through the parametric form of the
    problem (each step a minimum-norm-point problem; see ``csrc/cpu/aggregation/cagrad.h``), where
    torchjd calls cvxpy/Clarabel, whose solutions are ~1e-9 worse in objective and so differ from the
    exact update by up to ~1e-4 relative. Scale-invariant.

    >>> import torch
    >>> from fastmtl.aggregation import CAGrad
    >>> J = torch.tensor([[1.0, 0.0], [-0.5, 1.0]], dtype=torch.float64)
    >>> w = CAGrad(c=0.5)(J @ J.T)
    >>> float(((w @ J) - J.mean(0)).norm() / J.mean(0).norm()) <= 0.5 + 1e-9   # inside the ball
    True
    """

    properties = frozenset({"permutation_invariant"})

    def __init__(self, c: float = 0.4, norm_eps: float = 1e-4):
        super().__init__()
        self.c = check_scalar("CAGrad", "c", c)
        self.norm_eps = check_scalar("CAGrad", "norm_eps", norm_eps)

    def _weights(self, gram):
        return ops.cagrad_weights(gram, self.c, self.norm_eps)

    def _hyperparameters(self):
        return {"c": self.c, "norm_eps": self.norm_eps}
