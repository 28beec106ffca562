"""The interface every aggregation method shares: a module called on a Gram matrix."""

from __future__ import annotations

import abc
import functools

import torch


class Aggregator(torch.nn.Module, abc.ABC):
    """Gram matrix of the per-task gradients -> task weights.

    ``weights = method(gram)`` with ``gram [T, T]`` (``G[s, t] = <g_s, g_t>``) gives ``weights [T]``,
    and a batch ``gram [N, T, T]`` gives ``[N, T]`` (each matrix on its own). The update is
    ``sum_t weights[t] * g_t``. The Gram matrix is detached: weights are constants of the update.
    Weights come back in the Gram's dtype and on its device.

    Subclasses implement :meth:`_weights` on the batched ``[N, T, T]`` form. Methods whose numeric core is
    a fastmtl op leave the value checks (finite, symmetric) to the op; the others set
    ``_checks_values_in_op = False`` and get them here.
    """

    _checks_values_in_op = True

    def __call__(self, gram: torch.Tensor) -> torch.Tensor:
        # Straight to forward: these modules have no hooks to run, and nn.Module's call machinery costs
        # a noticeable share of a call that solves a T x T problem in microseconds.
        return self.forward(gram)

    def forward(self, gram: torch.Tensor) -> torch.Tensor:
        batched = _checked_shape(type(self).__name__, gram)
        g = gram.detach() if gram.requires_grad else gram
        g = g if batched else g.unsqueeze(0)
        if not self._checks_values_in_op:
            _check_values(type(self).__name__, g)
        weights = self._weights(g)
        return weights if batched else weights.squeeze(0)

    @abc.abstractmethod
    def _weights(self, gram: torch.Tensor) -> torch.Tensor:
        """Weights [N, T] of a batch of Gram matrices [N, T, T] (already shape-checked and detached)."""

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._hyperparameters().items())

    def _hyperparameters(self) -> dict:
        return {}


def _checked_shape(method: str, gram) -> bool:
    """Whether ``gram`` is a batch; raises ValueError/TypeError naming it otherwise."""
    if not isinstance(gram, torch.Tensor):
        raise TypeError(f"fastmtl.aggregation.{method}: argument 'gram' expected a torch.Tensor, got {type(gram).__name__}")
    if not gram.is_floating_point() or gram.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"fastmtl.aggregation.{method}: argument 'gram' expected dtype torch.float32 or torch.float64, "
            f"got {gram.dtype}"
        )
    shape = tuple(gram.shape)
    if gram.dim() not in (2, 3) or shape[-1] != shape[-2] or shape[-1] < 1:
        raise ValueError(
            f"fastmtl.aggregation.{method}: argument 'gram' expected a square Gram matrix [T, T] or a batch "
            f"[N, T, T] with T >= 1, got shape {list(shape)}"
        )
    return gram.dim() == 3


def _check_values(method: str, gram: torch.Tensor) -> None:
    if gram.numel() == 0:
        return
    if not bool(torch.isfinite(gram).all()):
        raise ValueError(f"fastmtl.aggregation.{method}: argument 'gram' expected finite values, got NaN or infinity")
    largest = gram.abs().max()
    tolerance = (1e-4 if gram.dtype == torch.float32 else 1e-8) * largest
    asymmetry = (gram - gram.transpose(-1, -2)).abs().max()
    if asymmetry > tolerance:
        raise ValueError(
            f"fastmtl.aggregation.{method}: argument 'gram' expected symmetric matrices (G[s, t] = G[t, s]), got "
            f"max |G - G^T| = {asymmetry.item():.3g} with max |G| = {largest.item():.3g}"
        )


def checked_pref(method: str, pref, T: int, like: torch.Tensor, default: float) -> torch.Tensor:
    """The preference vector as an [N, T] tensor like ``like`` (the batched Gram). The ops read it on
    the CPU in double precision, so it is made there (a CUDA Gram's weights are solved on the CPU too)."""
    if pref is None:
        return _default_pref(like.shape[0], T, default)
    if pref.dim() != 1 or pref.shape[0] != T:
        raise ValueError(
            f"fastmtl.aggregation.{method}: argument 'pref_vector' expected shape [{T}] (one entry per task of "
            f"'gram'), got {list(pref.shape)}"
        )
    return pref.to(torch.float64).expand(like.shape[0], T)


@functools.lru_cache(maxsize=64)
def _default_pref(N: int, T: int, value: float) -> torch.Tensor:
    # Read-only by the ops: one tensor per shape instead of a new one per call.
    return torch.full((N, T), value, dtype=torch.float64)


def check_vector(method: str, name: str, vector) -> torch.Tensor | None:
    if vector is None:
        return None
    if not isinstance(vector, torch.Tensor):
        vector = torch.as_tensor(vector, dtype=torch.float64)
    if vector.dim() != 1 or not vector.is_floating_point() or not bool(torch.isfinite(vector).all()):
        raise ValueError(
            f"fastmtl.aggregation.{method}: argument '{name}' expected a finite 1-D floating tensor, got "
            f"{vector.dtype} of shape {list(vector.shape)}"
        )
    return vector.detach().clone()


def check_scalar(method: str, name: str, value, low: float = 0.0, high: float = float("inf")) -> float:
    value = float(value)
    if not (low <= value <= high):
        raise ValueError(f"fastmtl.aggregation.{method}: argument '{name}' expected a value in [{low}, {high}], got {value}")
    return value


def make_generator(seed):
    """A private generator seeded once, or None for the global torch RNG (torch.manual_seed)."""
    if seed is None:
        return None
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return generator


class SeededAggregator(Aggregator):
    """A method that draws random numbers: from a private generator seeded once with ``seed``, or from
    the global torch RNG when ``seed`` is None. The private generator's state is in ``state_dict``."""

    def __init__(self, seed):
        super().__init__()
        self.seed = seed
        self._generator = make_generator(seed)

    def get_extra_state(self):
        return {"generator": None if self._generator is None else self._generator.get_state()}

    def set_extra_state(self, state):
        if state["generator"] is not None:
            if self._generator is None:
                self._generator = torch.Generator()
            self._generator.set_state(state["generator"])
