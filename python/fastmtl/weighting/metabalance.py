"""MetaBalance: auxiliary-task gradient magnitudes adapted to the target task's (He et al. 2022)."""

from __future__ import annotations

import torch

from ._base import Weighting, check_number


class MetaBalance(Weighting):
    """MetaBalance: task ``main_task`` is the target, the others auxiliary. With ``m_t`` the moving average
    (decay ``beta``, from 0) of ``|grad L_t|`` over the shared parameters, each auxiliary gradient is
    rescaled to ``r m_main / m_t + (1 - r)`` of itself (``r``: ``relax_factor``): all the way to the target's
    magnitude at ``r = 1``, unchanged at ``r = 0``. Both directions of the paper's rule (shrinking larger
    and enlarging smaller auxiliary gradients, its strategy C) are applied. ``loss = sum_t w_t L_t`` with
    ``w_main = 1`` and those factors as constants, so ``weights = w``. A task whose averaged norm is 0 (no
    gradient yet) keeps weight 1.

    He, Feng, Cheng, Gao, "MetaBalance: Improving Multi-Task Recommendations via Adapting Gradient
    Magnitudes of Auxiliary Tasks", WWW 2022 (defaults ``relax_factor = 0.7``, ``beta = 0.9``).

    Needs ``gram``: the Gram matrix of the per-task gradients over the shared parameters (only its
    diagonal). The paper rescales each gradient after the backward; through the loss weights the same
    update results, because the rescaling is a per-task scalar. The averaged norms are state
    (``state_dict``).

    >>> import torch
    >>> from fastmtl.weighting import MetaBalance
    >>> balance = MetaBalance(2, relax_factor=1.0)
    >>> _ = balance(torch.tensor([1.0, 1.0]), torch.diag(torch.tensor([4.0, 16.0])))   # norms 2 and 4
    >>> balance.weights                                                                  # aux scaled to 2
    tensor([1.0000, 0.5000])
    """

    requires_gram = True

    def __init__(self, num_tasks: int, relax_factor: float = 0.7, beta: float = 0.9, main_task: int = 0):
        super().__init__(num_tasks)
        self.relax_factor = check_number(
            relax_factor, "relax_factor", "MetaBalance", "a number in [0, 1]", lambda v: 0 <= v <= 1
        )
        self.beta = check_number(beta, "beta", "MetaBalance", "a number in [0, 1)", lambda v: 0 <= v < 1)
        if isinstance(main_task, bool) or not isinstance(main_task, int) or not 0 <= main_task < num_tasks:
            raise ValueError(
                f"MetaBalance: argument 'main_task' expected an int in [0, {num_tasks}), got {main_task!r}"
            )
        self.main_task = main_task
        self.register_buffer("grad_norm_average", torch.zeros(num_tasks, dtype=torch.float64))

    def _loss_and_weights(self, losses, gram):
        norms = gram.detach().diagonal().clamp(min=0).sqrt().to("cpu", torch.float64)
        average = self.beta * self.grad_norm_average.to("cpu") + (1 - self.beta) * norms
        self.grad_norm_average.copy_(average)
        main = average[self.main_task]
        ratio = torch.where(average > 0, main / torch.where(average > 0, average, 1.0), 1.0)
        weights = self.relax_factor * ratio + (1 - self.relax_factor)
        weights[self.main_task] = 1.0
        weights = torch.where(average > 0, weights, 1.0).to(losses.device, losses.dtype)
        return (weights * losses).sum(), weights

    def extra_repr(self) -> str:
        return (
            f"num_tasks={self.num_tasks}, relax_factor={self.relax_factor}, beta={self.beta}, "
            f"main_task={self.main_task}"
        )
