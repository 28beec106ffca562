"""The per-task gradients of the shared parameters, kept so that the Gram matrix and the weighted
update cost one GEMM each rather than a few small ops per parameter block.

A trunk has tens of parameter blocks (a transformer layer: 12). Summing the Gram matrix block by
block (``addmm_`` per block) and the update block by block (``tensordot`` per block) took 0.3 ms of
a 6 ms step on a small transformer (25 blocks, T = 3), more than the T-pass loop's one ``cat`` per
task and one GEMM. Where the gradients come one task at a time (the task-loop path), they are
written straight into the rows of one ``[T, P]`` matrix, and the blocks are views of its columns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Callable

import torch

__all__ = ["TaskJacobian", "gram_dtype", "gram_of", "blocks_gram", "weighted_sum"]


def gram_dtype(tensors) -> torch.dtype:
    """The dtype a Gram matrix of these gradients is summed in: their promoted dtype, float32 for
    16-bit gradients (a bfloat16 Gram keeps 3 digits, fewer than the aggregators need)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def gram_of(flat: torch.Tensor) -> torch.Tensor:
    """``flat @ flat.T`` of a ``[T, N]`` matrix, summed in :func:`gram_dtype`."""
    flat = flat.to(gram_dtype([flat]))
    return flat @ flat.T


def blocks_gram(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """``J J^T`` of the Jacobian whose column blocks are ``blocks`` (each ``[T, *shape]``)."""
    T = blocks[0].shape[0]
    dtype = gram_dtype(blocks)
    gram = torch.zeros((T, T), dtype=dtype, device=blocks[0].device)
    for block in blocks:
        flat = block.reshape(T, -1).to(dtype)
        gram.addmm_(flat, flat.T)
    return gram


def weighted_sum(weights: torch.Tensor, stacked: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``sum_t weights[t] x[t]`` for every ``[T, ...]`` tensor x."""
    return [torch.tensordot(weights.to(x.dtype), x, dims=1) for x in stacked]


class TaskJacobian(Sequence):
    """The T per-task gradients of some parameter blocks: ``self[i]`` is block i's ``[T, *shape]``.
    ``flat`` is the ``[T, P]`` Jacobian when the blocks are views of it, else None (then the Gram
    matrix and the update are summed block by block, and :meth:`jacobian` concatenates)."""

    def __init__(self, blocks: Sequence[torch.Tensor], flat: torch.Tensor | None = None):
        self._blocks = list(blocks)
        self.flat = flat

    @classmethod
    def _of_flat(cls, flat: torch.Tensor, shapes: list[tuple[int, ...]]) -> TaskJacobian:
        jacobian = cls([], flat)
        jacobian._shapes = shapes
        jacobian._blocks = None  # views made when asked for: the Gram and the update need none
        return jacobian

    @property
    def blocks(self) -> list[torch.Tensor]:
        """Each block's ``[T, *shape]`` (views of :attr:`flat` where there is one)."""
        if self._blocks is None:
            self._blocks = _views(self.flat, self._shapes)
        return self._blocks

    @classmethod
    def from_task_passes(
        cls,
        num_tasks: int,
        inputs: Sequence[torch.Tensor],
        one_task: Callable[[int, bool], Sequence[torch.Tensor | None]],
        retain_graph: bool,
    ) -> TaskJacobian:
        """``one_task(t, retain)`` (one backward pass: a gradient or None per input) for every task.
        When the inputs share a dtype and device, each pass's gradients are concatenated into one
        ``[P]`` row as it ends and the rows stacked into the ``[T, P]`` matrix after the last pass
        (the T-pass loop's ``cat`` and ``stack``); otherwise each block's T gradients are stacked.
        Peak memory: the passes' (T - 1 rows plus one pass's buffers), or 2 T x P while the rows
        are stacked, as the loop's. (Allocating the matrix before the first pass added T x P to
        every pass: 1% more than the loop's peak on a small CNN.)"""
        T = num_tasks
        same_kind = all(x.dtype == inputs[0].dtype and x.device == inputs[0].device for x in inputs)
        if not same_kind:
            return cls(_stacked(T, inputs, one_task, retain_graph))
        sizes = [x.numel() for x in inputs]
        like = inputs[0]
        rows = []
        for t in range(T):
            grads = one_task(t, retain_graph or t + 1 < T)
            # One row per pass, its gradients dropped at once, as the T-pass loop's cat (keeping each
            # pass's gradient tensors until the end changed how glibc's malloc reuses the passes'
            # activation-sized buffers: 3.6x the page faults and 1.3x the time of a CNN step).
            rows.append(
                torch.cat([like.new_zeros(n) if g is None else g.reshape(-1) for g, n in zip(grads, sizes)])
            )  # a None gradient: the input is unused
            grads = None
        flat = torch.stack(rows)
        rows = None
        return cls._of_flat(flat, [tuple(x.shape) for x in inputs])

    def __len__(self) -> int:
        return len(self.blocks) if self.flat is None else len(self._shapes)

    def __getitem__(self, index):
        return self.blocks[index]

    def gram(self) -> torch.Tensor:
        """``J J^T``, summed in :func:`gram_dtype`."""
        return blocks_gram(self.blocks) if self.flat is None else gram_of(self.flat)

    def weighted(self, weights: torch.Tensor) -> list[torch.Tensor]:
        """``sum_t weights[t] g_t`` per block."""
        if self.flat is None:
            return weighted_sum(weights, self.blocks)
        update = weights.to(self.flat.dtype) @ self.flat
        return [u.view(shape) for u, shape in zip(torch.split(update, self.sizes()), self._shapes)]

    def jacobian(self) -> torch.Tensor:
        """The ``[T, P]`` Jacobian, columns in block order."""
        if self.flat is not None:
            return self.flat
        T = self.blocks[0].shape[0]
        return torch.cat([g.reshape(T, -1) for g in self.blocks], dim=1)

    def sizes(self) -> list[int]:
        """Each block's number of parameters."""
        if self.flat is None:
            return [b[0].numel() for b in self.blocks]
        return [math.prod(shape) for shape in self._shapes]


def _views(flat: torch.Tensor, shapes) -> list[torch.Tensor]:
    T = flat.shape[0]
    views, offset = [], 0
    for shape in shapes:
        n = math.prod(shape)
        views.append(flat[:, offset : offset + n].view((T,) + tuple(shape)))
        offset += n
    return views


def _stacked(T: int, inputs, one_task, retain_graph: bool) -> list[torch.Tensor]:
    """Each block's T gradients stacked only after the last pass, each task's copy dropped as its
    block is stacked: memory peaks at T x P plus one block."""
    rows = [list(one_task(t, retain_graph or t + 1 < T)) for t in range(T)]
    blocks = []
    for i, x in enumerate(inputs):
        parts = [torch.zeros_like(x) if row[i] is None else row[i] for row in rows]
        blocks.append(torch.stack(parts))
        for row in rows:
            row[i] = None
        del parts
    return blocks
