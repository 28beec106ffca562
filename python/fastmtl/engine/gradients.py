"""Writing the engine's gradients into ``.grad`` as ``backward`` would, and checking the aggregator's
weights: what the autograd engine and the fused path share."""

from __future__ import annotations

import torch

from .._distributed import DataParallelSync
from .options import fail

__all__ = ["accumulate", "write_gradients", "checked_weights", "jacobian_update"]


def accumulate(param: torch.Tensor, update: torch.Tensor, owned: bool = False) -> None:
    """param.grad += update, as AccumulateGrad does; ``owned``: update is a fresh tensor nobody
    else holds, so it can become .grad without a copy. The update is cast to the parameter's dtype
    (under torch.autocast it is in the compute dtype: bfloat16 gradients of float32 parameters)."""
    update = update.detach()
    if update.dtype != param.dtype:
        update, owned = update.to(param.dtype), True
    if param.grad is None:
        param.grad = update if owned else update.clone()
    else:
        param.grad.add_(update)


def write_gradients(params, grads, sync: DataParallelSync, owned: bool = False) -> None:
    """Accumulates the step's gradients into .grad, averaged over the ranks first when data-parallel."""
    for p, g in zip(params, sync.average(list(grads))):
        if g is not None and p.requires_grad:
            accumulate(p, g, owned=owned and not sync.active)


def check_finite_losses(losses: torch.Tensor, task_names=None) -> None:
    """Raises naming the first task whose loss is NaN or infinite: a NaN loss otherwise surfaces
    later as the aggregator's "argument 'gram' expected finite values", which hides its origin.
    Skipped while torch.compile traces (a data-dependent branch would break the graph)."""
    if torch.compiler.is_compiling():
        return
    finite = torch.isfinite(losses.detach())
    if bool(finite.all()):
        return
    t = int((~finite).nonzero()[0, 0])
    name = f"task {task_names[t]!r}" if task_names is not None else f"task {t}"
    fail("losses", "finite per-task losses", f"a {losses[t].item()} loss for {name} (index {t})")


def checked_weights(aggregator, gram: torch.Tensor) -> torch.Tensor:
    """``aggregator(gram)``, detached, after checking it is ``[T]`` and finite (the finite check is
    skipped while torch.compile traces: it is a data-dependent branch)."""
    weights = aggregator(gram)
    T = gram.shape[0]
    if not isinstance(weights, torch.Tensor) or weights.shape != (T,):
        got = list(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        fail("aggregator", f"a callable returning weights of shape [{T}] for a [{T}, {T}] Gram matrix", str(got))
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(weights).all()):
        fail("aggregator", "finite weights", str(weights.tolist()))
    return weights.detach()


def jacobian_update(aggregator, jacobian: torch.Tensor, gram: torch.Tensor, sizes) -> tuple[list, torch.Tensor]:
    """A "jacobian" method's step (issue 17): ``aggregator(jacobian=J)``, ``J [T, P]`` detached, checked
    to be ``[P]`` and finite (the finite check skipped while torch.compile traces), split into the
    flat blocks of ``sizes`` (the shared parameters' numels, in the Jacobian's column order). Returns
    ``(blocks, weights)``: the method's ``last_weights`` where it keeps them (ExcessMTL, MoCo), else
    NaN ``[T]`` (GradDrop, TrimmedMean: no weighting), in the Gram matrix's dtype and on its device."""
    update = aggregator(jacobian=jacobian.detach())
    T, P = jacobian.shape
    if not isinstance(update, torch.Tensor) or update.shape != (P,):
        got = list(update.shape) if isinstance(update, torch.Tensor) else type(update).__name__
        fail("aggregator", f"a method returning an update of shape [{P}] for a [{T}, {P}] Jacobian", str(got))
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(update).all()):
        fail("aggregator", "a finite update", f"non-finite values from {type(aggregator).__name__}")
    weights = getattr(aggregator, "last_weights", None)
    if weights is None:
        weights = torch.full((T,), float("nan"), dtype=gram.dtype, device=gram.device)
    return list(torch.split(update.detach(), list(sizes))), weights.detach()
