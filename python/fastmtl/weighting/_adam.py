"""One step of torch.optim.Adam on a method's own state tensors: the meta optimizers of FAMO and
Auto-Lambda, whose moments live in module buffers so that they travel with ``state_dict()``."""

from __future__ import annotations

import math

import torch

#: torch.optim.Adam's defaults, which both methods' official code keeps.
BETAS = (0.9, 0.999)
EPS = 1e-8


@torch.no_grad()
def adam_step_(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int, lr: float
) -> None:
    """``param`` moved in place by torch.optim.Adam's update (no weight decay, no amsgrad) for
    ``grad``; ``exp_avg`` / ``exp_avg_sq`` are its moments (updated in place), ``step`` the 1-based
    number of this step."""
    beta1, beta2 = BETAS
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(EPS)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
