"""PCD: priority-constrained descent for a primary objective and secondary ones."""

from __future__ import annotations

import torch

from ._base import Aggregator, check_scalar


def _primary_qp(G: torch.Tensor, taus: torch.Tensor, dependence_tol: float, tol: float = 1e-9) -> torch.Tensor:
    """``min_d |d - g_1|^2 / 2`` s.t. ``<g_j, d> >= tau_j |g_j|^2`` (j >= 2), from the Gram matrix alone:
    the weights ``[1, mu_2, ..., mu_m]`` of ``d = g_1 + sum_j mu_j g_j``, ``mu`` the KKT multipliers;
    ``[1, 0, ..., 0]`` if the constraints are infeasible.

    The dual active-set method of Goldfarb & Idnani (1983) for an identity Hessian: stationarity holds
    at every iterate, so every inner product is an entry of G. Each round adds the most violated
    constraint, dropping active ones whose multiplier would turn negative first; a gradient whose
    component orthogonal to the active ones is below ``dependence_tol`` of its norm counts as their
    combination. At most 10 m rounds (a guard against cycling at rounding level)."""
    m = G.shape[0]
    weights = torch.zeros(m, dtype=G.dtype)
    weights[0] = 1.0
    if m == 1:
        return weights
    S = G[1:, 1:]
    violation = taus * S.diagonal() - G[1:, 0]  # > 0 where g_1 itself violates constraint j
    mu = torch.zeros(m - 1, dtype=G.dtype)
    slack_tol = tol * max(float(G.diagonal().max()), torch.finfo(G.dtype).tiny)
    active: list[int] = []
    rounds, limit = 0, 10 * m
    while rounds < limit:
        slacks = S @ mu - violation
        slacks[active] = 0.0
        p = int(slacks.argmin())
        if float(slacks[p]) >= -slack_tol:
            break
        slack_p = slacks[p]
        while rounds < limit:
            rounds += 1
            if active:
                r = torch.linalg.solve(S[active][:, active], S[active, p])
                orthogonal_sq = S[p, p] - S[p, active] @ r
                ratios = torch.where(r > 0.0, mu[active] / r, torch.inf)
                k = int(ratios.argmin())
                partial = float(ratios[k])
            else:
                r = torch.zeros(0, dtype=G.dtype)
                orthogonal_sq = S[p, p]
                k, partial = -1, float("inf")
            full = float(-slack_p / orthogonal_sq) if orthogonal_sq > dependence_tol * S[p, p] else float("inf")
            step = min(partial, full)
            if step == float("inf"):
                return weights  # infeasible: the constraints are dropped
            mu[active] -= step * r
            mu[p] += step
            if full <= partial:
                active.append(p)
                break
            mu[active[k]] = 0.0
            del active[k]
            slack_p = S[p] @ mu - violation[p]
    weights[1:] = mu.clamp(min=0.0)
    return weights


