"""Task descriptions: what each head predicts and which loss it is trained with."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ._validation import check_int_at_least

KINDS = ("regression", "binary", "multiclass")
# The losses each kind may use; the first is the default.
LOSSES_BY_KIND = {
    "regression": ("mse", "l1", "huber"),
    "binary": ("bce",),
    "multiclass": ("ce",),
}


@dataclass(frozen=True)
class Task:
    """One task of a multi-task model.

    Args:
        name: key of the task in target and output dicts.
        kind: ``"regression"``, ``"binary"`` or ``"multiclass"``.
        num_outputs: regression: number of outputs (default 1); binary: 1; multiclass: the number
            of classes (required).
        loss: regression: ``"mse"`` (default), ``"l1"`` or ``"huber"`` (smooth L1, beta 1);
            binary: ``"bce"`` (with logits); multiclass: ``"ce"`` (softmax cross-entropy).
        weight: the task's weight in ``MultiTaskModel.loss`` (sum of ``weight * L_t``).

    Targets (see ``MultiTaskModel.losses``): regression float ``[B]`` or ``[B, n]``, binary float or
    bool ``[B]``, multiclass integer class indices ``[B]``; missing labels are NaN, or -100 for
    multiclass. ``L_t`` is the mean over the task's labelled entries, 0 if it has none.

    >>> Task("click", "binary").loss
    'bce'
    >>> Task("rating", "multiclass", num_outputs=5).num_outputs
    5
    """

    name: str
    kind: str
    num_outputs: int | None = None
    loss: str | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Task: argument 'name' expected a non-empty string, got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(
                f"Task {self.name!r}: argument 'kind' expected one of {', '.join(KINDS)}, got {self.kind!r}"
            )
        allowed = LOSSES_BY_KIND[self.kind]
        loss = allowed[0] if self.loss is None else self.loss
        if loss not in allowed:
            raise ValueError(
                f"Task {self.name!r}: argument 'loss' expected one of {', '.join(allowed)} for a {self.kind} task, got {loss!r}"
            )
        n = self.num_outputs
        if self.kind == "multiclass":
            check_int_at_least(f"Task {self.name!r}", "num_outputs", n, 2, "the number of classes of a multiclass task")
        elif self.kind == "binary":
            if n is None:
                n = 1
            if n != 1 or isinstance(n, bool):
                raise ValueError(f"Task {self.name!r}: argument 'num_outputs' expected 1 for a binary task, got {n!r}")
        else:
            if n is None:
                n = 1
            check_int_at_least(f"Task {self.name!r}", "num_outputs", n, 1)
        try:
            weight = float(self.weight)
        except (TypeError, ValueError):
            raise TypeError(f"Task {self.name!r}: argument 'weight' expected a number, got {self.weight!r}") from None
        if not math.isfinite(weight):
            # A NaN or infinite weight poisons every gradient of the trunk, silently.
            raise ValueError(f"Task {self.name!r}: argument 'weight' expected a finite number, got {self.weight!r}")
        object.__setattr__(self, "loss", loss)
        object.__setattr__(self, "num_outputs", n)
        object.__setattr__(self, "weight", weight)

    @property
    def target_width(self) -> int:
        """Columns of this task in the packed target tensor: n for regression, else 1."""
        return self.num_outputs if self.kind == "regression" else 1


def check_tasks(tasks: Sequence[Task], where: str) -> tuple:
    """Validates a task list (non-empty, Task objects, unique names) and returns it as a tuple."""
    if isinstance(tasks, Task):
        tasks = (tasks,)
    elif isinstance(tasks, Sequence) and not isinstance(tasks, str):
        tasks = tuple(tasks)
    else:
        raise TypeError(f"{where}: argument 'tasks' expected a sequence of fastmtl.Task, got {type(tasks).__name__}")
    if len(tasks) == 0:
        raise ValueError(f"{where}: argument 'tasks' expected at least one Task, got 0")
    for i, task in enumerate(tasks):
        if not isinstance(task, Task):
            raise TypeError(f"{where}: argument 'tasks[{i}]' expected a fastmtl.Task, got {type(task).__name__}")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"{where}: argument 'tasks' expected unique names, got duplicates {dup}")
    return tasks
