"""SDMGrad: stochastic direction-oriented multi-objective gradient descent (Xiao et al. 2023)."""

from __future__ import annotations

import torch

from ._base import CrossGramAggregator, check_int, check_scalar, check_vector
from ._simplex import project_onto_simplex


class SDMGrad(CrossGramAggregator):
    """SDMGrad (Xiao, Ban, Ji, "Direction-oriented Multi-objective Learning", NeurIPS 2023): the task
    weights ``w`` on the simplex are stepped ``n_iter`` times per call by projected SGD with momentum on
    ``A (w + lambda_ w~)``, ``A`` the cross-Gram normalised by the squared mean gradient norm
    (``mean_t sqrt(max(A_tt, 0))``, + 1e-8) as in the official code and LibMTL; returns
    ``(w + lambda_ w~) / (1 + lambda_)``, the direction pulled toward the preference ``w~`` (default
    uniform). ``A = J_1 J_2^T`` of two independent mini-batches (not symmetric in general).

    Needs the cross-Gram (``requires = "cross_gram"``). Stateful (w, kept across calls): :meth:`reset`,
    ``state_dict``. Same arithmetic as torchjd's ``SDMGradWeighting`` (defaults lr=10, momentum=0.5,
    n_iter=20, lambda_=0.3, as the paper's experiments).

    >>> import torch
    >>> from fastmtl.aggregation import SDMGrad
    >>> w = SDMGrad()(cross_gram=torch.eye(3, dtype=torch.float64))
    >>> [round(x, 6) for x in w.tolist()]
    [0.333333, 0.333333, 0.333333]
    """

    def __init__(
        self, lr: float = 10.0, momentum: float = 0.5, n_iter: int = 20, lambda_: float = 0.3, pref_vector=None
    ):
        super().__init__()
        self.lr = check_scalar("SDMGrad", "lr", lr)
        if self.lr <= 0:
            raise ValueError(f"fastmtl.aggregation.SDMGrad: argument 'lr' expected a value > 0, got {self.lr}")
        self.momentum = check_scalar("SDMGrad", "momentum", momentum, 0.0, 1.0)
        if self.momentum >= 1:
            raise ValueError(
                f"fastmtl.aggregation.SDMGrad: argument 'momentum' expected a value in [0, 1), got {self.momentum}"
            )
        self.n_iter = check_int("SDMGrad", "n_iter", n_iter, 1)
        self.lambda_ = check_scalar("SDMGrad", "lambda_", lambda_)
        self.pref_vector = check_vector("SDMGrad", "pref_vector", pref_vector)
        self.reset()

    def reset(self) -> None:
        self._w = None
        self._key = None

    def _cross_weights(self, A):
        T = A.shape[0]
        key = (T, A.dtype, A.device)
        if self._key != key or self._w is None:
            self._w = A.new_full((T,), 1.0 / T)
            self._key = key
        if self.pref_vector is None:
            target = A.new_full((T,), 1.0 / T)
        elif self.pref_vector.shape[0] != T:
            raise ValueError(
                f"fastmtl.aggregation.SDMGrad: argument 'pref_vector' expected {T} entries (one per task of "
                f"'cross_gram'), got {self.pref_vector.shape[0]}"
            )
        else:
            target = self.pref_vector.to(A.device, A.dtype)
        scale = torch.diagonal(A).clamp(min=0.0).sqrt().mean()
        a = A / (scale.pow(2) + 1e-8)
        w, velocity = self._w, None
        for _ in range(self.n_iter):
            step = a @ (w + self.lambda_ * target)
            velocity = step if velocity is None else self.momentum * velocity + step
            w = project_onto_simplex(w - self.lr * velocity)
        self._w = w
        return (w + self.lambda_ * target) / (1.0 + self.lambda_)

    def get_extra_state(self):
        return {"w": self._w, "key": self._key}

    def set_extra_state(self, state):
        self._w, self._key = state["w"], state["key"]

    def _hyperparameters(self):
        return {"lr": self.lr, "momentum": self.momentum, "n_iter": self.n_iter, "lambda_": self.lambda_}
