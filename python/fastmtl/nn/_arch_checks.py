"""Argument checks shared by the architecture modules (cross-stitch, MTAN, DSelect-k, ESMM, AITM,
SharedBottom): every message names the class, the argument, what was expected and what was given."""

from __future__ import annotations

import math

import torch

from .. import ops


def check_count(owner: str, name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: argument '{name}' expected an int >= {minimum}, got {value!r}")
    return value


def check_widths(owner: str, name: str, widths) -> list[int]:
    """An int (one layer) or a non-empty sequence of layer widths, each an int >= 1."""
    if isinstance(widths, bool) or not isinstance(widths, (int, list, tuple)):
        raise TypeError(
            f"{owner}: argument '{name}' expected an int or a sequence of ints, got {type(widths).__name__}"
        )
    widths = [widths] if isinstance(widths, int) else list(widths)
    if not widths:
        raise ValueError(f"{owner}: argument '{name}' expected at least one layer width, got []")
    for i, w in enumerate(widths):
        check_count(owner, f"{name}[{i}]", w, 1)
    return widths


def check_activation(owner: str, activation) -> str:
    if activation not in ops.ACTIVATIONS:
        raise ValueError(
            f"{owner}: argument 'activation' expected one of {', '.join(ops.ACTIVATIONS)}, got {activation!r}"
        )
    return activation


def check_float(owner: str, name: str, value, low: float, high: float, low_open: bool = False) -> float:
    """A real number in [low, high] ((low, high] when low_open)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: argument '{name}' expected a float, got {type(value).__name__}")
    value = float(value)
    bad_low = value <= low if low_open else value < low
    if bad_low or value > high or math.isnan(value):
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{owner}: argument '{name}' expected a float in {interval}, got {value!r}")
    return value


def check_input(owner: str, x, in_features: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner}: argument 'x' expected a tensor [B, {in_features}], got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(f"{owner}: argument 'x' expected shape [B, {in_features}], got {list(x.shape)}")
