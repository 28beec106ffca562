"""EW: equal weighting, the baseline every other method is compared with."""

from __future__ import annotations

import torch

from ._base import Weighting


class EW(Weighting):
    """Equal weighting: ``loss = sum_t L_t``, every weight 1.

    Needs the losses only; stateless. The baseline of the MTL literature (e.g. LibMTL's ``EW``).

    >>> import torch
    >>> from fastmtl.weighting import EW
    >>> ew = EW(2)
    >>> ew(torch.tensor([0.5, 2.0]))
    tensor(2.5000)
    >>> ew.weights
    tensor([1., 1.])
    """

    def _loss_and_weights(self, losses, gram):
        return losses.sum(), torch.ones_like(losses)
