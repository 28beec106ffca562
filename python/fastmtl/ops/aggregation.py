"""The aggregation ops: batches of Gram matrices ``gram [N, T, T]`` (``G[s, t] = <g_s, g_t>``) to task
weights ``[N, T]``, solved in double precision on the CPU by ``csrc/cpu/aggregation/``; results come
back in the Gram's dtype and on its device. The classes of :mod:`fastmtl.aggregation` call these;
:mod:`fastmtl.reference` has plain-PyTorch versions of each.

The weights of an aggregation method are constants of the update (no method differentiates through
them), so these ops have no derivative: their autograd kernel (C++) refuses inputs that require grad,
with a message saying to detach them.

>>> import torch, fastmtl
>>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)   # two conflicting gradients
>>> w = fastmtl.ops.min_norm_weights((J @ J.T)[None])[0]                # MGDA
>>> [round(x, 12) for x in w.tolist()], [round(x, 12) for x in (w @ J).tolist()]  # the min-norm point
([0.6, 0.4], [0.2, 0.4])
"""

from __future__ import annotations

import warnings

import torch

from .. import _C

__all__ = [
    "dual_cone_projection",
    "dual_cone_weights",
    "dual_cone_weights_unbatched",
    "min_norm_weights",
    "cagrad_weights",
    "power_system_weights",
    "pcgrad_weights",
    "gradvac_weights",
    "aligned_mtl_weights",
    "imtlg_weights",
    "config_weights",
]

# The OpOverload (.default) is called directly: resolving the overload packet costs microseconds per
# call, a visible share for these small problems.
_fastmtl = torch.ops.fastmtl


def dual_cone_projection(gram: torch.Tensor, u: torch.Tensor, norm_eps: float = 1e-4, reg_eps: float = 1e-4):
    """For each ``u [N, K, T]``: the ``v >= u`` minimising ``v^T H v``, ``H = G / tr(G) + reg_eps I``
    (``G / tr(G)`` is replaced by 0 when ``tr(G) < norm_eps``). ``J^T v`` is the projection of ``J^T u``
    onto the dual cone of the gradients (Quinton & Rey 2024, Prop. 1): UPGrad and DualProj."""
    return _fastmtl.dual_cone_projection.default(gram, u, norm_eps, reg_eps)


def dual_cone_weights(
    gram: torch.Tensor, pref: torch.Tensor, norm_eps: float = 0.0, reg_eps: float = 1e-4, each: bool = True
) -> torch.Tensor:
    """UPGrad's (``each``: the sum of the projections of ``pref_t g_t``) or DualProj's (the projection of
    ``sum_t pref_t g_t``) weights in one call: ``gram [T, T]`` with ``pref [T]``, or ``[N, T, T]`` with
    ``[N, T]``. Same QP and normalisation as :func:`dual_cone_projection`."""
    return _fastmtl.dual_cone_weights.default(gram, pref, norm_eps, reg_eps, each)


#: UPGrad's (``each``) or DualProj's weights ``[T]`` of one plain CPU Gram matrix ``[T, T]`` without the
#: dispatcher (``csrc/binding/unbatched_aggregation.cpp``): the checks, normalisation and solver of
#: :func:`dual_cone_weights`, ``pref=None`` for ``1/T`` each. Returns None where the call has to go
#: through the op (not an exact CPU tensor, requires grad, functorch-wrapped, a Python dispatch mode
#: active, ``T = 0``, ``pref`` not ``[T]``). Not traceable by torch.compile: callers use the op there.
#: Called directly (no Python frame around it): the point is a call of a few microseconds.
dual_cone_weights_unbatched = _C.dual_cone_weights_unbatched


def min_norm_weights(gram: torch.Tensor) -> torch.Tensor:
    """MGDA: weights on the simplex of the minimum-norm point of the convex hull of the gradients."""
    return _fastmtl.min_norm_weights.default(gram)


