"""ESMM, the Entire Space Multi-task Model (Ma et al. 2018): pCTCVR = pCTR * pCVR, both losses
over all impressions, so the CVR tower is trained on the entire space without sample selection bias."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..tasks import Task
from ._arch_checks import check_activation, check_count, check_input, check_widths
from .experts import ExpertBank
from .fused_mlp import FusedMLP
from .heads import MultiTaskHeads


def product_logit(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``logit(sigmoid(a) * sigmoid(b)) = -logsumexp(-a, -b, -a - b)``, stable for any logits.

    From ``1 - s(a)s(b) = (e^-a + e^-b + e^-(a+b)) s(a)s(b)``: the log-odds of the product never
    forms the product itself, so neither ``log(p)`` of a tiny probability nor ``1 - p`` of one
    close to 1 rounds away."""
    return -torch.logsumexp(torch.stack([-a, -b, -(a + b)]), dim=0)


class ESMM(nn.Module):
    """Two towers on a shared input: CTR (tower 0) and CVR (tower 1), each ending in a one-unit
    logit layer; the model predicts ``pCTR = sigmoid(a_ctr)``, ``pCVR = sigmoid(a_cvr)`` and
    ``pCTCVR = pCTR * pCVR``, and trains on two tasks over all impressions: ``ctr`` (click labels,
    bce on pCTR) and ``ctcvr`` (click-and-convert labels, bce on the product). The CVR tower has no
    loss of its own, which is the point of the paper.

    ``task_features(x)`` returns the two tasks' logits ``[2, B, 1]``: ``a_ctr`` and
    ``logit(pCTCVR)`` (:func:`product_logit`), so that with :meth:`heads` (identity heads:
    weight 1, bias 0, frozen) :class:`MultiTaskModel` computes both losses in the fused
    :func:`fastmtl.ops.multitask_head_loss` op and both engines run on it unchanged.

    Why the product loss is on the fused path only through its logit: the op computes
    ``bce_with_logits(z W^T + b, y)``, a loss of an affine function of the features; the CTCVR
    loss ``bce(sigmoid(a_ctr) * sigmoid(a_cvr), y)`` is not the bce of any affine function of the
    towers' outputs (its log-odds ``-logsumexp(-a, -b, -a-b)`` is not linear in them), so the
    towers' last layers cannot be the op's head GEMM. Written as bce-with-logits of the product's
    log-odds it is exactly the op's loss with an identity head; that head's GEMM is ``[B, 2] x
    [2, 2]``, so what the op contributes here is the stable bce, masking and the per-task means,
    not a fused head. (Passing ``pCTCVR`` as a logit, or its naive ``log(p / (1 - p))``, would be
    wrong or lose precision, hence :func:`product_logit`.)

    Fused ops: the optional shared bottom in one :func:`fastmtl.ops.fused_mlp` call, both towers'
    hidden layers in one :func:`fastmtl.ops.fused_experts` call; the towers' logit layers (one
    ``[2, B, h] x [2, h, 1]`` batched GEMM) and the product logit are plain PyTorch.

    Args:
        in_features: input width (the paper's concatenated shared embeddings).
        tower_hidden: the hidden widths of both towers (an int for one layer).
        shared_hidden: widths of a shared bottom MLP before the towers (the paper shares only
            the embeddings: None).
        activation: of the hidden layers, as :class:`FusedMLP`.
        task_names: the names of the two tasks, default ``("ctr", "ctcvr")``.

    Targets: ``ctr`` the click labels over all impressions, ``ctcvr`` click * conversion (0 where
    not clicked, never NaN for a labelled impression): :meth:`targets` builds them.

    >>> import torch, fastmtl
    >>> esmm = fastmtl.nn.ESMM(12, tower_hidden=[16, 8])
    >>> model = fastmtl.nn.MultiTaskModel(esmm, esmm.heads())
    >>> x = torch.randn(6, 12)
    >>> click = torch.tensor([1., 0., 1., 0., 0., 1.])
    >>> conversion = torch.tensor([1., float("nan"), 0., float("nan"), float("nan"), 1.])  # unknown where not clicked
    >>> targets = esmm.targets(click, conversion)
    >>> targets["ctcvr"].tolist()
    [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    >>> model.loss(x, targets).backward()
    >>> p = esmm.probabilities(x)
    >>> bool(torch.allclose(p["ctcvr"], p["ctr"] * p["cvr"]))
    True
    """

    def __init__(
        self,
        in_features: int,
        tower_hidden: int | Sequence[int],
        shared_hidden: int | Sequence[int] | None = None,
        activation: str = "relu",
        task_names: Sequence[str] = ("ctr", "ctcvr"),
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_count("ESMM", "in_features", in_features, 1)
        towers = check_widths("ESMM", "tower_hidden", tower_hidden)
        self.activation = check_activation("ESMM", activation)
        names = tuple(task_names) if isinstance(task_names, (list, tuple)) else None
        if names is None or len(names) != 2 or not all(isinstance(n, str) for n in names) or names[0] == names[1]:
            raise ValueError(
                f"ESMM: argument 'task_names' expected two different names (CTR task, CTCVR task), got {task_names!r}"
            )
        self.in_features, self.num_tasks, self.task_names = in_features, 2, names
        factory = {"device": device, "dtype": dtype}
        self.bottom = None
        fan_in = in_features
        if shared_hidden is not None:
            self.bottom = FusedMLP(
                in_features, check_widths("ESMM", "shared_hidden", shared_hidden), activation, **factory
            )
            fan_in = self.bottom.out_features
        self.towers = ExpertBank(fan_in, 2, towers, activation, **factory)
        self.logit_weight = nn.Parameter(torch.empty(2, towers[-1], **factory))
        self.logit_bias = nn.Parameter(torch.empty(2, **factory))
        self.reset_parameters()

    out_features = 1  # each task's "representation" is its logit

    @property
    def tasks(self):
        """The two binary tasks, in the order of :meth:`task_features`."""
        return [Task(self.task_names[0], "binary"), Task(self.task_names[1], "binary")]

    def reset_parameters(self) -> None:
        if self.bottom is not None:
            self.bottom.reset_parameters()
        self.towers.reset_parameters()
        bound = 1.0 / math.sqrt(self.logit_weight.shape[1])  # nn.Linear(h, 1) per tower
        nn.init.uniform_(self.logit_weight, -bound, bound)
        nn.init.uniform_(self.logit_bias, -bound, bound)

    def heads(self) -> MultiTaskHeads:
        """Identity heads for :class:`MultiTaskModel`: logit ``1 * feature + 0`` per task, not trainable."""
        w = self.logit_weight
        heads = MultiTaskHeads(1, self.tasks, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            heads.weight.fill_(1.0)
            heads.bias.zero_()
        heads.requires_grad_(False)
        return heads

    def tower_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[2, B]``: the CTR tower's logit ``a_ctr`` and the CVR tower's ``a_cvr``."""
        check_input("ESMM", x, self.in_features)
        shared = x if self.bottom is None else self.bottom(x)
        hidden = self.towers(shared)  # [2, B, h]
        return torch.baddbmm(self.logit_bias.view(2, 1, 1), hidden, self.logit_weight.unsqueeze(-1)).squeeze(-1)

    def task_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[2, B, 1]``: the logits of pCTR and of pCTCVR."""
        a_ctr, a_cvr = self.tower_logits(x).unbind(0)
        return torch.stack([a_ctr, product_logit(a_ctr, a_cvr)]).unsqueeze(-1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits: dict ``ctr``, ``cvr``, ``ctcvr`` -> ``[B]`` (``ctcvr`` the product's log-odds)."""
        a_ctr, a_cvr = self.tower_logits(x).unbind(0)
        return {"ctr": a_ctr, "cvr": a_cvr, "ctcvr": product_logit(a_ctr, a_cvr)}

    def probabilities(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """dict ``ctr``, ``cvr``, ``ctcvr`` -> ``[B]`` probabilities, ``ctcvr = ctr * cvr``."""
        return {name: torch.sigmoid(logit) for name, logit in self.forward(x).items()}

    def targets(self, click: torch.Tensor, conversion: torch.Tensor) -> dict[str, torch.Tensor]:
        """The two tasks' targets from click labels (0/1, NaN = impression unlabelled) and
        conversion labels (0/1 where clicked; anything, NaN included, where not clicked):
        ``ctr = click``, ``ctcvr = click * conversion``, 0 where not clicked."""
        for name, t in (("click", click), ("conversion", conversion)):
            if not isinstance(t, torch.Tensor) or t.dim() != 1:
                got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"ESMM.targets: argument '{name}' expected a 1-D tensor [B], got {got}")
        if conversion.shape != click.shape:
            raise ValueError(
                f"ESMM.targets: argument 'conversion' expected shape {list(click.shape)} (as 'click'), "
                f"got {list(conversion.shape)}"
            )
        click = click.to(torch.promote_types(click.dtype, torch.float32)) if not click.is_floating_point() else click
        clicked = click == 1
        if bool(torch.isnan(conversion[clicked]).any()):
            raise ValueError(
                "ESMM.targets: argument 'conversion' expected 0/1 labels on every clicked impression, "
                "got NaN on a clicked one"
            )
        ctcvr = torch.where(clicked, conversion.to(click.dtype), torch.where(click == 0, 0.0, math.nan).to(click.dtype))
        return {self.task_names[0]: click, self.task_names[1]: ctcvr}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, task_names={self.task_names}"
