"""fastmtl.weighting: each method against its paper's formula worked by hand, the weights against
autograd, state round trips, input checks and a short training run."""

import copy
import io
import math

import pytest
import torch

from fastmtl.weighting import (
    COSMOS,
    DBMTL,
    DWA,
    EW,
    FAMO,
    GLS,
    IMTLL,
    PBI,
    RLW,
    STCH,
    UW,
    GradNorm,
    MetaBalance,
    Weighting,
)

# name -> factory(num_tasks); every method with its defaults, RLW seeded so runs repeat.
METHODS = {
    "EW": lambda t: EW(t),
    "UW": lambda t: UW(t),
    "DWA": lambda t: DWA(t),
    "RLW": lambda t: RLW(t, seed=3),
    "GradNorm": lambda t: GradNorm(t),
    "FAMO": lambda t: FAMO(t),
    "DBMTL": lambda t: DBMTL(t),
    "IMTLL": lambda t: IMTLL(t),
    "GLS": lambda t: GLS(t),
    "STCH": lambda t: STCH(t),
    "COSMOS": lambda t: COSMOS(t),
    "PBI": lambda t: PBI(t),
    "MetaBalance": lambda t: MetaBalance(t),
}
STATEFUL = ["UW", "DWA", "RLW", "GradNorm", "FAMO", "DBMTL", "IMTLL", "MetaBalance"]


def random_gram(num_tasks, generator, dtype=torch.float64):
    """A Gram matrix of random per-task gradients: symmetric positive semi-definite."""
    grads = torch.randn(num_tasks, 7, generator=generator, dtype=dtype)
    return grads @ grads.T


def random_losses(num_tasks, generator, dtype=torch.float64):
    return (0.2 + 2.0 * torch.rand(num_tasks, generator=generator, dtype=dtype)).requires_grad_()


def step(method, losses, gram, step_index):
    """One call following the method's protocol (DWA closes an epoch every 3 steps, FAMO gets an
    explicit update on odd steps and the implicit one on even steps)."""
    loss = method(losses, gram)
    if isinstance(method, DWA) and step_index % 3 == 2:
        method.end_epoch()
    if isinstance(method, FAMO) and step_index % 2 == 1:
        method.update(0.9 * losses.detach())
    return loss


def assert_close(actual, expected, rtol=1e-12, atol=None):
    """|actual - expected| <= atol + rtol |expected| elementwise (atol defaults to rtol), in float64.
    (Not torch.testing.assert_close: its first call imports torch.distributed, which costs seconds.)"""
    actual = actual.detach().double() if isinstance(actual, torch.Tensor) else torch.tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, f"shape {list(actual.shape)} != {list(expected.shape)}"
    ok = torch.isclose(actual, expected, rtol=rtol, atol=rtol if atol is None else atol)
    assert bool(ok.all()), f"{actual.tolist()} != {expected.tolist()} (rtol {rtol})"


# ---- each method against its formula, worked by hand


def test_ew_sums_the_losses():
    ew = EW(3)
    losses = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    assert_close(ew(losses), 4.0)
    assert_close(ew.weights, [1.0, 1.0, 1.0])


def test_uw_is_kendalls_formula_in_libmtls_form():
    uw = UW(2)
    with torch.no_grad():
        uw.log_vars.copy_(torch.tensor([0.0, math.log(2.0)]))
    loss = uw(torch.tensor([1.0, 3.0], dtype=torch.float64))
    # L_t / (2 sigma_t^2) + log(sigma_t^2) / 2 with sigma^2 = 1, 2
    assert_close(loss, 1.0 / 2 + 3.0 / 4 + math.log(2.0) / 2, rtol=1e-7)
    assert_close(uw.weights, [0.5, 0.25], rtol=1e-7)
    loss.backward()
    # d/ds [L e^-s / 2 + s / 2] = 1/2 - L e^-s / 2
    assert_close(uw.log_vars.grad, [0.5 - 0.5, 0.5 - 3.0 / 4], rtol=1e-7)


