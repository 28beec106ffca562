"""CR-MOGM: an exponential moving average of any method's weights (Zhou et al. 2022)."""

from __future__ import annotations

from ._base import Aggregator, check_scalar, check_vector, requirement


class CRMOGM(Aggregator):
    """Correlation-reduced stochastic multi-objective gradient manipulation (Zhou et al., NeurIPS 2022,
    "On the Convergence of Stochastic Multi-Objective Gradient Manipulation and Beyond"): the weights of
    the wrapped method, smoothed across calls, ``lambda_k = alpha lambda_(k-1) + (1 - alpha) lambdahat_k``;
    ``lambda_0`` is ``initial_weights`` if given, else the first call's weights (so the first output is
    the wrapped method's, whatever alpha), as torchjd's ``CRMOGMWeighting``.

    Wraps any method that returns weights: it takes what the wrapped method requires (``requires`` is
    the wrapped method's: a Gram matrix, batched or not, or a cross-Gram). Methods that return an update
    (``requires = "jacobian"``: GradDrop, TrimmedMean, ExcessMTL, MoCo) are refused. ``alpha`` may be changed
    between calls (the paper's schedule: ``alpha = 1 - lr / initial_lr``). Stateful: :meth:`reset` (which
    also resets the wrapped method where it has a ``reset``) and ``state_dict``; a change of the number of
    tasks raises (call :meth:`reset` first). T = 0 returns empty weights without touching the state.

    >>> import torch
    >>> from fastmtl.aggregation import CRMOGM, MGDA
    >>> smoothed = CRMOGM(MGDA(), alpha=0.5)
    >>> smoothed(torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64)))     # the first call: MGDA's
    tensor([0.8000, 0.2000], dtype=torch.float64)
    >>> smoothed(torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64)))     # (0.8, 0.2) / 2 + (0.2, 0.8) / 2
    tensor([0.5000, 0.5000], dtype=torch.float64)
    """

    def __init__(self, aggregator: Aggregator, alpha: float = 0.9, initial_weights=None):
        super().__init__()
        if not callable(aggregator):
            raise TypeError(
                f"fastmtl.aggregation.CRMOGM: argument 'aggregator' expected an aggregation method, got "
                f"{type(aggregator).__name__}"
            )
        requires = requirement(aggregator)
        if requires == "jacobian":
            raise ValueError(
                f"fastmtl.aggregation.CRMOGM: argument 'aggregator' expected a method that returns weights "
                f"(requires 'gram' or 'cross_gram'), got {type(aggregator).__name__} (requires 'jacobian', returns "
                f"an update)"
            )
        self.aggregator = aggregator
        self.requires = requires
        self.alpha = alpha
        self.initial_weights = check_vector("CRMOGM", "initial_weights", initial_weights)
        self._average = None

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value) -> None:
        self._alpha = check_scalar("CRMOGM", "alpha", value, 0.0, 1.0)

    def reset(self) -> None:
        if hasattr(self.aggregator, "reset"):
            self.aggregator.reset()
        self._average = None

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        current = self.aggregator(*args, **kwargs)
        if current.shape[-1] == 0 or current.numel() == 0:
            return current
        if self._average is None:
            if self.initial_weights is None:
                previous = current
            else:
                if self.initial_weights.shape[0] != current.shape[-1]:
                    raise ValueError(
                        f"fastmtl.aggregation.CRMOGM: argument 'initial_weights' expected {current.shape[-1]} entries "
                        f"(one per task), got {self.initial_weights.shape[0]}"
                    )
                previous = self.initial_weights.to(current.device, current.dtype).expand_as(current)
        else:
            if self._average.shape != current.shape:
                raise ValueError(
                    f"fastmtl.aggregation.CRMOGM: the weights changed shape from {list(self._average.shape)} to "
                    f"{list(current.shape)} (another number of tasks or batch); call reset() first"
                )
            previous = self._average.to(current.device, current.dtype)
        self._average = self._alpha * previous + (1.0 - self._alpha) * current
        return self._average

    def _weights(self, gram):  # pragma: no cover - forward delegates to the wrapped method
        raise NotImplementedError

    def get_extra_state(self):
        return {"average": self._average, "alpha": self._alpha}

    def set_extra_state(self, state):
        self._average = state["average"]
        self._alpha = state["alpha"]

    def _hyperparameters(self):
        return {"alpha": self._alpha}
