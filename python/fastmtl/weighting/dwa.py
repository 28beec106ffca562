"""DWA: dynamic weight average (Liu et al. 2019)."""

from __future__ import annotations

import torch

from ._base import Weighting, check_number


class DWA(Weighting):
    """Dynamic weight average: tasks whose loss fell least over the last epoch get more weight.

    ``w_t = T * softmax(r / temperature)_t`` with ``r_t = Lbar_t(k-1) / Lbar_t(k-2)``, the ratio of
    the task's mean loss over the last two closed epochs; ``w_t = 1`` until two epochs are
    closed. ``loss = sum_t w_t L_t``; the weights are constant within an epoch.

    Liu, Johns, Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019.

    Needs the losses and their history: every call adds its (detached) losses to the running mean
    of the current epoch, and :meth:`end_epoch` closes the epoch — call it once per epoch, after
    the last step. A task whose mean loss over epoch ``k-2`` was 0 (never labelled) gets ``r_t = 1``
    instead of a division by zero. The running sums and the last two epoch means are state
    (``state_dict``).

    >>> import torch
    >>> from fastmtl.weighting import DWA
    >>> dwa = DWA(2)
    >>> for epoch_losses in ([2.0, 2.0], [1.0, 2.0]):
    ...     _ = dwa(torch.tensor(epoch_losses))
    ...     dwa.end_epoch()
    >>> _ = dwa(torch.tensor([0.9, 1.9]))
    >>> dwa.weights  # r = (0.5, 1): the task that stalled gets more weight
    tensor([0.8756, 1.1244])
    """

    def __init__(self, num_tasks: int, temperature: float = 2.0):
        super().__init__(num_tasks)
        self.temperature = check_number(temperature, "temperature", "DWA", "a number > 0", lambda v: v > 0)
        # float64 so that long epochs average without float32 round-off.
        self.register_buffer("epoch_loss_sum", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("last_mean", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("previous_mean", torch.zeros(num_tasks, dtype=torch.float64))
        self._epoch_steps = 0
        self._epochs_closed = 0

    def _current_weights(self) -> torch.Tensor:
        if self._epochs_closed < 2:
            return torch.ones(self.num_tasks, dtype=torch.float64, device=self.last_mean.device)
        earlier = self.previous_mean
        ratio = torch.where(earlier > 0, self.last_mean / torch.where(earlier > 0, earlier, 1.0), 1.0)
        return self.num_tasks * torch.softmax(ratio / self.temperature, dim=0)

    def _loss_and_weights(self, losses, gram):
        weights = self._current_weights().to(losses)
        self.epoch_loss_sum += losses.detach().to(self.epoch_loss_sum)
        self._epoch_steps += 1
        return (weights * losses).sum(), weights

    def end_epoch(self) -> None:
        """Closes the current epoch: its mean loss becomes ``Lbar(k-1)``, the weights of the next
        epoch follow from it."""
        if self._epoch_steps == 0:
            raise RuntimeError("DWA.end_epoch: no losses were seen in this epoch; call the module on the losses first")
        self.previous_mean.copy_(self.last_mean)
        self.last_mean.copy_(self.epoch_loss_sum / self._epoch_steps)
        self.epoch_loss_sum.zero_()
        self._epoch_steps = 0
        self._epochs_closed += 1

    @property
    def epochs_closed(self) -> int:
        return self._epochs_closed

    def get_extra_state(self):
        return {"epoch_steps": self._epoch_steps, "epochs_closed": self._epochs_closed}

    def set_extra_state(self, state) -> None:
        self._epoch_steps = int(state["epoch_steps"])
        self._epochs_closed = int(state["epochs_closed"])

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, temperature={self.temperature}"