def test_imtll_is_exp_s_times_loss_minus_s():
    imtl = IMTLL(2)
    with torch.no_grad():
        imtl.log_scales.copy_(torch.tensor([0.0, math.log(2.0)]))
    loss = imtl(torch.tensor([1.0, 3.0], dtype=torch.float64))
    assert_close(loss, 1.0 + 2.0 * 3.0 - math.log(2.0), rtol=1e-7)
    assert_close(imtl.weights, [1.0, 2.0], rtol=1e-7)
    loss.backward()
    assert_close(imtl.log_scales.grad, [1.0 - 1, 2.0 * 3.0 - 1], rtol=1e-7)


def test_gls_is_the_geometric_mean():
    gls = GLS(3)
    assert_close(gls(torch.tensor([1.0, 4.0, 2.0], dtype=torch.float64)), 2.0)  # (1 * 4 * 2)^(1/3)
    assert_close(gls.weights, [2.0 / 3, 2.0 / 12, 2.0 / 6])


def test_gls_leaves_tasks_with_zero_loss_out():
    gls = GLS(3)
    losses = torch.tensor([0.0, 4.0, 1.0], dtype=torch.float64, requires_grad=True)
    loss = gls(losses)
    assert_close(loss, 2.0)  # sqrt(4 * 1)
    assert_close(gls.weights, [0.0, 2.0 / 8, 2.0 / 2])
    (grad,) = torch.autograd.grad(loss, losses)
    assert torch.isfinite(grad).all()
    assert_close(grad, gls.weights)
    assert_close(gls(torch.zeros(3, dtype=torch.float64)), 0.0)
    assert_close(gls.weights, [0.0, 0.0, 0.0])


def test_dwa_weights_are_t_softmax_of_epoch_mean_ratios():
    dwa = DWA(3, temperature=2.0)
    for losses in ([3.0, 2.0, 1.0], [1.0, 2.0, 3.0]):  # epoch 1: means 2, 2, 2
        dwa(torch.tensor(losses, dtype=torch.float64))
        assert_close(dwa.weights, [1.0, 1.0, 1.0])
    dwa.end_epoch()
    for losses in ([1.0, 2.0, 4.0], [1.0, 2.0, 4.0]):  # epoch 2: means 1, 2, 4
        dwa(torch.tensor(losses, dtype=torch.float64))
        assert_close(dwa.weights, [1.0, 1.0, 1.0])  # two epochs are not closed yet
    dwa.end_epoch()
    losses = [0.7, 1.1, 3.0]
    loss = dwa(torch.tensor(losses, dtype=torch.float64))
    exps = [math.exp(r / 2.0) for r in (1 / 2, 2 / 2, 4 / 2)]
    expected = [3 * e / sum(exps) for e in exps]
    assert_close(dwa.weights, expected)
    assert_close(loss, sum(w * v for w, v in zip(expected, losses)))
    # Constant within the epoch; the next epoch's ratios use epochs 2 and 3.
    dwa(torch.tensor([0.5, 1.0, 5.0], dtype=torch.float64))
    assert_close(dwa.weights, expected)
    dwa.end_epoch()  # epoch 3 means: 0.6, 1.05, 4.0
    dwa(torch.tensor(losses, dtype=torch.float64))
    exps = [math.exp(r / 2.0) for r in (0.6 / 1, 1.05 / 2, 4.0 / 4)]
    assert_close(dwa.weights, [3 * e / sum(exps) for e in exps])


def test_dwa_task_never_labelled_gets_ratio_one():
    dwa = DWA(2, temperature=1.0)
    for losses in ([0.0, 2.0], [0.0, 1.0]):
        dwa(torch.tensor(losses, dtype=torch.float64))
        dwa.end_epoch()
    dwa(torch.tensor([1.0, 1.0], dtype=torch.float64))
    exps = [math.exp(1.0), math.exp(0.5)]
    assert_close(dwa.weights, [2 * e / sum(exps) for e in exps])


def test_dwa_end_epoch_without_steps_raises():
    with pytest.raises(RuntimeError, match="end_epoch"):
        DWA(2).end_epoch()


