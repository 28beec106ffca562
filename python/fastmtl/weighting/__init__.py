"""Loss-based task weighting: per-task losses ``[T]`` (and, for some methods, the ``[T, T]`` Gram
matrix of the per-task gradients) -> the scalar loss to backpropagate.

Every method is a :class:`Weighting` module with one call, ``method(losses, gram=None)``,
``num_tasks`` as its first argument, and ``method.weights``: the effective weights of the last
call, ``d(returned loss) / d(losses)``, detached. Their state — learnable parameters, running
statistics, generators, optimizer moments — is saved by ``state_dict()``.

Weighting acts on the losses; the gradient-based methods, which act on the per-task gradients
(MGDA, PCGrad, ...), are in :mod:`fastmtl.aggregation`.

============  ===========================================  ===================================  ==========================================
method        paper                                        needs                                returns
============  ===========================================  ===================================  ==========================================
``EW``        equal weighting (baseline)                   losses                               ``sum L_t``
``UW``        Kendall et al., CVPR 2018                    losses, learnable parameters         ``sum L_t / (2 exp s_t) + s_t / 2``
``DWA``       Liu et al., CVPR 2019                        losses, history (``end_epoch()``)    ``sum w_t L_t``, ``w`` from epoch-mean ratios
``RLW``       Lin et al., TMLR 2022 (arXiv 2021)           losses (random draws)                ``sum w_t L_t``, ``w = softmax(randn(T))``
``GradNorm``  Chen et al., ICML 2018                       losses, history, gram (diagonal)     ``sum w_t L_t``, ``w`` stepped after each call
``FAMO``      Liu et al., NeurIPS 2023                     losses, history (``update()``)       ``sum z_t log(L_t - min_t + eps) / c``
``DBMTL``     Lin et al., arXiv 2023                       losses, history, gram (diagonal)     ``sum alpha_t log(L_t + eps)``
``IMTLL``     Liu et al., ICLR 2021 (IMTL-L)               losses, learnable parameters         ``sum exp(s_t) L_t - s_t``
``GLS``       Chennupati et al., CVPR-W 2019               losses                               ``(prod L_t)^(1/T)``
``STCH``      Lin et al., ICML 2024                        losses                               ``mu log sum exp(w_t (L_t - z_t) / mu)``
``COSMOS``    Ruchte & Grabocka, ICDM 2021                 losses                               ``sum r_t L_t - lambda cos(r, L)``
``PBI``       Zhang & Li, IEEE TEC 2007                    losses                               ``d1 + theta d2`` along / off a preference
``MetaBal.``  He et al., WWW 2022 (``MetaBalance``)        losses, history, gram (diagonal)     ``sum w_t L_t``, aux norms toward the main's
``AutoLam.``  Liu et al., TMLR 2022 (``AutoLambda``)       losses, history, ``meta_step()``     ``sum lambda_t L_t``, ``lambda`` meta-learnt
============  ===========================================  ===================================  ==========================================

"learnable parameters": ``method.parameters()`` must go to the optimizer with the model's.
"history": the method keeps state across calls; restore it with ``load_state_dict`` when resuming.
"meta_step()": AutoLambda moves its weights by a virtual step of the shared parameters
(``params``) and the validation losses at it: call ``method.meta_step(train_fn, val_fn)`` each step.
"gram": ``G_st = <grad L_s, grad L_t>`` over the shared parameters (``method.requires_gram``).

>>> import torch
>>> from fastmtl.weighting import UW
>>> shared = torch.nn.Linear(3, 2)
>>> weighting = UW(num_tasks=2)
>>> optimizer = torch.optim.SGD([*shared.parameters(), *weighting.parameters()], lr=0.1)
>>> out = shared(torch.randn(8, 3))
>>> losses = out.pow(2).mean(dim=0)
>>> weighting(losses).backward()
>>> optimizer.step()
"""

from ._base import Weighting
from .autolambda import AutoLambda
from .cosmos import COSMOS
from .dbmtl import DBMTL
from .dwa import DWA
from .equal import EW
from .famo import FAMO
from .gls import GLS
from .gradnorm import GradNorm
from .imtl import IMTLL
from .metabalance import MetaBalance
from .pbi import PBI
from .rlw import RLW
from .stch import STCH
from .uncertainty import UW

__all__ = [
    "Weighting",
    "EW",
    "UW",
    "DWA",
    "RLW",
    "GradNorm",
    "FAMO",
    "DBMTL",
    "IMTLL",
    "GLS",
    "STCH",
    "COSMOS",
    "PBI",
    "MetaBalance",
    "AutoLambda",
]
