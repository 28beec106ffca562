"""MTAN, the Multi-Task Attention Network (Liu, Johns & Davison 2019), for a fully connected
shared trunk: every task reads the shared layers through its own soft attention masks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._arch_checks import check_activation, check_count, check_input, check_widths
from ._init import linear_init_
from .fused_mlp import FusedMLP


class MTAN(nn.Module):
    """A shared trunk (a :class:`FusedMLP`: the paper's global feature pool) and, per task and per
    trunk layer, an attention module that masks that layer's output.

    With ``h_j`` the output of shared layer ``j`` and ``a_{t,j}`` task t's attended features:

    * ``m_{t,1} = g_{t,1}(h_1)``, and for ``j > 1`` ``m_{t,j} = g_{t,j}([h_j, f_{j-1}(a_{t,j-1})])``;
    * ``g_{t,j}(u) = sigmoid(W2 relu(W1 u + b1) + b2)``, both layers ``h_j``-wide: a mask in (0, 1);
    * ``a_{t,j} = m_{t,j} * h_j`` (elementwise);
    * ``f_j = act(W a + b)``, ``[width_j -> width_{j+1}]``, one layer shared by all tasks: the
      paper's shared 3x3 convolution that brings the attended features to the next block's size.

    Task t's representation is ``a_{t,L}``. The paper's blocks are convolution stages, here each
    trunk layer is one block (``u = p = h_j`` in its notation).

    Where fused ops run: the trunk's layers through :func:`fastmtl.ops.fused_mlp`, one call per layer
    (the masks need every layer's output); every layer's first attention layer for all tasks in one
    :func:`fastmtl.ops.fused_experts` call (tasks as experts); ``f_j`` for all tasks in one
    ``fused_mlp`` call over ``[T * B, width_j]``. The sigmoid layer of the masks and the products
    are plain PyTorch (a batched GEMM and elementwise ops: no fused op ends in a sigmoid).

    Parameters: ``shared`` (the FusedMLP trunk), ``bridges`` (a FusedMLP per ``f_j``, ``L - 1`` of them),
    ``attention_weights1[j]`` ``[T, width_j, in_j]`` (``in_j`` = ``width_j``, doubled for
    ``j > 1``), ``attention_biases1[j]``, ``attention_weights2[j]`` ``[T, width_j, width_j]``,
    ``attention_biases2[j]``. ``task_features(x)``: ``[T, B, hidden_features[-1]]``.

    >>> import torch, fastmtl
    >>> trunk = fastmtl.nn.MTAN(12, [16, 8], num_tasks=3)
    >>> tasks = [fastmtl.Task(f"t{i}", "regression") for i in range(3)]
    >>> model = fastmtl.nn.MultiTaskModel(trunk, fastmtl.nn.MultiTaskHeads(8, tasks))
    >>> x = torch.randn(4, 12)
    >>> result = model.mtl_backward(x, {t.name: torch.randn(4) for t in tasks}, fastmtl.aggregation.UPGrad())
    >>> trunk.task_features(x).shape, result.gram.shape
    (torch.Size([3, 4, 8]), torch.Size([3, 3]))
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | Sequence[int],
        num_tasks: int,
        activation: str = "relu",
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_count("MTAN", "in_features", in_features, 1)
        widths = check_widths("MTAN", "hidden_features", hidden_features)
        check_count("MTAN", "num_tasks", num_tasks, 1)
        self.activation = check_activation("MTAN", activation)
        self.in_features, self.hidden_features, self.num_tasks = in_features, tuple(widths), num_tasks
        factory = {"device": device, "dtype": dtype}
        T = num_tasks
        self.shared = FusedMLP(in_features, widths, activation, **factory)
        self.bridges = nn.ModuleList([FusedMLP(a, b, activation, **factory) for a, b in zip(widths[:-1], widths[1:])])
        fan_ins = [widths[0]] + [2 * w for w in widths[1:]]
        self.attention_weights1 = nn.ParameterList(
            [nn.Parameter(torch.empty(T, w, k, **factory)) for w, k in zip(widths, fan_ins)]
        )
        self.attention_biases1 = nn.ParameterList([nn.Parameter(torch.empty(T, w, **factory)) for w in widths])
        self.attention_weights2 = nn.ParameterList([nn.Parameter(torch.empty(T, w, w, **factory)) for w in widths])
        self.attention_biases2 = nn.ParameterList([nn.Parameter(torch.empty(T, w, **factory)) for w in widths])
        self.reset_parameters()

    @property
    def out_features(self) -> int:
        return self.hidden_features[-1]

    def reset_parameters(self) -> None:
        self.shared.reset_parameters()
        for bridge in self.bridges:
            bridge.reset_parameters()
        for params in zip(
            self.attention_weights1, self.attention_biases1, self.attention_weights2, self.attention_biases2
        ):
            w1, b1, w2, b2 = params
            for t in range(self.num_tasks):
                linear_init_(w1[t], b1[t])
                linear_init_(w2[t], b2[t])

    def task_features(self, x: torch.Tensor) -> torch.Tensor:
        """Every task's attended output of the last trunk layer: ``[T, B, out_features]``."""
        check_input("MTAN", x, self.in_features)
        T, B = self.num_tasks, x.shape[0]
        shared_weights = list(self.shared.weights._parameters.values())
        shared_biases = list(self.shared.biases._parameters.values())
        w1s, b1s = list(self.attention_weights1._parameters.values()), list(self.attention_biases1._parameters.values())
        w2s, b2s = list(self.attention_weights2._parameters.values()), list(self.attention_biases2._parameters.values())
        h, attended = x, None
        for j in range(len(shared_weights)):
            h = torch.ops.fastmtl.fused_mlp.default(h, [shared_weights[j]], [shared_biases[j]], self.activation)[0]
            if attended is None:
                mask_input = h  # [B, w]: the same input for every task's attention module
            else:
                carried = self.bridges[j - 1](attended.reshape(T * B, -1)).view(T, B, -1)
                mask_input = torch.cat([h.expand(T, B, h.shape[1]), carried], dim=2)
            hidden = torch.ops.fastmtl.fused_experts.default(mask_input, [w1s[j]], [b1s[j]], "relu")[0]
            mask = torch.sigmoid(torch.baddbmm(b2s[j].unsqueeze(1), hidden, w2s[j].transpose(1, 2)))
            attended = mask * h
        return attended

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.task_features(x).unbind(0))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, hidden_features={list(self.hidden_features)}, "
            f"num_tasks={self.num_tasks}, activation={self.activation!r}"
        )