def test_rlw_draws_softmax_of_standard_normals_from_its_own_generator():
    rlw = RLW(3, seed=7)
    reference = torch.Generator().manual_seed(7)
    losses = [1.0, 2.0, 0.5]
    seen = []
    for _ in range(3):
        loss = rlw(torch.tensor(losses, dtype=torch.float64))
        draw = torch.randn(3, generator=reference, dtype=torch.float64).tolist()
        exps = [math.exp(v) for v in draw]
        expected = [e / sum(exps) for e in exps]
        assert_close(rlw.weights, expected)
        assert_close(loss, sum(w * v for w, v in zip(expected, losses)))
        seen.append(rlw.weights)
    assert not torch.equal(seen[0], seen[1]), "RLW must draw fresh weights at every call"


def test_rlw_without_seed_uses_the_global_rng():
    torch.manual_seed(11)
    expected = torch.softmax(torch.randn(2, dtype=torch.float64), dim=0)
    torch.manual_seed(11)
    rlw = RLW(2)
    rlw(torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert torch.equal(rlw.weights, expected)


def gradnorm_step_by_hand(w, n, losses, initial, alpha, lr):
    """The paper's update in plain floats: one step of lr on sum |w n - target|, clamp, renormalise."""
    ltilde = [v / i for v, i in zip(losses, initial)]
    r = [v / (sum(ltilde) / len(ltilde)) for v in ltilde]
    mean_weighted = sum(a * b for a, b in zip(w, n)) / len(w)
    target = [mean_weighted * ri**alpha for ri in r]
    new = [max(a - lr * math.copysign(1.0, a * b - c) * b, 0.0) for a, b, c in zip(w, n, target)]
    return [len(w) * v / sum(new) for v in new]


def test_gradnorm_follows_the_paper_update_over_three_steps():
    alpha, lr = 1.5, 0.1
    gradnorm = GradNorm(2, alpha=alpha, lr=lr)
    gradnorm.double()
    calls = [([2.0, 1.0], [4.0, 1.0]), ([1.0, 0.8], [9.0, 4.0]), ([0.6, 0.7], [1.0, 2.25])]
    w, initial = [1.0, 1.0], calls[0][0]
    for losses, diag in calls:
        loss = gradnorm(torch.tensor(losses, dtype=torch.float64), torch.diag(torch.tensor(diag, dtype=torch.float64)))
        assert_close(gradnorm.weights, w)
        assert_close(loss, sum(a * b for a, b in zip(w, losses)))
        w = gradnorm_step_by_hand(w, [math.sqrt(d) for d in diag], losses, initial, alpha, lr)
        assert_close(gradnorm.task_weights, w)
    # The hand-worked first step: (1 - 0.1 * 2, 1 + 0.1 * 1) rescaled to sum 2.
    assert_close(gradnorm_step_by_hand([1, 1], [2, 1], [2, 1], [2, 1], alpha, lr), [1.6 / 1.9, 2.2 / 1.9])


def test_gradnorm_uses_only_the_diagonal_and_clamps_at_zero():
    gradnorm = GradNorm(2, lr=1.0)
    gram = torch.tensor([[100.0, -7.0], [-7.0, 1.0]], dtype=torch.float64)  # n = 10, 1
    gradnorm(torch.tensor([1.0, 1.0], dtype=torch.float64), gram)
    # w_1 = 1 - 10 < 0 -> 0, w_2 = 1 + 1 = 2; sum is already 2.
    assert_close(gradnorm.task_weights, [0.0, 2.0], rtol=1e-7)


def test_gradnorm_initial_loss_of_an_unlabelled_task_is_its_first_nonzero_one():
    gradnorm = GradNorm(2)
    gram = torch.eye(2, dtype=torch.float64)
    gradnorm(torch.tensor([0.0, 1.0], dtype=torch.float64), gram)
    assert torch.isfinite(gradnorm.task_weights).all()
    gradnorm(torch.tensor([3.0, 1.0], dtype=torch.float64), gram)
    assert_close(gradnorm.initial_losses, [3.0, 1.0])


def test_famo_forward_is_the_papers_scaled_log_loss():
    famo = FAMO(3, min_losses=[0.0, 0.5, 0.0], eps=1e-8)
    with torch.no_grad():
        famo.logits.copy_(torch.tensor([0.2, -0.1, 0.4]))
    losses = [1.0, 2.5, 0.25]
    loss = famo(torch.tensor(losses, dtype=torch.float64))
    xi = [float(v) for v in torch.tensor([0.2, -0.1, 0.4])]  # the float32 logits it holds
    exps = [math.exp(v) for v in xi]
    z = [e / sum(exps) for e in exps]
    d = [1.0 + 1e-8, 2.0 + 1e-8, 0.25 + 1e-8]
    c = sum(a / b for a, b in zip(z, d))
    assert_close(loss, sum(a * math.log(b) for a, b in zip(z, d)) / c, rtol=1e-7)
    assert_close(famo.weights, [a / (c * b) for a, b in zip(z, d)], rtol=1e-7)


def adam_by_hand(param, grad, state, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8):
    """torch.optim.Adam's update (L2 weight decay, bias-corrected) in plain floats."""
    state["step"] += 1
    t = state["step"]
    g = [gi + weight_decay * p for gi, p in zip(grad, param)]
    state["m"] = [betas[0] * m + (1 - betas[0]) * gi for m, gi in zip(state["m"], g)]
    state["v"] = [betas[1] * v + (1 - betas[1]) * gi * gi for v, gi in zip(state["v"], g)]
    out = []
    for p, m, v in zip(param, state["m"], state["v"]):
        m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
        out.append(p - lr * m_hat / (math.sqrt(v_hat) + eps))
    return out


@pytest.mark.parametrize("explicit_update", [True, False])
def test_famo_logits_follow_adam_on_the_softmax_vjp_of_the_log_loss_decrease(explicit_update):
    lr, gamma, eps = 0.05, 0.01, 1e-8
    famo = FAMO(3, lr=lr, gamma=gamma, eps=eps).double()
    xi, state = [0.0, 0.0, 0.0], {"step": 0, "m": [0.0] * 3, "v": [0.0] * 3}
    sequence = [[1.0, 2.0, 3.0], [0.8, 1.9, 2.0], [0.5, 1.85, 1.9], [0.45, 1.0, 1.8]]
    if not explicit_update:
        famo(torch.tensor(sequence[0], dtype=torch.float64))
    for before, after in zip(sequence, sequence[1:]):
        if explicit_update:
            famo(torch.tensor(before, dtype=torch.float64))
            famo.update(torch.tensor(after, dtype=torch.float64))
        else:
            famo(torch.tensor(after, dtype=torch.float64))  # runs the pending update of `before` first
        delta = [math.log(b + eps) - math.log(a + eps) for b, a in zip(before, after)]
        exps = [math.exp(v) for v in xi]
        z = [e / sum(exps) for e in exps]
        zdelta = sum(a * b for a, b in zip(z, delta))
        grad = [zi * (di - zdelta) for zi, di in zip(z, delta)]  # J_softmax^T delta
        xi = adam_by_hand(xi, grad, state, lr, gamma)
        assert_close(famo.logits, xi)
    # The task whose log-loss fell least (task 2) has gained weight.
    assert famo.logits.argmax() == 1


def test_famo_adam_matches_torch_optim_adam():
    """The official code drives torch.optim.Adam with autograd's softmax VJP: so must this."""
    famo = FAMO(2, lr=0.025, gamma=1e-3).double()
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.025, weight_decay=1e-3)
    sequence = torch.tensor([[1.0, 2.0], [0.5, 1.9], [0.45, 1.0], [0.44, 0.7], [0.2, 0.69]], dtype=torch.float64)
    for before, after in zip(sequence, sequence[1:]):
        famo(before)
        famo.update(after)
        delta = (before + 1e-8).log() - (after + 1e-8).log()
        (d,) = torch.autograd.grad(torch.softmax(w, -1), w, grad_outputs=delta)
        opt.zero_grad()
        w.grad = d
        opt.step()
        assert_close(famo.logits, w, rtol=1e-12, atol=1e-14)


