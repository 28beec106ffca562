"""GradDrop: gradient sign dropout (Chen et al. 2020)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._base import JacobianAggregator, check_vector, make_generator


def _identity(purity: torch.Tensor) -> torch.Tensor:
    return purity


class GradDrop(JacobianAggregator):
    """Gradient sign dropout (Chen et al. 2020, "Just Pick a Sign", Algorithm 1 lines 10-15): for every
    parameter, the positive sign purity ``P = (1 + sum_t g_t / sum_t |g_t|) / 2``; one uniform draw ``U``
    per parameter keeps the positive entries where ``f(P) > U`` and the negative ones where ``f(P) < U``;
    ``leak_t`` of task t's entries pass regardless. The update is ``sum_t (leak_t + (1 - leak_t) M_t) g_t``.

    Needs the per-task gradients (``requires = "jacobian"``): the mask is per parameter, which no Gram
    matrix determines. ``f``: a monotonically increasing function of the purity (identity by default);
    ``leak``: one value per task, or None for no leak. ``seed=None`` draws ``U`` from the global torch
    RNG (the same draws as torchjd's GradDrop after the same ``torch.manual_seed``); an integer seeds a
    private generator once.

    >>> import torch
    >>> from fastmtl.aggregation import GradDrop
    >>> J = torch.tensor([[1.0, 2.0], [3.0, 4.0]])     # all signs agree: P = 1, everything kept
    >>> GradDrop(seed=0)(jacobian=J)
    tensor([4., 6.])
    """

    def __init__(self, f: Callable = _identity, leak=None, seed: int | None = None):
        super().__init__()
        if not callable(f):
            raise TypeError(f"fastmtl.aggregation.GradDrop: argument 'f' expected a callable, got {type(f).__name__}")
        self.f = f
        self.leak = check_vector("GradDrop", "leak", leak)
        self.seed = seed
        self._generator = make_generator(seed, "GradDrop")

    def _check_num_tasks(self, T):
        if self.leak is not None and self.leak.shape[0] != T:
            raise ValueError(
                f"fastmtl.aggregation.GradDrop: argument 'jacobian' expected {self.leak.shape[0]} rows (the length "
                f"of 'leak'), got T = {T}"
            )

    def _update(self, J):
        self._check_num_tasks(J.shape[0])
        purity = 0.5 * (1.0 + J.sum(dim=0) / J.abs().sum(dim=0))  # NaN where every g_t is 0: nothing kept
        kept = self.f(purity)
        if self._generator is None:
            U = torch.rand(purity.shape, dtype=J.dtype, device=J.device)
        else:
            U = torch.rand(purity.shape, dtype=J.dtype, generator=self._generator).to(J.device)
        mask = ((kept > U) & (J > 0)) | ((kept < U) & (J < 0))
        if self.leak is None:
            return (mask * J).sum(dim=0)
        leak = self.leak.to(J.device, J.dtype)[:, None]
        return ((leak + (1 - leak) * mask) * J).sum(dim=0)

    def get_extra_state(self):
        return {"generator": None if self._generator is None else self._generator.get_state()}

    def set_extra_state(self, state):
        if state["generator"] is not None:
            if self._generator is None:
                self._generator = torch.Generator()
            self._generator.set_state(state["generator"])

    def _hyperparameters(self):
        return {"leak": None if self.leak is None else self.leak.tolist(), "seed": self.seed}
