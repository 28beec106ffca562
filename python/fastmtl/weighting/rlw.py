"""RLW: random loss weighting (Lin et al. 2021)."""

from __future__ import annotations

import torch

from ._base import Weighting


class RLW(Weighting):
    """Random loss weighting: ``w = softmax(randn(T))``, drawn fresh at every call;
    ``loss = sum_t w_t L_t``.

    Lin et al., "Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task
    Learning", TMLR 2022 (arXiv 2021). A baseline: a method that does not beat RLW has not shown
    that its weights matter.

    Needs the losses only. With ``seed=None`` the draws come from torch's global RNG (so
    ``torch.manual_seed`` makes a run repeatable); with a ``seed`` they come from a private
    ``torch.Generator`` seeded once, whose state is saved in ``state_dict`` so that a resumed run
    draws what the uninterrupted one would have. The draw is made on the CPU in the losses'
    dtype (the same numbers on every device).

    >>> import torch
    >>> from fastmtl.weighting import RLW
    >>> rlw = RLW(3, seed=0)
    >>> _ = rlw(torch.tensor([1.0, 2.0, 3.0]))
    >>> round(float(rlw.weights.sum()), 6)
    1.0
    """

    def __init__(self, num_tasks: int, seed: int | None = None):
        super().__init__(num_tasks)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"RLW: argument 'seed' expected an int or None, got {seed!r}")
        self.seed = seed
        self._generator = None if seed is None else torch.Generator().manual_seed(seed)

    def _loss_and_weights(self, losses, gram):
        draw = torch.randn(self.num_tasks, generator=self._generator, dtype=losses.dtype)
        weights = torch.softmax(draw, dim=0).to(losses.device)
        return (weights * losses).sum(), weights

    def get_extra_state(self):
        return {"generator_state": None if self._generator is None else self._generator.get_state()}

    def set_extra_state(self, state) -> None:
        generator_state = state["generator_state"]
        if generator_state is None:
            self._generator = None
            return
        if self._generator is None:
            self._generator = torch.Generator()
        self._generator.set_state(generator_state)

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, seed={self.seed}"
