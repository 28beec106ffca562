"""Euclidean projection onto the probability simplex, shared by MoDo and SDMGrad."""

from __future__ import annotations

import torch


def project_onto_simplex(y: torch.Tensor) -> torch.Tensor:
    """``argmin_{x >= 0, sum x = 1} |x - y|`` of a vector ``y [T]`` (Held et al. 1974; Duchi et al. 2008):
    ``max(y - theta, 0)`` with ``theta = (sum of the k largest - 1) / k`` for the largest k whose k-th
    largest entry exceeds it."""
    T = y.shape[0]
    ordered = torch.sort(y, descending=True).values
    thetas = (torch.cumsum(ordered, 0) - 1.0) / torch.arange(1, T + 1, dtype=y.dtype, device=y.device)
    kept = int((ordered > thetas).nonzero().max()) if T > 1 else 0
    return (y - thetas[kept]).clamp(min=0.0)
