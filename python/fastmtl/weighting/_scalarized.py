"""What the scalarizations STCH, COSMOS and PBI share: a preference vector and the effective weights
of a nonlinear function of the losses."""

from __future__ import annotations

import torch
from torch import Tensor


def checked_preference(values, name: str, owner: str, num_tasks: int, default: float | None) -> Tensor | None:
    """``values`` as a finite float64 vector of length ``num_tasks`` (``default`` each when None, or None)."""
    if values is None:
        return None if default is None else torch.full((num_tasks,), default, dtype=torch.float64)
    try:
        vector = torch.as_tensor(values, dtype=torch.float64).detach().clone()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"{owner}: argument '{name}' expected a sequence of {num_tasks} numbers, got {values!r}"
        ) from None
    if vector.shape != (num_tasks,) or not bool(torch.isfinite(vector).all()):
        raise ValueError(
            f"{owner}: argument '{name}' expected {num_tasks} finite numbers (one per task), got {vector.tolist()}"
        )
    return vector


def effective_weights(scalarization, losses: Tensor) -> Tensor:
    """``d scalarization(L) / d L`` at the current losses, on a detached copy (the weights a
    Weighting reports)."""
    with torch.enable_grad():
        leaf = losses.detach().requires_grad_(True)
        (weights,) = torch.autograd.grad(scalarization(leaf), leaf)
    return weights
