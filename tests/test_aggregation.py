"""fastmtl.aggregation against torchjd 0.18 (at least 200 seeded Gramians per method, T in
{1, 2, 3, 8, 40}, six families: generic, rank-deficient, strongly conflicting, duplicated tasks, a zero
gradient, nearly singular), against exact QP solutions where torchjd is approximate, the methods'
properties, state, batching and bad input."""

import warnings

import numpy as np
import pytest
import quadprog
import torch
import torchjd.aggregation as tjd

import fastmtl.aggregation as agg
from aggregation_cases import KINDS, cases, gram, jacobian
from conftest import assert_rel_close

warnings.filterwarnings("ignore", module="cvxpy")
TS = (1, 2, 3, 8, 40)
CASES = cases(TS, per_T=40)  # 200 Gramians
assert len(CASES) >= 200


def _rel_update_error(w, reference_update, J):
    """|J^T w - reference| relative to the larger of the reference and the largest gradient."""
    scale = max(float(reference_update.norm()), float(J.norm(dim=1).max()), 1e-300)
    return float((w @ J - reference_update).norm()) / scale


def _cond_tolerance(G, base=1e-6):
    # Closed forms of nearly singular matrices lose digits with the condition number.
    return max(base, 1e-15 * float(torch.linalg.cond(G))) if G.shape[0] > 1 else base


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (lambda: agg.UPGrad(), lambda: tjd.UPGradWeighting()),
        (lambda: agg.DualProj(), lambda: tjd.DualProjWeighting()),
        (lambda: agg.UPGrad(pref_vector=None, reg_eps=1e-3), lambda: tjd.UPGradWeighting(
            projector=__import__("torchjd")._linalg.QuadprogProjector(reg_eps=1e-3))),
        (lambda: agg.IMTLG(), lambda: tjd.IMTLGWeighting()),
        (lambda: agg.AlignedMTL(), lambda: tjd.AlignedMTLWeighting()),
        (lambda: agg.AlignedMTL(scale_mode="median"), lambda: tjd.AlignedMTLWeighting(scale_mode="median")),
        (lambda: agg.AlignedMTL(scale_mode="rmse"), lambda: tjd.AlignedMTLWeighting(scale_mode="rmse")),
        (lambda: agg.Mean(), lambda: tjd.MeanWeighting()),
        (lambda: agg.Sum(), lambda: tjd.SumWeighting()),
    ],
    ids=["UPGrad", "DualProj", "UPGrad-reg1e-3", "IMTLG", "AlignedMTL-min", "AlignedMTL-median", "AlignedMTL-rmse",
         "Mean", "Sum"],
)
def test_gramian_weightings_match_torchjd(ours, theirs):
    for T, kind, seed, J, G in CASES:
        got, want = ours()(G), theirs()(G)
        tol = _cond_tolerance(G) if kind == "nearly_singular" else 1e-6
        assert_rel_close(got, want, tol, f"T={T} {kind} seed={seed}")


@pytest.mark.parametrize("seeded_global_rng", [True])
def test_pcgrad_and_random_match_torchjd_with_the_same_seed(seeded_global_rng):
    for T, kind, seed, J, G in CASES:
        torch.manual_seed(seed)
        want = tjd.PCGradWeighting()(G)
        torch.manual_seed(seed)
        assert_rel_close(agg.PCGrad()(G), want, 1e-9, f"PCGrad T={T} {kind}")
        torch.manual_seed(seed)
        want = tjd.Random()(J)
        torch.manual_seed(seed)
        assert_rel_close(agg.Random()(G) @ J, want, 1e-12, f"Random T={T} {kind}")


def test_gradvac_matches_torchjd_over_a_run_of_calls():
    # Stateful: the same sequence of Gramians through both, three calls each, same global seed.
    for T in TS:
        ours, theirs = agg.GradVac(beta=0.3), tjd.GradVacWeighting(beta=0.3)
        run = [c for c in CASES if c[0] == T]
        for step, (_, kind, seed, J, G) in enumerate(run):
            torch.manual_seed(seed)
            want = theirs(G)
            torch.manual_seed(seed)
            got = ours(G)
            assert_rel_close(got, want, 1e-9, f"GradVac T={T} step {step} {kind}")
        assert_rel_close(ours.targets, theirs._phi_t, 1e-9, f"GradVac targets T={T}")


