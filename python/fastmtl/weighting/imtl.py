"""IMTL-L: the loss-balancing half of Impartial Multi-Task Learning (Liu et al. 2021)."""

from __future__ import annotations

import torch
from torch import nn

from ._base import Weighting


class IMTLL(Weighting):
    """IMTL-L: one learnable scale ``s_t`` per task, ``loss = sum_t exp(s_t) L_t - s_t``, so
    ``weights = exp(s_t)``.

    Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021 (the loss part; the gradient
    part, IMTL-G, is an aggregator in :mod:`fastmtl.aggregation`). Minimising over ``s_t`` drives
    ``exp(s_t) L_t`` towards 1: every task's scaled loss is kept at the same level.

    Needs the losses only. ``log_scales`` (init 0) is an ``nn.Parameter``: give
    ``imtl.parameters()`` to the optimizer together with the model's.

    >>> import torch
    >>> from fastmtl.weighting import IMTLL
    >>> imtl = IMTLL(2)
    >>> loss = imtl(torch.tensor([0.5, 3.0]))
    >>> loss
    tensor(3.5000, grad_fn=<SumBackward0>)
    >>> imtl.weights
    tensor([1., 1.])
    >>> loss.backward()
    >>> imtl.log_scales.grad  # exp(s_t) L_t - 1
    tensor([-0.5000,  2.0000])
    """

    def __init__(self, num_tasks: int):
        super().__init__(num_tasks)
        self.log_scales = nn.Parameter(torch.zeros(num_tasks))

    def _loss_and_weights(self, losses, gram):
        s = self.log_scales.to(losses)
        scale = torch.exp(s)
        return (scale * losses - s).sum(), scale
