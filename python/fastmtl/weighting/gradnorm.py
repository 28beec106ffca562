"""GradNorm: gradient normalisation for adaptive loss balancing (Chen et al. 2018)."""

from __future__ import annotations

import torch

from ._base import Weighting, check_number


class GradNorm(Weighting):
    """GradNorm: weights that pull every task's weighted gradient norm towards a common level,
    scaled up for the tasks that have trained least.

    ``loss = sum_t w_t L_t`` with the current weights ``w`` (init 1); then ``w`` takes one
    gradient step of ``lr`` on ``L_grad = sum_t |w_t n_t - target_t|`` for the next call, with
    ``n_t = ||grad_W L_t||``, ``target_t = mean_s(w_s n_s) * r_t^alpha`` (a constant, as in the
    paper), ``r_t = Ltilde_t / mean(Ltilde)`` and ``Ltilde_t = L_t / L_t(first call)``; then
    ``w`` is clamped at 0 and renormalised to ``sum(w) = T``. The gradient of ``L_grad`` is
    analytic, ``sign(w_t n_t - target_t) n_t``: no second backward pass.

    Chen et al., "GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep Multitask
    Networks", ICML 2018.

    Needs ``gram``: the Gram matrix of the per-task gradients of the *unweighted* losses at the
    chosen shared layer (the paper uses the last shared layer); only its diagonal
    ``G_tt = n_t^2`` is used. The weights, the initial losses and nothing else are state
    (buffers, not parameters: the optimizer must not touch them).

    A task whose loss is 0 at the first call (no labels in that batch) takes as its initial loss
    the first nonzero one it shows; until then its ``Ltilde_t`` is 1.

    >>> import torch
    >>> from fastmtl.weighting import GradNorm
    >>> gradnorm = GradNorm(2, alpha=1.5, lr=0.1)
    >>> gram = torch.tensor([[4.0, 0.0], [0.0, 1.0]])  # ||g_1|| = 2, ||g_2|| = 1
    >>> gradnorm(torch.tensor([1.0, 1.0]), gram)  # returns sum(w L) with w = 1, then moves w
    tensor(2.)
    >>> gradnorm.task_weights  # (1 - 0.1 * 2, 1 + 0.1 * 1) = (0.8, 1.1), rescaled to sum 2
    tensor([0.8421, 1.1579])
    """

    requires_gram = True

    def __init__(self, num_tasks: int, alpha: float = 1.5, lr: float = 0.025):
        super().__init__(num_tasks)
        self.alpha = check_number(alpha, "alpha", "GradNorm", "a number >= 0", lambda v: v >= 0)
        self.lr = check_number(lr, "lr", "GradNorm", "a number > 0", lambda v: v > 0)
        self.register_buffer("task_weights", torch.ones(num_tasks))
        # 0 = not seen yet (losses are >= 0 in practice; 0 means "no labels", see the docstring).
        self.register_buffer("initial_losses", torch.zeros(num_tasks))

    def _loss_and_weights(self, losses, gram):
        w = self.task_weights.to(losses).clone()
        loss = (w * losses).sum()
        self._update(losses.detach(), gram.detach())
        return loss, w

    @torch.no_grad()
    def _update(self, losses, gram) -> None:
        w = self.task_weights.to(losses)
        unseen = self.initial_losses == 0
        self.initial_losses.copy_(torch.where(unseen, losses.to(self.initial_losses), self.initial_losses))
        initial = self.initial_losses.to(losses)
        seen = initial != 0
        ltilde = torch.where(seen, losses / torch.where(seen, initial, 1.0), 1.0)
        mean = ltilde.mean()
        rate = ltilde / mean if mean > 0 else torch.ones_like(ltilde)
        # Round-off in a Gram assembled from many blocks can leave a tiny negative diagonal.
        norms = gram.diagonal().clamp(min=0).sqrt().to(losses)
        weighted = w * norms
        target = weighted.mean() * rate.pow(self.alpha)
        w = (w - self.lr * torch.sign(weighted - target) * norms).clamp(min=0)
        total = w.sum()
        w = w * (self.num_tasks / total) if total > 0 else torch.ones_like(w)
        self.task_weights.copy_(w)

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, alpha={self.alpha}, lr={self.lr}"
