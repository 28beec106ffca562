"""Helpers the op wrappers of this package share: argument shapes as the C++ ops take them, and the
device check of the fake kernels."""

from __future__ import annotations

import torch


def bias_list(biases, weights, op: str = "fused_mlp") -> list:
    """The op takes a bias for every layer or none. Layers without one among layers with one get a
    constant zero bias (its gradient is dropped): the op cannot take a list holding None, because
    torch.library's autograd gives no gradient to such a list."""
    if biases is None:
        return []
    biases = list(biases)
    if not biases:
        return []  # the op's own form of "no bias" (MLPArguments.biases)
    # The length is checked first: a list of Nones of the wrong length is as wrong as any other.
    if len(biases) != len(weights):
        raise ValueError(
            f"fastmtl.{op}: argument 'biases' expected {len(weights)} entries (one per layer) or None, got {len(biases)}"
        )
    if all(b is None for b in biases):
        return []
    # The bias of a weight [..., out, in] is [..., out] (per expert for fused_experts).
    return [w.new_zeros(w.shape[:-1]) if b is None else b for b, w in zip(biases, weights)]


def check_devices(op: str, reference_name: str, reference: torch.Tensor, **tensors) -> None:
    """Fake kernels run where no device kernel checks (meta tensors, torch.compile tracing):
    mixed devices must fail there too, not produce a result."""
    for name, value in tensors.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for i, t in enumerate(values):
            if t is not None and t.device != reference.device:
                where = f"{name}[{i}]" if isinstance(value, (list, tuple)) else name
                raise ValueError(
                    f"fastmtl.{op}: argument '{where}' expected device {reference.device} "
                    f"(the device of '{reference_name}'), got {t.device}"
                )
