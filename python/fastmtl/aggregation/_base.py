"""The interface every aggregation method shares: a module called on a Gram matrix."""

from __future__ import annotations

import abc
import functools
import math
import numbers

import torch

#: What an aggregator needs, its class attribute ``requires``: the Gram matrix of the per-task gradients
#: (``G = J J^T``), the per-task gradients themselves (``J [T, P]``), or the cross-Gram ``J_1 J_2^T`` of
#: the gradients of two independent batches.
REQUIREMENTS = ("gram", "jacobian", "cross_gram")


class Aggregator(torch.nn.Module, abc.ABC):
    """Gram matrix of the per-task gradients -> task weights.

    ``weights = method(gram)`` with ``gram [T, T]`` (``G[s, t] = <g_s, g_t>``) gives ``weights [T]``,
    and a batch ``gram [N, T, T]`` gives ``[N, T]`` (each matrix on its own). The update is
    ``sum_t weights[t] * g_t``. The Gram matrix is detached: weights are constants of the update.
    Weights come back in the Gram's dtype and on its device. ``T = 0`` (no task) gives empty weights
    and ``N = 0`` an empty batch, as torchjd does, without touching the method's state.

    What a method needs is declared by its class attribute :attr:`requires`: ``"gram"`` (these),
    ``"jacobian"`` (:class:`JacobianAggregator`: ``method(jacobian=J)``, the per-task gradients
    ``J [T, P]`` -> the update ``[P]``) or ``"cross_gram"`` (:class:`CrossGramAggregator`:
    ``method(cross_gram=A)``, ``J_1 J_2^T`` of two independent batches -> weights ``[T]``). A positional
    argument is always a Gram matrix. A Gram method given only ``jacobian=J`` forms ``J J^T`` itself; a
    method given less than it needs raises a ValueError saying what it needs.

    Subclasses implement :meth:`_weights` on the batched ``[N, T, T]`` form. Methods whose numeric core is
    a fastmtl op leave the value checks (finite, symmetric, non-negative diagonal) to the op; the others
    set ``_checks_values_in_op = False`` and get them here.
    """

    #: One of :data:`REQUIREMENTS`: what the method must be given.
    requires = "gram"
    #: The properties of torchjd's test suite the method has, checked on every method by
    #: tests/test_aggregation_properties.py: "non_conflicting" (``J @ update >= 0``),
    #: "permutation_invariant" (permuting the tasks permutes the weights), "linear_under_scaling"
    #: (the update of ``diag(c) J`` is linear in ``c >= 0``). Every method has torchjd's "expected
    #: structure" (shape, dtype, device, finite).
    properties: frozenset = frozenset()
    _checks_values_in_op = True

    def __call__(self, gram=None, *, jacobian=None, cross_gram=None) -> torch.Tensor:
        # Straight to forward: these modules have no hooks to run, and nn.Module's call machinery costs
        # a noticeable share of a call that solves a T x T problem in microseconds.
        if gram is None:
            if jacobian is None:
                raise missing_input(self, gram=gram, jacobian=jacobian, cross_gram=cross_gram)
            gram = jacobian_gram(type(self).__name__, jacobian)
        return self.forward(gram)

    def forward(self, gram: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        batched = _checked_shape(name, gram)
        if gram.requires_grad:
            gram = gram.detach()
        g = gram if batched else gram.unsqueeze(0)
        if g.shape[0] == 0 or g.shape[-1] == 0:
            self._check_num_tasks(g.shape[-1])
            return gram.new_zeros(gram.shape[:-1])
        if not self._checks_values_in_op:
            _check_values(name, g)
        weights = self._weights(g)
        return weights if batched else weights[0]

    @abc.abstractmethod
    def _weights(self, gram: torch.Tensor) -> torch.Tensor:
        """Weights [N, T] of a batch of Gram matrices [N, T, T] (already shape-checked and detached; N, T >= 1)."""

    def _check_num_tasks(self, T: int) -> None:
        """Raises where the method cannot take T tasks (e.g. Constant's fixed length); called for T = 0 too."""

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._hyperparameters().items())

    def _hyperparameters(self) -> dict:
        return {}