def test_famo_update_needs_a_call_first_and_losses_above_the_minimum():
    famo = FAMO(2, min_losses=[0.5, 0.0])
    with pytest.raises(RuntimeError, match="update"):
        famo.update(torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="'losses'"):
        famo(torch.tensor([0.25, 1.0]))
    famo(torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="'losses_after'"):
        famo.update(torch.tensor([0.1, 1.0]))
    famo.update(torch.tensor([0.9, 1.0]))
    with pytest.raises(RuntimeError, match="update"):
        famo.update(torch.tensor([0.8, 1.0]))


def test_dbmtl_follows_the_dual_balancing_rule_over_two_steps():
    eps, beta, beta_sigma = 1e-8, 0.9, 0.5
    dbmtl = DBMTL(2, beta=beta, beta_sigma=beta_sigma, eps=eps).double()
    # step 1: ||grad L|| = 1, 4 -> ||grad log L|| = 1 / 1, 4 / 2
    losses, diag = [1.0, 2.0], [1.0, 16.0]
    loss = dbmtl(torch.tensor(losses, dtype=torch.float64), torch.diag(torch.tensor(diag, dtype=torch.float64)))
    nhat = [math.sqrt(g) / (v + eps) for g, v in zip(diag, losses)]
    alpha = [max(nhat) / (v + 1e-8) for v in nhat]
    assert_close(loss, sum(a * math.log(v + eps) for a, v in zip(alpha, losses)))
    assert_close(dbmtl.weights, [a / (v + eps) for a, v in zip(alpha, losses)])
    assert_close(dbmtl.weights, [2.0, 0.5], rtol=1e-7)
    # step 2: n = 1, 1; nhat = n + beta / 2^beta_sigma * (nhat - n)
    losses, diag = [0.5, 2.0], [0.25, 4.0]
    loss = dbmtl(torch.tensor(losses, dtype=torch.float64), torch.diag(torch.tensor(diag, dtype=torch.float64)))
    n = [math.sqrt(g) / (v + eps) for g, v in zip(diag, losses)]
    decay = beta / 2**beta_sigma
    nhat = [a + decay * (h - a) for a, h in zip(n, nhat)]
    alpha = [max(nhat) / (v + 1e-8) for v in nhat]
    assert_close(loss, sum(a * math.log(v + eps) for a, v in zip(alpha, losses)))
    assert_close(dbmtl.weights, [a / (v + eps) for a, v in zip(alpha, losses)])
    assert_close(dbmtl.grad_norm_average, nhat)