def cagrad_weights(gram: torch.Tensor, c: float, norm_eps: float = 1e-4) -> torch.Tensor:
    """CAGrad's weights, ``1/T + (phi/|g_w|) w`` with ``w`` minimising ``b^T w + phi |g_w|`` on the simplex."""
    return _fastmtl.cagrad_weights.default(gram, c, norm_eps)


#: The relative residual of G x = x^(-p) above which Newton's method counts as not converged.
POWER_SYSTEM_TOLERANCE = 1e-9

#: The shift share (the op's third output: how much of x^T (G + d I) x the positive-definite shift d I
#: holds) above which no x solves G x = x^(-p): the gradients are Pareto-stationary (a convex
#: combination of them is zero). Measured: ~1 on stationary Jacobians, float32 or float64, every
#: exponent; below 0.02 on all others (1e-13 to 1e-5 mostly).
SHIFT_BOUND_SHARE = 0.5


def power_system_weights(gram: torch.Tensor, exponent: float) -> torch.Tensor:
    """The ``x > 0`` with ``G x = x^(-exponent)``: Nash-MTL (exponent 1) and FairGrad (exponent 1/alpha),
    on the positive-definite-shifted Gram matrix (``csrc/cpu/aggregation/power_system.h``). Warns
    (UserWarning) where Newton's method did not converge, and where the system has no solution and the
    weights are held finite only by the shift (Pareto-stationary gradients: the weights grow as the
    shift shrinks, and the update is of the order of the Gram matrix's rounding, not a direction). The
    op itself returns the residuals and the shift shares too."""
    weights, residuals, shift_shares = _fastmtl.power_system_weights.default(gram, exponent)
    if residuals.device.type != "meta" and residuals.numel() and not torch.compiler.is_compiling():
        worst = float(residuals.max())
        if not worst <= POWER_SYSTEM_TOLERANCE:
            failed = int((~(residuals <= POWER_SYSTEM_TOLERANCE)).sum())
            warnings.warn(
                f"fastmtl.power_system_weights: Newton's method did not converge for {failed} of {residuals.numel()} "
                f"Gram matrices (largest relative residual {worst:.3g}, matrix {int(residuals.argmax())}); their "
                f"weights are the last iterate, not a solution of G x = x^(-{exponent})",
                stacklevel=2,
            )
        if float(shift_shares.max()) > SHIFT_BOUND_SHARE:
            bound = shift_shares > SHIFT_BOUND_SHARE
            first = int(bound.nonzero()[0, 0])
            warnings.warn(
                f"fastmtl.power_system_weights: for {int(bound.sum())} of {bound.numel()} Gram matrices (first: "
                f"matrix {first}) no weights solve G x = x^(-{exponent}): the gradients are (nearly) Pareto-stationary "
                f"(a convex combination of them is zero). The weights (largest {float(weights[first].max()):.3g}) "
                f"are held finite only by the positive-definite shift of the Gram matrix, and the update is of the "
                f"order of its rounding, not a direction to follow",
                stacklevel=2,
            )
    return weights


