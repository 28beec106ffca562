"""STCH: smooth Tchebycheff scalarization (Lin et al. 2024)."""

from __future__ import annotations

import torch

from ._base import Weighting, check_number
from ._scalarized import checked_preference, effective_weights


class STCH(Weighting):
    """Smooth Tchebycheff scalarization: ``loss = mu log sum_t exp(w_t (L_t - z_t) / mu)``, a smooth
    upper bound of the weighted worst task ``max_t w_t (L_t - z_t)`` that tightens as ``mu`` shrinks.
    ``weights`` (the preference ``w``, default ``1/T`` each) and ``reference`` (the ideal point ``z``,
    default 0). Computed around the largest term (Appendix B.1), so a small ``mu`` never overflows.
    ``weights`` of a call (``d loss / d L``): ``w_t softmax_t(w (L - z) / mu)``.

    Lin, Zhang, Yang, Zhang, Zhang, "Smooth Tchebycheff Scalarization for Multi-Objective Optimization",
    ICML 2024; torchjd's ``STCH`` (same arithmetic; torchjd has no default ``mu``, LibMTL's is 1).
    Needs the losses only; stateless.

    >>> import torch
    >>> from fastmtl.weighting import STCH
    >>> stch = STCH(2, mu=1.0, weights=[1.0, 1.0])
    >>> round(float(stch(torch.tensor([0.0, 0.0]))), 6)     # log 2
    0.693147
    >>> stch.weights
    tensor([0.5000, 0.5000])
    """

    def __init__(self, num_tasks: int, mu: float = 1.0, weights=None, reference=None):
        super().__init__(num_tasks)
        self.mu = check_number(mu, "mu", "STCH", "a finite number > 0", lambda v: 0 < v < float("inf"))
        self.register_buffer("preference", checked_preference(weights, "weights", "STCH", num_tasks, 1.0 / num_tasks))
        self.register_buffer("reference", checked_preference(reference, "reference", "STCH", num_tasks, None))

    def _scalarize(self, losses):
        shifted = losses if self.reference is None else losses - self.reference.to(losses)
        y = self.preference.to(losses) * shifted
        top = y.max()
        return self.mu * torch.logsumexp((y - top) / self.mu, dim=0) + top

    def _loss_and_weights(self, losses, gram):
        return self._scalarize(losses), effective_weights(self._scalarize, losses)

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, mu={self.mu}"
