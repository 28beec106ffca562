"""Regression tests of the aggregation defects found by torchjd's unit tests (issue 17) and the fuzz run
(issue 18): float32 Gram matrices of stationary Jacobians, ConFIG's float32 accuracy, T = 0 and empty
batches, scale invariance at every scale, reg_eps = 0 on rank-deficient Grams, negative diagonals, meta
tensors and bad hyperparameters."""

import math
import warnings

import pytest
import torch

import fastmtl
import fastmtl.aggregation as agg
from aggregation_cases import call, cases, gram, jacobian
from conftest import assert_rel_close

# One default instance of every method (the enumerating tests below add nothing by hand but the
# arguments a method has no default for).
_REQUIRED = {
    "Constant": lambda T: dict(weights=torch.ones(T)),
    "Krum": lambda T: dict(n_byzantine=0),
    "TrimmedMean": lambda T: dict(trim_number=0),
    "CRMOGM": lambda T: dict(aggregator=agg.UPGrad()),
}
METHOD_NAMES = [
    name
    for name in agg.__all__
    if isinstance(getattr(agg, name), type)
    and issubclass(getattr(agg, name), agg.Aggregator)
    and name not in agg.INTERFACES
]
GRAM_METHODS = [name for name in METHOD_NAMES if getattr(agg, name).requires == "gram"]


def make(name, T=3):
    return getattr(agg, name)(**_REQUIRED.get(name, lambda T: {})(T))


def given(method, J, seed=0):
    """What the method requires, for the task gradients J (a second batch's gradients: J + noise)."""
    if method.requires == "jacobian":
        return J
    if method.requires == "cross_gram":
        g = torch.Generator().manual_seed(seed)
        return J @ (J + 0.1 * torch.randn(J.shape, generator=g, dtype=J.dtype)).T
    return gram(J)


# ---- Nash-MTL and FairGrad on float32 Gram matrices of stationary Jacobians


STATIONARY = "no weights solve G x = x\\^\\(-.*Pareto-stationary"


def test_fairgrad_on_the_float32_gram_of_a_stationary_jacobian_does_not_conflict_and_says_so():
    J = torch.tensor([[0.1, 0.7], [-0.3, -2.1]], dtype=torch.float32)  # g_1 = -3 g_0: stationary
    for alpha in (0.1, 0.5, 1.0, 2.0):
        with pytest.warns(UserWarning, match=STATIONARY):
            update = agg.FairGrad(alpha=alpha)(J @ J.T) @ J
        # Before: [0.164, -0.493] at alpha = 0.1 (Newton stopped on an objective with no minimum). After:
        # ~1e-4 at alpha = 0.1, up to ~2e-3 at alpha = 2 (the weights grow as shift^(-1 / (1 + 1/alpha))).
        bound = (1e-3 if alpha == 0.1 else 1e-2) * float(J.norm(dim=1).max() ** 2)
        assert float((J @ update).abs().max()) <= bound, (alpha, update)
    with pytest.warns(UserWarning, match=STATIONARY):
        update = agg.NashMTL(max_norm=0)(J @ J.T) @ J
    assert float((J @ update).abs().max()) <= 1e-3 * float(J.norm(dim=1).max() ** 2)


def _is_stationary(J: torch.Tensor) -> bool:
    """Whether 0 is (to rounding) in the convex hull of the rows of J: MGDA's min-norm point is ~0."""
    w = agg.MGDA()(J.double() @ J.double().T)
    return float((w @ J.double()).norm()) <= 1e-6 * float(J.double().norm(dim=1).max())


def test_power_system_on_random_float32_jacobians_warns_exactly_where_stationary():
    # 20 random gradients in 10 dimensions: 0 is often in their convex hull. Before: update norms of 35-77.
    g = torch.Generator().manual_seed(0)
    seen = {True: 0, False: 0}
    for seed in range(20):
        J = torch.randn(20, 10, generator=g)
        G = J @ J.T
        stationary = _is_stationary(J)
        seen[stationary] += 1
        for method in [agg.NashMTL(max_norm=0)] + [agg.FairGrad(alpha) for alpha in (0.1, 0.5, 2.0, 5.0)]:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                w = method(G).double()
            said = [str(c.message) for c in caught if "Pareto-stationary" in str(c.message)]
            assert bool(said) == stationary, (seed, method, stationary, said)
            assert not [c for c in caught if "did not converge" in str(c.message)], (seed, method)
            assert bool(torch.isfinite(w).all())
            update = float((w @ J.double()).norm())
            if isinstance(method, agg.NashMTL):
                # At the solution of (G + shift) x = 1/x, x^T (G + shift) x = T: |update|^2 <= T (+ rounding).
                assert update <= math.sqrt(20) * 1.01, seed
            elif not stationary:
                # A solution exists, and the shift's rounding-level share leaves it where float64 puts it.
                exact = method(J.double() @ J.double().T) @ J.double()
                assert abs(update - float(exact.norm())) <= 0.05 * float(exact.norm()), (seed, method)
    assert seen[True] >= 3 and seen[False] >= 3  # both kinds are checked