def test_dbmtl_with_beta_zero_has_no_memory():
    dbmtl = DBMTL(2, beta=0.0).double()
    dbmtl(torch.tensor([1.0, 1.0], dtype=torch.float64), torch.diag(torch.tensor([100.0, 1.0], dtype=torch.float64)))
    dbmtl(torch.tensor([1.0, 1.0], dtype=torch.float64), torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64)))
    assert_close(dbmtl.weights, [2.0 / (1 + 1e-8 / 1), 1.0], rtol=1e-7)


# ---- properties every method has


@pytest.mark.parametrize("name", METHODS)
def test_weights_are_the_gradient_of_the_loss_wrt_the_losses(name):
    generator = torch.Generator().manual_seed(0)
    method = METHODS[name](3).double()
    for i in range(5):
        losses = random_losses(3, generator)
        loss = step(method, losses, random_gram(3, generator), i)
        assert loss.dim() == 0
        (grad,) = torch.autograd.grad(loss, losses)
        assert_close(method.weights, grad, rtol=1e-10, atol=1e-12)
        assert not method.weights.requires_grad


@pytest.mark.parametrize("name", METHODS)
def test_one_task_works(name):
    method = METHODS[name](1).double()
    for i in range(4):
        losses = torch.tensor([1.5 - 0.1 * i], dtype=torch.float64, requires_grad=True)
        loss = step(method, losses, torch.tensor([[2.0]], dtype=torch.float64), i)
        assert torch.isfinite(loss)
        (grad,) = torch.autograd.grad(loss, losses)
        assert_close(method.weights, grad)
        assert method.weights.shape == (1,) and method.weights.item() > 0


@pytest.mark.parametrize("name", METHODS)
def test_float32_losses_give_float32_weights(name):
    method = METHODS[name](2)
    method(torch.tensor([1.0, 2.0]), torch.eye(2))
    assert method.weights.dtype == torch.float32 and torch.isfinite(method.weights).all()


