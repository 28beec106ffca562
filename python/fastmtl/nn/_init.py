"""Parameter initialisation shared by the modules: exactly what nn.Linear does."""

import math

import torch


def linear_init_(weight: torch.Tensor, bias) -> None:
    """nn.Linear.reset_parameters: kaiming_uniform(a=sqrt(5)) weights, U(-1/sqrt(fan_in), ...) bias."""
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in = weight.shape[1]
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        torch.nn.init.uniform_(bias, -bound, bound)
