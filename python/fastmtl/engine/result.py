"""What one ``mtl_backward`` call computed: the result type every path of the engine returns (and
:func:`fastmtl.reference.mtl_backward` too)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MTLBackwardResult"]


@dataclass
class MTLBackwardResult:
    """What one ``mtl_backward`` call computed (all detached): the losses ``[T]``, the aggregator's
    weights ``[T]``, the Gram matrix ``[T, T]`` it saw, and the Jacobian ``[T, P]`` of the shared
    parameters when ``keep_jacobian=True`` (exact mode), its columns the flattened parameters in
    the order of ``shared_params`` (``model.mtl_backward``: :meth:`MultiTaskModel.shared_parameters`,
    in ``trunk.parameters()`` order; :func:`fastmtl.mtl_backward` without ``shared_params``: the
    order of :func:`fastmtl.engine.graph_leaves`). With ``gram_every > 1``, ``gram_computed``
    says whether this call computed the Gram matrix and weights (else they are the kept ones).
    ``path``: how the generic engine got the Gram matrix ("batched", "task-loop", "factored", "streamed", "rep",
    "partial/..." or "kept weights"; empty on the fused path); ``cosine``: with
    ``report_cosine=True``, the cosine between the update of the shared parameters and the exact
    mode's."""

    losses: torch.Tensor
    weights: torch.Tensor
    gram: torch.Tensor
    jacobian: torch.Tensor | None = None
    gram_computed: bool = True
    path: str = ""
    cosine: float | None = None
