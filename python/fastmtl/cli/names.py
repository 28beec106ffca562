"""Command-line names: methods, modes and data sets are named as in the Python API, case-insensitively
(``--method upgrad`` is ``fastmtl.aggregation.UPGrad``), and a wrong name lists the valid ones."""

from __future__ import annotations

import argparse
import inspect

from .. import aggregation, weighting
from ..data import DATASETS
from ..engine import MODES

# Every method class of fastmtl.aggregation but Constant, whose weights a command line has no way to give
# (the interfaces and helpers in __all__ are not methods). The engine behind the command line
# (model.mtl_backward) supplies what each declares: the Jacobian methods (GradDrop, TrimmedMean,
# ExcessMTL, MoCo) get the per-task gradients in exact mode with gram_every=1, the cross-Gram methods
# (MoDo, SDMGrad) the cross-Gram of each batch's two halves in exact mode.
_AGGREGATOR_NAMES = [
    name
    for name in aggregation.__all__
    if isinstance(getattr(aggregation, name), type)
    and issubclass(getattr(aggregation, name), aggregation.Aggregator)
    and name not in aggregation.INTERFACES
    and name != "Constant"
]
_WEIGHTING_NAMES = [name for name in weighting.__all__ if name != "Weighting"]

#: lower-case name -> the class name in fastmtl.aggregation / fastmtl.weighting
METHODS: dict[str, str] = {name.lower(): name for name in _WEIGHTING_NAMES + _AGGREGATOR_NAMES}
DATA_SETS: dict[str, str] = {name.lower(): name for name in DATASETS}
MODE_NAMES: dict[str, str] = {name.lower(): name for name in MODES}


def canonical(what: str, name: str, names: dict[str, str]) -> str:
    """The API spelling of ``name`` in ``names``; ValueError listing the valid names otherwise."""
    try:
        return names[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; valid: {', '.join(names.values())}") from None


def argument_type(what: str, names: dict[str, str]):
    """An argparse ``type=`` that maps a name case-insensitively and reports a wrong one with the list."""

    def parse(name: str) -> str:
        try:
            return canonical(what, name, names)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = what  # argparse names the type in its messages
    return parse


def is_aggregator(method: str) -> bool:
    """Whether ``method`` (an API name) is a Gram -> weights aggregator (else a loss weighting)."""
    return method in _AGGREGATOR_NAMES


def _command_line_arguments(method: str, num_tasks: int) -> dict:
    """The arguments of the methods that have no default for them: Krum assumes no adversarial task,
    TrimmedMean trims one task from each end where there are 3 or more, CR-MOGM smooths UPGrad (as
    torchjd's example)."""
    if method == "Krum":
        return {"n_byzantine": 0}
    if method == "TrimmedMean":
        return {"trim_number": 1 if num_tasks >= 3 else 0}
    if method == "CRMOGM":
        return {"aggregator": aggregation.UPGrad()}
    return {}


def make_method(method: str, num_tasks: int, seed: int, params=None, lr: float | None = None):
    """A new instance of the method with its defaults; methods that draw random numbers get ``seed``.
    Methods that step the model's parameters themselves (AutoLambda's virtual step) get ``params``
    and, as their step size, the model optimizer's ``lr``."""
    cls = getattr(aggregation, method) if is_aggregator(method) else getattr(weighting, method)
    signature = inspect.signature(cls).parameters
    kwargs = {"seed": seed} if "seed" in signature else {}
    if "params" in signature:
        if params is None or lr is None:
            raise ValueError(f"{method} needs the model's parameters and learning rate (arguments 'params', 'lr')")
        kwargs.update(params=params, lr=lr)
    if is_aggregator(method):
        return cls(**_command_line_arguments(method, num_tasks), **kwargs)
    return cls(num_tasks, **kwargs)
