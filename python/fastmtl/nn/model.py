"""MultiTaskModel: a shared trunk and the fused task heads."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..aggregation import requirement
from ..engine import fused_model_backward, mtl_backward
from ..engine.gradients import check_finite_losses
from ..tasks import check_tasks
from .fused_mlp import FusedMLP
from .heads import MultiTaskHeads
from .routing import routed_logits, routed_losses


@dataclass
class MultiTaskOutput:
    """What ``model(x, targets)`` returns (the Hugging Face convention): ``logits`` dict name ->
    ``[B, num_outputs]``, ``losses`` the per-task losses ``[T]`` (unweighted, as
    :meth:`MultiTaskModel.losses`), ``loss`` the scalar ``sum_t task.weight * L_t`` to call
    ``backward`` on. Going through ``forward`` is what lets DDP/FSDP hooks see the step."""

    logits: dict[str, torch.Tensor]
    losses: torch.Tensor
    loss: torch.Tensor


class MultiTaskModel(nn.Module):
    """Hard parameter sharing: ``trunk`` (shared parameters) feeds ``heads`` (one per task).

    The trunk can be any module mapping ``x`` to ``[B, heads.in_features]`` features; with a
    :class:`FusedMLP` trunk the whole training step runs in two fused ops. A trunk with one
    representation per task (:class:`MMoE`, :class:`PLE`, :class:`SoftSharedLinear`: a
    ``task_features(x)`` method giving ``[T, B, d]``, or any trunk returning a list of ``T``
    tensors ``[B, d]``) has task t's head read representation t.

    >>> import torch, fastmtl
    >>> tasks = [fastmtl.Task("y", "regression"), fastmtl.Task("c", "multiclass", num_outputs=3)]
    >>> model = fastmtl.nn.MultiTaskModel(fastmtl.nn.FusedMLP(10, [32, 32]), fastmtl.nn.MultiTaskHeads(32, tasks))
    >>> x = torch.randn(6, 10)
    >>> targets = {"y": torch.randn(6), "c": torch.tensor([0, 2, 1, -100, 0, 1])}
    >>> model.losses(x, targets).shape
    torch.Size([2])
    >>> model.loss(x, targets).backward()
    """

    def __init__(self, trunk: nn.Module, heads: MultiTaskHeads):
        super().__init__()
        if not isinstance(trunk, nn.Module):
            raise TypeError(f"MultiTaskModel: argument 'trunk' expected an nn.Module, got {type(trunk).__name__}")
        if not isinstance(heads, MultiTaskHeads):
            raise TypeError(
                f"MultiTaskModel: argument 'heads' expected a fastmtl.nn.MultiTaskHeads, got {type(heads).__name__}"
            )
        out_features = getattr(trunk, "out_features", None)
        if out_features is not None and out_features != heads.in_features:
            raise ValueError(
                f"MultiTaskModel: trunk outputs {out_features} features but heads expect in_features={heads.in_features}"
            )
        trunk_tasks = getattr(trunk, "num_tasks", None)
        if hasattr(trunk, "task_features") and trunk_tasks is not None and trunk_tasks != len(heads.tasks):
            raise ValueError(
                f"MultiTaskModel: the trunk gives {trunk_tasks} per-task representations but heads "
                f"have {len(heads.tasks)} tasks"
            )
        self.trunk = trunk
        self.heads = heads

    @property
    def tasks(self):
        return self.heads.tasks

    def features(self, x: torch.Tensor):
        """(trunk output, whether it is per task): ``[B, d]`` shared, or ``[T, B, d]`` one per task."""
        if hasattr(self.trunk, "task_features"):
            return self.trunk.task_features(x), True
        z = self.trunk(x)
        if isinstance(z, (list, tuple)):
            return torch.stack(list(z)), True
        return z, False

    def forward(self, x: torch.Tensor, targets: Mapping | torch.Tensor | None = None):
        """Logits per task: dict name -> ``[B, num_outputs]``; with ``targets`` (as for
        :meth:`losses`) a :class:`MultiTaskOutput` with ``logits``, ``losses`` and ``loss``.

        ``DDP(model)(x, targets).loss.backward()`` is the data-parallel training step: a loss
        computed by ``model.module.loss`` would skip DDP's gradient all-reduce. The trunk runs
        once; the heads run once for the logits and once in the fused loss op.
        """
        z, per_task = self.features(x)
        logits = routed_logits(self.heads, z) if per_task else self.heads(z)
        if targets is None:
            return logits
        losses = routed_losses(self.heads, z, targets) if per_task else self.heads.losses(z, targets)
        return MultiTaskOutput(logits=logits, losses=losses, loss=self._weighted_sum(losses))

    def losses(self, x: torch.Tensor, targets: Mapping | torch.Tensor) -> torch.Tensor:
        """Per-task losses ``[T]`` in task order (mean over each task's labelled entries, 0 if none).

        ``targets``: dict name -> tensor — regression float ``[B]`` or ``[B, n]`` (NaN = missing),
        binary float or bool ``[B]`` (NaN = missing), multiclass integer indices ``[B]`` (-100 =
        missing) — or the packed tensor of ``model.heads.pack_targets(targets)``.
        """
        z, per_task = self.features(x)
        return routed_losses(self.heads, z, targets) if per_task else self.heads.losses(z, targets)

    def loss(self, x: torch.Tensor, targets: Mapping | torch.Tensor) -> torch.Tensor:
        """Scalar ``sum_t task.weight * L_t``."""
        return self._weighted_sum(self.losses(x, targets))

    def _weighted_sum(self, losses: torch.Tensor) -> torch.Tensor:
        # Losses of a 16-bit model are float32 (ops.loss_dtype), like the task_weights buffer.
        return torch.dot(losses, self.heads.task_weights.to(losses.dtype))

    def shared_parameters(self):
        """The trunk's parameters that all tasks share, the ones :meth:`mtl_backward` aggregates:
        ``trunk.shared_parameters()`` where the trunk declares them (MMoE: the experts; PLE: the
        expert banks and the shared gates; per-task gates are task-specific), else all of
        ``trunk.parameters()``."""
        declared = getattr(self.trunk, "shared_parameters", None)
        return list(declared()) if callable(declared) else list(self.trunk.parameters())

    def mtl_backward(
        self,
        x: torch.Tensor,
        targets: Mapping | torch.Tensor,
        aggregator,
        shared_params: Iterable[torch.Tensor] | None = None,
        **options,
    ):
        """Backward of one multi-task step with an aggregated update of the trunk.

        The trunk's parameters get ``sum_t a_t grad(task.weight_t * L_t)`` with ``a =
        aggregator(G)``, ``G`` the Gram matrix of those per-task gradients; each head gets the
        gradient of its own ``task.weight * L_t``. Accumulates into ``.grad`` like ``backward``.
        ``x, targets``: as for :meth:`losses`; ``aggregator``: Gram ``[T, T]`` -> weights ``[T]``,
        e.g. ``fastmtl.aggregation.UPGrad()`` (or a "jacobian" method, below); ``options``: the keyword arguments of
        :class:`fastmtl.engine.MTLBackwardOptions` (``mode``, ``gram_every``, ``keep_jacobian``,
        ``gram_path``, ``ddp_gram``, ``process_group``). The ``gram_every`` schedule belongs to the
        model: a fresh aggregator of the same type per call continues it. ``shared_params``: the
        parameters to aggregate (default :meth:`shared_parameters`); every other parameter the
        losses depend on (heads, per-task gates) gets its own ``task.weight * L_t`` gradient.

        With a :class:`FusedMLP` trunk of plain layers (no norm, no dropout in training) the step
        runs in fused C++ ops with no ``T x P`` Jacobian (:func:`fastmtl.engine.fused_model_backward`);
        any other trunk, per-task ones (MMoE, PLE)
        included, goes through :func:`fastmtl.mtl_backward` (features: the trunk output, or the
        ``[T, B, d]`` representations). Returns an :class:`fastmtl.engine.MTLBackwardResult`
        (``losses`` are the unweighted ``L_t``).

        Both paths supply what the aggregator declares (its ``requires``) by the same rule: a method
        that needs the per-task gradients (``"jacobian"``: GradDrop, TrimmedMean, ExcessMTL, MoCo) gets
        the ``[T, P]`` Jacobian of the shared parameters (``mode="exact"``, ``gram_every=1`` only) and
        its update is written into their ``.grad``; ``result.weights`` is its ``last_weights``, else
        NaN. Parameters upstream of ``x`` are not shared: with such a method they get the gradient of
        ``sum_t task.weight_t L_t``. A ``"cross_gram"`` method (MoDo, SDMGrad) gets the cross-Gram
        ``J_1 J_2^T`` of the batch's two halves (the first ``B // 2`` examples and the rest, two
        independent samples of a shuffled batch; the trunk runs once over the whole batch, so a
        BatchNorm trunk couples them through its batch statistics) and its weights apply to the mean
        of both halves' losses: :func:`fastmtl.mtl_backward` on losses ``[2, T]``
        (:mod:`fastmtl.engine.cross_batches`), whatever the trunk; ``result.losses`` is ``[2, T]``,
        ``result.gram`` the cross-Gram.

        >>> import torch, fastmtl
        >>> tasks = [fastmtl.Task("y", "regression"), fastmtl.Task("c", "multiclass", num_outputs=3)]
        >>> model = fastmtl.nn.MultiTaskModel(fastmtl.nn.FusedMLP(10, [32, 32]), fastmtl.nn.MultiTaskHeads(32, tasks))
        >>> targets = {"y": torch.randn(6), "c": torch.tensor([0, 2, 1, -100, 0, 1])}
        >>> result = model.mtl_backward(torch.randn(6, 10), targets, fastmtl.aggregation.UPGrad())
        >>> result.gram.shape, model.trunk.weights[0].grad.shape
        (torch.Size([2, 2]), torch.Size([32, 10]))
        """
        shared = None if shared_params is None else list(shared_params)
        cross = requirement(aggregator) == "cross_gram"
        trunk_params = list(self.trunk.parameters())
        every_trunk_param = shared is None or (
            len(shared) == len(trunk_params) and all(any(p is q for q in shared) for p in trunk_params)
        )
        if not cross and isinstance(self.trunk, FusedMLP) and self.trunk.plain_layers and every_trunk_param:
            return fused_model_backward(self, x, targets, aggregator, **options)
        if options.get("gram_path", "auto") != "auto":
            if cross:
                raise ValueError(
                    "MultiTaskModel.mtl_backward: argument 'gram_path' expected 'auto' with "
                    f"{type(aggregator).__name__} (a cross-Gram step runs through fastmtl.mtl_backward), got "
                    f"{options['gram_path']!r}"
                )
            raise ValueError(
                f"MultiTaskModel.mtl_backward: argument 'gram_path' applies to a FusedMLP trunk only, "
                f"got {options['gram_path']!r} with a {type(self.trunk).__name__} trunk"
            )
        z, per_task = self.features(x)
        if cross:
            losses = self._half_batch_losses(z, per_task, targets, aggregator)
        else:
            losses = self._checked_losses(z, per_task, targets)
        if shared is None:
            shared = self.shared_parameters()
        result = mtl_backward(
            losses * self.heads.task_weights.to(losses.dtype), z, aggregator, shared, schedule_owner=self, **options
        )
        result.losses = losses.detach()
        return result

    def _checked_losses(self, z, per_task: bool, targets) -> torch.Tensor:
        """The per-task losses ``[T]`` of the features (finite, or an error naming the task)."""
        losses = routed_losses(self.heads, z, targets) if per_task else self.heads.losses(z, targets)
        check_finite_losses(losses, self.heads.task_names)
        return losses

    def _half_batch_losses(self, z, per_task: bool, targets, aggregator) -> torch.Tensor:
        """A cross-Gram method's losses ``[2, T]``: those of the batch's first ``B // 2`` examples and
        of the rest, two independent samples (one forward of the trunk over the whole batch)."""
        size = z.shape[1 if per_task else 0]
        if size < 2:
            raise ValueError(
                f"MultiTaskModel.mtl_backward: argument 'x' expected a batch of at least 2 examples with "
                f"{type(aggregator).__name__} (its halves are the two independent batches of the cross-Gram), "
                f"got {size}"
            )
        rows = []
        for part in (slice(0, size // 2), slice(size // 2, size)):
            half = {k: v[part] for k, v in targets.items()} if isinstance(targets, Mapping) else targets[part]
            rows.append(self._checked_losses(z[:, part] if per_task else z[part], per_task, half))
        return torch.stack(rows)

    @torch.no_grad()
    def load_plain_weights(self, trunk: nn.Sequential, heads) -> MultiTaskModel:
        """Loads the weights of the equivalent plain PyTorch model: ``trunk`` an ``nn.Sequential``
        of (Linear, activation) pairs (for a FusedMLP trunk; any other trunk gets
        ``load_state_dict(trunk.state_dict())``), ``heads`` one ``nn.Linear`` per task (dict name
        -> Linear or a list in task order). Outputs then match the plain model's."""
        if isinstance(self.trunk, FusedMLP):
            self.trunk.load_from_sequential(trunk)
        else:
            self.trunk.load_state_dict(trunk.state_dict())
        self.heads.load_from_linears(heads)
        return self

    # ---- transfer learning

    def add_tasks(self, tasks) -> MultiTaskModel:
        """Adds heads for new tasks after the existing ones, keeping the trained heads' weights.

        The trunk must give one shared representation (an MMoE or PLE has a gate per task fixed at
        construction). Returns ``self``; new parameters need adding to the optimizer.
        """
        new = list(check_tasks(tasks, "MultiTaskModel.add_tasks"))
        if hasattr(self.trunk, "task_features"):
            raise ValueError(
                f"MultiTaskModel.add_tasks: a {type(self.trunk).__name__} trunk has one representation "
                f"per task, fixed at construction; build a new trunk for {len(self.tasks) + len(new)} tasks"
            )
        old = self.heads
        taken = set(old.task_names)
        for t in new:
            if t.name in taken:
                raise ValueError(
                    f"MultiTaskModel.add_tasks: argument 'tasks' has task {t.name!r}, which the model has already"
                )
        old_weight, old_bias = old.stacked_parameters()
        heads = MultiTaskHeads(
            old.in_features,
            list(old.tasks) + new,
            device=old_weight.device,
            dtype=old_weight.dtype,
            per_task_parameters=old.per_task_parameters,
        )
        heads.copy_stacked_(old_weight.detach(), old_bias.detach())
        heads.train(old.training)
        self.heads = heads
        return self

    def freeze_trunk(self) -> MultiTaskModel:
        """Stops gradients to the trunk's parameters (``requires_grad = False``) and drops their
        ``.grad``: optimizers skip parameters without one, so the trunk stays bit-identical even
        under an optimizer built over all parameters (a stale gradient would still move it).
        Fine-tune the heads only."""
        for p in self.trunk.parameters():
            p.grad = None
        return self._set_trunk_trainable(False)

    def unfreeze_trunk(self) -> MultiTaskModel:
        """Undoes :meth:`freeze_trunk`."""
        return self._set_trunk_trainable(True)

    def _set_trunk_trainable(self, trainable: bool) -> MultiTaskModel:
        for p in self.trunk.parameters():
            p.requires_grad_(trainable)
        return self
