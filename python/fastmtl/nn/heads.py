"""MultiTaskHeads: every task's linear head as one stacked weight, and their losses in one call."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._validation import check_int_at_least
from ..tasks import Task, check_tasks
from ._init import linear_init_


class MultiTaskHeads(nn.Module):
    """One linear head per task, stored as one ``[sum of num_outputs, in_features]`` weight so all
    logits come from one GEMM; ``losses`` runs all heads and all losses in one fused op.

    Initialised like one ``nn.Linear(in_features, task.num_outputs)`` per task.

    >>> import torch, fastmtl
    >>> tasks = [fastmtl.Task("click", "binary"), fastmtl.Task("rating", "multiclass", num_outputs=5)]
    >>> heads = fastmtl.nn.MultiTaskHeads(16, tasks)
    >>> {k: v.shape for k, v in heads(torch.randn(4, 16)).items()}
    {'click': torch.Size([4, 1]), 'rating': torch.Size([4, 5])}
    """

    def __init__(self, in_features: int, tasks: Sequence[Task], device=None, dtype=None):
        super().__init__()
        check_int_at_least("MultiTaskHeads", "in_features", in_features, 1)
        self.layout = ops.task_layout(tasks, "MultiTaskHeads")
        self.tasks = self.layout.tasks
        self.in_features = in_features
        total = sum(self.layout.num_outputs)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(total, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(total, **factory))
        # Not persistent: derived from the tasks, which are constructor arguments.
        self.register_buffer(
            "task_weights",
            torch.tensor([t.weight for t in self.tasks], dtype=ops.loss_dtype(self.weight.dtype), device=device),
            persistent=False,
        )
        self.reset_parameters()

    def _apply(self, fn, recurse=True):
        # module.to(torch.bfloat16) would round the task weights; they are derived from the tasks,
        # so recompute them in the losses' dtype (float32 for a 16-bit model) on the new device.
        super()._apply(fn, recurse)
        self.task_weights = torch.tensor(
            [t.weight for t in self.tasks], dtype=ops.loss_dtype(self.weight.dtype), device=self.weight.device
        )
        return self

    @property
    def task_names(self):
        return [t.name for t in self.tasks]

    @property
    def loss_names(self):
        """Each task's loss name (``task.loss``), in task order, as the fused ops take them."""
        return self.layout.loss_names

    @property
    def num_outputs(self):
        """Each task's number of outputs, in task order: its rows of :attr:`weight`."""
        return self.layout.num_outputs

    @property
    def op_arguments(self) -> ops.HeadArguments:
        """The heads as the fused ops take them: ``(weight, bias, layout, task_weights)``, the
        parameters and buffer themselves. What the engine's fused path reads."""
        return ops.HeadArguments(self.weight, self.bias, self.layout, self.task_weights)

    def reset_parameters(self) -> None:
        # Per-task nn.Linear init has the same distribution for every row: fan_in is in_features.
        linear_init_(self.weight, self.bias)

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per task: dict name -> ``[..., num_outputs]``."""
        self._check_input(z, "forward")
        logits = F.linear(z, self.weight, self.bias)
        return dict(zip(self.task_names, logits.split(self.layout.num_outputs, dim=-1)))

    def pack_targets(self, targets: Mapping, dtype=None) -> torch.Tensor:
        """The dict of per-task targets as the packed tensor :meth:`losses` (and the engine's fused
        path) take: ``[B, sum of target widths]`` in ``dtype`` (default: the losses' dtype)."""
        return ops.pack_targets(targets, self.layout, dtype or ops.loss_dtype(self.weight.dtype))

    def losses(self, z: torch.Tensor, targets: Mapping | torch.Tensor) -> torch.Tensor:
        """Per-task losses ``[T]`` in task order, from trunk features ``z`` ``[B, in_features]``.

        ``targets``: dict name -> tensor (see :class:`fastmtl.Task`) or an already packed tensor.
        """
        self._check_input(z, "losses")
        if isinstance(targets, Mapping):
            targets = self.pack_targets(targets, ops.loss_dtype(z.dtype))
        return ops.multitask_head_loss(z, self.weight, self.bias, targets, self.layout)

    def _check_input(self, z, method: str) -> None:
        # Named here, not by F.linear's "mat1 and mat2 shapes" or the fused op's 'weight'.
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"MultiTaskHeads.{method}: argument 'z' expected a tensor, got {type(z).__name__}")
        if z.dim() == 0 or z.shape[-1] != self.in_features:
            raise ValueError(
                f"MultiTaskHeads.{method}: argument 'z' expected shape [..., {self.in_features}] (in_features), "
                f"got {list(z.shape)}"
            )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, tasks={[f'{t.name}:{t.kind}[{t.num_outputs}]' for t in self.tasks]}"

    # ---- switching from plain PyTorch

    def _linears_in_task_order(self, linears) -> list:
        if isinstance(linears, (Mapping, nn.ModuleDict)):  # ModuleDict is no Mapping
            missing = [n for n in self.task_names if n not in linears]
            if missing:
                raise ValueError(f"MultiTaskHeads: argument 'linears' has no head for tasks {missing}")
            linears = [linears[n] for n in self.task_names]
        linears = list(linears)
        if len(linears) != len(self.tasks):
            raise ValueError(f"MultiTaskHeads: argument 'linears' expected {len(self.tasks)} heads, got {len(linears)}")
        for task, linear in zip(self.tasks, linears):
            if not isinstance(linear, nn.Linear):
                raise TypeError(
                    f"MultiTaskHeads: head of task {task.name!r} expected nn.Linear, got {type(linear).__name__}"
                )
            if tuple(linear.weight.shape) != (task.num_outputs, self.in_features):
                raise ValueError(
                    f"MultiTaskHeads: head of task {task.name!r} expected weight shape "
                    f"[{task.num_outputs}, {self.in_features}], got {list(linear.weight.shape)}"
                )
        return linears

    @torch.no_grad()
    def load_from_linears(self, linears) -> MultiTaskHeads:
        """Copies per-task ``nn.Linear`` heads (dict name -> Linear, or a list in task order) into the
        stacked weight; a head without bias gets a zero bias."""
        row = 0
        for linear in self._linears_in_task_order(linears):
            n = linear.out_features
            self.weight[row : row + n].copy_(linear.weight)
            if linear.bias is not None:
                self.bias[row : row + n].copy_(linear.bias)
            else:
                self.bias[row : row + n].zero_()
            row += n
        return self

    @classmethod
    def from_linears(cls, linears, tasks: Sequence[Task]) -> MultiTaskHeads:
        """Fused heads carrying the weights of existing per-task ``nn.Linear`` heads.

        >>> import torch, fastmtl
        >>> tasks = [fastmtl.Task("a", "regression"), fastmtl.Task("b", "multiclass", num_outputs=3)]
        >>> plain = {"a": torch.nn.Linear(8, 1), "b": torch.nn.Linear(8, 3)}
        >>> heads = fastmtl.nn.MultiTaskHeads.from_linears(plain, tasks)
        >>> z = torch.randn(2, 8)
        >>> torch.allclose(heads(z)["b"], plain["b"](z))
        True
        """
        tasks = check_tasks(tasks, "MultiTaskHeads.from_linears")
        first = next(iter(linears.values())) if isinstance(linears, (Mapping, nn.ModuleDict)) else list(linears)[0]
        heads = cls(first.in_features, tasks, device=first.weight.device, dtype=first.weight.dtype)
        return heads.load_from_linears(linears)
