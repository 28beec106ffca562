"""How the per-task engine cooperates with data-parallel training (DDP, torch.distributed).

The engine writes ``.grad`` itself, so DDP's all-reduce hooks never see its gradients; it does
their work instead. Under data parallelism the global per-task gradient is the mean of the ranks'
per-task gradients, so the global Gram matrix has cross-rank terms. Two ways (``ddp_gram``):

* ``"exact"``: all-reduce the per-task gradients (the ``[T, P]`` Jacobian: T times DDP's usual
  traffic, and the Jacobian in memory), then the Gram matrix of their mean: the same weights and
  update as one process with the whole batch would compute (for equal shards).
* ``"local"`` (default): all-reduce the ranks' Gram matrices (T² numbers), so every rank uses the
  same weights; the Gram matrix lacks the cross-rank terms: ``G = sum_r G_r / R^2``. The update is
  then the mean of the ranks' updates, as DDP's.
* ``"none"``: no communication (each rank keeps its local update; for callers who synchronise
  gradients themselves).

In ``mode="rep"`` the ranks' representation gradients belong to different samples, so the local
Grams' sum over ``R^2`` *is* the exact Gram: both settings all-reduce the Grams.
"""

from __future__ import annotations

import torch

DDP_GRAMS = ("local", "exact", "none")


class DataParallelSync:
    """The communication of one engine call: inactive (every method an identity) outside an
    initialised process group of more than one rank, or with ``ddp_gram="none"``."""

    def __init__(self, ddp_gram: str, process_group=None):
        if ddp_gram not in DDP_GRAMS:
            raise ValueError(f"fastmtl.mtl_backward: argument 'ddp_gram' expected one of {DDP_GRAMS}, got {ddp_gram!r}")
        self.how, self.group, self.size = ddp_gram, process_group, 1
        dist = torch.distributed
        if ddp_gram != "none" and dist.is_available() and dist.is_initialized():
            self.size = dist.get_world_size(process_group)

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def exact(self) -> bool:
        """Whether the per-task gradients themselves are all-reduced (exact mode's Jacobian)."""
        return self.active and self.how == "exact"

    def _all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        torch.distributed.all_reduce(tensor, group=self.group)
        return tensor

    def gram(self, gram: torch.Tensor) -> torch.Tensor:
        """sum over ranks of the local Grams / R^2 (a copy; the input is not modified)."""
        if not self.active:
            return gram
        return self._all_reduce_sum(gram.clone()).div_(self.size * self.size)

    def jacobian(self, jacobian: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of the per-task gradients ``[T, P]``."""
        if not self.active:
            return jacobian
        return self._all_reduce_sum(jacobian.contiguous().clone()).div_(self.size)

    def average(self, grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """The mean over ranks of each gradient, in one coalesced all-reduce."""
        present = [g for g in grads if g is not None]
        if not self.active or not present:
            return grads
        flat = self._all_reduce_sum(torch.cat([g.reshape(-1) for g in present])).div_(self.size)
        out, offset = [], 0
        for g in grads:
            if g is None:
                out.append(None)
                continue
            out.append(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        return out
