"""ExcessMTL: task weights from estimated excess risks (He et al. 2024)."""

from __future__ import annotations

import torch

from ._base import JacobianAggregator, check_int, check_scalar


class ExcessMTL(JacobianAggregator):
    """Robust multi-task learning with excess risks (He et al., ICML 2024): task weights on the simplex
    stepped at every call by exponentiated gradient (eq. 9) on each task's estimated excess risk,
    ``E_t = sum_p g_tp^2 / sqrt(S_tp + 1e-7)`` with ``S`` the running sum of squared gradients (an
    AdaGrad-style diagonal Hessian, eqs. 6-7), divided by the baseline ``E_t`` of the first call (or the
    mean over ``n_warmup_steps`` warm-up calls, which return uniform weights). The update is
    ``sum_t w_t g_t``; :attr:`last_weights` keeps ``w``. Same arithmetic as torchjd's ExcessMTL (uniform
    initial weights, as the paper; the official code starts at 1).

    Needs the per-task gradients (``requires = "jacobian"``): ``S`` is per parameter. Stateful (``S`` is
    ``[T, P]``: the memory of a second Jacobian): :meth:`reset`, ``state_dict``; the state restarts when
    the shape, dtype or device of the Jacobian changes.

    >>> import torch
    >>> from fastmtl.aggregation import ExcessMTL
    >>> method = ExcessMTL()
    >>> update = method(jacobian=torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64))
    >>> method.last_weights.sum().item()
    1.0
    """

    def __init__(self, robust_step_size: float = 1.0, n_warmup_steps: int = 0):
        super().__init__()
        self.robust_step_size = check_scalar("ExcessMTL", "robust_step_size", robust_step_size)
        if self.robust_step_size <= 0:
            raise ValueError(
                f"fastmtl.aggregation.ExcessMTL: argument 'robust_step_size' expected a value > 0, got "
                f"{self.robust_step_size}"
            )
        self.n_warmup_steps = check_int("ExcessMTL", "n_warmup_steps", n_warmup_steps, 0)
        self.reset()

    def reset(self) -> None:
        self._weights_now = None
        self._squares = None
        self._baseline = None
        self._warmup_sum = None
        self._steps = 0
        self._key = None

    @property
    def last_weights(self):
        """The task weights of the last call, ``[T]`` (None before the first)."""
        return self._weights_now

    def _update(self, J):
        key = (tuple(J.shape), J.dtype, J.device)
        if self._key != key or self._squares is None:
            T, P = J.shape
            self._squares = J.new_zeros(T, P)
            self._warmup_sum = J.new_zeros(T)
            self._weights_now = J.new_full((T,), 1.0 / T)
            self._baseline = None
            self._steps = 0
            self._key = key
        squared = J * J
        self._squares += squared
        risks = (squared / torch.sqrt(self._squares + 1e-7)).sum(dim=1)
        if self._steps < self.n_warmup_steps:
            self._warmup_sum += risks
            self._steps += 1
            return self._weights_now @ J
        self._steps += 1
        if self._baseline is None:
            if self.n_warmup_steps > 0:
                self._baseline = self._warmup_sum / self.n_warmup_steps
                risks = risks / (self._baseline + 1e-7)
            else:
                self._baseline = risks  # the official code: the first call's risks, used raw
        else:
            risks = risks / (self._baseline + 1e-7)
        # In log space, so that a huge excess risk saturates the weights instead of overflowing to inf.
        self._weights_now = torch.softmax(torch.log(self._weights_now) + self.robust_step_size * risks, dim=0)
        return self._weights_now @ J

    def get_extra_state(self):
        return {
            "weights": self._weights_now,
            "squares": self._squares,
            "baseline": self._baseline,
            "warmup_sum": self._warmup_sum,
            "steps": self._steps,
            "key": self._key,
        }

    def set_extra_state(self, state):
        self._weights_now, self._squares = state["weights"], state["squares"]
        self._baseline, self._warmup_sum = state["baseline"], state["warmup_sum"]
        self._steps, self._key = state["steps"], state["key"]

    def _hyperparameters(self):
        return {"robust_step_size": self.robust_step_size, "n_warmup_steps": self.n_warmup_steps}
