"""MoCo: tracked per-task gradients and a projected step of the task weights (Fernando et al. 2023)."""

from __future__ import annotations

import torch

from ._base import JacobianAggregator, check_scalar
from ._simplex import project_onto_simplex


class MoCo(JacobianAggregator):
    """Multi-objective gradient correction (Fernando et al., ICLR 2023, Algorithm 1): MGDA's weights
    computed on *tracked* per-task gradients, which removes the bias of stochastic MGDA. At call
    ``k = 1, 2, ...`` with step sizes ``beta_k = beta / k^beta_sigma``, ``gamma_k = gamma / k^gamma_sigma``:

    - ``Y <- Y - beta_k (Y - J)`` (each task's gradient tracked by a moving average; ``Y`` starts at 0);
    - ``lambda <- Proj_simplex(lambda - gamma_k (Y Y^T + rho I) lambda)`` (one projected gradient step
      of MGDA's ``min ||Y^T lambda||^2``; ``lambda`` starts uniform);
    - the update is ``Y^T lambda``: the tracked gradients' combination, not ``J^T lambda``.

    The paper's simplex projection is used (LibMTL's code takes a softmax instead, and rescales the
    gradients by the losses; neither is in the paper). Defaults: LibMTL's (beta 0.5, beta_sigma 0.5,
    gamma 0.1, gamma_sigma 0.5, rho 0). :attr:`last_weights` keeps ``lambda``.

    Needs the per-task gradients (``requires = "jacobian"``): ``Y`` is ``[T, P]``, the memory of a second
    Jacobian. Stateful: :meth:`reset`, ``state_dict``; the state restarts when the shape, dtype or
    device of the Jacobian changes.

    >>> import torch
    >>> from fastmtl.aggregation import MoCo
    >>> method = MoCo()
    >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    >>> method(jacobian=J)  # Y = J / 2; lambda = Proj([1/2, 1/2] - 0.1 * [1/8, 1/2]) = [0.51875, 0.48125]
    tensor([0.2594, 0.4813], dtype=torch.float64)
    """

    def __init__(
        self, beta: float = 0.5, beta_sigma: float = 0.5, gamma: float = 0.1, gamma_sigma: float = 0.5, rho: float = 0.0
    ):
        super().__init__()
        self.beta = check_scalar("MoCo", "beta", beta)
        if not 0.0 < self.beta <= 1.0:
            raise ValueError(f"fastmtl.aggregation.MoCo: argument 'beta' expected a value in (0, 1], got {self.beta}")
        self.beta_sigma = check_scalar("MoCo", "beta_sigma", beta_sigma)
        self.gamma = check_scalar("MoCo", "gamma", gamma)
        self.gamma_sigma = check_scalar("MoCo", "gamma_sigma", gamma_sigma)
        self.rho = check_scalar("MoCo", "rho", rho)
        self.reset()

    def reset(self) -> None:
        self._tracked = None
        self._weights_now = None
        self._steps = 0
        self._key = None

    @property
    def last_weights(self):
        """The task weights ``lambda`` of the last call, ``[T]`` (None before the first)."""
        return self._weights_now

    def _update(self, J):
        key = (tuple(J.shape), J.dtype, J.device)
        if self._key != key or self._tracked is None:
            T = J.shape[0]
            self._tracked = torch.zeros_like(J)
            self._weights_now = J.new_full((T,), 1.0 / T)
            self._steps = 0
            self._key = key
        self._steps += 1
        beta_k = self.beta / self._steps**self.beta_sigma
        gamma_k = self.gamma / self._steps**self.gamma_sigma
        Y = self._tracked - beta_k * (self._tracked - J)
        # The step's matrix in double precision: Y Y^T of float32 gradients loses digits at large P.
        gram = (Y.double() @ Y.double().T).to(J.dtype)
        step = gram @ self._weights_now + self.rho * self._weights_now
        self._weights_now = project_onto_simplex(self._weights_now - gamma_k * step)
        self._tracked = Y
        return self._weights_now @ Y

    def get_extra_state(self):
        return {"tracked": self._tracked, "weights": self._weights_now, "steps": self._steps, "key": self._key}

    def set_extra_state(self, state):
        self._tracked, self._weights_now = state["tracked"], state["weights"]
        self._steps, self._key = state["steps"], state["key"]

    def _hyperparameters(self):
        return {
            "beta": self.beta,
            "beta_sigma": self.beta_sigma,
            "gamma": self.gamma,
            "gamma_sigma": self.gamma_sigma,
            "rho": self.rho,
        }
