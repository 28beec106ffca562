"""Modules users put in their models: the fused trunk, the fused heads and the model tying them."""

from .fused_mlp import FusedMLP
from .heads import MultiTaskHeads
from .model import MultiTaskModel, MultiTaskOutput
from .experts import MMoE, PLE
from .soft_sharing import SoftSharedLinear

__all__ = ["FusedMLP", "MultiTaskHeads", "MultiTaskModel", "MultiTaskOutput", "MMoE", "PLE", "SoftSharedLinear"]