def test_config_matches_torchjd_aggregation_of_the_jacobian():
    # torchjd has ConFIG only as an aggregator of the Jacobian: compare the updates.
    for T, kind, seed, J, G in CASES:
        want = tjd.ConFIG()(J)
        assert _rel_update_error(agg.ConFIG()(G), want, J) <= _cond_tolerance(G), f"T={T} {kind} seed={seed}"
    pref = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    J = jacobian(3, "generic", 1)
    assert _rel_update_error(agg.ConFIG(pref)(gram(J)), tjd.ConFIG(pref)(J), J) <= 1e-9


def test_constant_matches_torchjd():
    for T, kind, seed, J, G in CASES[::7]:
        w = torch.linspace(0.5, 2.0, T, dtype=torch.float64)
        assert_rel_close(agg.Constant(w)(G) @ J, tjd.Constant(w)(J), 1e-12)


def _exact_min_norm(G):
    T = G.shape[0]
    H = G.numpy() + 1e-13 * max(float(G.trace()), 1e-300) * np.eye(T)
    constraints = np.concatenate([np.ones((T, 1)), np.eye(T)], axis=1)
    return torch.from_numpy(quadprog.solve_qp(H, np.zeros(T), constraints, np.r_[1.0, np.zeros(T)], meq=1)[0])


def test_mgda_is_the_exact_min_norm_point_and_beats_torchjd_frank_wolfe():
    worst_tjd = 0.0
    for T, kind, seed, J, G in CASES:
        w = agg.MGDA()(G)
        assert float(w.min()) >= 0 and abs(float(w.sum()) - 1) <= 1e-12, (T, kind)
        exact = _exact_min_norm(G)
        assert _rel_update_error(w, exact @ J, J) <= 1e-8, f"T={T} {kind} seed={seed}"
        fw = tjd.MGDAWeighting()(G)
        assert float(w @ G @ w) <= float(fw @ G @ fw) + 1e-12 * float(G.diagonal().max())
        worst_tjd = max(worst_tjd, _rel_update_error(fw, exact @ J, J))
    assert worst_tjd > 1e-4  # torchjd's default tolerance is why it is not the oracle here


def _cagrad_objective(G, weights, c):
    # Recover w* from 1/T + s w* and evaluate b^T w + phi |g_w| on the trace-normalised Gram.
    T = G.shape[0]
    Gn = G / G.trace()
    w = weights - 1.0 / T
    w = w / w.sum()
    w = w.clamp_min(0) / w.clamp_min(0).sum()  # Clarabel's answers can sit 1e-10 outside the simplex
    return float(Gn.sum(1) @ w / T + c * (Gn.sum() / T**2).sqrt() * (w @ Gn @ w).clamp_min(0).sqrt())


@pytest.mark.parametrize("c", [0.4, 1.0])
def test_cagrad_matches_torchjd_to_clarabel_accuracy_and_is_no_worse(c):
    for T, kind, seed, J, G in CASES:
        got, want = agg.CAGrad(c)(G), tjd.CAGradWeighting(c)(G)
        # Clarabel solves to ~1e-9 in objective, which moves the update by up to ~1e-4.
        assert _rel_update_error(got, want @ J, J) <= 2e-3, f"T={T} {kind} seed={seed}"
        if T > 1 and float(got.abs().sum()) > 0 and float(want.abs().sum()) > 0:
            ours, theirs = _cagrad_objective(G, got, c), _cagrad_objective(G, want, c)
            assert ours <= theirs + 1e-12 * abs(theirs), (T, kind, seed)


def _solvable(kind):
    return kind in ("generic", "nearly_singular")


