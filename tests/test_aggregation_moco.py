"""MoCo (Fernando et al. 2023, Algorithm 1) against its formulas, by hand and in float64 loops, and
through fastmtl.mtl_backward, which supplies the per-task gradients it needs."""

import io

import pytest
import torch

import fastmtl
import fastmtl.aggregation as agg
from conftest import assert_rel_close


def moco_by_formula(jacobians, beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.0):
    """The paper's recursion written out: Y tracks J, lambda takes projected steps on the simplex."""
    T, P = jacobians[0].shape
    Y, lam, updates = torch.zeros(T, P, dtype=torch.float64), torch.full((T,), 1.0 / T, dtype=torch.float64), []
    for k, J in enumerate(jacobians, start=1):
        Y = Y - beta / k**beta_sigma * (Y - J)
        lam = lam - gamma / k**gamma_sigma * (Y @ Y.T @ lam + rho * lam)
        # Simplex projection by bisection on the threshold (independent of the sort-based one used).
        low, high = lam.min() - 1.0, lam.max()
        for _ in range(200):
            mid = (low + high) / 2
            if (lam - mid).clamp(min=0).sum() > 1:
                low = mid
            else:
                high = mid
        lam = (lam - (low + high) / 2).clamp(min=0)
        updates.append(lam @ Y)
    return updates, lam


def test_first_step_by_hand():
    J = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    method = agg.MoCo()
    update = method(jacobian=J)
    # Y = J / 2 = diag(0.5, 1); lambda = Proj([0.5, 0.5] - 0.1 * [0.125, 0.5]) = [0.51875, 0.48125]
    assert_rel_close(method.last_weights, torch.tensor([0.51875, 0.48125], dtype=torch.float64), 1e-12, "lambda")
    assert_rel_close(update, torch.tensor([0.259375, 0.48125], dtype=torch.float64), 1e-12, "update")


@pytest.mark.parametrize("T, P, seed", [(1, 3, 0), (2, 5, 1), (3, 7, 2), (8, 20, 3), (40, 9, 4)])
@pytest.mark.parametrize("hyper", [{}, dict(beta=0.9, beta_sigma=0.0, gamma=0.5, gamma_sigma=0.1, rho=0.3)])
def test_many_steps_follow_the_formulas(T, P, seed, hyper):
    generator = torch.Generator().manual_seed(seed)
    jacobians = [torch.randn(T, P, generator=generator, dtype=torch.float64) for _ in range(12)]
    expected, lam = moco_by_formula(jacobians, **hyper)
    method = agg.MoCo(**hyper)
    for step, (J, want) in enumerate(zip(jacobians, expected)):
        assert_rel_close(method(jacobian=J), want, 1e-9, f"update of step {step}")
    assert_rel_close(method.last_weights, lam, 1e-9, "lambda")
    assert abs(float(method.last_weights.sum()) - 1.0) < 1e-12 and bool((method.last_weights >= 0).all())


def test_state_round_trips_through_state_dict_and_reset_restarts():
    generator = torch.Generator().manual_seed(5)
    jacobians = [torch.randn(3, 4, generator=generator, dtype=torch.float64) for _ in range(4)]
    method = agg.MoCo()
    for J in jacobians[:2]:
        method(jacobian=J)
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    restored = agg.MoCo()
    restored.load_state_dict(torch.load(buffer, weights_only=False))
    assert_rel_close(restored(jacobian=jacobians[2]), method(jacobian=jacobians[2]), 0.0, "restored update")
    method.reset()
    assert_rel_close(method(jacobian=jacobians[0]), agg.MoCo()(jacobian=jacobians[0]), 0.0, "after reset")


def test_inputs_are_not_modified_and_a_gram_is_refused():
    J = torch.randn(3, 6, dtype=torch.float64)
    copy = J.clone()
    agg.MoCo()(jacobian=J)
    assert torch.equal(J, copy)
    with pytest.raises(ValueError, match="MoCo: needs the per-task gradients"):
        agg.MoCo()(J @ J.T)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(beta=0.0), ValueError, "argument 'beta' expected a value in \\(0, 1\\]"),
        (dict(beta=1.5), ValueError, "argument 'beta'"),
        (dict(gamma=float("nan")), ValueError, "argument 'gamma'"),
        (dict(rho=-1.0), ValueError, "argument 'rho'"),
        (dict(gamma_sigma="x"), TypeError, "argument 'gamma_sigma'"),
    ],
)
def test_bad_hyperparameters_name_the_argument(kwargs, error, words):
    with pytest.raises(error, match="fastmtl.aggregation.MoCo: " + words):
        agg.MoCo(**kwargs)


def test_mtl_backward_supplies_the_per_task_gradients():
    torch.manual_seed(0)
    trunk, heads = torch.nn.Linear(4, 6).double(), torch.nn.Linear(6, 3).double()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    z = trunk(x)
    losses = ((heads(z) - y) ** 2).mean(0)
    shared = list(trunk.parameters())
    J = torch.cat(
        [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)]) for loss in losses]
    ).reshape(3, -1)
    expected = agg.MoCo()(jacobian=J)
    result = fastmtl.mtl_backward(losses, z, agg.MoCo())
    got = torch.cat([p.grad.reshape(-1) for p in shared])
    assert_rel_close(got, expected, 1e-10, "shared update")
    assert result.weights.shape == (3,)
