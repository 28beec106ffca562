"""Training and evaluating one model with one MTL method: what the train and compare commands share.

Every run of a command starts from the same initial weights (``seed``) and sees the same batches in
the same order, so that methods differ only by how they combine the tasks. Loss weightings
(``fastmtl.weighting``) backpropagate ``method(losses)``; aggregators (``fastmtl.aggregation``) go
through ``model.mtl_backward``, which gives the Gram matrix of the per-task gradients for free.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import nn as fnn
from .. import ops
from ..data.dataset import MultiTaskDataset
from ..metrics import all_task_metrics
from ..weighting import DWA, FAMO, AutoLambda
from .names import is_aggregator, make_method

POSTFIX_EVERY = 10  # steps between progress-bar loss updates (formatting them costs more than a small step)


@dataclass
class TrainingConfig:
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    hidden: Sequence[int] = (256, 256)
    activation: str = "relu"
    mode: str = "exact"
    gram_every: int = 1
    seed: int = 0
    device: str = "cpu"
    # The trunk (see build_model) and, for data sets of categorical fields, the width of each
    # field's embedding.
    arch: str = "SharedBottom"
    embedding_dim: int = 8
    # Weightings compute no Gram matrix; the train command's heatmap needs one every this many steps
    # (outside the timed step). None: none.
    gram_stats_every: int | None = None


@dataclass
class RunResult:
    """One trained model: its test metrics, the median time of a training step, the per-step
    training losses ``[steps][T]`` and, where Gram matrices were seen, the mean gradient cosine
    similarity of every pair of tasks over training (``[T][T]``)."""

    label: str
    method: str
    task_names: list[str]
    metrics: dict[str, dict[str, float]]
    step_ms: float
    steps: int
    train_seconds: float
    step_losses: list[list[float]] = field(default_factory=list)
    mean_cosine: list[list[float]] | None = None
    gram_samples: int = 0


#: The trunks a run can use, by the name the command line gives them.
ARCHITECTURES = ("SharedBottom", "MMoE", "PLE")
# The smallest PLE, one shared and one task expert per level (for 3 tasks: 4 experts of one layer a
# level, 2 levels), and an MMoE of as many experts (4, of two layers): the same expert layers,
# so the two mixtures differ in how they gate, not in their size.
MMOE_EXPERTS = 4
PLE_SHARED_EXPERTS, PLE_TASK_EXPERTS = 1, 1


def build_trunk(num_features: int, num_tasks: int, config: TrainingConfig, field_cardinalities=None):
    """The shared trunk of ``config.arch`` on ``num_features`` inputs: ``SharedBottom`` a FusedMLP of
    widths ``config.hidden``; ``MMoE`` 4 experts of those widths with one gate per task; ``PLE`` one
    level per width (experts of one layer of the last width, one shared and one per task each).
    With ``field_cardinalities`` (categorical inputs) a FieldEmbedding front comes first."""
    front = None
    if field_cardinalities is not None:
        front = fnn.FieldEmbedding(list(field_cardinalities), config.embedding_dim)
        num_features = front.out_features
    hidden = list(config.hidden)
    if config.arch == "SharedBottom":
        body = fnn.FusedMLP(num_features, hidden, activation=config.activation)
    elif config.arch == "MMoE":
        body = fnn.MMoE(num_features, MMOE_EXPERTS, hidden, num_tasks, activation=config.activation)
    elif config.arch == "PLE":
        body = fnn.PLE(
            num_features,
            PLE_SHARED_EXPERTS,
            PLE_TASK_EXPERTS,
            [hidden[-1]],
            num_tasks,
            num_levels=len(hidden),
            activation=config.activation,
        )
    else:
        raise ValueError(f"argument --arch expected one of {', '.join(ARCHITECTURES)}, got {config.arch!r}")
    return body if front is None else fnn.EmbeddedTrunk(front, body)


def build_model(num_features: int, tasks, config: TrainingConfig, field_cardinalities=None) -> fnn.MultiTaskModel:
    """The trunk of :func:`build_trunk` and fused heads, initialised from ``config.seed`` (the same
    weights for every run with the same shapes)."""
    torch.manual_seed(config.seed)
    trunk = build_trunk(num_features, len(tasks), config, field_cardinalities)
    return fnn.MultiTaskModel(trunk, fnn.MultiTaskHeads(trunk.out_features, tasks)).to(config.device)


@torch.no_grad()
def evaluate(model: fnn.MultiTaskModel, data: MultiTaskDataset, batch_size: int = 4096) -> dict[str, dict[str, float]]:
    """Test metrics of every task of the model (see fastmtl.metrics) on ``data``."""
    device = next(model.parameters()).device
    chunks = [model(x.to(device)) for x, _ in data.batches(batch_size)]
    logits = {t.name: torch.cat([c[t.name] for c in chunks]).cpu() for t in model.tasks}
    return all_task_metrics(model.tasks, logits, data.targets, data.metrics)


def model_gram(model: fnn.MultiTaskModel, x, targets, mode: str) -> torch.Tensor:
    """The Gram matrix of the per-task gradients of the trunk (``fastmtl.ops.task_gram``; any other
    trunk than a FusedMLP: one autograd.grad per task over its parameters)."""
    trunk, heads = model.trunk, model.heads
    if not isinstance(trunk, fnn.FusedMLP) or not trunk.plain_layers:
        with torch.enable_grad():
            losses = model.losses(x, targets) * heads.task_weights
            shared = [p for p in trunk.parameters() if p.requires_grad]
            rows = [
                torch.cat(
                    [
                        g.reshape(-1)
                        for g in torch.autograd.grad(
                            loss, shared, retain_graph=True, allow_unused=True, materialize_grads=True
                        )
                    ]
                )
                for loss in losses
            ]
        jacobian = torch.stack(rows)
        return jacobian @ jacobian.T
    return ops.task_gram(x, *trunk.op_arguments, *heads.stacked_parameters(), targets, heads.layout, mode=mode)


def cosine_of(gram: torch.Tensor) -> torch.Tensor:
    """Gradient cosine similarities from a Gram matrix; 0 against a task with a zero gradient."""
    norms = gram.diagonal().clamp_min(0).sqrt()
    outer = torch.outer(norms, norms)
    return torch.where(outer > 0, gram / torch.where(outer > 0, outer, 1), 0.0)


class _Step:
    """One optimisation step of ``model`` with ``method``: returns the losses ``[T]`` and the Gram
    matrix the method saw (None for a weighting that needs none)."""

    def __init__(self, model, method_name: str, config: TrainingConfig, validation_batches=None):
        self.model, self.config = model, config
        self.method = make_method(
            method_name, len(model.tasks), config.seed, params=list(model.parameters()), lr=config.lr
        )
        # AutoLambda's validation batches: another shuffled pass over the training set, as the
        # official code's val_loader.
        self.validation_batches = validation_batches
        self.aggregates = is_aggregator(method_name)
        parameters = list(model.parameters())
        if not self.aggregates:
            self.method.to(config.device)
            parameters += list(self.method.parameters())  # UW's and IMTL-L's learnable weights
        self.optimizer = torch.optim.Adam(parameters, lr=config.lr)

    def __call__(self, x, targets):
        self.optimizer.zero_grad(set_to_none=True)
        if self.aggregates:
            result = self.model.mtl_backward(
                x, targets, self.method, mode=self.config.mode, gram_every=self.config.gram_every
            )
            self.optimizer.step()
            if result.losses.dim() == 2:
                # A cross-Gram method (MoDo, SDMGrad): the losses of the batch's two halves [2, T], and
                # a cross-Gram, not the Gram matrix the gradient-conflict statistics are read from.
                return result.losses.mean(0), None
            return result.losses, result.gram if result.gram_computed else None
        if isinstance(self.method, AutoLambda):  # the meta step first, at the parameters the step starts from
            x_val, targets_val = next(self.validation_batches)
            self.method.meta_step(lambda: self.model.losses(x, targets), lambda: self.model.losses(x_val, targets_val))
        losses = self.model.losses(x, targets)
        gram = model_gram(self.model, x, targets, self.config.mode) if self.method.requires_gram else None
        self.method(losses, gram).backward()
        self.optimizer.step()
        if isinstance(self.method, FAMO):  # FAMO learns from how this batch's losses moved
            with torch.no_grad():
                self.method.update(self.model.losses(x, targets))
        return losses.detach(), gram

    def end_epoch(self) -> None:
        if isinstance(self.method, DWA):
            self.method.end_epoch()


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _validation_batches(data: MultiTaskDataset, config: TrainingConfig):
    """Batches of ``data`` without end, reshuffled every pass from their own generator (``seed + 1``),
    on ``config.device``: AutoLambda's validation batches, drawn from the training set as the
    official code does (a second, independently shuffled loader over it)."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    while True:
        for x, targets in data.batches(config.batch_size, shuffle=True, generator=generator):
            yield x.to(config.device), {k: v.to(config.device) for k, v in targets.items()}


