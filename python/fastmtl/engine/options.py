"""The options of an ``mtl_backward`` call, documented and checked once for every path of the engine
(:func:`fastmtl.mtl_backward`, :meth:`fastmtl.nn.MultiTaskModel.mtl_backward`,
:func:`fastmtl.engine.fused_model_backward`), and the argument errors they raise."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, NoReturn

import torch

from .._distributed import DDP_GRAMS
from .._validation import check_int_at_least
from ..aggregation import requirement
from ..ops import GRAM_MODES, GRAM_PATHS

__all__ = ["MTLBackwardOptions", "MODES", "fail", "supplied_requirement"]

WHERE = "fastmtl.mtl_backward"
MODES = GRAM_MODES  # the values of MTLBackwardOptions.mode


def fail(argument: str, expected: str, got: str) -> NoReturn:
    """The engine's argument error: ValueError naming the argument, what was expected and given."""
    raise ValueError(f"{WHERE}: argument '{argument}' expected {expected}, got {got}")


def supplied_requirement(aggregator, options: MTLBackwardOptions) -> str:
    """What ``aggregator`` needs (its ``requires``, issue 17), after refusing, before any backward, what
    no ``mtl_backward`` can supply it with: the same rule for the generic engine and the fused path.

    ``"gram"``: any options. ``"jacobian"``: the per-task gradients of every shared parameter exist
    only in exact mode, on a call that computes them (``gram_every=1``), and not with ``gram_params``
    (a subset); the method's update is not a weighting that could be kept between calls.
    ``"cross_gram"``: exact mode (the features' per-task gradients of independent batches do not
    overlap: rep mode's cross-Gram is 0); the losses of two or three independent batches are the
    caller's (:mod:`fastmtl.engine.cross_batches`)."""
    requires = requirement(aggregator)
    name = type(aggregator).__name__
    if requires == "cross_gram" and options.mode != "exact":
        fail(
            "mode",
            f"'exact' with {name}, a method that needs the cross-Gram of independent batches (in rep mode "
            "it would be 0: the batches' feature gradients do not overlap)",
            repr(options.mode),
        )
    if requires == "jacobian":
        if options.gram_params is not None:
            fail(
                "gram_params",
                "None with a method that needs the per-task gradients of every shared parameter",
                f"gram_params with {name}",
            )
        needs = f"with {name}, a method that needs the per-task gradients (mode='exact' and gram_every=1 compute them)"
        if options.mode != "exact":
            fail("mode", f"'exact' {needs}", repr(options.mode))
        if options.gram_every > 1:
            fail("gram_every", f"1 {needs}", str(options.gram_every))
    return requires


