"""MoDo: multi-objective gradient descent with double sampling (Chen et al. 2024)."""

from __future__ import annotations

from ._base import CrossGramAggregator, check_scalar
from ._simplex import project_onto_simplex


class MoDo(CrossGramAggregator):
    """MoDo (Chen, Fernando, Ying, Chen, "Three-Way Trade-Off in Multi-Objective Learning", JMLR 2024,
    eq. 2.9a): one projected-gradient step of the task weights per call,
    ``lambda <- proj_simplex(lambda - gamma (A lambda + rho lambda))``, from uniform weights; returns
    ``lambda``. ``A = J_1 J_2^T`` is the cross-Gram of the per-task gradients of two independent
    mini-batches, an unbiased estimate of the Gram matrix's product with lambda (the one-batch Gram
    ``J J^T`` is biased and breaks the method's guarantee).

    Needs the cross-Gram (``requires = "cross_gram"``). Stateful (lambda): :meth:`reset`,
    ``state_dict``; it restarts when T, the dtype or the device changes. Same arithmetic as torchjd's
    ``MoDoWeighting``.

    >>> import torch
    >>> from fastmtl.aggregation import MoDo
    >>> MoDo(gamma=0.1, rho=0.0)(cross_gram=torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64)))
    tensor([0.5500, 0.4500], dtype=torch.float64)
    """

    def __init__(self, gamma: float = 0.1, rho: float = 0.1):
        super().__init__()
        self.gamma = check_scalar("MoDo", "gamma", gamma)
        if self.gamma <= 0:
            raise ValueError(f"fastmtl.aggregation.MoDo: argument 'gamma' expected a value > 0, got {self.gamma}")
        self.rho = check_scalar("MoDo", "rho", rho)
        self.reset()

    def reset(self) -> None:
        self._lambda = None
        self._key = None

    def _cross_weights(self, A):
        key = (A.shape[0], A.dtype, A.device)
        if self._key != key or self._lambda is None:
            self._lambda = A.new_full((A.shape[0],), 1.0 / A.shape[0])
            self._key = key
        step = A @ self._lambda + self.rho * self._lambda
        self._lambda = project_onto_simplex(self._lambda - self.gamma * step)
        return self._lambda

    def get_extra_state(self):
        return {"lambda": self._lambda, "key": self._key}

    def set_extra_state(self, state):
        self._lambda, self._key = state["lambda"], state["key"]

    def _hyperparameters(self):
        return {"gamma": self.gamma, "rho": self.rho}