def test_nash_mtl_matches_torchjd_where_its_solver_converges():
    # torchjd's Nash-MTL (20 convex-concave rounds through cvxpy/ECOS) costs ~4 s per call at T = 40 and
    # fails at T = 1; it is compared on 200 Gramians at T in {2, 3, 8} and a few at T = 40. Where it does
    # not converge (residual of a (G a) = 1 above 1e-6) ours must still solve the system.
    compared = converged = 0
    nash_cases = cases((2, 3, 8), per_T=67, seed0=7) + cases((40,), per_T=1, seed0=7)
    for T, kind, seed, J, G in nash_cases:
        ours = agg.NashMTL(max_norm=0)(G)
        if _solvable(kind):
            # Our system is G + 1e-14 max(G_tt) I: the residual of the unregularised one is at that level.
            residual = (ours * (G @ ours) - 1).abs().max()
            assert float(residual) <= 1e-8 * float(ours.max() ** 2 * G.diagonal().max()), (T, kind, seed)
            theirs = tjd.NashMTL(n_tasks=T, max_norm=0).weighting(J)
            compared += 1
            if float((theirs * (G @ theirs) - 1).abs().max()) <= 1e-6:
                converged += 1
                assert _rel_update_error(ours, theirs @ J, J) <= 1e-5, (T, kind, seed)
        else:
            assert torch.isfinite(ours).all()
    assert compared >= 60 and converged >= compared // 4, (compared, converged)
    # With the default max_norm = 1 both scale the update down to norm 1.
    J = jacobian(3, "generic", 11)
    theirs = tjd.NashMTL(n_tasks=3)(J)
    assert _rel_update_error(agg.NashMTL()(gram(J)), theirs, J) <= 1e-5
    assert abs(float((agg.NashMTL()(gram(J)) @ J).norm()) - 1) <= 1e-12


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
def test_fairgrad_matches_torchjd_where_least_squares_converges(alpha):
    compared = 0
    for T, kind, seed, J, G in CASES:
        if not _solvable(kind) or T == 40 and seed % 2:  # least_squares at T = 40 is slow: half of them
            continue
        ours, theirs = agg.FairGrad(alpha)(G), tjd.FairGradWeighting(alpha)(G)
        target = ours ** (-1 / alpha)
        assert float(((G @ ours - target) / target).abs().max()) <= 1e-8, (T, kind, seed)
        if float((G @ theirs - theirs ** (-1 / alpha)).abs().max()) <= 1e-9 * float(G.diagonal().max()):
            compared += 1
            assert _rel_update_error(ours, theirs @ J, J) <= 1e-6, (T, kind, seed)
    assert compared >= 40
    assert_rel_close(agg.FairGrad(0.0)(CASES[50][4]), tjd.FairGradWeighting(0.0)(CASES[50][4]), 1e-12)


# ---- properties


def test_upgrad_update_conflicts_with_no_task():
    for T, kind, seed, J, G in CASES:
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


SCALE_INVARIANT = [agg.Mean, agg.Sum, agg.MGDA, agg.UPGrad, agg.DualProj, lambda: agg.PCGrad(seed=0), agg.CAGrad,
                   agg.IMTLG, agg.AlignedMTL, agg.ConFIG, lambda: agg.GradVac(eps=0.0, seed=0)]  # eps: absolute


@pytest.mark.parametrize("make", SCALE_INVARIANT)
@pytest.mark.parametrize("scale", [1e-2, 1e9])
def test_scale_invariant_methods(make, scale):
    # Down to where the trace falls below norm_eps (torchjd's "all gradients are zero"). Compared on the
    # update: where gradients are dependent, MGDA's weights are not unique but its point is.
    for T, kind, seed, J, G in CASES[::5]:
        J = J / G.trace().clamp_min(1e-300).sqrt()
        G = gram(J)
        tol = _cond_tolerance(G, 1e-9) if kind == "nearly_singular" else 1e-9
        assert _rel_update_error(make()(G * scale), make()(G) @ J, J) <= tol, f"T={T} {kind}"


