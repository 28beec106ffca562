"""DB-MTL: dual-balancing multi-task learning (Lin et al. 2023)."""

from __future__ import annotations

import torch

from ._base import Weighting, check_number


class DBMTL(Weighting):
    """DB-MTL: balances the loss scales with logarithms and the gradient magnitudes with weights.

    Loss-scale balancing: it optimises ``log(L_t + eps)``, whose gradient ``grad L_t / (L_t + eps)``
    no longer depends on the scale of ``L_t``. Gradient-magnitude balancing: with
    ``n_t = sqrt(G_tt) / (L_t + eps)``, the norm of that gradient, it keeps the moving average
    ``nhat = n + (beta / step^beta_sigma) (nhat - n)`` (``step`` counts calls from 1;
    ``nhat = n`` at the first) and scales every task up to the largest,
    ``alpha_t = max_s(nhat_s) / (nhat_t + 1e-8)``. ``loss = sum_t alpha_t log(L_t + eps)``
    with ``alpha`` a constant, so ``weights = alpha_t / (L_t + eps)``.

    Lin, Ye, Xu, Shi, Zhang, Kwok, "Dual-Balancing for Multi-Task Learning", arXiv 2308.12029
    (2023); LibMTL's ``DB_MTL``.

    Needs ``gram``: the Gram matrix of the per-task gradients of the raw losses ``L_t`` over the
    shared parameters (only its diagonal is used). The paper keeps the moving average of the
    gradient *vectors* and combines those averaged vectors; a Gram-based interface sees only
    inner products and combines the current gradients, so this keeps the moving average of their
    *norms*. With ``beta=0`` there is no averaging and this is exactly the paper's rule.
    The averaged norms and the step count are state (``state_dict``).

    A task with zero gradient at the first step (no labels) gets ``nhat_t = 0`` and a huge
    ``alpha_t``; its gradient is exactly zero, so the update is unaffected, but the returned
    loss value is then no number to log — log the raw losses.

    >>> import torch
    >>> from fastmtl.weighting import DBMTL
    >>> dbmtl = DBMTL(2, beta=0.0)
    >>> gram = torch.tensor([[1.0, 0.0], [0.0, 16.0]])  # ||grad L|| = 1, 4
    >>> _ = dbmtl(torch.tensor([1.0, 2.0]), gram)  # ||grad log L|| = 1, 2: task 1 is scaled up 2x
    >>> dbmtl.weights  # alpha_t / L_t = 2 / 1, 1 / 2
    tensor([2.0000, 0.5000])
    """

    requires_gram = True

    def __init__(self, num_tasks: int, beta: float = 0.9, beta_sigma: float = 0.5, eps: float = 1e-8):
        super().__init__(num_tasks)
        self.beta = check_number(beta, "beta", "DBMTL", "a number in [0, 1)", lambda v: 0 <= v < 1)
        self.beta_sigma = check_number(beta_sigma, "beta_sigma", "DBMTL", "a number >= 0", lambda v: v >= 0)
        self.eps = check_number(eps, "eps", "DBMTL", "a number > 0", lambda v: v > 0)
        self.register_buffer("grad_norm_average", torch.zeros(num_tasks))
        self._steps = 0

    def _loss_and_weights(self, losses, gram):
        self._check_nonnegative(losses)
        shifted = losses + self.eps
        d = shifted.detach()
        # Round-off in a Gram assembled from many blocks can leave a tiny negative diagonal.
        norms = gram.detach().diagonal().clamp(min=0).sqrt().to(losses) / d
        self._steps += 1
        if self._steps == 1:
            average = norms
        else:
            decay = self.beta / self._steps**self.beta_sigma
            average = norms + decay * (self.grad_norm_average.to(losses) - norms)
        self.grad_norm_average.copy_(average)
        alpha = average.max() / (average + 1e-8)
        return (alpha * torch.log(shifted)).sum(), alpha / d

    def get_extra_state(self):
        return {"steps": self._steps}

    def set_extra_state(self, state) -> None:
        self._steps = int(state["steps"])

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, beta={self.beta}, beta_sigma={self.beta_sigma}, eps={self.eps}"
