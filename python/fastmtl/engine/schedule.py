"""The ``gram_every`` schedule: whether a call recomputes the task weights, and the weights (and Gram
matrix) kept from the last call that did.

Schedules are kept by the engine, not written into the objects they belong to: one per owner (the
aggregator object of :func:`fastmtl.mtl_backward`, the model of ``model.mtl_backward``) in a
``WeakKeyDictionary``, so a schedule lives exactly as long as its owner and the owner's state
(``state_dict``, ``__dict__``) is untouched.
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable

import torch

from .options import fail

__all__ = ["WeightSchedule", "schedule_of"]


class WeightSchedule:
    """``gram_every=k``: whether this call recomputes the weights, and the weights (and Gram) kept
    from the last call that did. A call with another key (aggregator type, mode, number of tasks,
    k) starts over."""

    def __init__(self):
        self.calls, self.key = 0, None
        self.weights: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None

    def due(self, key: Hashable, every: int) -> bool:
        """Whether this call computes the weights (and counts the call)."""
        if key != self.key or self.weights is None:
            self.calls, self.key = 0, key
        due = self.calls % every == 0
        self.calls += 1
        return due

    def keep(self, weights: torch.Tensor, gram: torch.Tensor) -> None:
        self.weights, self.gram = weights, gram


# One schedule per owner, dropped with it.
_schedules: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def schedule_of(owner) -> WeightSchedule:
    """The schedule of ``owner`` (an aggregator or a model), made on first use."""
    try:
        return _schedules.setdefault(owner, WeightSchedule())
    except TypeError:
        fail(
            "aggregator",
            "an object that can be weakly referenced when gram_every > 1 (its weights are kept with it)",
            type(owner).__name__,
        )
