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
Krum(f)         (Multi-)Krum's selected gradients           -
PCD(tau)        primary task first, tau for the others      EMA of the squared norms
CRMOGM(m)       EMA of another method's weights             EMA of the weights
GradDrop        gradient sign dropout (needs J)             RNG (one draw per parameter)
TrimmedMean(k)  coordinate-wise trimmed mean (needs J)      -
ExcessMTL       excess-risk weights (needs J)               AdaGrad sums [T, P], weights
MoCo            MGDA step on tracked gradients (needs J)    tracked gradients [T, P], weights
MoDo            projected step on the simplex (cross-Gram)  weights
SDMGrad         direction-oriented weights (cross-Gram)     weights
==============  ==========================================  =====================================

What a method needs is its ``requires``: ``"gram"`` (most: ``method(gram)``, ``[T, T]`` or ``[N, T, T]``
-> weights), ``"jacobian"`` (:class:`JacobianAggregator`: ``method(jacobian)``, the per-task gradients
``J [T, P]`` -> the update ``[P]``) or ``"cross_gram"`` (:class:`CrossGramAggregator`:
``method(cross_gram)``, ``J_1 J_2^T`` of two independent mini-batches -> weights ``[T]``). A method given
less than it needs (a Gram matrix to GradDrop, ``gram=`` to MoDo) raises a ValueError saying what it needs.

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

from ._base import (
    REQUIREMENTS,
    Aggregator,
    CrossGramAggregator,
    JacobianAggregator,
    requirement,
)
from .aligned_mtl import AlignedMTL
from .cagrad import CAGrad
from .config import ConFIG
from .constant import Constant
from .cr_mogm import CRMOGM
from .dualproj import DualProj
from .excess_mtl import ExcessMTL
from .fairgrad import FairGrad
from .graddrop import GradDrop
from .gradvac import GradVac
from .imtl_g import IMTLG
from .krum import Krum
from .mean import Mean
from .mgda import MGDA
from .moco import MoCo
from .modo import MoDo
from .nash_mtl import NashMTL
from .pcd import PCD
from .pcgrad import PCGrad
from .random import Random
from .sdmgrad import SDMGrad
from .sum import Sum
from .trimmed_mean import TrimmedMean
from .upgrad import UPGrad

#: The interfaces (not methods): everything else in __all__ is a method.
INTERFACES = ("Aggregator", "JacobianAggregator", "CrossGramAggregator")

__all__ = [
    "CRMOGM",
    "IMTLG",
    "MGDA",
    "PCD",
    "REQUIREMENTS",
    "Aggregator",
    "AlignedMTL",
    "CAGrad",
    "ConFIG",
    "Constant",
    "CrossGramAggregator",
    "DualProj",
    "ExcessMTL",
    "MoCo",
    "FairGrad",
    "GradDrop",
    "GradVac",
    "JacobianAggregator",
    "Krum",
    "Mean",
    "MoDo",
    "NashMTL",
    "PCGrad",
    "Random",
    "SDMGrad",
    "Sum",
    "TrimmedMean",
    "UPGrad",
    "requirement",
]
