"""Plain-PyTorch reference of :func:`fastmtl.ops.fused_mlp_norm`: ``F.linear``,
``F.batch_norm`` / ``F.layer_norm``, the activation and dropout, layer by layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .trunk import activation_fn

__all__ = ["fused_mlp_norm"]


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
    dropout_masks: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The same arguments; ``dropout_masks``: the kept entries of each layer (bool ``[B, out_l]``)
    where dropout runs (training, ``dropout > 0``), in place of random ones, so that a test can
    replay the op's masks. Running statistics are updated in place, as the op does. Stacked towers
    (3-D weights) run one by one, each with its own slice of every per-layer tensor."""
    if weights[0].dim() == 3:
        outputs = []
        for e in range(weights[0].shape[0]):

            def own(tensors, e=e):
                return [t[e] for t in tensors]

            outputs.append(
                fused_mlp_norm(
                    x if x.dim() == 2 else x[e],
                    own(weights),
                    own(biases),
                    norm,
                    activation,
                    dropout,
                    training,
                    own(norm_weights),
                    own(norm_biases),
                    own(running_means),
                    own(running_vars),
                    momentum,
                    eps,
                    None if dropout_masks is None else own(dropout_masks),
                )
            )
        return torch.stack(outputs)
    act = (lambda a: torch.softmax(a, dim=-1)) if activation == "softmax" else activation_fn(activation)
    h = x
    for l, w in enumerate(weights):
        a = F.linear(h, w, biases[l] if biases else None)
        gamma = norm_weights[l] if norm_weights else None
        beta = norm_biases[l] if norm_biases else None
        if norm == "batch":
            mean = running_means[l] if running_means else None
            var = running_vars[l] if running_vars else None
            a = F.batch_norm(a, mean, var, gamma, beta, training or mean is None, momentum, eps)
        elif norm == "layer":
            a = F.layer_norm(a, (w.shape[0],), gamma, beta, eps)
        h = act(a)
        if training and dropout > 0.0:
            if dropout_masks is None:
                h = F.dropout(h, dropout, True)
            else:
                scale = 0.0 if dropout >= 1.0 else 1.0 / (1.0 - dropout)
                h = h * dropout_masks[l] * scale
    return h
