"""FAMO: fast adaptive multitask optimization (Liu et al. 2023)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._adam import adam_step_
from ._base import Weighting, check_number

# torch.optim.Adam's defaults, which the official FAMO code keeps.


class FAMO(Weighting):
    """FAMO: weights that make every task's log-loss fall at the same rate, learnt from how the
    losses actually moved after each step, at O(1) cost per step (no per-task gradients).

    Task logits ``xi`` (init 0), ``z = softmax(xi)``, ``D_t = L_t - min_loss_t + eps``,
    ``c = sum_t z_t / D_t`` (a constant), ``loss = sum_t z_t log(D_t) / c``, so
    ``weights = z_t / (c D_t)``.

    After the model's step, :meth:`update` takes the losses of the same batch under the new
    parameters: ``delta_t = log D_t(before) - log D_t(after)`` and ``xi`` takes one Adam step
    (``lr``, ``weight_decay=gamma``, as the official code's ``torch.optim.Adam``) along the
    vector-Jacobian product ``J_softmax(xi)^T delta``.

    If :meth:`update` was not called, the next call uses its own losses (the next batch's, under
    the new parameters) as the "after" of the previous step. That saves the extra forward pass
    :meth:`update` needs; the price is noise, since ``delta`` then also holds the difference
    between the two batches.

    Liu, Liu, Jin, Stone, Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023;
    official code github.com/Cranial-XIX/FAMO.

    Needs the losses and the losses of the previous step. ``min_losses`` (default 0) are lower
    bounds of the losses; every loss must stay above ``min_loss_t - eps``. The logits, Adam's
    moments and step count and the previous losses are state (``state_dict``); the logits are
    a buffer, not a parameter, since FAMO updates them itself.

    >>> import torch
    >>> from fastmtl.weighting import FAMO
    >>> famo = FAMO(2)
    >>> famo(torch.tensor([1.0, 4.0]))  # z = (1/2, 1/2), c = 1/2 + 1/8
    tensor(1.1090)
    >>> famo.weights  # z_t / (c D_t): the normalised inverse losses
    tensor([0.8000, 0.2000])
    >>> famo.update(torch.tensor([0.5, 3.9]))  # task 1 fell faster: task 2's logit rises
    >>> famo.logits
    tensor([-0.0250,  0.0250])
    """

    def __init__(
        self,
        num_tasks: int,
        lr: float = 0.025,
        gamma: float = 1e-3,
        eps: float = 1e-8,
        min_losses: Sequence[float] | None = None,
    ):
        super().__init__(num_tasks)
        self.lr = check_number(lr, "lr", "FAMO", "a number > 0", lambda v: v > 0)
        self.gamma = check_number(gamma, "gamma", "FAMO", "a number >= 0", lambda v: v >= 0)
        self.eps = check_number(eps, "eps", "FAMO", "a number > 0", lambda v: v > 0)
        if min_losses is None:
            mins = torch.zeros(num_tasks)
        else:
            mins = torch.as_tensor(min_losses, dtype=torch.get_default_dtype()).detach().clone().cpu()
            if mins.shape != (num_tasks,) or not bool(torch.isfinite(mins).all()):
                raise ValueError(
                    f"FAMO: argument 'min_losses' expected {num_tasks} finite numbers, got {mins.tolist()!r}"
                )
        self.register_buffer("min_losses", mins)
        self.register_buffer("logits", torch.zeros(num_tasks))
        self.register_buffer("adam_exp_avg", torch.zeros(num_tasks))
        self.register_buffer("adam_exp_avg_sq", torch.zeros(num_tasks))
        self.register_buffer("previous_losses", torch.zeros(num_tasks))
        self._adam_steps = 0
        self._pending = False  # a forward whose "after" losses have not been seen yet

    def _shifted(self, losses: torch.Tensor, what: str) -> torch.Tensor:
        """D = L - min_losses + eps, which must be > 0 for its log."""
        shifted = losses - self.min_losses.to(losses) + self.eps
        if not bool((shifted > 0).all()):
            raise ValueError(
                f"FAMO: argument '{what}' expected values > min_losses - eps = "
                f"{(self.min_losses - self.eps).tolist()}, got {losses.detach().cpu().tolist()}"
            )
        return shifted

    def _loss_and_weights(self, losses, gram):
        shifted = self._shifted(losses, "losses")
        if self._pending:
            self._step(losses.detach())
        z = torch.softmax(self.logits, dim=0).to(losses)
        d = shifted.detach()
        c = (z / d).sum()
        loss = (z * torch.log(shifted)).sum() / c
        self.previous_losses.copy_(losses.detach())
        self._pending = True
        return loss, z / (c * d)

    def update(self, losses_after: torch.Tensor) -> None:
        """The losses ``[T]`` of the last call's batch after the model's optimizer step: one Adam
        step on the logits from how much each task's log-loss fell."""
        if not self._pending:
            raise RuntimeError("FAMO.update: no call since the last update; call the module on the losses first")
        self._check_losses(losses_after)
        self._shifted(losses_after, "losses_after")
        self._step(losses_after.detach())

    @torch.no_grad()
    def _step(self, losses_after: torch.Tensor) -> None:
        mins = self.min_losses.double()
        before = self.previous_losses.double() - mins + self.eps
        after = losses_after.to(before.device, torch.float64) - mins + self.eps
        delta = torch.log(before) - torch.log(after)
        z = torch.softmax(self.logits.double(), dim=0)
        grad = (z * (delta - (z * delta).sum())).to(self.logits)  # J_softmax^T delta
        self._adam(grad)
        self._pending = False

    def _adam(self, grad: torch.Tensor) -> None:
        """One step of torch.optim.Adam (L2 weight decay, no amsgrad), with its moments in buffers
        so that they are saved with the module."""
        self._adam_steps += 1
        grad = grad + self.gamma * self.logits
        adam_step_(self.logits, grad, self.adam_exp_avg, self.adam_exp_avg_sq, self._adam_steps, self.lr)

    def get_extra_state(self):
        return {"adam_steps": self._adam_steps, "pending": self._pending}

    def set_extra_state(self, state) -> None:
        self._adam_steps = int(state["adam_steps"])
        self._pending = bool(state["pending"])

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, lr={self.lr}, gamma={self.gamma}, eps={self.eps}"
