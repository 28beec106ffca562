"""GLS: the geometric loss strategy (Chennupati et al. 2019)."""

from __future__ import annotations

import torch

from ._base import Weighting


class GLS(Weighting):
    """Geometric loss strategy: ``loss = (prod_t L_t)^(1/T)``, computed as ``exp(mean_t log L_t)``
    so that many small losses do not underflow; ``weights = loss / (T L_t)``.

    Chennupati et al., "MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss Strategy
    for Multi-Task Learning", CVPR Workshops 2019. The geometric mean is invariant to each task's
    loss scale: the weight of a task is inversely proportional to its own loss.

    Needs the losses only; stateless. Losses must be >= 0. A task whose loss is exactly 0 (a batch
    with no labels for it: fastmtl's losses are then 0 with zero gradient) is left out of the
    mean: it gets weight 0 and T counts only the others, instead of zeroing the whole product.
    If every loss is 0 the returned loss is 0 with all weights 0.

    >>> import torch
    >>> from fastmtl.weighting import GLS
    >>> gls = GLS(2)
    >>> gls(torch.tensor([1.0, 4.0]))
    tensor(2.)
    >>> gls.weights  # 2 / (2 * 1), 2 / (2 * 4)
    tensor([1.0000, 0.2500])
    """

    def _loss_and_weights(self, losses, gram):
        self._check_nonnegative(losses)
        present = losses > 0
        count = int(present.sum())
        if count == 0:
            return (losses * 0).sum(), torch.zeros_like(losses)
        # log(1) = 0 at the absent tasks: they add nothing and, through where, get no gradient.
        logs = torch.log(torch.where(present, losses, torch.ones_like(losses)))
        loss = torch.exp(logs.sum() / count)
        safe = torch.where(present, losses.detach(), torch.ones_like(losses))
        weights = torch.where(present, loss.detach() / (count * safe), torch.zeros_like(losses))
        return loss, weights