def train_run(
    label: str,
    method_name: str,
    train: MultiTaskDataset,
    test: MultiTaskDataset,
    config: TrainingConfig,
    progress=None,
    on_step: Callable | None = None,
) -> RunResult:
    """Trains a fresh model on ``train`` with ``method_name`` for ``config.epochs`` and evaluates it on
    ``test``. ``progress``: a tqdm bar advanced by one per step, its postfix showing the losses."""
    model = build_model(train.num_features, train.tasks, config, train.field_cardinalities)
    step = _Step(model, method_name, config, _validation_batches(train, config))
    generator = torch.Generator().manual_seed(config.seed)
    step_seconds, step_losses = [], []
    cosine_sum, gram_samples = None, 0
    names = train.task_names
    started = time.perf_counter()
    for _ in range(config.epochs):
        for x, targets in train.batches(config.batch_size, shuffle=True, generator=generator):
            x = x.to(config.device)
            targets = {k: v.to(config.device) for k, v in targets.items()}
            _synchronize(config.device)
            begin = time.perf_counter()
            losses, gram = step(x, targets)
            _synchronize(config.device)
            step_seconds.append(time.perf_counter() - begin)
            if gram is None and config.gram_stats_every and len(step_seconds) % config.gram_stats_every == 1:
                gram = model_gram(model, x, targets, config.mode)
            if gram is not None:
                cosine = cosine_of(gram.detach().double().cpu())
                cosine_sum = cosine if cosine_sum is None else cosine_sum + cosine
                gram_samples += 1
            step_losses.append(losses.cpu().tolist())
            if progress is not None:
                progress.update(1)
                if len(step_seconds) % POSTFIX_EVERY == 0:
                    progress.set_postfix_str(
                        label + " " + " ".join(f"{n}={v:.3g}" for n, v in zip(names, step_losses[-1])), refresh=False
                    )
        step.end_epoch()
    train_seconds = time.perf_counter() - started
    return RunResult(
        label=label,
        method=method_name,
        task_names=names,
        metrics=evaluate(model, test),
        step_ms=1000 * statistics.median(step_seconds) if step_seconds else float("nan"),
        steps=len(step_seconds),
        train_seconds=train_seconds,
        step_losses=step_losses,
        mean_cosine=None if cosine_sum is None else (cosine_sum / gram_samples).tolist(),
        gram_samples=gram_samples,
    )


