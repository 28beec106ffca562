"""MultiTaskDataset: features and per-task targets held as tensors, and hiding a share of the labels."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping, Sequence

import torch

from ..tasks import Task, check_tasks

IGNORE_INDEX = -100  # missing multiclass label (ARCHITECTURE.md), as F.cross_entropy's default


def missing_value(task: Task) -> float:
    """How a missing label of ``task`` is written: -100 for multiclass, NaN otherwise."""
    return IGNORE_INDEX if task.kind == "multiclass" else math.nan


def labelled_mask(task: Task, target: torch.Tensor) -> torch.Tensor:
    """True where ``target`` holds a label (same shape as ``target``)."""
    return target != IGNORE_INDEX if task.kind == "multiclass" else ~torch.isnan(target)


class MultiTaskDataset(torch.utils.data.Dataset):
    """A multi-task data set in memory: ``features [N, F]`` and one target tensor per task.

    ``dataset[i]`` is ``(features[i], {name: target[i]})``, so a ``torch.utils.data.DataLoader``
    with the default collate yields ``(x [B, F], {name: [B]})`` batches that ``model.losses`` takes.
    Targets follow ARCHITECTURE.md: regression float ``[N]`` or ``[N, n]``, binary float ``[N]``
    (0/1), multiclass int64 class indices ``[N]``; missing labels NaN, or -100 for multiclass.
    :meth:`batches` slices the tensors directly, which is much faster than a DataLoader's per-sample
    collation for a set that fits in memory.

    >>> import torch, fastmtl
    >>> tasks = [fastmtl.Task("y", "regression"), fastmtl.Task("c", "multiclass", num_outputs=3)]
    >>> data = MultiTaskDataset(torch.rand(10, 4), {"y": torch.rand(10), "c": torch.arange(10) % 3}, tasks)
    >>> x, targets = data[0]
    >>> x.shape, sorted(targets)
    (torch.Size([4]), ['c', 'y'])
    >>> data.with_missing_labels(0.5).labelled_counts()
    {'y': 5, 'c': 5}
    """

    def __init__(
        self,
        features: torch.Tensor,
        targets: Mapping,
        tasks: Sequence[Task],
        metrics: Mapping = None,
        field_cardinalities: Sequence[int] = None,
    ):
        self.tasks = check_tasks(tasks, "MultiTaskDataset")
        if not isinstance(features, torch.Tensor) or features.dim() != 2 or not features.is_floating_point():
            got = (
                f"{features.dtype} of shape {list(features.shape)}"
                if isinstance(features, torch.Tensor)
                else type(features).__name__
            )
            raise ValueError(f"MultiTaskDataset: argument 'features' expected a floating tensor [N, F], got {got}")
        if not isinstance(targets, Mapping):
            raise TypeError(
                f"MultiTaskDataset: argument 'targets' expected a dict name -> tensor, got {type(targets).__name__}"
            )
        names = [t.name for t in self.tasks]
        if sorted(targets) != sorted(names):
            raise ValueError(
                f"MultiTaskDataset: argument 'targets' expected the keys {names} (one per task), got {list(targets)}"
            )
        n = features.shape[0]
        self.features = features
        self.targets: dict[str, torch.Tensor] = {}
        for task in self.tasks:
            target = targets[task.name]
            expected = (n, task.num_outputs) if task.kind == "regression" and task.num_outputs > 1 else (n,)
            if not isinstance(target, torch.Tensor) or tuple(target.shape) != expected:
                got = list(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
                raise ValueError(
                    f"MultiTaskDataset: argument 'targets[{task.name!r}]' expected shape {list(expected)} "
                    f"(one row per sample of 'features'), got {got}"
                )
            if task.kind == "multiclass" and (target.is_floating_point() or target.dtype == torch.bool):
                raise ValueError(
                    f"MultiTaskDataset: argument 'targets[{task.name!r}]' expected integer class indices "
                    f"for a multiclass task, got {target.dtype}"
                )
            if task.kind != "multiclass" and not target.is_floating_point():
                raise ValueError(
                    f"MultiTaskDataset: argument 'targets[{task.name!r}]' expected a floating tensor "
                    f"for a {task.kind} task (NaN = missing), got {target.dtype}"
                )
            self.targets[task.name] = target
        self.metrics = self._check_metrics(metrics)
        self.field_cardinalities = self._check_fields(field_cardinalities)

    def _check_metrics(self, metrics) -> dict[str, tuple]:
        """How each task is scored (``fastmtl.metrics``): dict name -> metric names, default by kind."""
        from ..metrics import check_metric_names  # fastmtl.metrics imports this module

        metrics = {} if metrics is None else dict(metrics)
        unknown = sorted(set(metrics) - set(self.task_names))
        if unknown:
            raise ValueError(
                f"MultiTaskDataset: argument 'metrics' names unknown tasks {unknown}; tasks are {self.task_names}"
            )
        return {t.name: check_metric_names(t, metrics.get(t.name)) for t in self.tasks}

    def _check_fields(self, cardinalities):
        """Categorical features: ``features[:, f]`` holds a category index in ``[0, cardinalities[f])``
        (stored as a float, exact below 2**24), for a front such as ``fastmtl.nn.FieldEmbedding``."""
        if cardinalities is None:
            return None
        cardinalities = [int(c) for c in cardinalities]
        if len(cardinalities) != self.num_features or min(cardinalities, default=0) < 1:
            raise ValueError(
                f"MultiTaskDataset: argument 'field_cardinalities' expected {self.num_features} ints >= 1 "
                f"(one per feature column), got {cardinalities}"
            )
        index = self.features
        bad = (index != index.round()) | (index < 0) | (index >= torch.tensor(cardinalities, dtype=index.dtype))
        if bool(bad.any()):
            column = int(bad.any(0).nonzero()[0])
            raise ValueError(
                f"MultiTaskDataset: feature column {column} expected category indices in "
                f"[0, {cardinalities[column]}) (argument 'field_cardinalities'), got other values"
            )
        return cardinalities

    def _with(self, features: torch.Tensor, targets: Mapping) -> MultiTaskDataset:
        """A data set of the same tasks, metrics and fields over other rows or labels."""
        return MultiTaskDataset(features, targets, self.tasks, self.metrics, self.field_cardinalities)

    @property
    def task_names(self):
        return [t.name for t in self.tasks]

    @property
    def num_features(self) -> int:
        return self.features.shape[1]

    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, index) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.features[index], {name: target[index] for name, target in self.targets.items()}

    def batches(
        self, batch_size: int, shuffle: bool = False, generator: torch.Generator = None
    ) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """``(x, targets)`` batches of ``batch_size`` rows (the last one may be smaller), in a random
        order drawn from ``generator`` when ``shuffle``."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(
                f"MultiTaskDataset.batches: argument 'batch_size' expected an int >= 1, got {batch_size!r}"
            )
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else None
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size] if shuffle else slice(start, start + batch_size)
            yield self[index]

    def subset(self, indices) -> MultiTaskDataset:
        """The rows ``indices`` (a tensor of indices or a slice) as a new data set."""
        x, targets = self[indices]
        return self._with(x, targets)

    def labelled_counts(self) -> dict[str, int]:
        """Labelled entries per task."""
        return {t.name: int(labelled_mask(t, self.targets[t.name]).sum()) for t in self.tasks}

    def with_missing_labels(self, fraction: float | Mapping, seed: int = 0) -> MultiTaskDataset:
        """A copy in which ``fraction`` of each task's labels are hidden (NaN, or -100 for multiclass).

        ``fraction``: one share for every task, or a dict name -> share (tasks left out keep all
        their labels). Each column of a task (a multi-output regression task has several) loses
        ``round(fraction * N)`` of its entries, drawn with ``seed``; the features and this data set
        are not modified.
        """
        shares = dict(fraction) if isinstance(fraction, Mapping) else {t.name: fraction for t in self.tasks}
        unknown = sorted(set(shares) - set(self.task_names))
        if unknown:
            raise ValueError(
                f"MultiTaskDataset.with_missing_labels: argument 'fraction' names unknown tasks {unknown}; "
                f"tasks are {self.task_names}"
            )
        generator = torch.Generator().manual_seed(int(seed))
        n = len(self)
        targets = {}
        for task in self.tasks:
            share = shares.get(task.name, 0.0)
            if isinstance(share, bool) or not isinstance(share, numbers.Real) or not 0.0 <= share <= 1.0:
                raise ValueError(
                    f"MultiTaskDataset.with_missing_labels: argument 'fraction' expected a number in "
                    f"[0, 1] for task {task.name!r}, got {share!r}"
                )
            target = self.targets[task.name].clone()
            columns = target.unsqueeze(1) if target.dim() == 1 else target  # a view: writes reach `target`
            hidden = int(round(share * n))
            for column in range(columns.shape[1]):
                rows = torch.randperm(n, generator=generator)[:hidden]
                columns[rows, column] = missing_value(task)
            targets[task.name] = target
        return self._with(self.features, targets)

    def with_task_subsets(self, labels_per_task: int, seed: int = 0) -> MultiTaskDataset:
        """The label-scarce setting: each task labelled on its own ``labels_per_task`` rows, disjoint
        from every other task's (drawn with ``seed``), its other labels hidden; rows left labelled
        for no task are dropped (no loss would see them). The result has ``T * labels_per_task`` rows,
        each labelled for one task: a single-task model learns from its task's rows only, a shared
        trunk from all of them. Rows missing the task's label in this data set stay missing."""
        where = "MultiTaskDataset.with_task_subsets"
        count = len(self.tasks)
        if isinstance(labels_per_task, bool) or not isinstance(labels_per_task, int) or labels_per_task < 1:
            raise ValueError(f"{where}: argument 'labels_per_task' expected an int >= 1, got {labels_per_task!r}")
        if count * labels_per_task > len(self):
            raise ValueError(
                f"{where}: argument 'labels_per_task' expected at most {len(self) // count} "
                f"({len(self)} rows over {count} tasks, disjoint), got {labels_per_task}"
            )
        generator = torch.Generator().manual_seed(int(seed))
        rows = torch.randperm(len(self), generator=generator)[: count * labels_per_task]
        x, targets = self[rows]
        owner = torch.arange(count).repeat_interleave(labels_per_task)  # row i is labelled for task owner[i]
        scarce = {}
        for t, task in enumerate(self.tasks):
            target = targets[task.name].clone()
            target[owner != t] = missing_value(task)
            scarce[task.name] = target
        return self._with(x, scarce)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(samples={len(self)}, features={self.num_features}, tasks={self.task_names})"