@dataclass(frozen=True)
class MTLBackwardOptions:
    """How an ``mtl_backward`` call computes the aggregated update (keyword arguments of every
    ``mtl_backward``; checked when made).

    Attributes:
        mode: ``"exact"``: the Gram matrix of the per-task gradients of the shared parameters;
            ``"rep"``: that of the per-task gradients of the features (the trunk output; MGDA-UB,
            Sener & Koltun 2018: approximate, nearly free), followed by one ordinary backward of
            ``sum_t a_t dL_t/dz`` through the trunk.
        gram_every: recompute the weights on every k-th call and reuse them in between (Nash-MTL's
            ``update_weights_every``), where a call is one ordinary weighted backward. The schedule
            continues over calls with the same aggregator object (:func:`fastmtl.mtl_backward`) or
            model (``model.mtl_backward``, any aggregator of the same type); changing the
            aggregator type, mode, number of tasks or k starts it over.
        keep_jacobian: also return the ``[T, P]`` Jacobian of the shared parameters (exact mode).
        gram_path: the per-layer Gram algorithm of a FusedMLP trunk's fused path: ``"auto"`` (a
            cost model), ``"materialise"`` or ``"ghost"`` (``K = X X^T``); other trunks take only
            ``"auto"``.
        ddp_gram: under data parallelism (an initialised ``torch.distributed`` group of several
            ranks) the gradients written are the mean over the ranks, as DDP's, and the Gram matrix
            covers the ranks by ``"local"`` (all-reduced Grams, no cross-rank terms), ``"exact"``
            (all-reduced per-task gradients) or ``"none"`` (no communication); see
            :mod:`fastmtl._distributed`.
        process_group: the ``torch.distributed`` group of ``ddp_gram`` (default: the world).
        gram_params: a subset of the shared parameters (the trunk's last block, say; kept as a
            tuple): the Gram matrix and weights come from their per-task gradients only (the
            T-batched backward stops there), and the weighted update ``sum_t a_t dL_t/dz`` reaches
            every shared parameter by one ordinary backward. :func:`fastmtl.mtl_backward` only.
        memory_budget: bytes (``None``: :data:`~fastmtl.engine.trunk_gram.DEFAULT_MEMORY_BUDGET`,
            512 MiB) the exact Gram's per-task gradients may take: the vmapped backward runs in task
            chunks that keep its intermediates within it, and a T x P Jacobian that would exceed it
            is streamed (each parameter block's Gram share added and dropped);
            :func:`fastmtl.engine.trunk_gram.plan_gram` decides. :func:`fastmtl.mtl_backward` only.
        report_cosine: ``result.cosine`` is the cosine between the call's update of the shared
            parameters and the exact mode's (computed as well, with a copy of the aggregator), so
            the price of ``rep``, ``gram_params`` or a kept ``gram_every`` weight is visible; 1.0
            in exact mode. :func:`fastmtl.mtl_backward` only.

    >>> MTLBackwardOptions(mode="rep", gram_every=2).gram_every
    2
    """

    mode: str = "exact"
    gram_every: int = 1
    keep_jacobian: bool = False
    gram_path: str = "auto"
    ddp_gram: str = "local"
    process_group: Any = None
    gram_params: tuple | None = None
    memory_budget: int | None = None
    report_cosine: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            fail("mode", f"one of {MODES}", repr(self.mode))
        if self.gram_path not in GRAM_PATHS:
            fail("gram_path", f"one of {GRAM_PATHS}", repr(self.gram_path))
        check_int_at_least(WHERE, "gram_every", self.gram_every, 1, "recompute the weights every k calls")
        if self.ddp_gram not in DDP_GRAMS:
            fail("ddp_gram", f"one of {DDP_GRAMS}", repr(self.ddp_gram))
        if self.gram_params is not None:
            object.__setattr__(self, "gram_params", _checked_gram_params(self.gram_params))
        if self.memory_budget is not None and (
            isinstance(self.memory_budget, bool) or not isinstance(self.memory_budget, int) or self.memory_budget < 0
        ):
            fail("memory_budget", "None or an int >= 0 (bytes)", repr(self.memory_budget))
        if not isinstance(self.report_cosine, bool):
            fail("report_cosine", "a bool", repr(self.report_cosine))

    @property
    def generic_only(self) -> list:
        """The names of the options set here that only :func:`fastmtl.mtl_backward` (any trunk) has."""
        return [
            name
            for name, value, default in (
                ("gram_params", self.gram_params, None),
                ("memory_budget", self.memory_budget, None),
                ("report_cosine", self.report_cosine, False),
            )
            if value is not default
        ]

    @classmethod
    def of(cls, function: str, options: Mapping[str, Any]) -> MTLBackwardOptions:
        """The options of a call's keyword arguments; TypeError naming ``function`` for unknown ones."""
        if not options:
            return _DEFAULTS
        unknown = sorted(set(options) - OPTION_NAMES)
        if unknown:
            raise TypeError(
                f"{function}: unexpected keyword arguments {unknown}; the options are "
                f"{sorted(OPTION_NAMES)} (see fastmtl.engine.MTLBackwardOptions)"
            )
        return cls(**options)


def _checked_gram_params(gram_params) -> tuple:
    """``gram_params`` as a non-empty tuple of tensors (whether they are shared parameters is checked
    by the call, which knows them)."""
    if isinstance(gram_params, torch.Tensor):
        chosen = (gram_params,)
    else:
        try:
            chosen = tuple(gram_params)
        except TypeError:
            fail(
                "gram_params",
                "a tensor or an iterable of tensors (a subset of the shared parameters)",
                type(gram_params).__name__,
            )
    if not chosen:
        fail("gram_params", "a non-empty subset of the shared parameters", "an empty sequence")
    for i, p in enumerate(chosen):
        if not isinstance(p, torch.Tensor):
            fail(
                "gram_params",
                "a subset of the shared parameters (the layers the Gram matrix is computed on)",
                f"gram_params[{i}] of type {type(p).__name__}",
            )
    return chosen


# Read once: torch.compile cannot trace dataclasses.fields() of the class inside a compiled call.
OPTION_NAMES = frozenset(f.name for f in fields(MTLBackwardOptions))
_DEFAULTS = MTLBackwardOptions()  # frozen: one shared instance for calls that set no option
