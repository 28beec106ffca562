"""Plain-PyTorch references of the aggregation ops (:mod:`fastmtl.ops.aggregation`): same functions,
same signatures, batched Gram matrices ``[N, T, T]``. Obvious rather than fast: the quadratic programs
are solved by enumerating supports (exact, small T only), projected-gradient iterations or textbook
Newton steps; the closed forms are written with ``torch.linalg``.
"""

from __future__ import annotations

import itertools

import torch

__all__ = [
    "dual_cone_projection",
    "dual_cone_weights",
    "min_norm_weights",
    "cagrad_weights",
    "power_system_weights",
    "pcgrad_weights",
    "gradvac_weights",
    "aligned_mtl_weights",
    "imtlg_weights",
    "config_weights",
]

_MAX_ENUMERATED_TASKS = 10


def _per_matrix(gram, fn, *batched):
    g = gram.detach().to(torch.float64)
    return torch.stack([fn(g[n], *(b[n] for b in batched)) for n in range(g.shape[0])]).to(gram.dtype)


def _input_eps(gram):
    return torch.finfo(gram.dtype).eps


def dual_cone_projection(gram, u, norm_eps=1e-4, reg_eps=1e-4):
    """min v^T H v s.t. v >= u by accelerated projected gradient (FISTA with fixed restarts: linear
    convergence), run for 30 restart periods: ~1e-13 for the regularised, trace-normalised H."""
    g = gram.detach().to(torch.float64)
    T = g.shape[-1]
    trace = g.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None]
    # Zero only for a zero Gram matrix or below norm_eps; reg_eps is raised to 1e-11 (as the op does).
    normalised = torch.where(trace > 0, g / trace.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(g))
    H = torch.where(trace < norm_eps, torch.zeros_like(g), normalised)
    H = H + max(reg_eps, 1e-11) * torch.eye(T, dtype=torch.float64)
    lower = u.detach().to(torch.float64)  # [N, K, T]
    eigenvalues = torch.linalg.eigvalsh(H)
    step = 1.0 / (2.0 * eigenvalues[:, -1])[:, None, None]
    # Restarting the momentum every few sqrt(condition number) steps makes FISTA converge linearly.
    period = int(4 * float((eigenvalues[:, -1] / eigenvalues[:, 0]).max()) ** 0.5) + 10
    v = lower.clone()
    y, t = v.clone(), 1.0
    for it in range(30 * period):
        v_next = torch.maximum(y - step * 2.0 * (y @ H), lower)  # H symmetric: (H y)^T = y^T H
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        y = v_next + ((t - 1) / t_next) * (v_next - v)
        v, t = v_next, t_next
        if it % period == 0:
            y, t = v.clone(), 1.0
    return v.to(u.dtype)


def dual_cone_weights(gram, pref, norm_eps=0.0, reg_eps=1e-4, each=True):
    """UPGrad (each: the sum over t of the projections of pref_t e_t) or DualProj (the projection of
    pref), through :func:`dual_cone_projection`; [T, T] with [T] or [N, T, T] with [N, T]."""
    single = gram.dim() == 2
    g, p = (gram[None], pref[None]) if single else (gram, pref)
    u = torch.diag_embed(p.to(torch.float64)) if each else p.to(torch.float64)[:, None, :]
    weights = dual_cone_projection(g, u, norm_eps, reg_eps).sum(dim=1).to(gram.dtype)
    return weights[0] if single else weights


def _affine_min_norm(G, support):
    """Weights on `support` of the minimum-norm point of its affine hull (least squares)."""
    k = len(support)
    Gs = G[support][:, support]
    kkt = torch.zeros(k + 1, k + 1, dtype=G.dtype)
    kkt[:k, :k] = Gs
    kkt[:k, k] = 1
    kkt[k, :k] = 1
    rhs = torch.zeros(k + 1, dtype=G.dtype)
    rhs[k] = 1
    return torch.linalg.lstsq(kkt, rhs.unsqueeze(1)).solution[:k, 0]


def _min_norm_by_enumeration(G):
    T = G.shape[0]
    if T > _MAX_ENUMERATED_TASKS:
        raise ValueError(
            f"fastmtl.reference.min_norm_weights enumerates supports: T <= {_MAX_ENUMERATED_TASKS}, got {T}"
        )
    best, best_value = None, float("inf")
    for size in range(1, T + 1):
        for support in itertools.combinations(range(T), size):
            alpha = _affine_min_norm(G, list(support))
            if bool((alpha < -1e-12).any()) or abs(float(alpha.sum()) - 1) > 1e-9:
                continue
            w = torch.zeros(T, dtype=G.dtype)
            w[list(support)] = alpha.clamp_min(0)
            value = float(w @ G @ w)
            if value < best_value - 1e-15 * float(G.diagonal().max()):
                best, best_value = w / w.sum(), value
    return best


