"""The fused tower op: ``fused_mlp_norm`` (Linear -> [BatchNorm | LayerNorm] -> activation ->
[Dropout] layers in one call, the towers of recommendation models), its typed wrapper and its fake
(meta) kernels. Autograd is registered in C++ (``csrc/ops/norm_trunk_autograd.cpp``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._checks import check_devices
from .activations import PRE_ACTIVATION_SAVED, check_activation

__all__ = ["fused_mlp_norm", "fused_mlp_norm_with_saved", "NORMS", "SAVED_PER_LAYER"]

NORMS = ("none", "batch", "layer")
# Tensors fused_mlp_norm saves per layer (csrc/ops/norm_trunk.h): pre, mean, invstd, act_src, mask.
SAVED_PER_LAYER = 5


def fused_mlp_norm(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor] = (),
    norm: str = "batch",
    activation: str = "relu",
    dropout: float = 0.0,
    training: bool = True,
    norm_weights: Sequence[torch.Tensor] = (),
    norm_biases: Sequence[torch.Tensor] = (),
    running_means: Sequence[torch.Tensor] = (),
    running_vars: Sequence[torch.Tensor] = (),
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """A tower in one call: ``z_l = dropout(act(norm(z_{l-1} W_l^T + b_l)))`` for every layer.

    Args:
        x: ``[B, in_features]``, float32, float64, bfloat16 or float16; ``[E, B, in_features]``
            for stacked towers with one input each.
        weights, biases: ``W_l`` ``[out_l, in_l]`` and ``b_l`` ``[out_l]`` per layer (biases: all
            or none). Stacked towers: ``[E, out_l, in_l]`` and ``[E, out_l]``, E towers of the same
            widths run together (the experts of MMoE / PLE, per-task towers), each with its own
            normalisation (``[E, out_l]`` parameters and running statistics): the same as E
            separate towers, in one call with one batched GEMM per layer.
        norm: ``batch`` (``nn.BatchNorm1d``: batch statistics in training, the running ones in eval
            when given; ``running_means`` / ``running_vars`` are updated in place in training, with
            ``momentum``), ``layer`` (``nn.LayerNorm`` over the features) or ``none``.
        activation: as :func:`fastmtl.ops.fused_mlp`, or ``softmax`` (over each row's features: the
            gates of mixture-of-experts models, ``Linear -> BatchNorm1d -> Softmax``).
        dropout: the probability of zeroing an entry after the activation, in training (torch's
            generator, as ``nn.Dropout``).
        norm_weights, norm_biases: the affine parameters of each layer's normalisation, or empty.

    Returns: ``[B, out_L]`` (stacked: ``[E, B, out_L]``).

    >>> import torch, fastmtl
    >>> x = torch.randn(8, 3)
    >>> ws, mean, var = [torch.randn(5, 3)], [torch.zeros(5)], [torch.ones(5)]
    >>> out = fastmtl.ops.fused_mlp_norm(x, ws, norm="batch", running_means=mean, running_vars=var)
    >>> out.shape, bool(mean[0].abs().sum() > 0)
    (torch.Size([8, 5]), True)
    """
    out, _saved = fused_mlp_norm_with_saved(
        x,
        weights,
        biases,
        norm,
        activation,
        dropout,
        training,
        norm_weights,
        norm_biases,
        running_means,
        running_vars,
        momentum,
        eps,
    )
    return out


def fused_mlp_norm_with_saved(
    x,
    weights,
    biases=(),
    norm="batch",
    activation="relu",
    dropout=0.0,
    training=True,
    norm_weights=(),
    norm_biases=(),
    running_means=(),
    running_vars=(),
    momentum=0.1,
    eps=1e-5,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """:func:`fused_mlp_norm` and the tensors its backward reads (five per layer). In training, the
    running statistics are updated in place, as ``nn.BatchNorm1d`` does (the op itself is
    functional: it returns the new statistics, written here)."""
    out, saved, updated = torch.ops.fastmtl.fused_mlp_norm.default(
        x,
        list(weights),
        list(biases),
        list(norm_weights),
        list(norm_biases),
        list(running_means),
        list(running_vars),
        norm,
        activation,
        float(dropout),
        bool(training),
        float(momentum),
        float(eps),
    )
    if updated:
        with torch.no_grad():
            for buffer, new in zip(list(running_means) + list(running_vars), updated):
                buffer.copy_(new)
    return out, saved


def _check_norm(op: str, norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"fastmtl.{op}: argument 'norm' expected one of {', '.join(NORMS)}, got {norm!r}")


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


# ---- fake kernels (torch.compile tracing, meta tensors, opcheck): the shapes of ops/norm_trunk.cpp


@torch.library.register_fake("fastmtl::fused_mlp_norm")
def _fused_mlp_norm_fake(
    x,
    weights,
    biases,
    norm_weights,
    norm_biases,
    running_means,
    running_vars,
    norm,
    activation,
    dropout,
    training,
    momentum,
    eps,
):
    if activation != "softmax":
        check_activation("fastmtl.fused_mlp_norm", activation)
    _check_norm("fused_mlp_norm", norm)
    check_devices("fused_mlp_norm", "x", x, weights=weights, biases=biases)
    rows = x.shape[-2]
    stacked = weights[0].dim() == 3
    batch_stats = training or not running_means
    dropping = training and dropout > 0.0
    reads_output = activation not in PRE_ACTIVATION_SAVED

    def none():  # a fresh [0] placeholder each time, as the op makes them (returns must not alias)
        return x.new_empty((0,))

    def no_stats():
        return x.new_empty((0,), dtype=_stat_dtype(x))

    saved = []
    for l, w in enumerate(weights):
        towers = (w.shape[0],) if stacked else ()
        cols = w.shape[-2]
        activations = (*towers, rows, cols)
        top = l + 1 == len(weights)
        pre = x.new_empty(activations) if norm != "none" else none()
        if norm == "batch" and batch_stats:
            mean, invstd = (x.new_empty((*towers, cols), dtype=_stat_dtype(x)) for _ in range(2))
        elif norm == "layer":
            mean, invstd = (x.new_empty((*towers, rows, 1), dtype=_stat_dtype(x)) for _ in range(2))
        else:
            mean, invstd = no_stats(), no_stats()
        act_src = none() if top and not dropping and reads_output else x.new_empty(activations)
        mask = x.new_empty(activations, dtype=torch.bool) if dropping else none()
        saved += [pre, mean, invstd, act_src, mask]
    updated = (
        [t.new_empty(t.shape) for t in list(running_means) + list(running_vars)] if training and norm == "batch" else []
    )
    towers = (weights[-1].shape[0],) if stacked else ()
    return x.new_empty((*towers, rows, weights[-1].shape[-2])), saved, updated


@torch.library.register_fake("fastmtl::fused_mlp_norm_backward")
def _fused_mlp_norm_backward_fake(
    grad_out,
    x,
    weights,
    biases,
    norm_weights,
    norm_biases,
    running_means,
    running_vars,
    out,
    saved,
    norm,
    activation,
    dropout,
    training,
    momentum,
    eps,
    need_input_grad,
):
    check_devices("fused_mlp_norm_backward", "x", x, grad_out=grad_out, weights=weights, out=out, saved=saved)
    grad_x = x.new_empty(x.shape) if need_input_grad else x.new_empty((0,))
    return (
        grad_x,
        [w.new_empty(w.shape) for w in weights],
        [b.new_empty(b.shape) for b in biases],
        [g.new_empty(g.shape) for g in norm_weights],
        [b.new_empty(b.shape) for b in norm_biases],
    )
