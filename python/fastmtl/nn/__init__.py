"""Modules users put in their models: the fused trunk, the fused heads and the model tying them."""

from .fused_mlp import FusedMLP
from .heads import MultiTaskHeads
from .model import MultiTaskModel, MultiTaskOutput
from .experts import MMoE, PLE
from .soft_sharing import SoftSharedLinear
from .embedding import EmbeddedTrunk, FieldEmbedding

from .cross_stitch import CrossStitch
from .mtan import MTAN
from .dselect_k import DSelectK
from .shared_bottom import SharedBottom
from .esmm import ESMM
from .aitm import AITM
from .learning_to_branch import LearningToBranch

__all__ = ["FusedMLP", "MultiTaskHeads", "MultiTaskModel", "MultiTaskOutput", "MMoE", "PLE", "SoftSharedLinear", "FieldEmbedding", "EmbeddedTrunk"]
__all__ += ["CrossStitch", "MTAN", "DSelectK", "SharedBottom", "ESMM", "AITM", "LearningToBranch"]
