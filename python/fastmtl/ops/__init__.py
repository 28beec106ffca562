"""The fused ops: typed Python functions over ``torch.ops.fastmtl.*``, and their fake (meta)
kernels registered through ``torch.library`` so they work under ``torch.compile(fullgraph=True)``
and ``torch.library.opcheck``. Their autograd formulas are registered in C++
(``csrc/ops/autograd.cpp``: the Python route cost more per call than a small step's GEMMs).

The C++ forward ops also return what their backward needs (saved activations, logit gradients);
the functions here return only the result. :mod:`fastmtl.reference` has the same functions in plain
PyTorch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional, Sequence

import torch

from ..tasks import Task, check_tasks

__all__ = ["fused_mlp", "multitask_head_loss", "pack_targets", "loss_dtype", "ACTIVATIONS", "PRE_ACTIVATION_SAVED"]

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "tanh", "identity")
# Activations whose backward reads the pre-activation (the C++ forward saves it for every layer);
# the others read the layer output, of which all but the last are saved (the last is the result).
PRE_ACTIVATION_SAVED = frozenset({"gelu", "gelu_tanh", "silu"})


# --------------------------------------------------------------------------------------------
# fused_mlp


def fused_mlp(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Optional[Sequence[Optional[torch.Tensor]]],
    activation: str = "relu",
) -> torch.Tensor:
    """The whole trunk in one call: ``z_l = act(z_{l-1} W_l^T + b_l)`` for every layer.

    Args:
        x: ``[B, in_features]``, float32 or float64.
        weights: ``W_l`` of shape ``[out_l, in_l]`` (as ``nn.Linear.weight``), chained layer to layer.
        biases: ``b_l`` of shape ``[out_l]`` per layer, ``None`` entries for layers without bias, or
            ``None`` for no bias at all.
        activation: ``relu``, ``gelu`` (erf), ``gelu_tanh``, ``silu``, ``tanh`` or ``identity``,
            applied after every layer.

    Returns: ``[B, out_L]``.

    >>> import torch, fastmtl
    >>> x = torch.randn(4, 3)
    >>> ws = [torch.randn(5, 3), torch.randn(2, 5)]
    >>> fastmtl.ops.fused_mlp(x, ws, None, "relu").shape
    torch.Size([4, 2])
    """
    weights = list(weights)
    out, _saved = torch.ops.fastmtl.fused_mlp.default(x, weights, _bias_list(biases, weights), activation)
    return out


def _bias_list(biases, weights, op: str = "fused_mlp"):
    """The op takes a bias for every layer or none. Layers without one among layers with one get a
    constant zero bias (its gradient is dropped): the op cannot take a list holding None, because
    torch.library's autograd gives no gradient to such a list."""
    if biases is None:
        return []
    biases = list(biases)
    if all(b is None for b in biases):
        return []
    if len(biases) != len(weights):
        raise ValueError(
            f"fastmtl.{op}: argument 'biases' expected {len(weights)} entries (one per layer), got {len(biases)}"
        )
    # The bias of a weight [..., out, in] is [..., out] (per expert for fused_experts).
    return [w.new_zeros(w.shape[:-1]) if b is None else b for b, w in zip(biases, weights)]


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"fastmtl.fused_mlp: argument 'activation' expected one of {', '.join(ACTIVATIONS)}, got {activation!r}"
        )


def _check_devices(op: str, reference_name: str, reference: torch.Tensor, **tensors) -> None:
    """Fake kernels run where no device kernel checks (meta tensors, torch.compile tracing):
    mixed devices must fail there too, not produce a result."""
    for name, value in tensors.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for i, t in enumerate(values):
            if t is not None and t.device != reference.device:
                where = f"{name}[{i}]" if isinstance(value, (list, tuple)) else name
                raise ValueError(
                    f"fastmtl.{op}: argument '{where}' expected device {reference.device} "
                    f"(the device of '{reference_name}'), got {t.device}"
                )


@torch.library.register_fake("fastmtl::fused_mlp")
def _fused_mlp_fake(x, weights, biases, activation):
    _check_activation(activation)
    _check_devices("fused_mlp", "x", x, weights=weights, biases=biases)
    rows = x.shape[0]
    out = x.new_empty((rows, weights[-1].shape[0]))
    kept = weights if activation in PRE_ACTIVATION_SAVED else weights[:-1]
    return out, [x.new_empty((rows, w.shape[0])) for w in kept]


@torch.library.register_fake("fastmtl::fused_mlp_backward")
def _fused_mlp_backward_fake(grad_out, x, weights, out, saved, activation, has_bias, need_input_grad):
    grad_x = x.new_empty(x.shape) if need_input_grad else x.new_empty((0,))
    grad_weights = [w.new_empty(w.shape) for w in weights]
    grad_biases = [x.new_empty((w.shape[0],)) for w in weights] if has_bias else []
    return grad_x, grad_weights, grad_biases




# --------------------------------------------------------------------------------------------
# multitask_head_loss


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the per-task losses (and of the packed targets) for inputs of ``dtype``: the
    same dtype, except float32 for float16 / bfloat16 inputs (CUDA only): their losses are
    accumulated and returned in float32, and class indices above 256 are not exact in bfloat16."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def task_layout(tasks: Sequence[Task], where: str = "fastmtl.ops.multitask_head_loss"):
    """(tasks tuple, loss names, num_outputs) as the C++ ops take them."""
    tasks = check_tasks(tasks, where)
    return tasks, [t.loss for t in tasks], [t.num_outputs for t in tasks]


