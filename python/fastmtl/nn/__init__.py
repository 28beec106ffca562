"""Modules users put in their models: the fused trunk, the fused heads and the model tying them."""

from .aitm import AITM
from .cross_stitch import CrossStitch
from .dselect_k import DSelectK
from .embedding import EmbeddedTrunk, FieldEmbedding
from .esmm import ESMM
from .experts import PLE, MMoE
from .fused_mlp import FusedMLP
from .heads import MultiTaskHeads
from .learning_to_branch import LearningToBranch
from .model import MultiTaskModel, MultiTaskOutput
from .mtan import MTAN
from .shared_bottom import SharedBottom
from .soft_sharing import SoftSharedLinear

__all__ = [
    "FusedMLP",
    "MultiTaskHeads",
    "MultiTaskModel",
    "MultiTaskOutput",
    "MMoE",
    "PLE",
    "SoftSharedLinear",
    "FieldEmbedding",
    "EmbeddedTrunk",
]
__all__ += ["CrossStitch", "MTAN", "DSelectK", "SharedBottom", "ESMM", "AITM", "LearningToBranch"]
