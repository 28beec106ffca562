"""Plain-PyTorch references of the fused ops and of the engine: same functions, same signatures,
built from ``torch.nn.functional`` and autograd. Slow and obvious on purpose: the tests' oracle.
One module per module of :mod:`fastmtl.ops` (trunk, norm_trunk, heads, experts, per_task, aggregation), and
:mod:`.mtl_backward_loop` for :func:`fastmtl.mtl_backward`."""

from . import aggregation, architectures
from .aggregation import *  # noqa: F401, F403  (its __all__: the aggregation ops)
from .architectures import *  # noqa: F401, F403  (its __all__: the architecture modules)
from .experts import fused_experts, gated_mixture
from .heads import multitask_head_loss, pack_targets
from .mtl_backward_loop import mtl_backward
from .norm_trunk import fused_mlp_norm
from .per_task import task_gram
from .trunk import activation_fn, fused_mlp

__all__ = (
    [
        "fused_mlp",
        "fused_mlp_norm",
        "activation_fn",
        "multitask_head_loss",
        "pack_targets",
        "fused_experts",
        "gated_mixture",
        "task_gram",
        "mtl_backward",
    ]
    + list(aggregation.__all__)
    + list(architectures.__all__)
)
