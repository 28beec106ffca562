"""The normalisation and dropout of fused towers, shared by :class:`FusedMLP` (one tower) and
:class:`ExpertBank` (E stacked towers: experts, per-task towers): the option checks, the
normalisation modules that hold the parameters and running statistics, and the one call of
:func:`fastmtl.ops.fused_mlp_norm` with BatchNorm1d's step counting."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .. import ops

NORMS = (None, "batch", "layer")


def check_norm_options(owner: str, norm, dropout, name: str = "") -> float:
    """``norm`` one of None / "batch" / "layer", ``dropout`` a probability; returns it as a float.
    ``name``: the arguments' prefix in the owner's signature (``tower_`` for ``tower_norm``)."""
    if norm not in NORMS:
        raise ValueError(f"{owner}: argument '{name}norm' expected None, 'batch' or 'layer', got {norm!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
        raise ValueError(f"{owner}: argument '{name}dropout' expected a probability in [0, 1], got {dropout!r}")
    return float(dropout)


class StackedLayerNorm(nn.Module):
    """E towers' own ``nn.LayerNorm(features)``: ``weight``, ``bias`` ``[E, features]`` (tower e's
    affine parameters in row e), normalising each tower's rows over its features."""

    def __init__(self, num_towers: int, features: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(num_towers, features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(num_towers, features, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"num_towers={self.weight.shape[0]}, features={self.weight.shape[1]}, eps={self.eps}"


def make_norms(
    norm: str | None,
    widths: Sequence[int],
    num_towers: int | None,
    eps: float,
    momentum: float | None,
    factory: dict,
) -> nn.ModuleList | None:
    """One normalisation module per layer: ``nn.BatchNorm1d`` (over ``E * width`` channels for E
    stacked towers: channel ``e * width + j`` is tower e's feature j, so BatchNorm1d's buffers,
    momentum and step count hold for every tower), ``nn.LayerNorm`` or :class:`StackedLayerNorm`."""
    if norm == "batch":
        towers = num_towers or 1
        return nn.ModuleList([nn.BatchNorm1d(towers * n, eps=eps, momentum=momentum, **factory) for n in widths])
    if norm == "layer":
        if num_towers is None:
            return nn.ModuleList([nn.LayerNorm(n, eps=eps, **factory) for n in widths])
        return nn.ModuleList([StackedLayerNorm(num_towers, n, eps=eps, **factory) for n in widths])
    return None


def _batch_norm_momentum(norms, training: bool) -> float:
    """The running statistics' update factor of this step, as ``nn.BatchNorm1d.forward``: it
    counts the step in ``num_batches_tracked`` in training; momentum None averages cumulatively."""
    first = norms[0]
    if not (training and first.track_running_stats and first.num_batches_tracked is not None):
        return 0.0 if first.momentum is None else first.momentum
    for m in norms:
        m.num_batches_tracked.add_(1)
    return 1.0 / float(first.num_batches_tracked) if first.momentum is None else first.momentum


def run_tower(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    norm: str | None,
    norms: nn.ModuleList | None,
    activation: str,
    dropout: float,
    training: bool,
) -> torch.Tensor:
    """The tower (or E stacked towers: 3-D weights) through :func:`fastmtl.ops.fused_mlp_norm`,
    with the parameters and running statistics of ``norms`` (stacked: seen as ``[E, width]``)."""
    modules = list(norms) if norms is not None else []

    def per_layer(tensors):
        if not tensors or tensors[0] is None:
            return []
        return [t.view(w.shape[:-1]) for t, w in zip(tensors, weights)]  # [E * d] -> [E, d] when stacked

    momentum, eps = 0.0, modules[0].eps if modules else 1e-5
    if norm == "batch":
        momentum = _batch_norm_momentum(modules, training)
    running = norm == "batch"
    return ops.fused_mlp_norm(
        x,
        weights,
        biases,
        norm or "none",
        activation,
        dropout,
        training,
        per_layer([m.weight for m in modules]),
        per_layer([m.bias for m in modules]),
        per_layer([m.running_mean for m in modules]) if running else [],
        per_layer([m.running_var for m in modules]) if running else [],
        momentum,
        eps,
    )
