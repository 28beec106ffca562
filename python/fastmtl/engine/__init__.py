"""The MTL engine: per-task gradients of the shared parameters, their Gram matrix, an aggregator's
weights and the aggregated update written into ``.grad``, without T backward passes.

* :mod:`.autograd_engine`: :func:`fastmtl.mtl_backward`, any PyTorch trunk (the T cotangents down
  the trunk in one vectorised backward, T plain passes, or streamed; :mod:`.trunk_gram` plans which
  and computes the Gram matrix per parameter block, :mod:`.batched_backward` is the streamed sweep);
* :mod:`.fused`: the fused path of a FusedMLP trunk and MultiTaskHeads (``model.mtl_backward``),
  over op arguments, with no Jacobian;
* :mod:`.schedule`: the ``gram_every`` weight schedule; :mod:`.options`: the call options and
  their checks; :mod:`.result`: the result type; :mod:`.gradients`: writing ``.grad``.
"""

from .autograd_engine import graph_leaves, mtl_backward
from .fused import fused_mlp_mtl_backward, fused_model_backward
from .options import MODES, MTLBackwardOptions
from .result import MTLBackwardResult
from .schedule import WeightSchedule, schedule_of
from .trunk_gram import update_cosine

__all__ = [
    "mtl_backward",
    "fused_model_backward",
    "fused_mlp_mtl_backward",
    "graph_leaves",
    "MTLBackwardOptions",
    "MODES",
    "MTLBackwardResult",
    "WeightSchedule",
    "schedule_of",
    "update_cosine",
]
