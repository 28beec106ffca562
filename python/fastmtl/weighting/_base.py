"""Weighting: the one interface of the loss-based task weighting methods, and its input checks."""

from __future__ import annotations

import abc
import math
import numbers

import torch
from torch import Tensor, nn


def check_num_tasks(num_tasks, owner: str) -> int:
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"{owner}: argument 'num_tasks' expected an int >= 1, got {num_tasks!r}")
    return num_tasks


def check_number(value, name: str, owner: str, expected: str, ok) -> float:
    """A hyperparameter as a float; ValueError naming it unless it is a real number with ``ok(value)``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) or not ok(value):
        raise ValueError(f"{owner}: argument '{name}' expected {expected}, got {value!r}")
    return float(value)


class Weighting(nn.Module, abc.ABC):
    """Per-task losses (and, for some methods, the Gram matrix of the per-task gradients) -> the
    scalar loss to backpropagate.

    Every method is a module so that its state (learnable parameters, running statistics, random
    generators, optimizer moments) travels with ``state_dict()`` / ``load_state_dict()`` and
    ``.to(device)`` like the rest of the model.

    Subclasses implement :meth:`_loss_and_weights`; this class checks the inputs and keeps
    :attr:`weights`.
    """

    #: True when :meth:`forward` needs ``gram``.
    requires_gram: bool = False

    def __init__(self, num_tasks: int):
        super().__init__()
        self.num_tasks = check_num_tasks(num_tasks, type(self).__name__)
        self._last_weights: Tensor | None = None

    def forward(self, losses: Tensor, gram: Tensor | None = None) -> Tensor:
        """``losses``: ``[T]`` per-task losses of this step (differentiable). ``gram``: ``[T, T]``
        Gram matrix of the per-task gradients (``G_st = <grad L_s, grad L_t>``) where the method
        needs it (:attr:`requires_gram`); others ignore it once it has passed the checks.

        Returns the scalar loss to backpropagate."""
        self._check_losses(losses)
        if gram is None and self.requires_gram:
            raise ValueError(
                f"{type(self).__name__}: argument 'gram' is required (the [{self.num_tasks}, {self.num_tasks}] Gram "
                f"matrix of the per-task gradients), got None"
            )
        if gram is not None:
            self._check_gram(gram)
        loss, weights = self._loss_and_weights(losses, gram)
        self._last_weights = weights.detach()
        return loss

    @abc.abstractmethod
    def _loss_and_weights(self, losses: Tensor, gram: Tensor | None) -> tuple[Tensor, Tensor]:
        """(scalar loss, d loss / d losses). Inputs already checked; must not modify them."""

    @property
    def weights(self) -> Tensor:
        """``[T]``, detached: the effective weights of the last call, ``d(returned loss)/d(losses)``."""
        if self._last_weights is None:
            raise RuntimeError(f"{type(self).__name__}: no weights yet; call the module on the losses first")
        return self._last_weights

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}"

    # ---- checks shared by every method

    def _check_losses(self, losses) -> None:
        name, t = type(self).__name__, self.num_tasks
        if not isinstance(losses, Tensor):
            raise ValueError(f"{name}: argument 'losses' expected a Tensor of shape [{t}], got {type(losses).__name__}")
        if not losses.is_floating_point():
            raise ValueError(f"{name}: argument 'losses' expected a floating tensor, got dtype {losses.dtype}")
        if losses.shape != (t,):
            raise ValueError(
                f"{name}: argument 'losses' expected shape [{t}] (one loss per task), got {list(losses.shape)}"
            )
        if not bool(torch.isfinite(losses).all()):
            raise ValueError(f"{name}: argument 'losses' expected finite values, got {losses.detach().cpu().tolist()}")

    def _check_gram(self, gram) -> None:
        name, t = type(self).__name__, self.num_tasks
        if not isinstance(gram, Tensor):
            raise ValueError(
                f"{name}: argument 'gram' expected a Tensor of shape [{t}, {t}], got {type(gram).__name__}"
            )
        if not gram.is_floating_point():
            raise ValueError(f"{name}: argument 'gram' expected a floating tensor, got dtype {gram.dtype}")
        if gram.shape != (t, t):
            raise ValueError(f"{name}: argument 'gram' expected shape [{t}, {t}], got {list(gram.shape)}")
        if not bool(torch.isfinite(gram).all()):
            raise ValueError(f"{name}: argument 'gram' expected finite values, got non-finite entries")

    def _check_nonnegative(self, losses: Tensor) -> None:
        """For the methods that take logs of the losses."""
        if bool((losses < 0).any()):
            raise ValueError(
                f"{type(self).__name__}: argument 'losses' expected values >= 0, got {losses.detach().cpu().tolist()}"
            )