@pytest.mark.parametrize("name", STATEFUL)
def test_state_dict_round_trip_gives_identical_next_weights(name):
    generator = torch.Generator().manual_seed(1)
    original = METHODS[name](3).double()
    for p in original.parameters():  # learnt parameters must travel too
        with torch.no_grad():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype))
    for i in range(5):
        step(original, random_losses(3, generator), random_gram(3, generator), i)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)  # through a checkpoint file, as a resumed run does
    buffer.seek(0)
    restored = METHODS[name](3).double()
    restored.load_state_dict(torch.load(buffer))
    for i in range(5, 9):
        losses, gram = random_losses(3, generator), random_gram(3, generator)
        a = step(original, losses, gram, i)
        b = step(restored, losses, gram, i)
        assert torch.equal(original.weights, restored.weights), f"{name}: step {i}"
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", STATEFUL)
def test_a_fresh_instance_differs_after_training(name):
    """The round trip above proves something only if the state matters."""
    generator = torch.Generator().manual_seed(1)
    trained = METHODS[name](3).double()
    for p in trained.parameters():
        with torch.no_grad():
            p.add_(1.0)
    for i in range(6):
        step(trained, random_losses(3, generator), random_gram(3, generator), i)
    fresh = METHODS[name](3).double()
    losses, gram = random_losses(3, generator), random_gram(3, generator)
    trained(losses, gram)
    fresh(losses, gram)
    assert not torch.equal(trained.weights, fresh.weights)


def test_rlw_state_dict_holds_the_generator_and_deepcopy_too():
    rlw = RLW(4, seed=5)
    rlw(torch.ones(4))
    clone = copy.deepcopy(rlw)
    rlw(torch.ones(4))
    clone(torch.ones(4))
    assert torch.equal(rlw.weights, clone.weights)


@pytest.mark.parametrize("name", METHODS)
def test_inputs_are_not_modified(name):
    generator = torch.Generator().manual_seed(2)
    method = METHODS[name](3).double()
    for i in range(4):
        losses, gram = random_losses(3, generator), random_gram(3, generator)
        losses_copy, gram_copy = losses.detach().clone(), gram.clone()
        step(method, losses, gram, i)
        assert torch.equal(losses.detach(), losses_copy) and torch.equal(gram, gram_copy)


@pytest.mark.parametrize("name", METHODS)
def test_bad_losses_raise_value_error_naming_the_argument(name):
    method = METHODS[name](3)
    gram = torch.eye(3)
    bad = {
        "wrong length": torch.ones(2),
        "2-D": torch.ones(1, 3),
        "NaN": torch.tensor([1.0, math.nan, 1.0]),
        "inf": torch.tensor([1.0, math.inf, 1.0]),
        "integer": torch.ones(3, dtype=torch.int64),
        "list": [1.0, 1.0, 1.0],
    }
    for what, losses in bad.items():
        with pytest.raises(ValueError, match="'losses'") as info:
            method(losses, gram)
        assert type(method).__name__ in str(info.value), what
    with pytest.raises(ValueError, match=r"'losses' expected shape \[3\].*got \[1, 3\]"):
        method(torch.ones(1, 3), gram)
    with pytest.raises(RuntimeError, match="no weights yet"):
        _ = METHODS[name](3).weights


@pytest.mark.parametrize("name", ["GLS", "DBMTL"])
def test_negative_losses_raise_for_the_methods_taking_logs(name):
    with pytest.raises(ValueError, match="'losses' expected values >= 0"):
        METHODS[name](2)(torch.tensor([1.0, -0.5]), torch.eye(2))


@pytest.mark.parametrize("name", ["GradNorm", "DBMTL"])
def test_bad_gram_raises_value_error_naming_the_argument(name):
    method = METHODS[name](3)
    assert method.requires_gram
    losses = torch.ones(3)
    with pytest.raises(ValueError, match="'gram' is required"):
        method(losses)
    with pytest.raises(ValueError, match=r"'gram' expected shape \[3, 3\], got \[2, 2\]"):
        method(losses, torch.eye(2))
    with pytest.raises(ValueError, match="'gram'"):
        method(losses, torch.ones(3))
    with pytest.raises(ValueError, match="'gram' expected finite"):
        method(losses, torch.full((3, 3), math.nan))


