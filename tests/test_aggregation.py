"""fastmtl.aggregation's properties, state, batching and bad input on seeded Gramians (T in
{1, 2, 3, 8, 40}, six families: generic, rank-deficient, strongly conflicting, duplicated tasks, a zero
gradient, nearly singular). Needs neither torchjd nor quadprog: the comparisons with them are in
test_aggregation_torchjd.py."""

import pytest
import torch

import fastmtl.aggregation as agg
from aggregation_cases import KINDS, cases, gram, jacobian
from aggregation_cases import cond_tolerance as _cond_tolerance
from aggregation_cases import rel_update_error as _rel_update_error
from conftest import assert_rel_close

TS = (1, 2, 3, 8, 40)
CASES = cases(TS, per_T=40)  # 200 Gramians
assert len(CASES) >= 200

# ---- properties


def test_upgrad_update_conflicts_with_no_task():
    for T, kind, seed, _J, G in CASES:
        w = agg.UPGrad()(G)
        # Exact for the regularised problem: <g_t, update> >= -reg_eps tr(G) w_t.
        assert bool(torch.all(G @ w >= -1e-4 * G.trace() * w.abs() - 1e-12 * G.trace())), (T, kind, seed)
        if kind == "generic":
            w0 = agg.UPGrad(reg_eps=0.0)(G)
            assert bool(torch.all(G @ w0 >= -1e-10 * G.trace())), (T, kind, seed)


def test_pcgrad_without_conflicts_is_the_sum_or_the_mean():
    for T in TS:
        J = torch.rand(T, 10, generator=torch.Generator().manual_seed(T), dtype=torch.float64)  # all cosines > 0
        G = gram(J)
        assert torch.equal(agg.PCGrad(seed=0)(G), agg.Sum()(G))
        assert_rel_close(agg.PCGrad(seed=0, reduction="mean")(G), agg.Mean()(G), 1e-15)


SCALE_INVARIANT = [
    agg.Mean,
    agg.Sum,
    agg.MGDA,
    agg.UPGrad,
    agg.DualProj,
    lambda: agg.PCGrad(seed=0),
    agg.CAGrad,
    agg.IMTLG,
    agg.AlignedMTL,
    agg.ConFIG,
    lambda: agg.GradVac(eps=0.0, seed=0),
]  # eps: absolute


@pytest.mark.parametrize("make", SCALE_INVARIANT)
@pytest.mark.parametrize("scale", [1e-2, 1e9])
def test_scale_invariant_methods(make, scale):
    # Down to where the trace falls below norm_eps (torchjd's "all gradients are zero"). Compared on the
    # update: where gradients are dependent, MGDA's weights are not unique but its point is.
    for T, kind, _seed, J, G in CASES[::5]:
        J = J / G.trace().clamp_min(1e-300).sqrt()
        G = gram(J)
        tol = _cond_tolerance(G, 1e-9) if kind == "nearly_singular" else 1e-9
        assert _rel_update_error(make()(G * scale), make()(G) @ J, J) <= tol, f"T={T} {kind}"


def test_nash_and_fairgrad_scale_as_the_inverse_root():
    J = jacobian(4, "generic", 3)
    G = gram(J)
    assert_rel_close(agg.NashMTL(max_norm=0)(100 * G), agg.NashMTL(max_norm=0)(G) / 10, 1e-10)
    assert_rel_close(agg.FairGrad(1.0)(100 * G), agg.FairGrad(1.0)(G) / 10, 1e-10)


ALL = [
    agg.Mean,
    agg.Sum,
    lambda: agg.Constant(torch.ones(1)),
    lambda: agg.Random(seed=0),
    agg.MGDA,
    agg.UPGrad,
    agg.DualProj,
    lambda: agg.PCGrad(seed=0),
    lambda: agg.GradVac(seed=0),
    agg.CAGrad,
    agg.IMTLG,
    agg.AlignedMTL,
    agg.NashMTL,
    agg.ConFIG,
    agg.FairGrad,
]


@pytest.mark.filterwarnings(
    "ignore:.*Pareto-stationary"
)  # degenerate cases include stationary ones: said, tested in test_aggregation_robustness
@pytest.mark.parametrize("make", ALL)
def test_degenerate_gramians_give_finite_weights(make):
    g = torch.Generator().manual_seed(0)
    for T in (1, 2, 7, 128):
        if T > 1 and make is ALL[2]:
            continue
        J = torch.randn(T, 5, generator=g, dtype=torch.float64)
        for G in (
            torch.zeros(T, T, dtype=torch.float64),
            gram(J),
            gram(J.repeat(2, 1)[:T]),
            1e-150 * gram(J),
            1e150 * gram(J),
            gram(J).float(),
        ):
            w = make()(G)
            assert w.shape == (T,) and w.dtype == G.dtype and bool(torch.isfinite(w).all()), (T, G.dtype)