class PCD(Aggregator):
    """Priority-constrained descent (Varam et al., TMLR 2026, "Not All Objectives Are Born Equal"): task 0
    is the primary objective. The update follows its (normalised) gradient as closely as possible,
    ``min_d |d - s_0 g_0|^2`` subject to every secondary task j getting at least ``tau_j`` of the
    first-order progress of a step along its own normalised gradient, ``<s_j g_j, d> >= tau_j |s_j g_j|^2``,
    then is rescaled to the norm of ``g_0``. ``s_t = 1 / sqrt(v_t + eps)``, ``v_t`` the bias-corrected EMA
    (decay ``beta``) of ``|g_t|^2`` over the calls. The QP is solved exactly in float64 by a dual
    active-set method on the Gram matrix (Goldfarb & Idnani), as torchjd's PCD does.

    Zero primary gradient: zero update. Infeasible constraints (two anti-parallel secondary gradients):
    dropped, the update is ``g_0``. ``tau``: a number or one value per secondary task, in [0, 1].
    Not symmetric in the tasks. Stateful (the EMA): :meth:`reset`, ``state_dict``; it restarts when T
    changes. Unbatched Gram matrices only (the EMA follows one sequence of calls).

    >>> import torch
    >>> from fastmtl.aggregation import PCD
    >>> J = torch.tensor([[1.0, 0.0], [-0.5, 1.0]], dtype=torch.float64)   # task 1 conflicts with task 0
    >>> w = PCD(tau=0.1)(J @ J.T)
    >>> bool((J @ (w @ J))[1] > 0)                                         # task 1 still progresses
    True
    """

    _checks_values_in_op = False

    def __init__(self, tau=0.02, beta: float = 0.999, eps: float = 1e-8):
        super().__init__()
        if isinstance(tau, torch.Tensor):
            if tau.dim() != 1 or not bool(((tau >= 0) & (tau <= 1)).all()):
                raise ValueError(
                    f"fastmtl.aggregation.PCD: argument 'tau' expected a number or a 1-D tensor with values in [0, 1], "
                    f"got {tau.tolist()}"
                )
            self.tau = tau.detach().to(torch.float64).clone()
        else:
            self.tau = check_scalar("PCD", "tau", tau, 0.0, 1.0)
        self.beta = check_scalar("PCD", "beta", beta, 0.0, 1.0)
        if self.beta >= 1:
            raise ValueError(f"fastmtl.aggregation.PCD: argument 'beta' expected a value in [0, 1), got {self.beta}")
        self.eps = check_scalar("PCD", "eps", eps)
        self.reset()

    def reset(self) -> None:
        self._ema = None
        self._steps = 0

    def forward(self, gram):
        if isinstance(gram, torch.Tensor) and gram.dim() == 3:
            raise ValueError(
                f"fastmtl.aggregation.PCD: argument 'gram' expected one Gram matrix [T, T] (PCD keeps a moving "
                f"average over one sequence of calls), got a batch of shape {list(gram.shape)}"
            )
        return super().forward(gram)

    def _taus(self, T):
        if isinstance(self.tau, torch.Tensor):
            if self.tau.shape[0] != T - 1:
                raise ValueError(
                    f"fastmtl.aggregation.PCD: argument 'tau' expected {T - 1} values (one per secondary task of "
                    f"'gram'), got {self.tau.shape[0]}"
                )
            return self.tau
        return torch.full((T - 1,), self.tau, dtype=torch.float64)

    def _weights(self, gram):
        G = gram[0].to("cpu", torch.float64)
        T = G.shape[0]
        taus = self._taus(T)
        norms_sq = G.diagonal()
        if self._ema is None or self._ema.shape[0] != T:
            self._ema, self._steps = torch.zeros(T, dtype=torch.float64), 0
        self._steps += 1
        self._ema = self.beta * self._ema + (1.0 - self.beta) * norms_sq
        denominators = (self._ema / (1.0 - self.beta**self._steps) + self.eps).sqrt()
        scales = torch.where(denominators > 0.0, 1.0 / denominators, torch.zeros_like(denominators))
        weights = torch.zeros(T, dtype=torch.float64)
        precision = 10.0 * torch.finfo(gram.dtype).eps  # the Gram's relative rounding
        if norms_sq[0] > 0.0:
            normalised = G * torch.outer(scales, scales)
            w = _primary_qp(normalised, taus, dependence_tol=max(1e-9, precision))
            direction_sq = w @ normalised @ w
            magnitude = (w.abs() @ normalised.diagonal().sqrt()) ** 2
            if direction_sq > precision * magnitude:  # else the direction is zero up to rounding
                weights = w * scales * (norms_sq[0] / direction_sq).sqrt()
        return weights.to(gram.device, gram.dtype)[None]

    def get_extra_state(self):
        return {"ema": self._ema, "steps": self._steps}

    def set_extra_state(self, state):
        self._ema, self._steps = state["ema"], state["steps"]

    def _hyperparameters(self):
        tau = self.tau.tolist() if isinstance(self.tau, torch.Tensor) else self.tau
        return {"tau": tau, "beta": self.beta, "eps": self.eps}
