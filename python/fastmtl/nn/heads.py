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
    """One linear head per task, run as one ``[sum of num_outputs, in_features]`` weight so all
    logits come from one GEMM; ``losses`` runs all heads and all losses in one fused op.

    Initialised like one ``nn.Linear(in_features, task.num_outputs)`` per task.

    Parameters: by default the stacked ``weight`` and ``bias`` themselves (state-dict keys
    ``weight``, ``bias``). With ``per_task_parameters=True`` each task's head is its own
    ``nn.Linear`` in :attr:`task_heads` (keys ``task_heads.<t>.weight``/``.bias``, ``t`` the task's
    index), so an optimizer's parameter groups can give one task's head its own learning rate or
    weight decay (:meth:`task_parameters`), and one task's head can be frozen
    (``requires_grad_(False)``); the heads are stacked (one ``torch.cat`` of a few KB) each time
    they run, not called one by one (a forward hook on ``task_heads[t]`` does not fire), and
    gradients reach each task's parameters (written as ``.grad`` by the fused ``mtl_backward``,
    through autograd elsewhere). Either kind loads the other's checkpoints. :meth:`stacked_parameters` is the
    stacked weight and bias in both.

    >>> import torch, fastmtl
    >>> tasks = [fastmtl.Task("click", "binary"), fastmtl.Task("rating", "multiclass", num_outputs=5)]
    >>> heads = fastmtl.nn.MultiTaskHeads(16, tasks)
    >>> {k: v.shape for k, v in heads(torch.randn(4, 16)).items()}
    {'click': torch.Size([4, 1]), 'rating': torch.Size([4, 5])}

    A higher learning rate and no weight decay for one task's head:

    >>> heads = fastmtl.nn.MultiTaskHeads(16, tasks, per_task_parameters=True)
    >>> optimizer = torch.optim.AdamW(
    ...     [{"params": heads.task_parameters("click"), "lr": 1e-2, "weight_decay": 0.0},
    ...      {"params": heads.task_parameters("rating")}], lr=1e-3)
    >>> heads.stacked_parameters()[0].shape
    torch.Size([6, 16])
    """

    def __init__(
        self, in_features: int, tasks: Sequence[Task], device=None, dtype=None, per_task_parameters: bool = False
    ):
        super().__init__()
        check_int_at_least("MultiTaskHeads", "in_features", in_features, 1)
        self.layout = ops.task_layout(tasks, "MultiTaskHeads")
        self.tasks = self.layout.tasks
        self.in_features = in_features
        total = sum(self.layout.num_outputs)
        factory = {"device": device, "dtype": dtype}
        if not isinstance(per_task_parameters, bool):
            raise TypeError(
                f"MultiTaskHeads: argument 'per_task_parameters' expected a bool, got {type(per_task_parameters).__name__}"
            )
        self.per_task_parameters = per_task_parameters
        if per_task_parameters:
            self.task_heads = nn.ModuleList(nn.Linear(in_features, n, **factory) for n in self.layout.num_outputs)
        else:
            self.weight = nn.Parameter(torch.empty(total, in_features, **factory))
            self.bias = nn.Parameter(torch.empty(total, **factory))
        # Not persistent: derived from the tasks, which are constructor arguments.
        self.register_buffer("task_weights", self._derived_task_weights(), persistent=False)
        self._register_load_state_dict_pre_hook(self._load_other_kind_of_checkpoint)
        self.reset_parameters()

    def _apply(self, fn, recurse=True):
        # module.to(torch.bfloat16) would round the task weights; they are derived from the tasks,
        # so recompute them in the losses' dtype (float32 for a 16-bit model) on the new device.
        super()._apply(fn, recurse)
        self.task_weights = self._derived_task_weights()
        return self

    def _derived_task_weights(self) -> torch.Tensor:
        """Each task's ``weight`` in the losses' dtype, on the parameters' device."""
        first = next(self.parameters())
        return torch.tensor([t.weight for t in self.tasks], dtype=ops.loss_dtype(first.dtype), device=first.device)

    def _parameter_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # ---- the parameters: stacked, or one nn.Linear per task

    def stacked_parameters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight [sum of num_outputs, in_features], bias [sum of num_outputs])``, task t's rows
        after those of the tasks before it: the Parameters themselves by default, their
        concatenation (differentiable) with ``per_task_parameters``. What the fused ops take."""
        if not self.per_task_parameters:
            return self.weight, self.bias
        heads = list(self.task_heads)
        return torch.cat([h.weight for h in heads]), torch.cat([h.bias for h in heads])

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """Task ``task``'s head parameters ``[weight, bias]``, for an optimizer's parameter group;
        needs ``per_task_parameters=True`` (a stacked weight is one Parameter for every task)."""
        if task not in self.task_names:
            raise ValueError(
                f"MultiTaskHeads.task_parameters: argument 'task' expected one of {self.task_names}, got {task!r}"
            )
        if not self.per_task_parameters:
            raise ValueError(
                "MultiTaskHeads.task_parameters: the heads keep one stacked weight for all tasks; "
                "build them with per_task_parameters=True to give a task's head its own Parameters"
            )
        head = self.task_heads[self.task_names.index(task)]
        return [head.weight, head.bias]

    @torch.no_grad()
    def copy_stacked_(self, weight: torch.Tensor, bias: torch.Tensor | None, first_row: int = 0) -> MultiTaskHeads:
        """Copies ``weight`` ``[n, in_features]`` and ``bias`` ``[n]`` (None: zeros) into the stacked
        rows ``first_row .. first_row + n`` of the heads, whichever kind of parameters they have.
        A block may span several tasks but must start and end at task boundaries with
        ``per_task_parameters``."""
        n = weight.shape[0]
        total = sum(self.layout.num_outputs)
        if weight.dim() != 2 or weight.shape[1] != self.in_features or not 0 <= first_row <= total - n:
            raise ValueError(
                f"MultiTaskHeads.copy_stacked_: argument 'weight' expected shape [n, {self.in_features}] for rows "
                f"{first_row}.. within the {total} rows, got {list(weight.shape)}"
            )
        bias = weight.new_zeros(n) if bias is None else bias
        if tuple(bias.shape) != (n,):
            raise ValueError(
                f"MultiTaskHeads.copy_stacked_: argument 'bias' expected shape [{n}] (the weight's rows), "
                f"got {list(bias.shape)}"
            )
        if not self.per_task_parameters:
            self.weight[first_row : first_row + n].copy_(weight)
            self.bias[first_row : first_row + n].copy_(bias)
            return self
        starts = [0]
        for width in self.layout.num_outputs:
            starts.append(starts[-1] + width)
        if first_row not in starts or first_row + n not in starts:
            raise ValueError(
                f"MultiTaskHeads.copy_stacked_: rows {first_row}..{first_row + n} expected to start and end at "
                f"task boundaries {starts} (per-task parameters)"
            )
        for t in range(starts.index(first_row), starts.index(first_row + n)):
            rows = slice(starts[t] - first_row, starts[t + 1] - first_row)
            self.task_heads[t].weight.copy_(weight[rows])
            self.task_heads[t].bias.copy_(bias[rows])
        return self

    def to_linears(self) -> dict[str, nn.Linear]:
        """Each task's head as a plain ``nn.Linear`` (copies), dict name -> Linear, for serving or
        comparing without fastmtl."""
        weight, bias = (t.detach() for t in self.stacked_parameters())
        linears = {}
        for task, w, b in zip(self.tasks, weight.split(self.num_outputs), bias.split(self.num_outputs)):
            linear = nn.Linear(self.in_features, task.num_outputs, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                linear.weight.copy_(w)
                linear.bias.copy_(b)
            linears[task.name] = linear
        return linears

    def _load_other_kind_of_checkpoint(self, state_dict, prefix, *args) -> None:
        # A checkpoint of stacked heads into per-task ones, or the other way round: the keys of the
        # other kind are rewritten to this one's (the rows of task t are its own head's).
        stacked = [prefix + "weight", prefix + "bias"]
        per_task = [[f"{prefix}task_heads.{t}.{name}" for t in range(len(self.tasks))] for name in ("weight", "bias")]
        rows = sum(self.layout.num_outputs)
        if (
            self.per_task_parameters
            and all(k in state_dict for k in stacked)
            and all(state_dict[k].dim() >= 1 and state_dict[k].shape[0] == rows for k in stacked)
        ):  # (other row counts stay under their keys: load_state_dict reports them)
            for key, keys in zip(stacked, per_task):
                for k, block in zip(keys, state_dict.pop(key).split(self.layout.num_outputs)):
                    state_dict[k] = block.clone()  # its own storage, also for load_state_dict(assign=True)
        elif not self.per_task_parameters and all(k in state_dict for keys in per_task for k in keys):
            for key, keys in zip(stacked, per_task):
                state_dict[key] = torch.cat([state_dict.pop(k) for k in keys])

    @property
    def task_names(self):
        return [t.name for t in self.tasks]

    @property
    def loss_names(self):
        """Each task's loss name (``task.loss``), in task order, as the fused ops take them."""
        return self.layout.loss_names

    @property
    def num_outputs(self):
        """Each task's number of outputs, in task order: its rows of the stacked weight."""
        return self.layout.num_outputs

    @property
    def op_arguments(self) -> ops.HeadArguments:
        """The heads as the fused ops take them: ``(weight, bias, layout, task_weights)``, the
        stacked parameters (:meth:`stacked_parameters`) and the buffer."""
        return ops.HeadArguments(*self.stacked_parameters(), self.layout, self.task_weights)

    def parameter_parts(self) -> tuple[list[nn.Parameter], list[nn.Parameter]] | None:
        """With ``per_task_parameters``: ``(weights, biases)``, the Parameters the stacked weight and
        bias are concatenated from (rows in task order), where code that writes ``.grad`` itself
        (the fused engine) puts each task's rows of their gradients; None for stacked heads, whose
        stacked weight and bias are the Parameters."""
        if not self.per_task_parameters:
            return None
        return [h.weight for h in self.task_heads], [h.bias for h in self.task_heads]

    def reset_parameters(self) -> None:
        # Per-task nn.Linear init has the same distribution for every row: fan_in is in_features.
        if self.per_task_parameters:
            for head in self.task_heads:
                linear_init_(head.weight, head.bias)
        else:
            linear_init_(self.weight, self.bias)

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per task: dict name -> ``[..., num_outputs]``."""
        self._check_input(z, "forward")
        logits = F.linear(z, *self.stacked_parameters())
        return dict(zip(self.task_names, logits.split(self.layout.num_outputs, dim=-1)))

    def pack_targets(self, targets: Mapping, dtype=None) -> torch.Tensor:
        """The dict of per-task targets as the packed tensor :meth:`losses` (and the engine's fused
        path) take: ``[B, sum of target widths]`` in ``dtype`` (default: the losses' dtype)."""
        return ops.pack_targets(targets, self.layout, dtype or ops.loss_dtype(self._parameter_dtype()))

    def losses(self, z: torch.Tensor, targets: Mapping | torch.Tensor) -> torch.Tensor:
        """Per-task losses ``[T]`` in task order, from trunk features ``z`` ``[B, in_features]``.

        ``targets``: dict name -> tensor (see :class:`fastmtl.Task`) or an already packed tensor.
        """
        self._check_input(z, "losses")
        if isinstance(targets, Mapping):
            targets = self.pack_targets(targets, ops.loss_dtype(z.dtype))
        return ops.multitask_head_loss(z, *self.stacked_parameters(), targets, self.layout)

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
        kind = ", per_task_parameters=True" if self.per_task_parameters else ""
        return (
            f"in_features={self.in_features}, tasks={[f'{t.name}:{t.kind}[{t.num_outputs}]' for t in self.tasks]}{kind}"
        )

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
        heads; a head without bias gets a zero bias."""
        row = 0
        for linear in self._linears_in_task_order(linears):
            self.copy_stacked_(linear.weight, linear.bias, row)
            row += linear.out_features
        return self

    @classmethod
    def from_linears(cls, linears, tasks: Sequence[Task], per_task_parameters: bool = False) -> MultiTaskHeads:
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
        heads = cls(
            first.in_features,
            tasks,
            device=first.weight.device,
            dtype=first.weight.dtype,
            per_task_parameters=per_task_parameters,
        )
        return heads.load_from_linears(linears)
