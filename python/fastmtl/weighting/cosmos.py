"""COSMOS: the linear scalarization with a cosine penalty (Ruchte & Grabocka 2021)."""

from __future__ import annotations

from torch.nn.functional import cosine_similarity

from ._base import Weighting, check_number
from ._scalarized import checked_preference, effective_weights


class COSMOS(Weighting):
    """COSMOS scalarization: ``loss = sum_t r_t L_t - lambda_ cos(r, L)``, the linear scalarization with
    preference ``r`` (``weights``, default ``1/T`` each) rewarded for pointing the loss vector along ``r``,
    which spreads the trade-offs of a Pareto front. ``weights`` of a call: ``d loss / d L``. The full
    method also feeds ``r`` to the model and resamples it (Dirichlet) every step: assign
    ``method.preference`` before a call to do that.

    Ruchte & Grabocka, "Scalable Pareto Front Approximation for Deep Multi-Objective Learning", ICDM
    2021; torchjd's ``COSMOS`` (same arithmetic; torchjd has no defaults, here ``lambda_ = 1``).
    Needs the losses only; stateless.

    >>> import torch
    >>> from fastmtl.weighting import COSMOS
    >>> cosmos = COSMOS(2, lambda_=1.0)
    >>> round(float(cosmos(torch.tensor([1.0, 1.0]))), 6)   # 1 - cos(0) = 0
    0.0
    """

    def __init__(self, num_tasks: int, lambda_: float = 1.0, weights=None):
        super().__init__(num_tasks)
        self.lambda_ = check_number(
            lambda_, "lambda_", "COSMOS", "a finite number >= 0", lambda v: 0 <= v < float("inf")
        )
        self.register_buffer("preference", checked_preference(weights, "weights", "COSMOS", num_tasks, 1.0 / num_tasks))

    def _scalarize(self, losses):
        r = self.preference.to(losses)
        return (r * losses).sum() - self.lambda_ * cosine_similarity(r, losses, dim=0)

    def _loss_and_weights(self, losses, gram):
        return self._scalarize(losses), effective_weights(self._scalarize, losses)

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, lambda_={self.lambda_}"
