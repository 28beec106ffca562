"""The activations of the layer-stack ops (fused_mlp, fused_experts) and which of them save what."""

from __future__ import annotations

__all__ = ["ACTIVATIONS", "PRE_ACTIVATION_SAVED", "check_activation"]

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "tanh", "identity")
# Activations whose backward reads the pre-activation (the C++ forward saves it for every layer);
# the others read the layer output, of which all but the last are saved (the last is the result).
PRE_ACTIVATION_SAVED = frozenset({"gelu", "gelu_tanh", "silu"})


def check_activation(owner: str, activation: str) -> None:
    """Raises ValueError naming ``owner`` unless ``activation`` is one of :data:`ACTIVATIONS`."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"{owner}: argument 'activation' expected one of {', '.join(ACTIVATIONS)}, got {activation!r}")
