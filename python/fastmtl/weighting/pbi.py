"""PBI: penalty-based boundary intersection (Zhang & Li 2007)."""

from __future__ import annotations

import torch

from ._base import Weighting, check_number
from ._scalarized import checked_preference, effective_weights

# Under the square root of d2, so that its gradient stays finite where the losses lie on the preference
# direction (always for T = 1): moves the result by at most ~1e-6 there (torchjd's constant).
_EPSILON = 1e-12


class PBI(Weighting):
    """Penalty-based boundary intersection: with ``f = L - z`` (``reference`` z, default 0) and the unit
    preference direction ``u = w / |w|`` (``weights`` w, default all equal), ``d1 = <f, u>`` (progress along
    it) and ``d2 = |f - d1 u|`` (distance to it): ``loss = d1 + theta d2``. ``weights`` of a call:
    ``d loss / d L = u + theta (f - d1 u) / d2``.

    Zhang & Li, "MOEA/D: A Multiobjective Evolutionary Algorithm Based on Decomposition", IEEE TEC 2007
    (``theta = 5`` in its experiments, the default here); torchjd's ``PBI`` (same arithmetic).
    Needs the losses only; stateless.

    >>> import torch
    >>> from fastmtl.weighting import PBI
    >>> pbi = PBI(2, theta=5.0, weights=[1.0, 0.0])
    >>> round(float(pbi(torch.tensor([3.0, 4.0]))), 4)       # d1 = 3, d2 = 4
    23.0
    """

    def __init__(self, num_tasks: int, theta: float = 5.0, weights=None, reference=None):
        super().__init__(num_tasks)
        self.theta = check_number(theta, "theta", "PBI", "a finite number >= 0", lambda v: 0 <= v < float("inf"))
        preference = checked_preference(weights, "weights", "PBI", num_tasks, 1.0)
        if not bool((preference != 0).any()):
            raise ValueError(
                f"PBI: argument 'weights' expected a non-zero preference direction, got {preference.tolist()}"
            )
        self.register_buffer("preference", preference)
        self.register_buffer("reference", checked_preference(reference, "reference", "PBI", num_tasks, None))

    def _scalarize(self, losses):
        f = losses if self.reference is None else losses - self.reference.to(losses)
        direction = self.preference.to(losses)
        direction = direction / direction.norm()
        d1 = f @ direction
        perpendicular = f - d1 * direction
        return d1 + self.theta * torch.sqrt(perpendicular @ perpendicular + _EPSILON)

    def _loss_and_weights(self, losses, gram):
        return self._scalarize(losses), effective_weights(self._scalarize, losses)

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, theta={self.theta}"
