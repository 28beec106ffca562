"""Seeded families of task-gradient matrices J [T, P] and their Gram matrices, shared by the
aggregation tests: well-conditioned, rank-deficient, strongly conflicting, duplicated tasks, a zero
gradient, nearly singular."""

from __future__ import annotations

import torch

KINDS = ("generic", "rank_deficient", "conflicting", "duplicated", "zero_task", "nearly_singular")


def jacobian(T: int, kind: str, seed: int, P: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    P = P or max(2 * T, 12)
    J = torch.randn(T, P, generator=g, dtype=torch.float64) * torch.exp(
        torch.randn(T, 1, generator=g, dtype=torch.float64)
    )
    if kind == "rank_deficient" and T > 1:
        r = max(1, T // 2)
        J = torch.randn(T, r, generator=g, dtype=torch.float64) @ torch.randn(r, P, generator=g, dtype=torch.float64)
    elif kind == "conflicting" and T > 1:
        # A shared direction every task opposes to a different degree, plus small own parts.
        shared = torch.randn(1, P, generator=g, dtype=torch.float64)
        signs = torch.where(torch.arange(T) % 2 == 0, 1.0, -1.0).to(torch.float64)[:, None]
        J = signs * (1 + torch.rand(T, 1, generator=g, dtype=torch.float64)) * shared + 0.3 * J
    elif kind == "duplicated" and T > 1:
        J[T // 2 :] = J[: T // 2].repeat(2, 1)[: T - T // 2]  # the second half repeats the first
    elif kind == "zero_task" and T > 1:
        J[T // 2] = 0
    elif kind == "nearly_singular" and T > 1:
        J[-1] = J[0] + 1e-4 * torch.randn(P, generator=g, dtype=torch.float64)  # condition number ~1e8
    return J


def gram(J: torch.Tensor) -> torch.Tensor:
    G = J @ J.T
    return (G + G.T) / 2


def cases(Ts, per_T: int, seed0: int = 0):
    """(T, kind, seed, J, G) for every T, cycling through the kinds: per_T cases per T."""
    out = []
    for T in Ts:
        for k in range(per_T):
            kind = KINDS[k % len(KINDS)]
            seed = seed0 + 1000 * T + k
            J = jacobian(T, kind, seed)
            out.append((T, kind, seed, J, gram(J)))
    return out


def rel_update_error(w, reference_update, J):
    """|J^T w - reference| relative to the larger of the reference and the largest gradient."""
    scale = max(float(reference_update.norm()), float(J.norm(dim=1).max()), 1e-300)
    return float((w @ J - reference_update).norm()) / scale


def cond_tolerance(G, base=1e-6):
    # Closed forms of nearly singular matrices lose digits with the condition number.
    return max(base, 1e-15 * float(torch.linalg.cond(G))) if G.shape[0] > 1 else base


def call(method, x):
    """``method`` on ``x`` passed as what it requires (``gram=``, ``jacobian=`` or ``cross_gram=``)."""
    return method(**{getattr(method, "requires", "gram"): x})