class JacobianAggregator(Aggregator):
    """A method that needs the per-task gradients themselves (``requires = "jacobian"``):
    ``method(jacobian=J)``, ``J [T, P]`` (row t: task t's gradient of the P shared parameters) -> the
    update ``[P]``, in J's dtype and on its device. The keyword is required: a positional argument is a
    Gram matrix (what the engines pass), which these methods cannot use, and it raises saying so.
    ``T = 0`` or ``P = 0`` gives a zero update of length P, as torchjd does.

    Subclasses implement :meth:`_update` on a checked, detached, non-empty ``J``."""

    requires = "jacobian"

    def __call__(self, gram=None, *, jacobian=None, cross_gram=None) -> torch.Tensor:
        # Keyword only: a positional argument is a Gram matrix, what the engines and every Gram method
        # take; a [T, T] Gram read as a Jacobian would give a silently wrong "update" of length T.
        if jacobian is None:
            raise missing_input(self, gram=gram, jacobian=jacobian, cross_gram=cross_gram)
        return self.forward(jacobian)

    def forward(self, jacobian: torch.Tensor) -> torch.Tensor:
        J = checked_jacobian(type(self).__name__, jacobian)
        if J.shape[0] == 0 or J.shape[1] == 0:
            self._check_num_tasks(J.shape[0])
            return J.new_zeros(J.shape[1])
        return self._update(J)

    @abc.abstractmethod
    def _update(self, jacobian: torch.Tensor) -> torch.Tensor:
        """The update [P] of a checked, detached J [T, P] with T, P >= 1."""

    def _weights(self, gram):  # pragma: no cover - never called: forward takes the Jacobian
        raise missing_input(self, gram=gram)


class CrossGramAggregator(Aggregator):
    """A method that needs the cross-Gram ``A = J_1 J_2^T`` of the per-task gradients of two
    independent mini-batches (``requires = "cross_gram"``; MoDo, SDMGrad): ``method(cross_gram=A)``,
    ``A [T, T]`` (neither symmetric nor positive semi-definite in general) -> weights ``[T]``. The
    one-batch Gram ``J J^T`` is not a substitute (it breaks these methods' guarantees), so a positional
    argument or ``gram=`` (a Gram matrix) is refused, saying what the method needs. Unbatched: these methods
    keep state per call sequence. The engines supply the cross-Gram: :func:`fastmtl.mtl_backward` from
    losses ``[2, T]`` / ``[3, T]`` of independent batches, ``model.mtl_backward`` from the batch's two
    halves (:mod:`fastmtl.engine.cross_batches`).

    Subclasses implement :meth:`_cross_weights` on a checked, detached, non-empty ``[T, T]`` matrix."""

    requires = "cross_gram"

    def __call__(self, gram=None, *, jacobian=None, cross_gram=None) -> torch.Tensor:
        # Keyword only, as JacobianAggregator: a positional argument is a one-batch Gram matrix.
        if cross_gram is None:
            raise missing_input(self, gram=gram, jacobian=jacobian, cross_gram=cross_gram)
        return self.forward(cross_gram)

    def forward(self, cross_gram: torch.Tensor) -> torch.Tensor:
        A = checked_cross_gram(type(self).__name__, cross_gram)
        if A.shape[0] == 0:
            return A.new_zeros(0)
        return self._cross_weights(A)

    @abc.abstractmethod
    def _cross_weights(self, cross_gram: torch.Tensor) -> torch.Tensor:
        """Weights [T] of a checked, detached cross-Gram [T, T] with T >= 1."""

    def _weights(self, gram):  # pragma: no cover - never called: forward takes the cross-Gram
        raise missing_input(self, gram=gram)


_WHAT = {
    "gram": "the Gram matrix of the per-task gradients (gram=J @ J.T, [T, T])",
    "jacobian": "the per-task gradients themselves (jacobian=J, [T, P])",
    "cross_gram": "the cross-Gram of two independent batches' per-task gradients (cross_gram=J1 @ J2.T, [T, T])",
}


