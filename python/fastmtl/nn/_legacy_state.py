"""State-dict keys of earlier fastmtl versions, mapped when a checkpoint is loaded, so that a model
saved before a module's parameters were reorganised still loads (strictly) into the new module."""

from __future__ import annotations

import torch

__all__ = ["split_stacked_ple_experts"]


def split_stacked_ple_experts(module, state_dict, prefix, *_args) -> None:
    """PLE before its shared and task experts were separate parameters: one stacked bank per level,
    ``experts.{level}.*`` over ``S + T P`` experts (the shared ones first). Splits each such entry
    into ``shared_experts.{level}.*`` (experts ``[0, S)``) and ``task_experts.{level}.*`` (the rest),
    in place in ``state_dict``. A stacked weight or bias and a StackedLayerNorm parameter split on
    their expert axis (dim 0); a BatchNorm1d over ``E * width`` channels (channel ``e * width + j``:
    expert e) splits at ``S * width``; its step count goes to both halves. A load_state_dict pre-hook
    (``with_module=True``)."""
    S, P, T = module.num_shared_experts, module.num_task_experts, module.num_tasks
    old = prefix + "experts."
    for key in [k for k in state_dict if k.startswith(old)]:
        level, _, rest = key[len(old) :].partition(".")
        value = state_dict.pop(key)
        if rest.endswith("num_batches_tracked"):
            shared_part, task_part = value, value.clone()
        elif value.dim() == 1 and ".norms." in key:  # BatchNorm1d channels: expert-major
            width = value.shape[0] // (S + T * P)
            shared_part, task_part = value[: S * width], value[S * width :]
        else:
            shared_part, task_part = value[:S], value[S:]
        if S:
            state_dict[f"{prefix}shared_experts.{level}.{rest}"] = _own(shared_part)
        if P:
            state_dict[f"{prefix}task_experts.{level}.{rest}"] = _own(task_part)


def _own(t: torch.Tensor) -> torch.Tensor:
    """A slice as its own tensor (load_state_dict copies it; a view would keep the whole alive)."""
    return t.clone()