def test_power_system_does_not_warn_on_ordinary_grams():
    checked = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _, kind, _, J, G in cases((2, 3, 8), per_T=20):
            if kind in ("zero_task", "duplicated", "rank_deficient") or _is_stationary(J):
                continue
            for method in (agg.NashMTL(max_norm=0), agg.FairGrad(0.5), agg.FairGrad(5.0)):
                method(G)
                method(G.float())
            checked += 1
    assert checked >= 30


def test_power_system_says_when_newton_does_not_converge():
    # x^(-1e300) is 0 or infinity for every x != 1 in double precision: Newton cannot reach the solution,
    # and the op says so (the residuals; the wrapper warns) instead of silently returning its last iterate.
    G = torch.tensor([[[1.0, 0.5], [0.5, 1.0]]], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastmtl.ops.power_system_weights(G, 1.0)
    weights, residuals, _ = torch.ops.fastmtl.power_system_weights(G, 1e300)
    assert float(residuals[0]) > 1e-9
    with pytest.warns(UserWarning, match="did not converge for 1 of 1"):
        fastmtl.ops.power_system_weights(G, 1e300)


@pytest.mark.filterwarnings("ignore:.*Pareto-stationary")  # said, and tested, above
def test_power_system_op_matches_the_reference_on_float32_stationary_grams():
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        J = torch.randn(6, 3, generator=g)
        G = (J @ J.T)[None]
        assert_rel_close(
            fastmtl.ops.power_system_weights(G, 1.0),
            fastmtl.reference.power_system_weights(G, 1.0),
            1e-4,
            "float32 stationary",
        )


# ---- ConFIG in float32: the documented bound


def test_config_float32_error_is_within_the_documented_bound():
    # Documented: the update from a float32 Gram matrix (of float32 gradients) is within 10 cond(C) u32
    # of the exact update (float64 throughout), relative, C the cosine matrix.
    u32 = torch.finfo(torch.float32).eps / 2
    worst_ratio = 0.0
    for T, kind, seed, J, G in cases((2, 3, 8), per_T=30):
        if kind in ("zero_task", "duplicated", "rank_deficient"):
            continue
        norms = G.diagonal().sqrt()
        cond = float(torch.linalg.cond(G / torch.outer(norms, norms)))
        exact = agg.ConFIG()(G) @ J
        got = agg.ConFIG()(gram(J.float())).double() @ J
        error = float((got - exact).norm() / exact.norm())
        assert error <= 10 * cond * u32, (T, kind, seed, error, cond)
        worst_ratio = max(worst_ratio, error / (cond * u32))
    assert worst_ratio > 0.01  # the bound is not vacuous


# ---- T = 0, empty batches


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_no_task_gives_empty_weights_or_a_zero_update_as_torchjd(name):
    if name in ("Krum", "TrimmedMean"):  # torchjd refuses too: they need 3 and 1 rows at least
        with pytest.raises(ValueError, match="T = 0"):
            call(make(name, 0), given(make(name, 0), torch.zeros(0, 5, dtype=torch.float64)))
        return
    method = make(name, 0)
    out = call(method, given(method, torch.zeros(0, 5, dtype=torch.float64)))
    if method.requires == "jacobian":
        assert out.shape == (5,) and not bool(out.any())
    else:
        assert out.shape == (0,)
    if method.requires == "gram" and name != "PCD":
        assert make(name, 0)(torch.zeros(4, 0, 0)).shape == (4, 0)


@pytest.mark.parametrize("name", [n for n in GRAM_METHODS if n not in ("PCD",)])
def test_a_batch_of_no_gram_matrices_gives_no_weights(name):
    method = make(name, 3)
    out = method(torch.zeros(0, 3, 3, dtype=torch.float64))  # PCGrad / GradVac failed in torch.stack
    assert out.shape == (0, 3) and out.dtype == torch.float64


# ---- scale invariance at every scale float64 can represent


SCALE_FREE = ["Mean", "Sum", "MGDA", "UPGrad", "DualProj", "CAGrad", "IMTLG", "AlignedMTL", "ConFIG"]


def test_small_gradients_keep_upgrad_non_conflicting_and_cagrad_nonzero():
    J = torch.tensor([[1.0, 0.0], [-2.0, 0.1]], dtype=torch.float64) * 1e-3  # tr(G) = 5e-6 < 1e-4
    G = gram(J)
    for method in (agg.UPGrad(), agg.DualProj()):
        w = method(G)
        # Before: the mean, whose update conflicts with task 0. Now the weights of the unscaled problem,
        # within the documented bound of the regularised QP, <g_t, update> >= -reg_eps tr(G) |w_t|.
        assert_rel_close(w, method(G * 1e6), 1e-9, type(method).__name__)
        assert bool((G @ w >= -1e-4 * float(G.trace()) * w.abs() - 1e-15 * float(G.trace())).all()), G @ w
    assert float(agg.Mean()(G) @ G @ torch.tensor([1.0, 0.0], dtype=torch.float64)) < 0  # the mean conflicts
    assert float(agg.CAGrad()(G).abs().sum()) > 0  # before: zeros
    assert_rel_close(agg.CAGrad()(G), agg.CAGrad()(G * 1e6), 1e-9)


@pytest.mark.parametrize("name", SCALE_FREE)
def test_scale_invariance_at_every_representable_scale(name):
    # Down to 1e-290: below, the entries of a normalised Gram matrix become subnormal and lose digits.
    for T, kind, _seed, _J, G in cases((2, 3, 8), per_T=12):
        G = G / G.diagonal().max()
        reference = make(name, T)(G)
        for scale in (1e-290, 1e-200, 1e-100, 1e-20, 1e20, 1e100, 1e200, 1e300):
            w = make(name, T)(G * scale)
            assert bool(torch.isfinite(w).all()), (name, T, kind, scale)
            tolerance = 1e-6 if kind != "nearly_singular" else 1e-3
            assert float((w - reference).abs().max()) <= tolerance * max(1.0, float(reference.abs().max())), (
                name,
                T,
                kind,
                scale,
                w,
                reference,
            )
            if name == "MGDA":
                assert float(w.min()) >= 0 and abs(float(w.sum()) - 1) <= 1e-12, (T, kind, scale)
            if name == "UPGrad":
                trace = float(G.trace())  # the documented bound: <g_t, update> >= -reg_eps tr(G) |w_t|
                assert bool((G @ w >= -1e-4 * trace * w.abs() - 1e-12 * trace).all()), (T, kind, scale)


# ---- reg_eps = 0 on rank-deficient Gram matrices


@pytest.mark.parametrize("method", [agg.UPGrad, agg.DualProj])
def test_zero_regularisation_on_a_rank_deficient_gram_gives_no_conflict(method):
    J = torch.tensor([[1.0], [-1.0], [-1.0]], dtype=torch.float64)  # the dual cone is {0}
    G = gram(J)
    w = method(reg_eps=0.0)(G)
    assert bool((G @ w >= -1e-10 * float(G.trace())).all()), G @ w  # before: [1/3, -1/3, -1/3]
    for T, kind, seed, _J, G in cases((3, 8), per_T=12):
        if kind in ("rank_deficient", "duplicated", "zero_task"):
            w = method(reg_eps=0.0)(G)
            assert bool((G @ w >= -1e-9 * float(G.trace())).all()), (T, kind, seed)


# ---- refused input


@pytest.mark.parametrize("name", GRAM_METHODS)
def test_a_negative_diagonal_is_refused(name):
    G = torch.tensor([[1.0, 0.0], [0.0, -0.5]], dtype=torch.float64)
    method = make(name, 2) if name != "Krum" else make(name, 3)
    if name == "Krum":
        G = torch.diag(torch.tensor([1.0, 1.0, -0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="non-negative diagonal"):
        method(G)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_meta_tensors_are_refused_naming_the_argument(name):
    method = make(name, 3)
    value = given(method, torch.ones(3, 4, dtype=torch.float64)).to("meta")
    owner = "UPGrad" if name == "CRMOGM" else name  # CR-MOGM hands its input to the method it wraps
    with pytest.raises(ValueError, match=f"{owner}: argument '{method.requires}'.*meta"):
        call(method, value)


@pytest.mark.parametrize(
    "op, args",
    [
        ("config_weights", lambda G: (G, torch.ones(1, 3, device="meta", dtype=torch.float64))),
        ("aligned_mtl_weights", lambda G: (G.to("meta"), torch.ones(1, 3, dtype=torch.float64), "min")),
        ("pcgrad_weights", lambda G: (G, torch.arange(3).repeat(1, 3, 1).to("meta"))),
        ("dual_cone_projection", lambda G: (G.to("meta"), torch.eye(3, dtype=torch.float64)[None], 1e-4, 1e-4)),
        (
            "gradvac_weights",
            lambda G: (
                G,
                torch.tensor([[[1, 2], [0, 2], [0, 1]]]),
                torch.zeros(1, 3, 3, device="meta", dtype=torch.float64),
                0.5,
                1e-8,
            ),
        ),
    ],
)
def test_cpu_and_meta_mixed_in_an_op_are_refused(op, args):
    G = gram(jacobian(3, "generic", 0))[None]
    with pytest.raises(ValueError, match=f"fastmtl.{op}: .*meta"):
        getattr(fastmtl.ops, op)(*args(G))  # before: uninitialised memory as weights
    all_meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args(G)]
    out = getattr(fastmtl.ops, op)(*all_meta)  # shapes only, as for torch.compile
    assert (out[0] if isinstance(out, tuple) else out).device.type == "meta"


@pytest.mark.parametrize(
    "make_bad, error, words",
    [
        (lambda: agg.CAGrad(c=float("inf")), ValueError, "CAGrad: argument 'c' expected a finite value"),
        (lambda: agg.CAGrad(c="0.4"), TypeError, "CAGrad: argument 'c' expected a real number, got str"),
        (lambda: agg.CAGrad(c=True), TypeError, "CAGrad: argument 'c'"),
        (lambda: agg.UPGrad(reg_eps=float("nan")), ValueError, "UPGrad: argument 'reg_eps'"),
        (lambda: agg.NashMTL(max_norm=float("inf")), ValueError, "NashMTL: argument 'max_norm'"),
        (lambda: agg.Constant("abc"), TypeError, "Constant: argument 'weights' expected"),
        (lambda: agg.Random(seed="x"), TypeError, "Random: argument 'seed' expected an int or None, got str"),
        (lambda: agg.PCGrad(seed=1.5), TypeError, "PCGrad: argument 'seed'"),
        (lambda: agg.Krum(n_byzantine=-1), ValueError, "Krum: argument 'n_byzantine'"),
        (lambda: agg.TrimmedMean(trim_number="2"), TypeError, "TrimmedMean: argument 'trim_number'"),
        (lambda: agg.CRMOGM(agg.GradDrop()), ValueError, "CRMOGM: argument 'aggregator'"),
        (lambda: agg.CRMOGM(agg.MGDA(), alpha=1.5), ValueError, "CRMOGM: argument 'alpha'"),
        (lambda: agg.MoDo(gamma=0), ValueError, "MoDo: argument 'gamma'"),
        (lambda: agg.SDMGrad(momentum=1.0), ValueError, "SDMGrad: argument 'momentum'"),
        (lambda: agg.PCD(tau=2.0), ValueError, "PCD: argument 'tau'"),
        (lambda: agg.GradDrop(f=3), TypeError, "GradDrop: argument 'f'"),
        (lambda: agg.ExcessMTL(robust_step_size=0), ValueError, "ExcessMTL: argument 'robust_step_size'"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_class_and_argument(make_bad, error, words):
    with pytest.raises(error, match=words):
        make_bad()


def test_aligned_mtl_invalid_scale_mode_message():
    with pytest.raises(ValueError, match=r"Invalid scale_mode='max', expected one of 'min', 'median', 'rmse'"):
        agg.AlignedMTL(scale_mode="max")


def test_power_system_op_returns_the_shift_share_per_matrix():
    stationary = torch.tensor([[0.1, 0.7], [-0.3, -2.1]], dtype=torch.float64)  # g_1 = -3 g_0
    ordinary = torch.tensor([[1.0, 0.2], [0.3, 1.0]], dtype=torch.float64)
    grams = torch.stack([stationary @ stationary.T, ordinary @ ordinary.T])
    for exponent in (1.0, 0.2, 10.0):
        weights, residuals, shares = torch.ops.fastmtl.power_system_weights(grams, exponent)
        assert shares.shape == (2,) and shares.dtype == torch.float64
        assert float(shares[0]) > 0.99 and abs(float(shares[1])) < 1e-9, (exponent, shares)
        # The share is d |x|^2 / sum_t x_t^(1-p) at the solution, recomputed here from the weights.
        x = weights[1]
        expected = 1 - float(x @ grams[1] @ x) / float((x ** (1 - exponent)).sum())
        assert abs(float(shares[1]) - expected) <= 1e-12