def train_single_task_baselines(
    train: MultiTaskDataset, test: MultiTaskDataset, config: TrainingConfig, progress=None
) -> RunResult:
    """Independent learning: one model per task (a SharedBottom trunk of the same widths, its own
    head), each trained on its task alone. Returns the tasks' test metrics together; ``step_ms`` is
    the sum of the models' median step times (one step of every task), ``step_losses`` each step's
    losses side by side."""
    runs = []
    single_config = dataclasses.replace(config, arch="SharedBottom")  # one task: nothing to mix or gate
    for task in train.tasks:

        def alone(data, task=task):
            return MultiTaskDataset(
                data.features,
                {task.name: data.targets[task.name]},
                [task],
                {task.name: data.metrics[task.name]},
                data.field_cardinalities,
            )

        runs.append(train_run(f"single-task {task.name}", "EW", alone(train), alone(test), single_config, progress))
    return RunResult(
        label="single-task",
        method="single-task",
        task_names=train.task_names,
        metrics={run.task_names[0]: run.metrics[run.task_names[0]] for run in runs},
        step_ms=sum(run.step_ms for run in runs),
        steps=runs[0].steps,
        train_seconds=sum(run.train_seconds for run in runs),
        step_losses=[[run.step_losses[i][0] for run in runs] for i in range(runs[0].steps)],
    )


def steps_per_run(train: MultiTaskDataset, config: TrainingConfig) -> int:
    return config.epochs * -(-len(train) // config.batch_size)