def test_nash_and_fairgrad_scale_as_the_inverse_root():
    J = jacobian(4, "generic", 3)
    G = gram(J)
    assert_rel_close(agg.NashMTL(max_norm=0)(100 * G), agg.NashMTL(max_norm=0)(G) / 10, 1e-10)
    assert_rel_close(agg.FairGrad(1.0)(100 * G), agg.FairGrad(1.0)(G) / 10, 1e-10)


ALL = [agg.Mean, agg.Sum, lambda: agg.Constant(torch.ones(1)), lambda: agg.Random(seed=0), agg.MGDA, agg.UPGrad,
       agg.DualProj, lambda: agg.PCGrad(seed=0), lambda: agg.GradVac(seed=0), agg.CAGrad, agg.IMTLG, agg.AlignedMTL,
       agg.NashMTL, agg.ConFIG, agg.FairGrad]


@pytest.mark.parametrize("make", ALL)
def test_degenerate_gramians_give_finite_weights(make):
    g = torch.Generator().manual_seed(0)
    for T in (1, 2, 7, 128):
        if T > 1 and make is ALL[2]:
            continue
        J = torch.randn(T, 5, generator=g, dtype=torch.float64)
        for G in (torch.zeros(T, T, dtype=torch.float64), gram(J), gram(J.repeat(2, 1)[:T]), 1e-150 * gram(J),
                  1e150 * gram(J), gram(J).float()):
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
    for make, words in [(lambda: agg.UPGrad(pref_vector=torch.ones(2, 2)), "pref_vector"),
                        (lambda: agg.CAGrad(c=-1), "'c'"), (lambda: agg.GradVac(beta=2), "beta"),
                        (lambda: agg.NashMTL(update_weights_every=0), "update_weights_every"),
                        (lambda: agg.AlignedMTL(scale_mode="max"), "scale_mode"),
                        (lambda: agg.PCGrad(reduction="max"), "reduction"), (lambda: agg.FairGrad(-1), "alpha")]:
        with pytest.raises(ValueError, match=words):
            make()
    with pytest.raises(ValueError, match="pref_vector"):
        agg.UPGrad(pref_vector=torch.ones(3))(torch.eye(2))
    with pytest.raises(ValueError, match="'gram' expected 3 tasks"):
        agg.Constant(torch.ones(3))(torch.eye(2))


# ---- batches and state


@pytest.mark.parametrize("make", [agg.MGDA, agg.UPGrad, agg.DualProj, agg.CAGrad, agg.IMTLG, agg.AlignedMTL, agg.ConFIG,
                                  agg.FairGrad, lambda: agg.NashMTL(max_norm=0.5), lambda: agg.PCGrad(seed=3),
                                  lambda: agg.Random(seed=3), lambda: agg.GradVac(), agg.Mean])
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
    for make in (lambda: agg.GradVac(seed=1), lambda: agg.NashMTL(update_weights_every=3), lambda: agg.PCGrad(seed=1),
                 lambda: agg.Random(seed=1)):
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


def test_one_hundred_and_twenty_eight_tasks():
    # The solvers' documented range goes to T >= 128: check against torchjd (one Gram matrix each; its
    # Nash-MTL takes tens of seconds there, so ours is checked on its own system).
    J = jacobian(128, "conflicting", 128, P=300)
    G = gram(J)
    assert_rel_close(agg.UPGrad()(G), tjd.UPGradWeighting()(G), 1e-6, "UPGrad")
    assert _rel_update_error(agg.MGDA()(G), _exact_min_norm(G) @ J, J) <= 1e-8
    got, want = agg.CAGrad(0.5)(G), tjd.CAGradWeighting(0.5)(G)
    assert _rel_update_error(got, want @ J, J) <= 2e-3
    assert _cagrad_objective(G, got, 0.5) <= _cagrad_objective(G, want, 0.5) + 1e-12
    nash = agg.NashMTL(max_norm=0)(G)
    assert float((nash * (G @ nash) - 1).abs().max()) <= 1e-8
    for make in (agg.PCGrad, agg.GradVac, agg.IMTLG, agg.AlignedMTL, agg.ConFIG, agg.FairGrad, agg.DualProj):
        assert bool(torch.isfinite(make()(G)).all())
