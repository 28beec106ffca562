"""Gradient aggregation: the Gram matrix of the per-task gradients -> task weights.

Every method is a small module called on a Gram matrix ``G[s, t] = <g_s, g_t>``: ``[T, T] -> [T]``, or
a batch ``[N, T, T] -> [N, T]``. The update is ``sum_t weights[t] * g_t``; fastmtl's engine applies it
layer by layer without ever forming the gradients (ARCHITECTURE.md), and any code that has the
Jacobian ``J [T, P]`` can use ``weights @ J``. The numeric cores are C++ ops
(:mod:`fastmtl.ops.aggregation`) solving in double precision.

==============  ==========================================  =====================================
method          what it returns                             state / randomness
==============  ==========================================  =====================================
Mean, Sum       1/T, 1                                      -
Constant(w)     w                                           -
Random          softmax(randn(T)) (RLW)                     RNG (seed or global)
MGDA            exact min-norm point of the convex hull     -
UPGrad          sum of projections onto the dual cone       -
DualProj        projection of the mean onto the dual cone   -
PCGrad          projected conflicting gradients             RNG (visiting order)
GradVac         gradient vaccine                            EMA targets, RNG
CAGrad(c)       conflict-averse direction                   -
IMTLG           equal projections on unit gradients         -
AlignedMTL      aligned principal components                -
NashMTL         Nash bargaining solution G a = 1/a          weights reused every k calls
ConFIG          equal angles to all gradients               -
FairGrad(a)     alpha-fair weights G x = x^(-1/alpha)       -
==============  ==========================================  =====================================

Names, hyperparameters and defaults follow torchjd 0.18 where torchjd has the method, and the tests
check each against it. Gram matrices must be finite, symmetric (to 1e-8 of their largest entry in
float64, 1e-4 in float32) and of shape [T, T] or [N, T, T]; anything else raises ValueError naming
``gram``.

>>> import torch
>>> from fastmtl.aggregation import UPGrad
>>> J = torch.randn(3, 100, dtype=torch.float64)     # 3 task gradients
>>> weights = UPGrad()(J @ J.T)
>>> update = weights @ J
>>> bool(torch.all(J @ update >= -1e-12))             # no task is made worse to first order
True
"""

from ._base import Aggregator
from .bargaining import FairGrad, NashMTL
from .basic import Constant, Mean, Random, Sum
from .cagrad import CAGrad
from .dual_cone import DualProj, UPGrad
from .mgda import MGDA
from .spectral import IMTLG, AlignedMTL, ConFIG
from .surgery import GradVac, PCGrad

__all__ = [
    "Aggregator",
    "AlignedMTL",
    "CAGrad",
    "ConFIG",
    "Constant",
    "DualProj",
    "FairGrad",
    "GradVac",
    "IMTLG",
    "MGDA",
    "Mean",
    "NashMTL",
    "PCGrad",
    "Random",
    "Sum",
    "UPGrad",
]