def pcgrad_weights(gram: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """PCGrad's update as weights; ``order [N, T, T]`` (int64): the visiting order of the tasks for each task."""
    return _fastmtl.pcgrad_weights.default(gram, order)


def gradvac_weights(gram, order, targets, beta: float, eps: float):
    """GradVac's update as weights and the updated EMA cosine targets; ``order [N, T, T - 1]`` lists the
    other tasks of each task, ``targets [N, T, T]``. Returns ``(weights [N, T], new_targets [N, T, T])``."""
    return _fastmtl.gradvac_weights.default(gram, order, targets, beta, eps)


def aligned_mtl_weights(gram: torch.Tensor, pref: torch.Tensor, scale_mode: str = "min") -> torch.Tensor:
    """Aligned-MTL: ``sqrt(scale) V diag(lambda^-1/2) V^T pref`` over the Gram's non-null eigenpairs."""
    return _fastmtl.aligned_mtl_weights.default(gram, pref, scale_mode)


def imtlg_weights(gram: torch.Tensor) -> torch.Tensor:
    """IMTL-G: ``v / sum(v)`` with ``v = G^+ d``, ``d_i = |g_i|`` (zeros when ``sum(v)`` vanishes)."""
    return _fastmtl.imtlg_weights.default(gram)


def config_weights(gram: torch.Tensor, pref: torch.Tensor) -> torch.Tensor:
    """ConFIG: the direction with the same cosine ``pref_i`` to every unit gradient, scaled to
    ``sum_i <g_i, u/|u|>``, as weights of the gradients."""
    return _fastmtl.config_weights.default(gram, pref)


# Fake kernels: shapes only, for torch.compile, opcheck and the meta device. A CPU (or CUDA) tensor mixed
# with a meta one also dispatches here; without a check the caller would get new_empty's uninitialised
# memory as weights. All-meta (shapes only) and fake tensors (any devices: the ops copy to the CPU) pass.
def _check_devices(op: str, **tensors) -> None:
    on_meta = [name for name, t in tensors.items() if t.device.type == "meta"]
    if on_meta and len(on_meta) < len(tensors):
        others = ", ".join(f"'{name}' on {t.device}" for name, t in tensors.items() if t.device.type != "meta")
        raise ValueError(
            f"fastmtl.{op}: arguments on the meta device cannot be mixed with tensors that have values: "
            f"{', '.join(repr(n) for n in on_meta)} on meta, {others}"
        )


def _weights_like(gram):
    return gram.new_empty(gram.shape[:2])


@torch.library.register_fake("fastmtl::min_norm_weights")
def _min_norm_weights_fake(gram):
    return _weights_like(gram)


@torch.library.register_fake("fastmtl::imtlg_weights")
def _imtlg_weights_fake(gram):
    return _weights_like(gram)


@torch.library.register_fake("fastmtl::cagrad_weights")
def _cagrad_weights_fake(gram, c, norm_eps):
    return _weights_like(gram)


@torch.library.register_fake("fastmtl::power_system_weights")
def _power_system_weights_fake(gram, exponent):
    per_matrix = gram.new_empty(gram.shape[:1], dtype=torch.float64)
    return _weights_like(gram), per_matrix, per_matrix.clone()


@torch.library.register_fake("fastmtl::pcgrad_weights")
def _pcgrad_weights_fake(gram, order):
    _check_devices("pcgrad_weights", gram=gram, order=order)
    return _weights_like(gram)


@torch.library.register_fake("fastmtl::aligned_mtl_weights")
def _aligned_mtl_weights_fake(gram, pref, scale_mode):
    _check_devices("aligned_mtl_weights", gram=gram, pref=pref)
    return _weights_like(gram)


@torch.library.register_fake("fastmtl::config_weights")
def _config_weights_fake(gram, pref):
    _check_devices("config_weights", gram=gram, pref=pref)
    return _weights_like(gram)


@torch.library.register_fake("fastmtl::dual_cone_projection")
def _dual_cone_projection_fake(gram, u, norm_eps, reg_eps):
    _check_devices("dual_cone_projection", gram=gram, u=u)
    return u.new_empty(u.shape)


@torch.library.register_fake("fastmtl::gradvac_weights")
def _gradvac_weights_fake(gram, order, targets, beta, eps):
    _check_devices("gradvac_weights", gram=gram, order=order, targets=targets)
    return _weights_like(gram), targets.new_empty(targets.shape)


@torch.library.register_fake("fastmtl::dual_cone_weights")
def _dual_cone_weights_fake(gram, pref, norm_eps, reg_eps, each):
    _check_devices("dual_cone_weights", gram=gram, pref=pref)
    return gram.new_empty(gram.shape[:-1])
