"""UW: homoscedastic uncertainty weighting (Kendall et al. 2018)."""

from __future__ import annotations

import torch
from torch import nn

from ._base import Weighting


class UW(Weighting):
    """Uncertainty weighting: one learnable log-variance ``s_t = log sigma_t^2`` per task,
    ``loss = sum_t L_t / (2 exp(s_t)) + s_t / 2``, so ``weights = exp(-s_t) / 2``.

    Kendall, Gal, Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
    Geometry and Semantics", CVPR 2018. This is the form LibMTL uses (the 1/2 on both terms for
    every task, whatever its likelihood), and the log-variance parametrisation keeps sigma > 0
    without a constraint.

    Needs the losses only. ``log_vars`` (init 0) is an ``nn.Parameter``: give ``uw.parameters()``
    to the optimizer together with the model's, otherwise the weights never move.

    >>> import torch
    >>> from fastmtl.weighting import UW
    >>> uw = UW(2)
    >>> loss = uw(torch.tensor([1.0, 4.0]))
    >>> loss
    tensor(2.5000, grad_fn=<SumBackward0>)
    >>> uw.weights
    tensor([0.5000, 0.5000])
    >>> loss.backward()
    >>> uw.log_vars.grad  # 1/2 - L_t/2: the task with the larger loss gets a larger variance
    tensor([ 0.0000, -1.5000])
    """

    def __init__(self, num_tasks: int):
        super().__init__(num_tasks)
        self.log_vars = nn.Parameter(torch.zeros(num_tasks))

    def _loss_and_weights(self, losses, gram):
        s = self.log_vars.to(losses)
        precision_half = 0.5 * torch.exp(-s)
        loss = (losses * precision_half + 0.5 * s).sum()
        return loss, precision_half