def min_norm_weights(gram):
    """MGDA: every support's affine minimum-norm point with non-negative weights is a candidate; the
    smallest wins (exact; T <= 10)."""
    return _per_matrix(gram, _min_norm_by_enumeration)


def _cagrad_one(G, c, norm_eps):
    T = G.shape[0]
    trace = G.trace()
    if trace <= 0:  # scale-invariant: only an exactly zero Gram matrix means "all gradients zero"
        return torch.zeros(T, dtype=G.dtype)
    G = G / G.diagonal().max()
    G = G / G.trace()
    b = G.sum(1) / T
    phi = c * (G.sum() / T**2).clamp_min(0).sqrt()
    if phi <= 0:
        j = int(torch.argmin(b))
        return torch.full((T,), 1.0 / T, dtype=G.dtype) if G[j, j].sqrt() >= norm_eps else torch.zeros(T, dtype=G.dtype)
    if T > _MAX_ENUMERATED_TASKS:
        raise ValueError(f"fastmtl.reference.cagrad_weights enumerates supports: T <= {_MAX_ENUMERATED_TASKS}, got {T}")
    # On a support S the stationary points of b^T w + phi |g_w| (sum w = 1) are w = w_a + w_b / s with
    # s = phi / |g_w|; every non-negative one is feasible, so the best of them is the optimum.
    best, best_value = None, float("inf")
    # Where 0 is in the convex hull, the points with g_w = 0 are candidates of value <g_w, g_0> = 0
    # (the non-smooth part of the objective).
    mgda = _min_norm_by_enumeration(G)
    if float(mgda @ G @ mgda) <= 1e-24:
        best, best_value = mgda, 0.0
    for size in range(1, T + 1):
        for support in itertools.combinations(range(T), size):
            S = list(support)
            k = len(S)
            kkt = torch.zeros(k + 1, k + 1, dtype=G.dtype)
            kkt[:k, :k] = G[S][:, S]
            kkt[:k, k] = 1
            kkt[k, :k] = 1
            rhs = torch.zeros(k + 1, 2, dtype=G.dtype)
            rhs[k, 0] = 1  # w_a: affine min-norm point
            rhs[:k, 1] = -b[S]  # w_b: sum zero, G w_b + mu 1 = -b
            sol = torch.linalg.lstsq(kkt, rhs).solution[:k]
            w_a, w_b = torch.zeros(T, dtype=G.dtype), torch.zeros(T, dtype=G.dtype)
            w_a[S], w_b[S] = sol[:, 0], sol[:, 1]
            q_a, q_ab, q_b = float(w_a @ G @ w_a), float(w_a @ G @ w_b), float(w_b @ G @ w_b)
            c0 = q_b - float(phi) ** 2
            if q_a <= 0 or q_ab * q_ab - q_a * c0 < 0:
                continue
            s = (-q_ab + (q_ab * q_ab - q_a * c0) ** 0.5) / q_a
            if s <= 0:
                continue
            w = w_a + w_b / s
            if bool((w < -1e-12).any()):
                continue
            w = w.clamp_min(0)
            w = w / w.sum()
            value = float(b @ w + phi * (w @ G @ w).clamp_min(0).sqrt())
            if value < best_value:
                best, best_value = w, value
    if best is None:
        return torch.zeros(T, dtype=G.dtype)
    norm = (best @ G @ best).clamp_min(0).sqrt()
    if norm < norm_eps:
        return torch.zeros(T, dtype=G.dtype)
    return 1.0 / T + (phi / norm) * best


def cagrad_weights(gram, c, norm_eps=1e-4):
    """CAGrad by enumerating the supports of the simplex problem (exact; T <= 10)."""
    return _per_matrix(gram, lambda G: _cagrad_one(G, c, norm_eps))


def _power_one(G, p, rounding):
    T = G.shape[0]
    x = torch.zeros(T, dtype=G.dtype)
    max_diag = G.diagonal().max()
    if max_diag <= 0:
        return x
    active = G.diagonal() > 1e-14 * max_diag
    H = G[active][:, active]
    eye = torch.eye(int(active.sum()), dtype=G.dtype)
    # The op's positive-definite shift: the smallest max(1e-14, T rounding) max G_ii 4^k with H + shift/2 I
    # positive definite (here by its eigenvalues).
    shift = max(1e-14, T * rounding) * float(max_diag)
    while float(torch.linalg.eigvalsh(H + 0.5 * shift * eye)[0]) <= 0:
        shift *= 4.0
    H = H + shift * eye
    y = H.diagonal() ** (-1.0 / (1.0 + p))
    for _ in range(500):  # damped Newton with a fraction-to-boundary rule, plenty of steps
        residual = H @ y - y ** (-p)
        step = -torch.linalg.solve(H + torch.diag(p * y ** (-p - 1)), residual)
        t = min(1.0, float((-0.5 * y / step)[step < 0].min()) if bool((step < 0).any()) else 1.0)
        y = y + t * step
    x[active] = y
    return x