def requirement(aggregator) -> str:
    """What ``aggregator`` needs: its ``requires`` (``"gram"`` for plain callables, which take a Gram)."""
    requires = getattr(aggregator, "requires", "gram")
    if requires not in REQUIREMENTS:
        raise ValueError(
            f"fastmtl.aggregation: aggregator {type(aggregator).__name__} declares requires={requires!r}, expected "
            f"one of {REQUIREMENTS}"
        )
    return requires


def missing_input(aggregator, **given) -> ValueError:
    """The error for a method given less than it needs: names what it needs and what it got."""
    name = type(aggregator).__name__
    got = [key for key, value in given.items() if value is not None]
    requires = requirement(aggregator)
    return ValueError(
        f"fastmtl.aggregation.{name}: needs {_WHAT[requires]} (requires={requires!r}), got "
        + (", ".join(f"'{key}'" for key in got) if got else "nothing")
    )


def _check_has_values(method: str, name: str, t: torch.Tensor) -> None:
    if t.device.type == "meta":
        raise ValueError(
            f"fastmtl.aggregation.{method}: argument '{name}' expected a tensor with values (on cpu or cuda), got a "
            f"tensor on the meta device"
        )


def jacobian_gram(method: str, jacobian) -> torch.Tensor:
    """``J J^T`` of a checked Jacobian: what a Gram method given only the per-task gradients uses."""
    J = checked_jacobian(method, jacobian)
    return J @ J.T


def checked_jacobian(method: str, jacobian) -> torch.Tensor:
    """The per-task gradients ``[T, P]``, detached; TypeError/ValueError naming 'jacobian' otherwise."""
    if not isinstance(jacobian, torch.Tensor):
        raise TypeError(
            f"fastmtl.aggregation.{method}: argument 'jacobian' expected a torch.Tensor, got {type(jacobian).__name__}"
        )
    if jacobian.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"fastmtl.aggregation.{method}: argument 'jacobian' expected dtype torch.float32 or torch.float64, got "
            f"{jacobian.dtype}"
        )
    if jacobian.dim() != 2:
        raise ValueError(
            f"fastmtl.aggregation.{method}: argument 'jacobian' expected the per-task gradients [T, P], got shape "
            f"{list(jacobian.shape)}"
        )
    _check_has_values(method, "jacobian", jacobian)
    J = jacobian.detach()
    if J.numel() and not bool(torch.isfinite(J).all()):
        raise ValueError(
            f"fastmtl.aggregation.{method}: argument 'jacobian' expected finite values, got NaN or infinity"
        )
    return J


def checked_cross_gram(method: str, cross_gram) -> torch.Tensor:
    """A cross-Gram ``[T, T]``, detached; TypeError/ValueError naming 'cross_gram' otherwise."""
    if not isinstance(cross_gram, torch.Tensor):
        raise TypeError(
            f"fastmtl.aggregation.{method}: argument 'cross_gram' expected a torch.Tensor, got "
            f"{type(cross_gram).__name__}"
        )
    if cross_gram.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"fastmtl.aggregation.{method}: argument 'cross_gram' expected dtype torch.float32 or torch.float64, got "
            f"{cross_gram.dtype}"
        )
    if cross_gram.dim() != 2 or cross_gram.shape[0] != cross_gram.shape[1]:
        raise ValueError(
            f"fastmtl.aggregation.{method}: argument 'cross_gram' expected a square matrix J1 @ J2.T [T, T], got shape "
            f"{list(cross_gram.shape)}"
        )
    _check_has_values(method, "cross_gram", cross_gram)
    A = cross_gram.detach()
    if A.numel() and not bool(torch.isfinite(A).all()):
        raise ValueError(
            f"fastmtl.aggregation.{method}: argument 'cross_gram' expected finite values, got NaN or infinity"
        )
    return A


