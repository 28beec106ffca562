"""Soft parameter sharing (Evgeniou & Pontil 2004): task t uses ``W + W_t``, with a penalty on W_t."""

from __future__ import annotations

import torch
from torch import nn

from .._validation import check_int_at_least
from ._init import linear_init_


class SoftSharedLinear(nn.Module):
    """A linear layer per task, ``y_t = x_t (W + W_t)^T + b_t``, all tasks in one GEMM.

    ``W`` (``weight``, ``[out, in]``) is shared; ``W_t`` (``task_weight``, ``[T, out, in]``) starts
    at zero, so training begins from hard sharing and :meth:`penalty` (``sum_t ||W_t||^2``, to add
    to the loss times a coefficient) keeps the tasks close. ``W`` and ``b_t`` are initialised like
    ``nn.Linear``.

    Input ``[B, in]`` (shared: one GEMM of ``T * out`` columns) or ``[T, B, in]`` (per task: one
    batched GEMM). Output ``[T, B, out]``; ``forward`` returns it, ``task_features`` too.

    >>> import torch, fastmtl
    >>> layer = fastmtl.nn.SoftSharedLinear(8, 4, num_tasks=3)
    >>> layer(torch.randn(5, 8)).shape, layer.penalty().item()
    (torch.Size([3, 5, 4]), 0.0)
    """

    def __init__(self, in_features: int, out_features: int, num_tasks: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features), ("num_tasks", num_tasks)):
            check_int_at_least("SoftSharedLinear", name, value, 1)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.num_tasks = in_features, out_features, num_tasks
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.task_weight = nn.Parameter(torch.zeros(num_tasks, out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_tasks, out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        linear_init_(self.weight, None)
        nn.init.zeros_(self.task_weight)
        if self.bias is not None:
            bound = 1.0 / self.in_features**0.5
            nn.init.uniform_(self.bias, -bound, bound)

    def penalty(self) -> torch.Tensor:
        """``sum_t ||W_t||_F^2``."""
        return self.task_weight.square().sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, n, d = self.num_tasks, self.out_features, self.in_features
        if x.shape[-1:] != (d,) or x.dim() not in (2, 3) or (x.dim() == 3 and x.shape[0] != T):
            raise ValueError(f"SoftSharedLinear: input expected shape [B, {d}] or [{T}, B, {d}], got {list(x.shape)}")
        effective = self.weight + self.task_weight  # [T, out, in]
        if x.dim() == 2:
            flat_bias = None if self.bias is None else self.bias.reshape(T * n)
            out = torch.nn.functional.linear(x, effective.reshape(T * n, d), flat_bias)  # [B, T * out]
            return out.view(x.shape[0], T, n).transpose(0, 1)
        if self.bias is None:
            return torch.bmm(x, effective.transpose(1, 2))
        return torch.baddbmm(self.bias.unsqueeze(1), x, effective.transpose(1, 2))

    task_features = forward

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, num_tasks={self.num_tasks}, "
            f"bias={self.bias is not None}"
        )