def power_system_weights(gram, exponent):
    """G x = x^(-exponent) by damped Newton steps (same regularisation and zero-gradient rule as the op)."""
    rounding = torch.finfo(gram.dtype).eps / 2
    return _per_matrix(gram, lambda G: _power_one(G, float(exponent), rounding))


def _pcgrad_one(G, order):
    T = G.shape[0]
    total = torch.zeros(T, dtype=G.dtype)
    for i in range(T):
        coeff = torch.zeros(T, dtype=G.dtype)
        coeff[i] = 1
        for j in order[i].tolist():
            if j == i or G[j, j] <= 0:
                continue
            inner = G[j] @ coeff
            if inner < 0:
                coeff[j] -= inner / G[j, j]
        total += coeff
    return total


def pcgrad_weights(gram, order):
    return _per_matrix(gram, _pcgrad_one, order)


def gradvac_weights(gram, order, targets, beta, eps):
    g = gram.detach().to(torch.float64)
    new_targets = targets.detach().to(torch.float64).clone()
    out = []
    for n in range(g.shape[0]):
        G, phi = g[n], new_targets[n]
        T = G.shape[0]
        C = torch.eye(T, dtype=G.dtype)
        for i in range(T):
            for j in order[n, i].tolist():
                cG = C[i] @ G
                norm_i = (cG @ C[i]).clamp_min(0).sqrt()
                norm_j = G[j, j].clamp_min(0).sqrt()
                denominator = norm_i * norm_j + eps
                cosine = cG[j] / denominator if denominator > 0 else torch.zeros((), dtype=G.dtype)
                target = phi[i, j].clone()
                correction_denominator = norm_j * (1 - target**2).clamp_min(0).sqrt() + eps
                if cosine < target and correction_denominator > 0:
                    w = norm_i * (
                        target * (1 - cosine**2).clamp_min(0).sqrt() - cosine * (1 - target**2).clamp_min(0).sqrt()
                    )
                    C[i, j] += w / correction_denominator
                phi[i, j] = (1 - beta) * target + beta * cosine
        out.append(C.sum(0))
    return torch.stack(out).to(gram.dtype), new_targets.to(targets.dtype)


def _aligned_one(G, pref, scale_mode, eps):
    T = G.shape[0]
    lam, V = torch.linalg.eigh(G)
    keep = lam > lam.max() * T * eps
    if not bool(keep.any()):
        return pref.clone()
    lam_r, V_r = lam[keep], V[:, keep]
    scale = {"min": lam_r.min(), "median": lam_r.median(), "rmse": lam_r.mean()}[scale_mode]
    B = scale.sqrt() * V_r @ torch.diag(lam_r.rsqrt()) @ V_r.T
    return B @ pref


def aligned_mtl_weights(gram, pref, scale_mode="min"):
    eps = _input_eps(gram)
    return _per_matrix(gram, lambda G, p: _aligned_one(G, p, scale_mode, eps), pref.to(torch.float64))


def _pinv_solve(A, b, eps):
    return torch.linalg.pinv(A, rtol=A.shape[0] * eps, hermitian=True) @ b


def _imtlg_one(G, eps):
    v = _pinv_solve(G, G.diagonal().clamp_min(0).sqrt(), eps)
    total = v.sum()
    return torch.zeros_like(v) if total.abs() <= 1e-12 * v.abs().sum() else v / total


def imtlg_weights(gram):
    eps = _input_eps(gram)
    return _per_matrix(gram, lambda G: _imtlg_one(G, eps))


def _config_one(G, pref, eps):
    norms = G.diagonal().clamp_min(0).sqrt()
    inv = torch.where(norms > 0, 1 / norms, torch.zeros_like(norms))
    C = inv[:, None] * G * inv[None, :]
    gamma = _pinv_solve(C, pref, eps)
    norm = (gamma @ C @ gamma).clamp_min(0).sqrt().clamp_min(1e-12)
    length = (norms * (C @ gamma)).sum()
    return inv * gamma * length / norm**2


def config_weights(gram, pref):
    eps = _input_eps(gram)
    return _per_matrix(gram, lambda G, p: _config_one(G, p, eps), pref.to(torch.float64))