def pack_targets(
    targets: Mapping[str, torch.Tensor], tasks: Sequence[Task], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Packs per-task targets (dict name -> tensor) into one ``[B, sum of target widths]`` tensor.

    Regression: float ``[B]`` or ``[B, n]`` (NaN = missing); binary: float or bool ``[B]`` (NaN =
    missing); multiclass: integer class indices ``[B]`` (-100 = missing), stored as floats.
    """
    tasks, losses, num_outputs = task_layout(tasks, "fastmtl.ops.pack_targets")
    return _pack_targets(targets, tasks, losses, num_outputs, dtype)


def _pack_targets(targets, tasks, losses, num_outputs, dtype):
    if not isinstance(targets, Mapping):
        raise TypeError(f"fastmtl: argument 'targets' expected a dict of task name -> tensor, got {type(targets).__name__}")
    values = []
    for task in tasks:
        if task.name not in targets:
            raise ValueError(
                f"fastmtl: argument 'targets' has no entry for task {task.name!r}; "
                f"expected keys {[t.name for t in tasks]}, got {list(targets.keys())}"
            )
        value = targets[task.name]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"fastmtl: argument 'targets[{task.name!r}]' expected a tensor, got {type(value).__name__}")
        values.append(value)
    names = [t.name for t in tasks]
    return torch.ops.fastmtl.pack_targets.default(values, names, losses, num_outputs, dtype)


@torch.library.register_fake("fastmtl::pack_targets")
def _pack_targets_fake(targets, names, losses, num_outputs, dtype):
    width = sum(1 if loss in ("bce", "ce") else n for loss, n in zip(losses, num_outputs))
    return targets[0].new_empty((targets[0].shape[0], width), dtype=dtype)


def multitask_head_loss(
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets,
    tasks: Sequence[Task],
) -> torch.Tensor:
    """All task heads and all per-task losses in one call.

    Args:
        z: trunk output ``[B, d]``.
        weight: all heads stacked, ``[sum of num_outputs, d]``, in task order.
        bias: ``[sum of num_outputs]`` or ``None``.
        targets: packed ``[B, sum of target widths]`` in ``loss_dtype(z.dtype)`` (see
            :func:`pack_targets`), or a dict of task name -> tensor, packed here.
        tasks: the :class:`fastmtl.Task` list, in the order of the rows of ``weight``.

    Returns: the per-task losses ``[T]`` (mean over each task's labelled entries; 0 for a task
    with none) in ``loss_dtype(z.dtype)``. Backward with upstream weights ``w`` gives
    ``dz = sum_t w_t dL_t/dz``.

    Targets: regression a finite value, bce a probability in [0, 1] (soft labels allowed), ce a
    class index; NaN (regression, bce) or -100 (ce) = missing. An invalid target value (bce outside
    [0, 1], ce not a class index or -100, regression +-inf) raises
    ValueError on CPU. On CUDA, where checking would need a host synchronisation every step (and
    break CUDA-graph capture), it makes that task's loss NaN instead.
    """
    tasks, losses, num_outputs = task_layout(tasks)
    if isinstance(targets, Mapping):
        targets = _pack_targets(targets, tasks, losses, num_outputs, loss_dtype(z.dtype))
    result, _logit_grad, _scale = torch.ops.fastmtl.multitask_head_loss.default(
        z, weight, bias, targets, losses, num_outputs
    )
    return result


@torch.library.register_fake("fastmtl::multitask_head_loss")
def _multitask_head_loss_fake(z, weight, bias, targets, losses, num_outputs):
    _check_devices("multitask_head_loss", "z", z, weight=weight, bias=bias, targets=targets)
    num_tasks = len(losses)
    # Losses and 1/count scales: float32 for 16-bit z, as the CUDA kernel returns them; the
    # logit gradient stays in z's dtype.
    per_task = loss_dtype(z.dtype)
    return (
        z.new_empty((num_tasks,), dtype=per_task),
        z.new_empty((z.shape[0], weight.shape[0])),
        z.new_empty((num_tasks,), dtype=per_task),
    )


@torch.library.register_fake("fastmtl::multitask_head_loss_backward")
def _multitask_head_loss_backward_fake(grad_losses, z, weight, logit_grad, scale, num_outputs, has_bias, need_z_grad):
    grad_z = z.new_empty(z.shape) if need_z_grad else z.new_empty((0,))
    grad_bias = z.new_empty((weight.shape[0],)) if has_bias else z.new_empty((0,))
    return grad_z, weight.new_empty(weight.shape), grad_bias


# The aggregation ops (Gram matrices -> task weights) live in their own module.
from .aggregation import *  # noqa: E402, F401, F403  (its __all__: the aggregation ops)
# The per-task engine ops of fastmtl's own model.
from .engine import *  # noqa: E402, F401, F403  (its __all__: task_gram, GRAM_PATHS, GRAM_MODES)
# The Mixture-of-Experts ops (fused_experts, gated_mixture).
from .experts import *  # noqa: E402, F401, F403  (its __all__)
