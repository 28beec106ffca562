"""What PCGrad and GradVac share: the random visiting orders of gradient surgery."""

from __future__ import annotations

import torch


def draw_order(N: int, T: int, generator, exclude_self: bool) -> torch.Tensor:
    """One random visiting order per task, drawn task by task as torchjd draws them (so that the same
    seed gives the same orders): a permutation of all T tasks, or of the T - 1 others."""
    rows = []
    for _ in range(N):
        for i in range(T):
            if exclude_self:
                others = torch.tensor([j for j in range(T) if j != i], dtype=torch.int64)
                rows.append(others[torch.randperm(T - 1, generator=generator)])
            else:
                rows.append(torch.randperm(T, generator=generator))
    return torch.stack(rows).reshape(N, T, T - 1 if exclude_self else T)