def test_methods_without_gram_need_none():
    for name, factory in METHODS.items():
        method = factory(2)
        assert isinstance(method, Weighting)
        assert method.requires_gram == (name in ("GradNorm", "DBMTL", "MetaBalance"))
        if not method.requires_gram:
            method(torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize(
    "make, argument",
    [
        (lambda: EW(0), "num_tasks"),
        (lambda: UW(2.0), "num_tasks"),
        (lambda: GLS(True), "num_tasks"),
        (lambda: DWA(2, temperature=0), "temperature"),
        (lambda: RLW(2, seed="a"), "seed"),
        (lambda: GradNorm(2, alpha=-1), "alpha"),
        (lambda: GradNorm(2, lr=0), "lr"),
        (lambda: FAMO(2, lr=-1), "lr"),
        (lambda: FAMO(2, gamma=math.nan), "gamma"),
        (lambda: FAMO(2, min_losses=[0.0]), "min_losses"),
        (lambda: DBMTL(2, beta=1.0), "beta"),
        (lambda: DBMTL(2, eps=0), "eps"),
    ],
)
def test_bad_constructor_arguments_raise_value_error_naming_them(make, argument):
    with pytest.raises(ValueError, match=f"'{argument}' expected"):
        make()


def test_learnable_parameters_get_gradients_and_state_does_not():
    for method in (UW(3), IMTLL(3)):
        params = list(method.parameters())
        assert len(params) == 1 and params[0].shape == (3,)
        method(torch.tensor([0.5, 1.0, 2.0])).backward()
        assert params[0].grad is not None and params[0].grad.abs().sum() > 0
    for method in (DWA(3), RLW(3, seed=0), GradNorm(3), FAMO(3), DBMTL(3), EW(3), GLS(3)):
        assert list(method.parameters()) == []


# ---- training


def toy_problem():
    """Two regression tasks of very different scales on a shared linear layer."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=generator)
    y = torch.stack([x @ torch.randn(5, generator=generator), 10 * (x @ torch.randn(5, generator=generator))], 1)
    shared = torch.nn.Linear(5, 4)
    heads = torch.nn.Linear(4, 2)
    with torch.no_grad():
        for p in (*shared.parameters(), *heads.parameters()):
            p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    return x, y, shared, heads


# STCH minimises a smooth maximum (the worst weighted task) and PBI the distance along and off a
# preference ray: both may trade one task's loss for their objective by design. Their test below checks
# that the objective itself falls.
TRADING = ("STCH", "PBI")


@pytest.mark.parametrize("name", [name for name in METHODS if name not in TRADING])
def test_training_with_sgd_lowers_every_task_loss(name):
    x, y, shared, heads = toy_problem()
    method = METHODS[name](2)
    optimizer = torch.optim.SGD([*shared.parameters(), *heads.parameters(), *method.parameters()], lr=0.01)

    def task_losses():
        return (heads(shared(x)) - y).pow(2).mean(dim=0)

    with torch.no_grad():
        start = task_losses()
    for i in range(20):
        losses = task_losses()
        gram = None
        if method.requires_gram:
            grads = [torch.autograd.grad(losses[t], shared.weight, retain_graph=True)[0].flatten() for t in range(2)]
            gram = torch.stack(grads) @ torch.stack(grads).T
        optimizer.zero_grad()
        method(losses, gram).backward()
        optimizer.step()
        if isinstance(method, FAMO):
            with torch.no_grad():
                method.update(task_losses())
        if isinstance(method, DWA) and i % 5 == 4:
            method.end_epoch()
    with torch.no_grad():
        end = task_losses()
    assert torch.isfinite(end).all()
    assert (end < start).all(), f"{name}: losses {start.tolist()} -> {end.tolist()}"


# ---- the scalarizations and MetaBalance, on hand-computed cases


def test_stch_is_a_smooth_weighted_maximum():
    stch = STCH(3, mu=0.5, weights=[0.2, 0.3, 0.5], reference=[0.0, 1.0, 0.0])
    losses = torch.tensor([1.0, 3.0, 0.4], dtype=torch.float64, requires_grad=True)
    y = [0.2 * 1.0, 0.3 * 2.0, 0.5 * 0.4]
    expected = 0.5 * math.log(sum(math.exp(v / 0.5) for v in y))
    assert_close(stch(losses), expected)
    soft = [math.exp(v / 0.5) / sum(math.exp(u / 0.5) for u in y) for v in y]
    assert_close(stch.weights, [w * p for w, p in zip([0.2, 0.3, 0.5], soft)])
    assert float(STCH(3, mu=1e-4)(torch.tensor([1e4, 0.0, 1.0]))) == pytest.approx(1e4 / 3)  # no overflow


def test_cosmos_and_pbi_follow_their_formulas():
    r = [0.25, 0.75]
    cosmos = COSMOS(2, lambda_=2.0, weights=r).double()
    L = torch.tensor([2.0, 1.0], dtype=torch.float64)
    cos = (0.25 * 2 + 0.75 * 1) / (math.hypot(0.25, 0.75) * math.hypot(2, 1))
    assert_close(cosmos(L), 0.25 * 2 + 0.75 * 1 - 2.0 * cos)
    pbi = PBI(2, theta=3.0, weights=[3.0, 4.0], reference=[1.0, 0.0]).double()
    f = [1.0, 1.0]  # L - z
    d1 = (3 * f[0] + 4 * f[1]) / 5
    d2 = math.hypot(f[0] - d1 * 0.6, f[1] - d1 * 0.8)
    assert_close(pbi(L), d1 + 3.0 * math.sqrt(d2 * d2 + 1e-12))
    perpendicular = [f[0] - d1 * 0.6, f[1] - d1 * 0.8]
    assert_close(pbi.weights, [0.6 + 3.0 * perpendicular[0] / d2, 0.8 + 3.0 * perpendicular[1] / d2], rtol=1e-9)


def test_metabalance_moves_auxiliary_norms_toward_the_main_task():
    balance = MetaBalance(3, relax_factor=0.5, beta=0.5).double()
    balance(torch.ones(3, dtype=torch.float64), torch.diag(torch.tensor([4.0, 16.0, 1.0], dtype=torch.float64)))
    # m = 0.5 * |g| = [1, 2, 0.5]: factors 0.5 * m0 / m + 0.5
    assert_close(balance.weights, [1.0, 0.5 * 0.5 + 0.5, 0.5 * 2 + 0.5])
    balance(torch.ones(3, dtype=torch.float64), torch.diag(torch.tensor([4.0, 4.0, 4.0], dtype=torch.float64)))
    m = [0.5 * 1 + 0.5 * 2, 0.5 * 2 + 0.5 * 2, 0.5 * 0.5 + 0.5 * 2]
    assert_close(balance.weights, [1.0, 0.5 * m[0] / m[1] + 0.5, 0.5 * m[0] / m[2] + 0.5])
    assert_close(balance.grad_norm_average, m)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: STCH(2, mu=0.0), "'mu'"),
        (lambda: STCH(2, weights=[1.0]), "'weights'"),
        (lambda: COSMOS(2, lambda_=-1.0), "'lambda_'"),
        (lambda: PBI(2, weights=[0.0, 0.0]), "'weights'"),
        (lambda: PBI(2, theta=float("inf")), "'theta'"),
        (lambda: MetaBalance(2, relax_factor=2.0), "'relax_factor'"),
        (lambda: MetaBalance(2, main_task=2), "'main_task'"),
    ],
)
def test_new_weightings_refuse_bad_hyperparameters_naming_them(make, words):
    with pytest.raises(ValueError, match=words):
        make()


@pytest.mark.parametrize("name", TRADING)
def test_training_with_a_trading_scalarization_lowers_its_objective(name):
    x, y, shared, heads = toy_problem()
    method = METHODS[name](2)
    optimizer = torch.optim.SGD([*shared.parameters(), *heads.parameters()], lr=0.01)

    def task_losses():
        return (heads(shared(x)) - y).pow(2).mean(dim=0)

    with torch.no_grad():
        start = method(task_losses())
    for _ in range(20):
        optimizer.zero_grad()
        method(task_losses()).backward()
        optimizer.step()
    with torch.no_grad():
        end = method(task_losses())
    assert float(end) < float(start)
