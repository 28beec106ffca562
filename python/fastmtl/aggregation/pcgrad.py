"""PCGrad: projecting conflicting gradients, written on the Gram matrix."""

from __future__ import annotations

from .. import ops
from ._base import SeededAggregator
from ._surgery import draw_order


class PCGrad(SeededAggregator):
    """Projecting conflicting gradients (Yu et al. 2020, Algorithm 1): for each task, in a random order
    of the others, remove from its (modified) gradient the component along any gradient it conflicts
    with; the update is the sum of the modified gradients. Equals the sum of the gradients when no two
    conflict. ``reduction="sum"`` (default) sums the modified gradients as the paper's Algorithm 1,
    torchjd and LibMTL do; ``"mean"`` averages them as the authors' PyTorch code does (then it equals
    :class:`Mean` when no two gradients conflict).

    Computed from the Gram matrix alone (each modified gradient kept as coefficients over the original
    ones) in C++: O(T^3) instead of O(T^2 P). ``seed=None`` uses the global torch RNG and draws the same
    orders as torchjd's PCGrad; an integer seeds a private generator once. Scale-invariant.

    >>> import torch
    >>> from fastmtl.aggregation import PCGrad
    >>> PCGrad(seed=0)(torch.tensor([[1.0, 0.5], [0.5, 1.0]]))    # no conflict: the sum
    tensor([1., 1.])
    """

    def __init__(self, seed: int | None = None, reduction: str = "sum"):
        super().__init__(seed)
        if reduction not in ("sum", "mean"):
            raise ValueError(
                f"fastmtl.aggregation.PCGrad: argument 'reduction' expected 'sum' or 'mean', got {reduction!r}"
            )
        self.reduction = reduction

    def _weights(self, gram):
        N, T = gram.shape[:2]
        weights = ops.pcgrad_weights(gram, draw_order(N, T, self._generator, exclude_self=False))
        return weights / T if self.reduction == "mean" else weights

    def _hyperparameters(self):
        return {"seed": self.seed, "reduction": self.reduction}
