"""The fused ops: typed Python functions over ``torch.ops.fastmtl.*``, and their fake (meta)
kernels registered through ``torch.library`` so they work under ``torch.compile(fullgraph=True)``
and ``torch.library.opcheck``. Their autograd formulas are registered in C++ (``csrc/ops/``: the
Python route cost more per call than a small step's GEMMs).

The C++ forward ops also return what their backward needs (saved activations, logit gradients);
the plain functions return only the result, the ``*_with_saved`` ones both. :mod:`fastmtl.reference`
has the same functions in plain PyTorch. One module per family of ops:

* :mod:`.trunk`: ``fused_mlp``; :mod:`.norm_trunk`: ``fused_mlp_norm`` (towers with norm and dropout); :mod:`.heads`: ``multitask_head_loss``, ``pack_targets``;
* :mod:`.experts`: ``fused_experts``, ``gated_mixture`` (Mixture-of-Experts trunks);
* :mod:`.per_task`: the per-task Gram matrix (task_gram) and weighted backward of a FusedMLP model;
* :mod:`.aggregation`: Gram matrices to task weights (the aggregation methods' solvers).
"""

from . import aggregation
from .activations import ACTIVATIONS, PRE_ACTIVATION_SAVED, check_activation
from .aggregation import *  # noqa: F401, F403  (its __all__: the aggregation ops)
from .experts import expert_index_list, fused_experts, gated_mixture, gated_mixture_flat
from .heads import (
    HeadArguments,
    TaskLayout,
    loss_dtype,
    multitask_head_loss,
    multitask_head_loss_with_saved,
    pack_targets,
    task_layout,
)
from .norm_trunk import NORMS, fused_mlp_norm, fused_mlp_norm_with_saved
from .per_task import (
    GRAM_MODES,
    GRAM_PATHS,
    mtl_representation_gram,
    mtl_trunk_gram,
    mtl_weighted_backward,
    task_gram,
)
from .trunk import MLPArguments, fused_mlp, fused_mlp_with_saved

__all__ = [
    "ACTIVATIONS",
    "PRE_ACTIVATION_SAVED",
    "check_activation",
    "fused_mlp",
    "fused_mlp_with_saved",
    "fused_mlp_norm",
    "fused_mlp_norm_with_saved",
    "NORMS",
    "MLPArguments",
    "multitask_head_loss",
    "multitask_head_loss_with_saved",
    "pack_targets",
    "loss_dtype",
    "task_layout",
    "TaskLayout",
    "HeadArguments",
    "fused_experts",
    "gated_mixture",
    "gated_mixture_flat",
    "expert_index_list",
    "task_gram",
    "mtl_trunk_gram",
    "mtl_representation_gram",
    "mtl_weighted_backward",
    "GRAM_PATHS",
    "GRAM_MODES",
] + list(aggregation.__all__)
