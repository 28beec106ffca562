"""Cross-stitch networks (Misra et al. 2016): one network per task, their layer outputs mixed
between the tasks by learned T x T cross-stitch units."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._arch_checks import check_activation, check_count, check_float, check_input, check_widths
from ._init import linear_init_


class CrossStitch(nn.Module):
    """T task columns of ``len(hidden_features)`` layers each; after every layer a cross-stitch
    unit mixes the columns: ``h_t <- sum_s alpha_l[t, s] h_s``.

    Layer ``l`` of every column runs in one :func:`fastmtl.ops.fused_experts` call (the T columns as
    T one-layer "experts": one GEMM of ``T * out`` columns for the first layer, which reads the
    shared input, a batched GEMM after it, bias and activation fused); the cross-stitch mix is one
    plain ``[T, T] x [T, B * out]`` GEMM (no fused op mixes columns with a learned matrix).

    Args:
        in_features: input width (all columns read the same input).
        hidden_features: every column's layer widths (an int for one layer).
        num_tasks: number of columns T (one per task).
        activation: after every layer, as :class:`FusedMLP`.
        self_weight: initial ``alpha_l[t, t]``; the off-diagonal entries start at
            ``(1 - self_weight) / (T - 1)`` so every row sums to 1 (the paper's 0.9 / 0.1 for two tasks).

    Parameters: ``weights[l]`` ``[T, out_l, in_l]``, ``biases[l]`` ``[T, out_l]`` (each column
    initialised like its own ``nn.Linear``), ``stitch`` ``[L, T, T]``. ``task_features(x)`` gives
    ``[T, B, hidden_features[-1]]`` (what :class:`MultiTaskModel` routes to the heads).

    >>> import torch, fastmtl
    >>> trunk = fastmtl.nn.CrossStitch(10, [16, 8], num_tasks=2)
    >>> tasks = [fastmtl.Task("a", "regression"), fastmtl.Task("b", "binary")]
    >>> model = fastmtl.nn.MultiTaskModel(trunk, fastmtl.nn.MultiTaskHeads(8, tasks))
    >>> x, targets = torch.randn(5, 10), {"a": torch.randn(5), "b": torch.tensor([0., 1., 1., 0., float("nan")])}
    >>> model.loss(x, targets).backward()
    >>> trunk.task_features(x).shape, trunk.stitch.grad.shape
    (torch.Size([2, 5, 8]), torch.Size([2, 2, 2]))
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | Sequence[int],
        num_tasks: int,
        activation: str = "relu",
        self_weight: float = 0.9,
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_count("CrossStitch", "in_features", in_features, 1)
        widths = check_widths("CrossStitch", "hidden_features", hidden_features)
        check_count("CrossStitch", "num_tasks", num_tasks, 1)
        self.activation = check_activation("CrossStitch", activation)
        self.self_weight = check_float("CrossStitch", "self_weight", self_weight, 0.0, 1.0)
        self.in_features, self.hidden_features, self.num_tasks = in_features, tuple(widths), num_tasks
        factory = {"device": device, "dtype": dtype}
        fan_ins = [in_features] + widths[:-1]
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.empty(num_tasks, n, k, **factory)) for n, k in zip(widths, fan_ins)]
        )
        self.biases = nn.ParameterList([nn.Parameter(torch.empty(num_tasks, n, **factory)) for n in widths])
        self.stitch = nn.Parameter(torch.empty(len(widths), num_tasks, num_tasks, **factory))
        self.reset_parameters()

    @property
    def out_features(self) -> int:
        return self.hidden_features[-1]

    def reset_parameters(self) -> None:
        for w, b in zip(self.weights, self.biases):
            for t in range(self.num_tasks):
                linear_init_(w[t], b[t])
        T = self.num_tasks
        with torch.no_grad():
            off = (1.0 - self.self_weight) / (T - 1) if T > 1 else 0.0
            self.stitch.fill_(off)
            self.stitch.diagonal(dim1=1, dim2=2).fill_(self.self_weight if T > 1 else 1.0)

    def task_features(self, x: torch.Tensor) -> torch.Tensor:
        """The task columns' outputs after the last cross-stitch unit: ``[T, B, out_features]``."""
        check_input("CrossStitch", x, self.in_features)
        T = self.num_tasks
        h = x
        for layer, (w, b) in enumerate(zip(self.weights._parameters.values(), self.biases._parameters.values())):
            # h: [B, d] for the first layer (shared input), [T, B, d] after.
            h = torch.ops.fastmtl.fused_experts.default(h, [w], [b], self.activation)[0]
            h = torch.mm(self.stitch[layer], h.reshape(T, -1)).view(h.shape)
        return h

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.task_features(x).unbind(0))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, hidden_features={list(self.hidden_features)}, "
            f"num_tasks={self.num_tasks}, activation={self.activation!r}"
        )