@pytest.mark.parametrize("make", ALL)
def test_bad_gram_raises_value_error_naming_it(make):
    method = make()
    G = gram(jacobian(1, "generic", 0))
    bad = [
        (torch.ones(3), ValueError, "gram"),
        (torch.ones(2, 3), ValueError, "square"),
        (torch.ones(1, 1, 2, 2), ValueError, "gram"),
        (torch.full((1, 1), float("nan")), ValueError, "finite"),
        (torch.tensor([[1.0]], dtype=torch.int64), TypeError, "dtype"),
        ([[1.0]], TypeError, "torch.Tensor"),
    ]
    for value, error, words in bad:
        with pytest.raises(error, match=words):
            method(value)
    if not isinstance(method, agg.Constant):
        with pytest.raises(ValueError, match="symmetric"):
            method(torch.tensor([[1.0, 0.5], [-0.5, 1.0]]))
    assert torch.isfinite(method(G)).all()


def test_bad_hyperparameters_raise_naming_them():
    for make, words in [
        (lambda: agg.UPGrad(pref_vector=torch.ones(2, 2)), "pref_vector"),
        (lambda: agg.CAGrad(c=-1), "'c'"),
        (lambda: agg.GradVac(beta=2), "beta"),
        (lambda: agg.NashMTL(update_weights_every=0), "update_weights_every"),
        (lambda: agg.AlignedMTL(scale_mode="max"), "scale_mode"),
        (lambda: agg.PCGrad(reduction="max"), "reduction"),
        (lambda: agg.FairGrad(-1), "alpha"),
    ]:
        with pytest.raises(ValueError, match=words):
            make()
    with pytest.raises(ValueError, match="pref_vector"):
        agg.UPGrad(pref_vector=torch.ones(3))(torch.eye(2))
    with pytest.raises(ValueError, match="'gram' expected 3 tasks"):
        agg.Constant(torch.ones(3))(torch.eye(2))


# ---- batches and state


@pytest.mark.parametrize(
    "make",
    [
        agg.MGDA,
        agg.UPGrad,
        agg.DualProj,
        agg.CAGrad,
        agg.IMTLG,
        agg.AlignedMTL,
        agg.ConFIG,
        agg.FairGrad,
        lambda: agg.NashMTL(max_norm=0.5),
        lambda: agg.PCGrad(seed=3),
        lambda: agg.Random(seed=3),
        lambda: agg.GradVac(),
        agg.Mean,
    ],
)
@pytest.mark.filterwarnings(
    "ignore:.*Pareto-stationary"
)  # degenerate cases include stationary ones: said, tested in test_aggregation_robustness
def test_batch_equals_one_matrix_at_a_time(make):
    grams = torch.stack([gram(jacobian(6, KINDS[n % 3], n)) for n in range(5)])
    batched_method, single_method = make(), make()
    torch.manual_seed(0)
    batched = batched_method(grams)
    torch.manual_seed(0)
    if isinstance(single_method, agg.GradVac):
        # Per-matrix EMA state: a fresh instance per matrix, drawing its orders from the same stream.
        singles = [agg.GradVac()(grams[n]) for n in range(5)]
    else:
        singles = [single_method(grams[n]) for n in range(5)]
    assert batched.shape == (5, 6)
    for n in range(5):
        assert_rel_close(batched[n], singles[n], 1e-12, f"matrix {n}")


def test_stateful_methods_round_trip_through_state_dict():
    Gs = [gram(jacobian(4, "conflicting", s)) for s in range(4)]
    for make in (
        lambda: agg.GradVac(seed=1),
        lambda: agg.NashMTL(update_weights_every=3),
        lambda: agg.PCGrad(seed=1),
        lambda: agg.Random(seed=1),
    ):
        original = make()
        original(Gs[0])
        original(Gs[1])
        restored = make()
        restored.load_state_dict(original.state_dict())
        assert torch.equal(restored(Gs[2]), original(Gs[2]))
        assert torch.equal(restored(Gs[3]), original(Gs[3]))


def test_gradvac_state_changes_the_weights_and_reset_clears_it():
    G = gram(jacobian(4, "conflicting", 2))
    vac = agg.GradVac(seed=0)
    first = vac(G)
    assert vac.targets.shape == (4, 4) and float(vac.targets.abs().sum()) > 0
    vac.reset()
    assert vac.targets is None
    vac._generator.manual_seed(0)
    assert torch.equal(vac(G), first)


def test_nash_mtl_reuses_its_weights_between_updates():
    J1, J2 = jacobian(3, "generic", 1), jacobian(3, "generic", 2)
    nash = agg.NashMTL(max_norm=0, update_weights_every=2)
    first = nash(gram(J1))
    assert torch.equal(nash(gram(J2)), first)  # reused
    assert not torch.equal(nash(gram(J2)), first)  # recomputed at the 3rd call
    clipped = agg.NashMTL(max_norm=0.1, update_weights_every=2)
    clipped(gram(J1))
    w = clipped(gram(J2))  # reused weights, clipped for the new Gram matrix
    assert abs(float((w @ J2).norm()) - 0.1) <= 1e-12


def test_gram_on_another_device_gives_weights_there(device):
    G = gram(jacobian(4, "conflicting", 5)).to(device)
    for make in (agg.UPGrad, agg.MGDA, agg.Mean, lambda: agg.PCGrad(seed=0), agg.NashMTL):
        w = make()(G)
        assert w.device == G.device
        assert_rel_close(w, make()(G.cpu()), 1e-12)
