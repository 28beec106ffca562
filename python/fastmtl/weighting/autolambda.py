"""Auto-Lambda: task weights meta-learnt from a virtual step (Liu, Li, Kuang, Johns 2022)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from ._adam import adam_step_
from ._base import Weighting, check_number

# The finite difference's step in parameter space: eps = _FD_SCALE / ||grad L_val(theta')||, as DARTS
# and the official code.
_FD_SCALE = 0.01

LossesFn = Callable[[], Tensor]


class AutoLambda(Weighting):
    """Auto-Lambda: task weights ``lambda`` learnt so that one training step with them lowers the
    validation loss of the primary tasks the most.

    ``loss = sum_t lambda_t L_t`` (``weights = lambda``). :meth:`meta_step` moves ``lambda``: with the
    shared parameters ``theta`` (``params``) and the virtual step
    ``theta' = theta - lr * grad_theta sum_t lambda_t L_t^train(theta)``, it takes the gradient of
    ``L_val(theta') = sum_{t in primary} L_t^val(theta')`` with respect to ``lambda``,

        ``d L_val(theta') / d lambda_t = -lr * <grad L_val(theta'), grad L_t^train(theta)>``,

    by the finite difference of the paper (as DARTS), which needs no second-order autograd:

        ``-lr * [L_t^train(theta+) - L_t^train(theta-)] / (2 eps)``,
        ``theta± = theta ± eps * grad L_val(theta')``, ``eps = 0.01 / ||grad L_val(theta')||``

    (``grad_lambda L_train(theta±) = L^train(theta±)``: the per-task training losses). Then one
    Adam step (``weight_lr``, torch.optim.Adam's defaults, no weight decay, as the official code's
    meta optimizer) and ``lambda`` is clamped at 0.

    Liu, Li, Kuang, Johns, "Auto-Lambda: Disentangling Dynamic Task Relationships", TMLR 2022;
    official code github.com/lorenmt/auto-lambda.

    Arguments: ``params`` the parameters the virtual step moves (the official code moves all the
    model's; the shared ones alone are cheaper and ignore the heads' own step); ``lr`` the virtual
    step size ``alpha``: the model optimizer's learning rate, as in the official code (set
    ``method.lr`` again when a scheduler changes it); ``init`` the initial ``lambda`` (a number or
    ``T`` numbers >= 0; the official code uses 0.1); ``primary`` the tasks whose validation loss
    counts (default all; the others are auxiliary tasks, weighted only for what they do to the
    primary ones).

    A training step, as the official code (the meta step first, at the parameters the step will
    start from; the validation batch is another batch of the training set in the official code)::

        method.meta_step(lambda: model_losses(x, y), lambda: model_losses(x_val, y_val))
        optimizer.zero_grad()
        method(model_losses(x, y)).backward()
        optimizer.step()

    The two callables take no argument and return the ``[T]`` per-task losses at the *current*
    values of ``params`` (differentiable): :meth:`meta_step` changes ``params`` in place, calls
    them, and puts ``params`` back bitwise; it uses ``torch.autograd.grad``, so no ``.grad`` is
    touched. The callables must not call ``backward`` themselves; a graph built before
    :meth:`meta_step` that saved ``params`` cannot be backpropagated after it (their version
    counters move). Both callables are evaluated at fixed inputs: give them the same batch each
    time within one meta step (dropout: the finite difference assumes the same mask at ``theta+``
    and ``theta-``; evaluate the model in eval mode or with a fixed seed inside the callable if it
    has dropout). Modules in training mode update their running statistics (BatchNorm) at every
    call, as in the official code.

    ``lambda`` (``task_weights``), Adam's moments (buffers) and step count (extra state) are the
    state: ``state_dict`` / ``load_state_dict`` resume the meta optimizer exactly. ``lambda`` is a
    buffer, not a parameter: the model's optimizer must not step it (``method.parameters()`` is
    empty). ``params`` are the model's and are not saved with the method.

    >>> import torch
    >>> from fastmtl.weighting import AutoLambda
    >>> w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    >>> method = AutoLambda(2, [w], lr=0.1, weight_lr=0.01)
    >>> method(torch.tensor([1.0, 2.0]))  # sum_t lambda_t L_t, lambda = 1
    tensor(3.)
    >>> train = lambda: torch.stack([(w[0] - 1) ** 2, (w[1] - 2) ** 2])  # task 2 wants w[1] = 2
    >>> val = lambda: torch.stack([(w[0] - 1) ** 2, (w[1] - 3) ** 2])  # and its validation even more
    >>> # theta' = (1, 1.2); -lr <grad L_val(theta'), grad L_2(theta)> = -0.1 * (-3.6) * (-2)
    >>> method.meta_step(train, val)  # task 2's training step helps the validation loss
    tensor([ 0.0000, -0.7200])
    >>> method.task_weights  # so its weight rises, by weight_lr (Adam's first step)
    tensor([1.0000, 1.0100])
    """

    def __init__(
        self,
        num_tasks: int,
        params: Iterable[Tensor],
        lr: float = 1e-3,
        weight_lr: float = 1e-4,
        init: float | Sequence[float] = 1.0,
        primary: Sequence[int] | None = None,
    ):
        super().__init__(num_tasks)
        self.params = _check_params(params)
        self.lr = check_number(lr, "lr", "AutoLambda", "a finite number > 0", lambda v: 0 < v < math.inf)
        self.weight_lr = check_number(
            weight_lr, "weight_lr", "AutoLambda", "a finite number > 0", lambda v: 0 < v < math.inf
        )
        self.register_buffer("task_weights", _check_init(init, num_tasks))
        self.primary = _check_primary(primary, num_tasks)
        self.register_buffer("adam_exp_avg", torch.zeros(num_tasks))
        self.register_buffer("adam_exp_avg_sq", torch.zeros(num_tasks))
        self._adam_steps = 0

    def _loss_and_weights(self, losses, gram):
        w = self.task_weights.to(losses).clone()
        return (w * losses).sum(), w

    # ---- the meta step

    def meta_gradient(self, train_losses_fn: LossesFn, val_losses_fn: LossesFn) -> Tensor:
        """``d L_val(theta') / d lambda`` ``[T]`` by the finite difference (see the class), without
        moving ``lambda``. ``params`` are restored bitwise before it returns (even on an error)."""
        for name, fn in (("train_losses_fn", train_losses_fn), ("val_losses_fn", val_losses_fn)):
            if not callable(fn):
                raise ValueError(
                    f"AutoLambda: argument '{name}' expected a callable taking no argument, got {type(fn).__name__}"
                )
        params = self.params
        originals = [p.detach().clone() for p in params]
        try:
            with torch.enable_grad():
                # theta' = theta - lr * grad_theta sum_t lambda_t L_t^train(theta)
                train = self._call(train_losses_fn, "train_losses_fn")
                weighted = (self.task_weights.to(train) * train).sum()
                train_grads = _grads(weighted, params, "train_losses_fn")
                with torch.no_grad():
                    for p, p0, g in zip(params, originals, train_grads):
                        p.copy_(p0 - self.lr * g)
                # v = grad_theta' L_val(theta')
                val = self._call(val_losses_fn, "val_losses_fn")
                mask = torch.zeros(self.num_tasks, dtype=val.dtype, device=val.device)
                mask[list(self.primary)] = 1
                v = _grads((mask * val).sum(), params, "val_losses_fn")
                del train_grads, train, weighted, val
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d.double()) for d in v]))
            if not bool(torch.isfinite(norm)):
                raise ValueError("AutoLambda: argument 'val_losses_fn' gave a non-finite gradient at the virtual step")
            if norm == 0:  # L_val is flat at theta': the exact meta-gradient is 0
                return torch.zeros_like(self.task_weights)
            eps = _FD_SCALE / norm.item()
            with torch.no_grad():
                for p, p0, d in zip(params, originals, v):
                    p.copy_(p0 + eps * d)
                plus = self._call(train_losses_fn, "train_losses_fn").detach()
                for p, p0, d in zip(params, originals, v):
                    p.copy_(p0 - eps * d)
                minus = self._call(train_losses_fn, "train_losses_fn").detach()
        finally:
            with torch.no_grad():
                for p, p0 in zip(params, originals):
                    p.copy_(p0)
        meta = -self.lr * (plus.double() - minus.double()) / (2 * eps) + 0.0  # + 0.0: no -0.0
        return meta.to(self.task_weights)

    def meta_step(self, train_losses_fn: LossesFn, val_losses_fn: LossesFn) -> Tensor:
        """One update of ``lambda``: :meth:`meta_gradient`, one Adam step of ``weight_lr`` along it,
        then ``lambda`` clamped at 0. Returns the meta-gradient ``[T]``."""
        grad = self.meta_gradient(train_losses_fn, val_losses_fn)
        self._adam(grad)
        return grad

    @torch.no_grad()
    def _adam(self, grad: Tensor) -> None:
        """One step of torch.optim.Adam (no weight decay, no amsgrad), its moments in buffers."""
        self._adam_steps += 1
        adam_step_(self.task_weights, grad, self.adam_exp_avg, self.adam_exp_avg_sq, self._adam_steps, self.weight_lr)
        self.task_weights.clamp_(min=0)

    def _call(self, fn: LossesFn, name: str) -> Tensor:
        losses = fn()
        t = self.num_tasks
        if not isinstance(losses, Tensor):
            raise ValueError(
                f"AutoLambda: argument '{name}' expected to return a Tensor of shape [{t}], got {type(losses).__name__}"
            )
        if not losses.is_floating_point():
            raise ValueError(f"AutoLambda: argument '{name}' expected to return a floating tensor, got {losses.dtype}")
        if losses.shape != (t,):
            raise ValueError(
                f"AutoLambda: argument '{name}' expected to return shape [{t}] (one loss per task), "
                f"got {list(losses.shape)}"
            )
        if not bool(torch.isfinite(losses).all()):
            raise ValueError(
                f"AutoLambda: argument '{name}' expected to return finite losses, got {losses.detach().cpu().tolist()}"
            )
        return losses

    def get_extra_state(self):
        return {"adam_steps": self._adam_steps}

    def set_extra_state(self, state) -> None:
        self._adam_steps = int(state["adam_steps"])

    def extra_repr(self) -> str:
        return (
            f"num_tasks={self.num_tasks}, params={len(self.params)} tensors, lr={self.lr}, "
            f"weight_lr={self.weight_lr}, primary={list(self.primary)}"
        )


def _grads(loss: Tensor, params: list[Tensor], name: str) -> list[Tensor]:
    """d loss / d params, zeros for the parameters it does not reach."""
    if not loss.requires_grad:
        raise ValueError(
            f"AutoLambda: argument '{name}' expected to return losses differentiable with respect to 'params', "
            f"got a tensor that does not require grad (computed under torch.no_grad(), or from other tensors?)"
        )
    return list(torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True))


def _check_params(params) -> list[Tensor]:
    if isinstance(params, Tensor):
        params = [params]
    try:
        params = list(params)
    except TypeError:
        raise ValueError(
            f"AutoLambda: argument 'params' expected an iterable of tensors, got {type(params).__name__}"
        ) from None
    unique, seen = [], set()
    for p in params:
        if not isinstance(p, Tensor) or not p.is_floating_point() or not p.requires_grad or not p.is_leaf:
            what = (
                type(p).__name__
                if not isinstance(p, Tensor)
                else f"a tensor ({p.dtype}, requires_grad={p.requires_grad})"
            )
            raise ValueError(
                f"AutoLambda: argument 'params' expected floating leaf tensors that require grad, got {what}"
            )
        if id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    if not unique:
        raise ValueError("AutoLambda: argument 'params' expected at least one tensor, got none")
    return unique


def _check_init(init, num_tasks: int) -> Tensor:
    if isinstance(init, numbers.Real) and not isinstance(init, bool):
        value = check_number(init, "init", "AutoLambda", "a finite number >= 0", lambda v: 0 <= v < math.inf)
        return torch.full((num_tasks,), value)
    try:
        values = torch.as_tensor(init, dtype=torch.get_default_dtype()).detach().clone().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(
            f"AutoLambda: argument 'init' expected a number >= 0 or {num_tasks} numbers >= 0, got {init!r}"
        ) from None
    if values.shape != (num_tasks,) or not bool((torch.isfinite(values) & (values >= 0)).all()):
        raise ValueError(
            f"AutoLambda: argument 'init' expected a number >= 0 or {num_tasks} finite numbers >= 0, got {init!r}"
        )
    return values


def _check_primary(primary, num_tasks: int) -> tuple[int, ...]:
    if primary is None:
        return tuple(range(num_tasks))
    expected = f"distinct task indices in [0, {num_tasks}), at least one"
    try:
        indices = list(primary)
    except TypeError:
        raise ValueError(f"AutoLambda: argument 'primary' expected {expected}, got {primary!r}") from None
    ok = (
        indices
        and all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and 0 <= i < num_tasks for i in indices)
        and len(set(indices)) == len(indices)
    )
    if not ok:
        raise ValueError(f"AutoLambda: argument 'primary' expected {expected}, got {primary!r}")
    return tuple(sorted(int(i) for i in indices))
