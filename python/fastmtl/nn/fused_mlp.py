"""FusedMLP: a stack of Linear + activation layers run by one fused op call."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .. import ops
from .._validation import check_int_at_least
from ._init import linear_init_
from ._norm_layers import check_norm_options, make_norms, run_tower

# Plain PyTorch activation modules and the fused activation each one is.
_MODULE_ACTIVATIONS = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Tanh: "tanh", nn.Identity: "identity"}


def activation_name_of(module: nn.Module):
    """The fused activation name of a plain activation module, or None if it has none (softmax:
    over the features of [B, d] rows, dim 1 or -1, the gates of mixture-of-experts models)."""
    if type(module) is nn.Softmax:
        return "softmax" if module.dim in (1, -1) else None
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    for cls, name in _MODULE_ACTIVATIONS.items():
        if type(module) is cls:
            return name
    return None


class FusedMLP(nn.Module):
    """``len(hidden_features)`` layers of ``act(x W^T + b)`` in one fused call.

    Equivalent to ``nn.Sequential(nn.Linear(in, h0), Act(), nn.Linear(h0, h1), Act(), ...)``, with
    the same initialisation; the activation follows every layer, the last one included. With
    ``norm`` and / or ``dropout``, the towers of recommendation models: ``nn.Sequential(Linear,
    BatchNorm1d | LayerNorm, Act, Dropout, ...)`` in one call of :func:`fastmtl.ops.fused_mlp_norm`.

    Args:
        in_features: input width.
        hidden_features: the width of each layer (an int for one layer).
        activation: ``relu``, ``gelu`` (erf), ``gelu_tanh``, ``silu``, ``tanh``, ``identity``, or
            ``softmax`` over each row's features (a gate; runs :func:`fastmtl.ops.fused_mlp_norm`).
        bias: whether every layer has a bias.
        norm: ``None``, ``"batch"`` (an ``nn.BatchNorm1d`` per layer, in ``self.norms``: batch
            statistics in training, running ones in eval, its momentum / eps / buffers and state_dict
            keys) or ``"layer"`` (an ``nn.LayerNorm`` per layer), between the Linear and the activation.
        dropout: the probability of ``nn.Dropout`` after every activation (training only).
        norm_eps, norm_momentum: of the normalisation modules (``momentum=None``: BatchNorm1d's
            cumulative average).

    Inputs ``[..., in_features]``; outputs ``[..., hidden_features[-1]]``.

    >>> import torch, fastmtl
    >>> trunk = fastmtl.nn.FusedMLP(16, [32, 32], activation="gelu")
    >>> trunk(torch.randn(8, 16)).shape
    torch.Size([8, 32])
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | Sequence[int],
        activation: str = "relu",
        bias: bool = True,
        device=None,
        dtype=None,
        norm: str | None = None,
        dropout: float = 0.0,
        norm_eps: float = 1e-5,
        norm_momentum: float | None = 0.1,
    ):
        super().__init__()
        if isinstance(hidden_features, int):
            widths = [hidden_features]
        elif isinstance(hidden_features, Sequence) and not isinstance(hidden_features, str):
            widths = list(hidden_features)
        else:
            raise TypeError(
                "FusedMLP: argument 'hidden_features' expected an int or a sequence of ints (the layer widths), "
                f"got {type(hidden_features).__name__}"
            )
        if not widths:
            raise ValueError("FusedMLP: argument 'hidden_features' expected at least one layer width, got []")
        for i, w in enumerate([in_features] + widths):
            check_int_at_least("FusedMLP", "in_features" if i == 0 else f"hidden_features[{i - 1}]", w, 1)
        if activation != "softmax":  # softmax: the tower op only (it is not elementwise)
            ops.check_activation("FusedMLP", activation)
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.hidden_features = tuple(widths)
        self.activation = activation
        fan_ins = [in_features] + widths[:-1]
        self.weights = nn.ParameterList([nn.Parameter(torch.empty(n, k, **factory)) for n, k in zip(widths, fan_ins)])
        self.biases = nn.ParameterList([nn.Parameter(torch.empty(n, **factory)) for n in widths]) if bias else None
        self.dropout = check_norm_options("FusedMLP", norm, dropout)
        self.norm = norm
        # Per layer, whether the plain equivalent has a Dropout module (fastmtl.unconvert builds
        # them; convert records the original's, which may hold Dropout(p=0) in some layers only).
        self.plain_dropout_modules = (self.dropout > 0.0,) * len(widths)
        self.norms = make_norms(norm, widths, None, norm_eps, norm_momentum, factory)
        self.reset_parameters()

    @property
    def out_features(self) -> int:
        return self.hidden_features[-1]

    @property
    def plain_layers(self) -> bool:
        """Whether the forward is ``act(x W^T + b)`` layers alone (no norm; dropout off or in eval):
        then it runs :func:`fastmtl.ops.fused_mlp` and the engine's fused path applies."""
        return self.norm is None and self.activation != "softmax" and (self.dropout == 0.0 or not self.training)

    @property
    def op_arguments(self) -> ops.MLPArguments:
        """The trunk as the fused ops take it: ``(weights, biases, activation)``, the parameters
        themselves (not copies) in layer order, ``biases`` empty without bias. What the engine's
        fused path and :func:`fastmtl.ops.task_gram` read.

        >>> import fastmtl
        >>> args = fastmtl.nn.FusedMLP(4, [8, 2], bias=False).op_arguments
        >>> [list(w.shape) for w in args.weights], args.biases, args.activation
        ([[8, 4], [2, 8]], [], 'relu')
        """
        if self.norm is not None or self.activation == "softmax":
            what = f"norm={self.norm!r}" if self.norm is not None else "activation='softmax'"
            raise ValueError(
                f"FusedMLP.op_arguments: a FusedMLP with {what} is not elementwise act(x W^T + b) layers "
                "(fastmtl.ops.fused_mlp's arguments); its forward calls fastmtl.ops.fused_mlp_norm"
            )
        # ParameterList's own iteration goes through string-index lookups per element, which
        # cost more than the op's dispatch on small batches; its _parameters dict is the same data.
        weights = list(self.weights._parameters.values())
        biases = list(self.biases._parameters.values()) if self.biases is not None else []
        return ops.MLPArguments(weights, biases, self.activation)

    def reset_parameters(self) -> None:
        for i, w in enumerate(self.weights):
            linear_init_(w, self.biases[i] if self.biases is not None else None)
        if self.norms is not None:
            for m in self.norms:
                m.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"FusedMLP: input expected shape [..., {self.in_features}], got {list(x.shape)}")
        if self.norm == "batch" and x.dim() != 2:
            raise ValueError(
                f"FusedMLP: input expected shape [B, {self.in_features}] with norm='batch', got {list(x.shape)}"
            )
        rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if self.plain_layers:
            out = ops.fused_mlp(rows, *self.op_arguments)
        else:
            out = self._tower(rows)
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.out_features)

    def _tower(self, rows: torch.Tensor) -> torch.Tensor:
        weights = list(self.weights._parameters.values())
        biases = list(self.biases._parameters.values()) if self.biases is not None else []
        return run_tower(rows, weights, biases, self.norm, self.norms, self.activation, self.dropout, self.training)

    def extra_repr(self) -> str:
        text = (
            f"in_features={self.in_features}, hidden_features={list(self.hidden_features)}, "
            f"activation={self.activation!r}, bias={self.biases is not None}"
        )
        if self.norm is not None:
            text += f", norm={self.norm!r}"
        return text + (f", dropout={self.dropout}" if self.dropout else "")

    # ---- switching from plain PyTorch

    @staticmethod
    def _layers_of(sequential: nn.Sequential):
        """[(Linear, activation name)] of a Sequential of Linear, Act, Linear, Act, ..."""
        modules = list(sequential)
        if len(modules) == 0 or len(modules) % 2:
            raise ValueError(
                "FusedMLP: expected an nn.Sequential of (nn.Linear, activation) pairs, "
                f"got {len(modules)} modules: {[type(m).__name__ for m in modules]}"
            )
        layers = []
        for i in range(0, len(modules), 2):
            linear, act = modules[i], modules[i + 1]
            if not isinstance(linear, nn.Linear):
                raise ValueError(f"FusedMLP: module {i} expected nn.Linear, got {type(linear).__name__}")
            name = activation_name_of(act)
            if name is None:
                raise ValueError(
                    f"FusedMLP: module {i + 1} expected one of ReLU, GELU, SiLU, Tanh, Identity, Softmax(dim=1), got {type(act).__name__}"
                )
            layers.append((linear, name))
        names = {name for _, name in layers}
        if len(names) != 1:
            raise ValueError(f"FusedMLP: expected the same activation after every Linear, got {sorted(names)}")
        has_bias = {linear.bias is not None for linear, _ in layers}
        if len(has_bias) != 1:
            raise ValueError("FusedMLP: expected every Linear with a bias or none with one, got a mix")
        return layers

    @classmethod
    def from_sequential(cls, sequential: nn.Sequential) -> FusedMLP:
        """A FusedMLP computing the same function as ``sequential`` (Linear, Act, Linear, Act, ...),
        carrying copies of its weights.

        >>> import torch, fastmtl
        >>> plain = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3), torch.nn.ReLU())
        >>> fused = fastmtl.nn.FusedMLP.from_sequential(plain)
        >>> x = torch.randn(5, 4)
        >>> torch.allclose(fused(x), plain(x), atol=1e-6)
        True
        """
        layers = cls._layers_of(sequential)
        first = layers[0][0]
        module = cls(
            first.in_features,
            [linear.out_features for linear, _ in layers],
            activation=layers[0][1],
            bias=first.bias is not None,
            device=first.weight.device,
            dtype=first.weight.dtype,
        )
        module.load_from_sequential(sequential)
        return module

    @torch.no_grad()
    def load_from_sequential(self, sequential: nn.Sequential) -> FusedMLP:
        """Copies the weights of an equivalent plain ``nn.Sequential`` (Linear, Act, ...) into this module."""
        layers = self._layers_of(sequential)
        if len(layers) != len(self.weights) or layers[0][1] != self.activation:
            raise ValueError(
                f"FusedMLP.load_from_sequential: expected {len(self.weights)} (Linear, {self.activation}) pairs, "
                f"got {len(layers)} with activation {layers[0][1]!r}"
            )
        for i, (linear, _) in enumerate(layers):
            if linear.weight.shape != self.weights[i].shape:
                raise ValueError(
                    f"FusedMLP.load_from_sequential: Linear {i} expected weight shape {list(self.weights[i].shape)}, "
                    f"got {list(linear.weight.shape)}"
                )
            if (linear.bias is None) != (self.biases is None):
                raise ValueError(
                    f"FusedMLP.load_from_sequential: Linear {i} has bias={linear.bias is not None}, "
                    f"this FusedMLP has bias={self.biases is not None}"
                )
            self.weights[i].copy_(linear.weight)
            if self.biases is not None:
                self.biases[i].copy_(linear.bias)
        return self