def _checked_shape(method: str, gram) -> bool:
    """Whether ``gram`` is a batch; raises ValueError/TypeError naming it otherwise."""
    if not isinstance(gram, torch.Tensor):
        raise TypeError(
            f"fastmtl.aggregation.{method}: argument 'gram' expected a torch.Tensor, got {type(gram).__name__}"
        )
    if gram.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"fastmtl.aggregation.{method}: argument 'gram' expected dtype torch.float32 or torch.float64, "
            f"got {gram.dtype}"
        )
    shape = gram.shape
    if gram.dim() not in (2, 3) or shape[-1] != shape[-2]:
        raise ValueError(
            f"fastmtl.aggregation.{method}: argument 'gram' expected a square Gram matrix [T, T] or a batch "
            f"[N, T, T], got shape {list(shape)}"
        )
    if gram.device.type == "meta":
        _check_has_values(method, "gram", gram)
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
    # The same rule as the ops' check: squared gradient norms, non-negative up to the Gram's rounding.
    lowest_diagonal = gram.diagonal(dim1=-2, dim2=-1).min()
    if lowest_diagonal < -tolerance:
        raise ValueError(
            f"fastmtl.aggregation.{method}: argument 'gram' expected a non-negative diagonal (squared gradient "
            f"norms), got {lowest_diagonal.item():.3g}"
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


def _default_pref(N: int, T: int, value: float) -> torch.Tensor:
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        # Traced, or a fake tensor under a FakeTensorMode: made for this call, since a cached one would
        # outlive its trace or mode (a fake tensor cached here broke every later real call).
        return torch.full((N, T), value, dtype=torch.float64)
    return _cached_default_pref(N, T, value)


@functools.lru_cache(maxsize=64)
def _cached_default_pref(N: int, T: int, value: float) -> torch.Tensor:
    # Read-only by the ops: one tensor per shape instead of a new one per call.
    return torch.full((N, T), value, dtype=torch.float64)


def check_vector(method: str, name: str, vector) -> torch.Tensor | None:
    if vector is None:
        return None
    if not isinstance(vector, torch.Tensor):
        try:
            vector = torch.as_tensor(vector, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"fastmtl.aggregation.{method}: argument '{name}' expected a 1-D tensor or sequence of numbers, got "
                f"{type(vector).__name__} {vector!r}"
            ) from None
    if vector.dim() != 1 or not vector.is_floating_point() or not bool(torch.isfinite(vector).all()):
        raise ValueError(
            f"fastmtl.aggregation.{method}: argument '{name}' expected a finite 1-D floating tensor, got "
            f"{vector.dtype} of shape {list(vector.shape)}"
        )
    return vector.detach().clone()


def check_scalar(method: str, name: str, value, low: float = 0.0, high: float = float("inf")) -> float:
    """A finite real hyperparameter in [low, high]: TypeError for a non-number (a string, a bool),
    ValueError for NaN, infinity or a value out of range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"fastmtl.aggregation.{method}: argument '{name}' expected a real number, got {type(value).__name__} "
            f"{value!r}"
        )
    value = float(value)
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(
            f"fastmtl.aggregation.{method}: argument '{name}' expected a finite value in [{low}, {high}], got {value}"
        )
    return value


def check_int(method: str, name: str, value, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"fastmtl.aggregation.{method}: argument '{name}' expected an int, got {type(value).__name__} {value!r}"
        )
    if value < low:
        raise ValueError(f"fastmtl.aggregation.{method}: argument '{name}' expected an int >= {low}, got {value}")
    return int(value)


def make_generator(seed, method: str = "Aggregator"):
    """A private generator seeded once, or None for the global torch RNG (torch.manual_seed)."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(
            f"fastmtl.aggregation.{method}: argument 'seed' expected an int or None, got {type(seed).__name__} {seed!r}"
        )
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return generator


class SeededAggregator(Aggregator):
    """A method that draws random numbers: from a private generator seeded once with ``seed``, or from
    the global torch RNG when ``seed`` is None. The private generator's state is in ``state_dict``."""

    def __init__(self, seed):
        super().__init__()
        self.seed = seed
        self._generator = make_generator(seed, type(self).__name__)

    def get_extra_state(self):
        return {"generator": None if self._generator is None else self._generator.get_state()}

    def set_extra_state(self, state):
        if state["generator"] is not None:
            if self._generator is None:
                self._generator = torch.Generator()
            self._generator.set_state(state["generator"])
