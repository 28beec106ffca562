"""The aggregation ops (fastmtl.ops.aggregation) against fastmtl.reference, opcheck, batching, dtypes,
devices and bad input. The classes of fastmtl.aggregation, torchjd and the methods' properties are
tested in test_aggregation.py."""

import pytest
import torch

import fastmtl
from aggregation_cases import KINDS, cases, gram, jacobian
from conftest import assert_rel_close

ops, ref = fastmtl.ops, fastmtl.reference


def _order(T, seed, exclude_self):
    g = torch.Generator().manual_seed(seed)
    if exclude_self:
        return torch.stack(
            [
                torch.tensor([j for j in range(T) if j != i], dtype=torch.int64)[torch.randperm(T - 1, generator=g)]
                for i in range(T)
            ]
        )[None]
    return torch.stack([torch.randperm(T, generator=g) for _ in range(T)])[None]


def _pref(T, seed):
    return torch.rand(1, T, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.1


# name -> (op args after gram, reference args after gram); T <= 8 so that the enumerating references run.
def _calls(T, seed):
    u = torch.diag_embed(_pref(T, seed))
    targets = torch.rand(1, T, T, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) - 0.5
    return {
        "dual_cone_projection": (u, 1e-4, 1e-4),
        "dual_cone_weights": (_pref(T, seed), 1e-4, 1e-4, True),
        "min_norm_weights": (),
        "cagrad_weights": (0.5, 1e-4),
        "power_system_weights": (0.7,),
        "pcgrad_weights": (_order(T, seed, False),),
        "gradvac_weights": (_order(T, seed, True), targets, 0.3, 1e-8),
        "aligned_mtl_weights": (_pref(T, seed), "median"),
        "imtlg_weights": (),
        "config_weights": (_pref(T, seed),),
    }


OPS = list(_calls(2, 0))
# The minimum-norm point is unique, its weights not (dependent gradients): compare J^T w there.
COMPARE_POINTS = {"min_norm_weights", "cagrad_weights"}
# Nash/FairGrad have no finite solution when a convex combination of gradients vanishes.
UNSOLVABLE = {"power_system_weights": {"rank_deficient", "duplicated", "conflicting"}}


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("T", [1, 2, 3, 8])
def test_op_matches_reference_in_float64(name, T):
    for _, kind, seed, J, G in cases([T], per_T=len(KINDS)):
        if kind in UNSOLVABLE.get(name, ()):
            continue
        args = _calls(T, seed)[name]
        got = getattr(ops, name)(G[None], *args)
        want = getattr(ref, name)(G[None], *args)
        if name == "gradvac_weights":
            # A rank-deficient Gram's cosines divide rounding-sized entries by rounding-sized norms:
            # the op (C++) and the reference (ATen) round differently there, by ~1e-7 relative.
            target_tol = 1e-6 if kind == "rank_deficient" else 1e-9
            assert_rel_close(got[1], want[1], target_tol, f"{name} targets {kind}")
            got, want = got[0], want[0]
        if name in COMPARE_POINTS:
            got, want, scale = got[0] @ J, want[0] @ J, J.norm(dim=1).max()
            assert float((got - want).norm()) <= 1e-9 * float(scale), f"{name} {kind} T={T}"
        else:
            tol = 1e-7 if name.startswith("dual_cone") else 1e-9  # the reference iterates
            if kind == "nearly_singular":  # rounding errors grow with the condition number (~1e8)
                tol = max(tol, 1e-15 * float(torch.linalg.cond(G)))
            assert_rel_close(got, want, tol, f"{name} {kind} T={T}")


@pytest.mark.parametrize(
    "name",
    [
        "dual_cone_projection",
        "power_system_weights",
        "pcgrad_weights",
        "aligned_mtl_weights",
        "imtlg_weights",
        "config_weights",
        "gradvac_weights",
    ],
)
def test_op_scales_to_many_tasks(name):
    # T = 40 and 128: the iterative/closed-form references still run; results agree.
    for T in (40, 128):
        J = jacobian(T, "generic", T, P=3 * T)
        G = gram(J)
        args = _calls(T, T)[name]
        got, want = getattr(ops, name)(G[None], *args), getattr(ref, name)(G[None], *args)
        if name == "gradvac_weights":
            got, want = got[0], want[0]
        assert_rel_close(got, want, 1e-7, f"{name} T={T}")


@pytest.mark.parametrize("T", [40, 128])
def test_min_norm_weights_at_many_tasks_is_optimal(T):
    # No enumerating reference at this size: check the optimality conditions of the simplex QP.
    for kind in ("generic", "rank_deficient", "conflicting"):
        J = jacobian(T, kind, T, P=T // 2 if kind == "generic" else None)
        G = gram(J)
        w = ops.min_norm_weights(G[None])[0]
        assert float(w.min()) >= 0 and abs(float(w.sum()) - 1) < 1e-12
        scores = G @ w  # <x, g_j> >= |x|^2 for all j, with equality on the support
        gap = float(w @ G @ w - scores.min())
        assert gap <= 1e-10 * float(G.diagonal().max()), (kind, gap)


@pytest.mark.parametrize("name", OPS)
def test_float32_gram_matches_float64_reference(name):
    T = 6
    J = jacobian(T, "generic", 7)
    G = gram(J)
    args = _calls(T, 7)[name]
    args32 = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    got = getattr(ops, name)(G[None].float(), *args32)
    want = getattr(ref, name)(G[None], *args)
    if name == "gradvac_weights":
        got, want = got[0], want[0]
    assert got.dtype == torch.float32
    # The solvers run in double: only the Gram's own rounding to float32 differs.
    assert_rel_close(got.double(), want, 1e-4, name)


@pytest.mark.filterwarnings(
    "ignore:.*Pareto-stationary"
)  # degenerate cases include stationary ones: said, tested in test_aggregation_robustness
@pytest.mark.parametrize("name", OPS)
def test_batch_equals_one_matrix_at_a_time(name):
    T, N = 5, 4
    grams, argss = [], []
    for n in range(N):
        grams.append(gram(jacobian(T, KINDS[n % 2], 50 + n)))
        argss.append(_calls(T, 50 + n)[name])
    batched_args = tuple(
        torch.cat([a[i] for a in argss]) if isinstance(argss[0][i], torch.Tensor) else argss[0][i]
        for i in range(len(argss[0]))
    )
    batched = getattr(ops, name)(torch.stack(grams), *batched_args)
    for n in range(N):
        one = getattr(ops, name)(grams[n][None], *argss[n])
        if name == "gradvac_weights":
            assert torch.equal(batched[0][n], one[0][0]) and torch.equal(batched[1][n], one[1][0])
        elif name in ("aligned_mtl_weights", "imtlg_weights", "config_weights"):
            # LAPACK's batched eigh need not round exactly as one matrix at a time.
            assert_rel_close(batched[n], one[0], 1e-12, name)
        else:
            assert torch.equal(batched[n], one[0]), name


@pytest.mark.parametrize("name", OPS)
def test_opcheck(name):
    T = 4
    G = gram(jacobian(T, "generic", 3))
    torch.library.opcheck(getattr(torch.ops.fastmtl, name), (G[None], *_calls(T, 3)[name]))


@pytest.mark.parametrize("name", OPS)
def test_empty_batch_and_inputs_not_modified(name):
    T = 3
    G = gram(jacobian(T, "conflicting", 1))[None]
    args = _calls(T, 1)[name]
    before = [G.clone()] + [a.clone() for a in args if isinstance(a, torch.Tensor)]
    getattr(ops, name)(G, *args)
    after = [G] + [a for a in args if isinstance(a, torch.Tensor)]
    assert all(torch.equal(b, a) for b, a in zip(before, after))
    empty_args = tuple(a[:0] if isinstance(a, torch.Tensor) else a for a in args)
    out = getattr(ops, name)(G[:0], *empty_args)
    out = out[0] if isinstance(out, tuple) else out
    assert out.shape[0] == 0


@pytest.mark.parametrize("name", OPS)
def test_inputs_that_require_grad_are_refused_saying_to_detach(name):
    T = 3
    G = gram(jacobian(T, "generic", 0))[None]
    args = _calls(T, 0)[name]
    with pytest.raises(RuntimeError, match="not differentiable.*Detach"):
        getattr(ops, name)(G.clone().requires_grad_(), *args)
    floating = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()]
    for i in floating:
        bad = list(args)
        bad[i] = args[i].clone().requires_grad_()
        with pytest.raises(RuntimeError, match="not differentiable"):
            getattr(ops, name)(G, *bad)


@pytest.mark.parametrize("name", OPS)
def test_bad_gram_raises_naming_it(name):
    T = 3
    G = gram(jacobian(T, "generic", 0))[None]
    args = _calls(T, 0)[name]
    op = getattr(ops, name)
    bad = {
        "shape": (G[0], ValueError, "gram"),
        "not square": (G[:, :, :2], ValueError, "gram"),
        "nan": (
            G.clone().index_put_(
                (torch.tensor([0]), torch.tensor([0]), torch.tensor([1])),
                torch.tensor(float("nan"), dtype=torch.float64),
            ),
            ValueError,
            "finite",
        ),
        "asymmetric": (G + torch.triu(torch.ones(T, T, dtype=torch.float64), 1), ValueError, "symmetric"),
        "negative diagonal": (G - 10 * torch.eye(T, dtype=torch.float64) * G.abs().max(), ValueError, "diagonal"),
        "dtype": (G.to(torch.int64), TypeError, "gram"),
    }
    for _what, (g, error, words) in bad.items():
        with pytest.raises(error, match=words):
            op(g, *args)


def test_bad_arguments_raise_naming_them():
    G = gram(jacobian(3, "generic", 0))[None]
    with pytest.raises(ValueError, match="'u' expected shape"):
        ops.dual_cone_projection(G, torch.ones(1, 2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="'order' expected each row to list distinct tasks"):
        ops.pcgrad_weights(G, torch.zeros(1, 3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="'order' expected each row"):
        ops.gradvac_weights(
            G, torch.tensor([[[0, 1], [0, 2], [0, 1]]]), torch.zeros(1, 3, 3, dtype=torch.float64), 0.5, 1e-8
        )
    with pytest.raises(TypeError, match="'order' expected dtype torch.int64"):
        ops.pcgrad_weights(G, torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="'exponent' expected a finite value > 0"):
        ops.power_system_weights(G, 0.0)
    with pytest.raises(ValueError, match="'c' expected a finite value >= 0"):
        ops.cagrad_weights(G, -1.0)
    with pytest.raises(ValueError, match="'scale_mode' expected one of"):
        ops.aligned_mtl_weights(G, torch.ones(1, 3, dtype=torch.float64), "max")
    with pytest.raises(ValueError, match="'pref' expected shape"):
        ops.config_weights(G, torch.ones(1, 4, dtype=torch.float64))


def test_cuda_gram_is_solved_and_returned_on_its_device(device):
    G = gram(jacobian(4, "conflicting", 2))[None]
    want = ops.min_norm_weights(G)
    got = ops.min_norm_weights(G.to(device))
    assert got.device == G.to(device).device
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("each", [True, False])
def test_dual_cone_weights_is_upgrad_and_dualproj_in_one_call_batched_or_not(each):
    for T, kind, seed, _J, G in cases([1, 3, 8], per_T=len(KINDS)):
        pref = _pref(T, seed)
        u = torch.diag_embed(pref) if each else pref[:, None, :]
        want = ops.dual_cone_projection(G[None], u, 0.0, 1e-4).sum(dim=1)
        # Summed over the T projections in C++: the same terms as torch's sum, perhaps in another order.
        assert_rel_close(ops.dual_cone_weights(G[None], pref, 0.0, 1e-4, each), want, 1e-13, f"{kind} T={T}")
        assert torch.equal(
            ops.dual_cone_weights(G, pref[0], 0.0, 1e-4, each), ops.dual_cone_weights(G[None], pref, 0.0, 1e-4, each)[0]
        ), (T, kind)
        assert_rel_close(
            ops.dual_cone_weights(G, pref[0], 0.0, 1e-4, each),
            ref.dual_cone_weights(G, pref[0], 0.0, 1e-4, each),
            1e-7,
            f"{kind} T={T}",
        )
    with pytest.raises(ValueError, match="'pref' expected \\[T\\]"):
        ops.dual_cone_weights(G, pref, 0.0, 1e-4, each)
