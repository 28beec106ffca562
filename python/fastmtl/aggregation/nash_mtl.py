"""Nash-MTL: the Nash bargaining solution G a = 1/a, solved by Newton's method in C++."""

from __future__ import annotations

import torch

from .. import ops
from ._base import Aggregator, check_scalar


class NashMTL(Aggregator):
    """Multi-task learning as a bargaining game (Navon et al. 2022): the Nash bargaining solution,
    the weights ``a > 0`` with ``G a = 1/a`` (each task's share of the update inversely proportional
    to its weight), then the update scaled down to norm ``max_norm`` if longer (0 disables).

    The system is solved to rounding level (Newton's method on the strictly convex
    ``a^T G a / 2 - sum log a``) instead of the official code's 20 rounds of convex-concave steps
    through cvxpy/ECOS, which stop at a residual of 1e-3 and on some well-posed Gramians fail outright.
    Tasks with a zero gradient get weight 0. When no exact solution exists (some convex combination of
    the gradients is zero: no direction improves all tasks) the weights grow large rather than infinite
    and ``max_norm`` bounds the update.

    The Gram matrix is made positive definite before solving: the least shift of its diagonal by
    ``max(1e-14, T u) max_t G_tt`` times a power of 4 (``u`` the unit roundoff of its dtype) that makes
    ``G + shift/2 I`` Cholesky-factorable. Rounding leaves the float32 Gram of a stationary Jacobian
    slightly indefinite (eigenvalues down to about ``-T u max G_tt``), where the problem would have no
    minimum; shifted, the update stays bounded (``|update|^2 <= T`` for Nash-MTL at every solution).
    Newton's method either converges (every residual of the system at rounding level) or warns
    (``UserWarning``, naming the matrix and its residual) and returns its last iterate.

    Stateful: ``update_weights_every=k`` recomputes the weights at every k-th call and reuses them in
    between (re-scaled to ``max_norm`` for the current Gram matrix), as the official code's
    ``update_weights_every``; :meth:`reset` and ``state_dict`` cover that state.

    >>> import torch
    >>> from fastmtl.aggregation import NashMTL
    >>> G = torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    >>> NashMTL(max_norm=0)(G)                            # a_t = 1 / |g_t| for orthogonal gradients
    tensor([0.5000, 1.0000], dtype=torch.float64)
    """

    properties = frozenset({"non_conflicting", "permutation_invariant"})

    def __init__(self, max_norm: float = 1.0, update_weights_every: int = 1):
        super().__init__()
        self.max_norm = check_scalar("NashMTL", "max_norm", max_norm)
        if int(update_weights_every) != update_weights_every or update_weights_every < 1:
            raise ValueError(
                f"fastmtl.aggregation.NashMTL: argument 'update_weights_every' expected an integer >= 1, got "
                f"{update_weights_every!r}"
            )
        self.update_weights_every = int(update_weights_every)
        self.reset()

    def reset(self) -> None:
        self._step = 0
        self._last = None  # the unscaled weights of the last update, [N, T] float64

    def _weights(self, gram):
        if self._step % self.update_weights_every == 0 or self._last is None or self._last.shape != gram.shape[:2]:
            self._last = ops.power_system_weights(gram, 1.0).to(torch.float64).cpu()
        self._step += 1
        weights = self._last.to(gram.device, gram.dtype)
        if self.max_norm > 0:
            norm = torch.einsum("ns,nst,nt->n", weights, gram, weights).clamp_min(0).sqrt()
            weights = torch.where(
                (norm > self.max_norm).unsqueeze(-1), weights * (self.max_norm / norm).unsqueeze(-1), weights
            )
        return weights

    def get_extra_state(self):
        return {"step": self._step, "last": self._last}

    def set_extra_state(self, state):
        self._step = state["step"]
        self._last = state["last"]

    def _hyperparameters(self):
        return {"max_norm": self.max_norm, "update_weights_every": self.update_weights_every}
