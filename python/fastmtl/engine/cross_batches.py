"""The cross-Gram of independent batches, for the methods that need it (``requires = "cross_gram"``:
MoDo, SDMGrad; issue 17), supplied by :func:`fastmtl.mtl_backward` from per-task losses ``[K, T]``
of K = 2 or 3 independent batches.

The engine treats the ``K T`` losses as ``K T`` tasks: one exact Gram computation over them (any path
of :func:`fastmtl.engine.trunk_gram.plan_gram`: batched, task loop, streamed) gives ``[K T, K T]``,
whose block ``G[:T, T:2T] = J_1 J_2^T`` is the cross-Gram the method weighs (an unbiased estimate of
``G lambda``, where the one-batch Gram ``J J^T`` is biased). The method's weights ``w [T]`` become
weights of the ``K T`` losses, so the engine's one weighted update applies them as the methods'
authors do: K = 2, ``w`` on the mean of both batches' losses (MoDo's eq. 2.9b, torchjd's two-batch
example); K = 3, ``w`` on the third batch's losses only (LibMTL and the official code with
``three_grads``: the weights and the update come from separate draws). The task-specific
parameters (heads) get the gradient of the mean over the batches of ``sum_t L_kt``.

Rep mode cannot supply it: the features' per-task gradients of two batches live on different rows
of the features, so their cross-Gram is 0 whatever the model.

>>> import torch, fastmtl
>>> from fastmtl.aggregation import MoDo
>>> trunk, heads = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
>>> x, y = torch.randn(2, 16, 4), torch.randn(2, 16, 2)     # two independent batches of 16
>>> z = trunk(x.reshape(32, 4))                             # one trunk forward over both
>>> losses = ((heads(z).reshape(2, 16, 2) - y) ** 2).mean(1)  # [2, T]: row k, batch k's losses
>>> result = fastmtl.mtl_backward(losses, z, MoDo())
>>> result.gram.shape, result.weights.shape, trunk.weight.grad.shape
(torch.Size([2, 2]), torch.Size([2]), torch.Size([8, 4]))
"""

from __future__ import annotations

import torch

from .options import fail
from .result import MTLBackwardResult

__all__ = ["CROSS_BATCHES", "CrossBatchStep"]

CROSS_BATCHES = (2, 3)  # the numbers of independent batches a cross-Gram step takes


class CrossBatchStep:
    """One step of a cross-Gram method over losses ``[K, T]``: the flat losses the engine weighs,
    the Gram weighting it calls, the heads' gradient scale and the result as the method saw it."""

    def __init__(self, losses, method):
        name = type(method).__name__
        if not isinstance(losses, torch.Tensor) or losses.dim() != 2 or losses.shape[0] not in CROSS_BATCHES:
            got = list(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            fail(
                "losses",
                f"a [2, T] or [3, T] tensor with {name}, a method that needs the cross-Gram of independent "
                "batches: row k the per-task losses of batch k (2: the update uses both batches' mean; 3: "
                "the weights come from batches 1 and 2, the update from batch 3)",
                str(got),
            )
        if losses.shape[1] < 1:
            fail("losses", "at least one task (T >= 1)", str(list(losses.shape)))
        self.batches, self.tasks = int(losses.shape[0]), int(losses.shape[1])
        self.losses = losses
        self.flat = losses.reshape(-1)
        self.weighting = _CrossGramWeighting(method, self.batches, self.tasks)
        self.head_scale = 1.0 / self.batches

    def result(self, flat: MTLBackwardResult) -> MTLBackwardResult:
        """The engine's result over the ``K T`` flat losses, as the method saw it: losses ``[K, T]``,
        the method's weights ``[T]``, the cross-Gram ``[T, T]``; the Jacobian (``keep_jacobian``)
        stays ``[K T, P]``, row ``k T + t`` batch k's task t."""
        T = self.tasks
        flat.losses = self.losses.detach()
        flat.weights = self.weighting.method_weights(flat.weights)
        flat.gram = flat.gram[:T, T : 2 * T]
        return flat


class _CrossGramWeighting:
    """A Gram weighting of the ``K T`` flat losses around a cross-Gram method: it reads the cross-Gram
    block of the ``[K T, K T]`` Gram, asks the method for ``w [T]`` and spreads it over the losses
    that make the update (module docstring)."""

    requires = "gram"

    def __init__(self, method, batches: int, tasks: int):
        self.method, self.batches, self.tasks = method, batches, tasks

    def __call__(self, gram: torch.Tensor) -> torch.Tensor:
        T = self.tasks
        weights = self.method(cross_gram=gram[:T, T : 2 * T])
        if not isinstance(weights, torch.Tensor) or weights.shape != (T,):
            got = list(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
            fail("aggregator", f"a method returning weights of shape [{T}] for a [{T}, {T}] cross-Gram", str(got))
        weights = weights.to(gram.dtype)
        if self.batches == 2:
            return torch.cat([weights, weights]) * 0.5
        return torch.cat([weights.new_zeros(2 * T), weights])

    def method_weights(self, flat: torch.Tensor) -> torch.Tensor:
        """The method's ``w [T]`` back from the weights of the flat losses (exact: halving and
        doubling are exact in floating point, the zeros carry nothing)."""
        T = self.tasks
        return flat[:T] * 2.0 if self.batches == 2 else flat[2 * T :]
