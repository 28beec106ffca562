"""torchjd's property checks, written here, on every method of fastmtl.aggregation (enumerated from
``__all__``): the expected structure (all of them), and the properties each class declares in its
``properties`` (non-conflicting, permutation invariance, linearity under scaling), on seeded Jacobians.
Methods both libraries have declare what torchjd's tests check of them; a method declaring a property
it lacks fails here."""

import pytest
import torch

import fastmtl.aggregation as agg
from aggregation_cases import call, cases, gram

_REQUIRED = {
    "Constant": lambda T: dict(weights=torch.linspace(0.5, 1.5, T, dtype=torch.float64)),
    "Krum": lambda T: dict(n_byzantine=0),
    "TrimmedMean": lambda T: dict(trim_number=1 if T >= 3 else 0),
    "CRMOGM": lambda T: dict(aggregator=agg.UPGrad()),
}
METHODS = [
    name
    for name in agg.__all__
    if isinstance(getattr(agg, name), type)
    and issubclass(getattr(agg, name), agg.Aggregator)
    and name not in agg.INTERFACES
]
PROPERTIES = ("non_conflicting", "permutation_invariant", "linear_under_scaling")
TS = (1, 2, 3, 5, 8)
CASES = [c for c in cases(TS, per_T=12, seed0=500)]


# A property that holds for a setting other than the default: UPGrad is linear under scaling for its
# unregularised QP (reg_eps = 0, raised to 1e-11); the default reg_eps = 1e-4 moves it by ~1e-2.
_SETTINGS = {("UPGrad", "linear_under_scaling"): dict(reg_eps=0.0)}


def _make(name, T, prop=None):
    return getattr(agg, name)(**_REQUIRED.get(name, lambda T: {})(T), **_SETTINGS.get((name, prop), {}))


def _fits(name, T):
    return not (name == "Krum" and T < 3)


def _update(name, J, prop=None, seed=0):
    """(update, weights or None) of the method for the task gradients J [T, P] (a fresh instance: one
    call). Random methods draw from a global RNG seeded with ``seed``."""
    method = _make(name, J.shape[0], prop)
    torch.manual_seed(seed)
    if method.requires == "jacobian":
        return method(jacobian=J), None
    weights = call(method, gram(J))
    return weights @ J, weights


def test_every_method_is_enumerated_and_declares_known_properties():
    assert len(METHODS) >= 22
    for name in METHODS:
        cls = getattr(agg, name)
        assert cls.requires in agg.REQUIREMENTS, name
        assert set(cls.properties) <= set(PROPERTIES), name


@pytest.mark.filterwarnings(
    "ignore:.*Pareto-stationary"
)  # degenerate cases include stationary ones: said, tested in test_aggregation_robustness
@pytest.mark.parametrize("name", METHODS)
def test_expected_structure(name):
    for T, kind, _seed, J, _G in CASES:
        if not _fits(name, T):
            continue
        for dtype in (torch.float64, torch.float32):
            method = _make(name, T)
            out = call(
                method, {"gram": gram, "jacobian": lambda J: J, "cross_gram": gram}[method.requires](J.to(dtype))
            )
            expected = (J.shape[1],) if method.requires == "jacobian" else (T,)
            assert out.shape == expected and out.dtype == dtype, (name, T, kind)
            assert bool(torch.isfinite(out).all()), (name, T, kind, dtype)


def _with(prop):
    return [name for name in METHODS if prop in getattr(agg, name).properties]


@pytest.mark.parametrize("name", _with("non_conflicting"))
def test_non_conflicting(name):
    for T, kind, seed, J, G in CASES:
        if kind in ("duplicated", "nearly_singular", "rank_deficient") and name in ("NashMTL", "FairGrad"):
            continue  # no solution of G x = x^(-p) exists there; the weights are bounded, not balanced
        update, weights = _update(name, J, "non_conflicting")
        # Regularised dual-cone QPs concede reg_eps tr(G) |w_t| (UPGrad's documented bound).
        tolerance = (1e-4 * float(weights.abs().max()) + 1e-12) * float(G.trace())
        assert bool((J @ update >= -tolerance).all()), (name, T, kind, seed, (J @ update).min())


@pytest.mark.filterwarnings(
    "ignore:.*Pareto-stationary"
)  # degenerate cases include stationary ones: said, tested in test_aggregation_robustness
@pytest.mark.parametrize("name", _with("permutation_invariant"))
def test_permutation_invariant(name):
    for T, kind, seed, J, _G in CASES:
        if not _fits(name, T) or kind in ("duplicated", "nearly_singular"):
            continue  # ties (Krum) and non-unique weights: the update may legitimately pick another
        permutation = torch.randperm(T, generator=torch.Generator().manual_seed(seed))
        a, b = _update(name, J, "permutation_invariant")[0], _update(name, J[permutation], "permutation_invariant")[0]
        scale = max(float(a.norm()), float(J.norm(dim=1).max()))
        assert float((a - b).norm()) <= 1e-9 * scale, (name, T, kind, seed)


@pytest.mark.parametrize("name", _with("linear_under_scaling"))
def test_linear_under_scaling(name):
    for T, kind, seed, J, _G in CASES:
        g = torch.Generator().manual_seed(seed)
        c1, c2 = (
            torch.rand(T, generator=g, dtype=torch.float64) + 0.1,
            torch.rand(T, generator=g, dtype=torch.float64) + 0.1,
        )
        alpha, beta = 0.3, 1.7
        prop = "linear_under_scaling"
        combined = _update(name, (alpha * c1 + beta * c2)[:, None] * J, prop)[0]
        separate = alpha * _update(name, c1[:, None] * J, prop)[0] + beta * _update(name, c2[:, None] * J, prop)[0]
        tolerance = 1e-12 if name != "UPGrad" else 1e-7
        scale = max(float(separate.norm()), float(J.norm(dim=1).max()))
        assert float((combined - separate).norm()) <= tolerance * scale, (name, T, kind, seed)
