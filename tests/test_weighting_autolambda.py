"""fastmtl.weighting.AutoLambda: the finite-difference meta-gradient against the exact one (double
backward through the virtual step), parameters and gradients left bitwise as they were, the sign of
the meta-gradient on a toy worked by hand, state round trips, input checks and a short training run."""

import copy
import io
import math

import pytest
import torch
from torch.func import functional_call

from fastmtl.weighting import AutoLambda, Weighting


def assert_close(actual, expected, rtol, atol=0.0):
    actual = actual.detach().double()
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, f"shape {list(actual.shape)} != {list(expected.shape)}"
    ok = (actual - expected).abs() <= atol + rtol * expected.abs()
    assert bool(ok.all()), f"{actual.tolist()} != {expected.tolist()} (rtol {rtol}, atol {atol})"


class Toy(torch.nn.Module):
    """A shared tanh layer and one linear head per task."""

    def __init__(self, num_tasks=3, d_in=4, hidden=5, dtype=torch.float64, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.shared = torch.nn.Sequential(
            torch.nn.Linear(d_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, hidden)
        )
        self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden, 1) for _ in range(num_tasks))
        self.to(dtype)

    def forward(self, x):
        z = torch.tanh(self.shared(x))
        return torch.cat([head(z) for head in self.heads], dim=1)


def toy_data(num_tasks=3, d_in=4, rows=16, dtype=torch.float64, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d_in, generator=generator, dtype=dtype)
    y = torch.randn(rows, num_tasks, generator=generator, dtype=dtype)
    return x, y


def per_task_mse(outputs, y):
    return (outputs - y).pow(2).mean(dim=0)


def losses_fn(model, x, y):
    return lambda: per_task_mse(model(x), y)


def exact_meta_gradient(model, names, lam, lr, train, val, primary):
    """d L_val(theta') / d lambda by double backward: theta' = theta - lr * grad sum lambda_t L_t^train,
    differentiated through the virtual step with create_graph."""
    lam = lam.detach().clone().requires_grad_()
    params = dict(model.named_parameters())
    theta = [params[n] for n in names]
    train_losses = per_task_mse(model(train[0]), train[1])
    grads = torch.autograd.grad((lam * train_losses).sum(), theta, create_graph=True)
    stepped = {n: p - lr * g for n, p, g in zip(names, theta, grads)}
    val_losses = per_task_mse(functional_call(model, stepped, (val[0],)), val[1])
    mask = torch.zeros_like(lam)
    mask[list(primary)] = 1
    (meta,) = torch.autograd.grad((mask * val_losses).sum(), lam)
    return meta


# ---- (1) the finite difference against the exact meta-gradient


@pytest.mark.parametrize(
    "which, primary, init",
    [
        ("shared", None, 1.0),
        ("all", None, [0.5, 1.0, 2.0]),
        ("shared", [0, 2], [1.0, 0.3, 0.7]),
        ("all", [1], 0.1),
    ],
)
def test_finite_difference_meta_gradient_matches_double_backward(which, primary, init):
    model = Toy()
    train, val = toy_data(seed=1), toy_data(seed=2)
    names = [n for n, _ in model.named_parameters() if which == "all" or n.startswith("shared")]
    params = [dict(model.named_parameters())[n] for n in names]
    lr = 0.3
    method = AutoLambda(3, params, lr=lr, init=init, primary=primary).double()
    fd = method.meta_gradient(losses_fn(model, *train), losses_fn(model, *val))
    exact = exact_meta_gradient(model, names, method.task_weights, lr, train, val, method.primary)
    assert fd.dtype == torch.float64
    assert bool((exact.abs() > 1e-6).any())  # not a trivial comparison
    assert_close(fd, exact, rtol=1e-4, atol=1e-4 * float(exact.abs().max()))
    # A meta-gradient moves nothing: lambda and its Adam moments are as they were.
    assert_close(method.task_weights, torch.as_tensor(init, dtype=torch.float32).double().expand(3), rtol=0)
    assert method.adam_exp_avg.abs().sum() == 0


def test_meta_step_is_one_adam_step_along_the_meta_gradient_then_clamped():
    model = Toy()
    train, val = toy_data(seed=1), toy_data(seed=2)
    params = list(model.shared.parameters())
    method = AutoLambda(3, params, lr=0.3, weight_lr=0.05).double()
    lam = method.task_weights.detach().clone().requires_grad_()
    reference = torch.optim.Adam([lam], lr=0.05)
    for _ in range(4):
        grad = method.meta_step(losses_fn(model, *train), losses_fn(model, *val))
        lam.grad = grad.clone()
        reference.step()
        with torch.no_grad():
            lam.clamp_(min=0)
        assert_close(method.task_weights, lam, rtol=1e-12, atol=1e-14)


def test_lambda_is_clamped_at_zero():
    w = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    method = AutoLambda(1, [w], lr=0.1, weight_lr=10.0, init=0.5).double()
    # Training pulls w to +1, validation wants -1: the meta-gradient is positive, lambda falls.
    grad = method.meta_step(lambda: (w - 1) ** 2, lambda: (w + 1) ** 2)
    assert grad.item() > 0
    assert method.task_weights.item() == 0.0
    method(torch.tensor([2.0], dtype=torch.float64))
    assert method.weights.item() == 0.0


# ---- (2) params and their .grad bitwise unchanged


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_meta_step_restores_params_and_grads_bitwise(dtype):
    model = Toy(dtype=dtype)
    train, val = toy_data(dtype=dtype, seed=1), toy_data(dtype=dtype, seed=2)
    params = list(model.parameters())
    for p in params[::2]:
        p.grad = torch.randn_like(p)  # some with a gradient, some without
    before = [p.detach().clone() for p in params]
    grads = [p.grad for p in params]
    grad_values = [None if g is None else g.clone() for g in grads]
    method = AutoLambda(3, params, lr=0.5).to(dtype)
    method.meta_step(losses_fn(model, *train), losses_fn(model, *val))
    for p, b, g, gv in zip(params, before, grads, grad_values):
        assert torch.equal(p, b)
        assert p.grad is g
        if g is not None:
            assert torch.equal(p.grad, gv)


def test_params_are_restored_when_a_callable_raises():
    model = Toy()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    train = toy_data(seed=1)
    calls = []

    def failing_val():
        calls.append(1)
        raise RuntimeError("boom")

    method = AutoLambda(3, params, lr=0.5).double()
    with pytest.raises(RuntimeError, match="boom"):
        method.meta_step(losses_fn(model, *train), failing_val)
    assert calls  # it raised at the virtual step, with the params moved
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert method.task_weights.tolist() == [1.0, 1.0, 1.0]


def test_meta_gradient_is_the_same_under_no_grad():
    model = Toy()
    train, val = toy_data(seed=1), toy_data(seed=2)
    method = AutoLambda(3, list(model.shared.parameters()), lr=0.3).double()
    with torch.no_grad():
        first = method.meta_gradient(losses_fn(model, *train), losses_fn(model, *val))
    second = method.meta_gradient(losses_fn(model, *train), losses_fn(model, *val))
    assert torch.equal(first, second)


# ---- (3) the direction, on a toy worked by hand


def test_meta_gradient_sign_on_a_task_whose_training_hurts_its_validation():
    """w = (w0, w1) = 0. Task 0 trains toward w0 = +1 but its validation wants w0 = -1; task 1 trains
    and validates toward w1 = +1. With lambda = 1, lr = a: grad L_0 = (-2, 0), grad L_1 = (0, -2),
    theta' = (2a, 2a), grad L_val(theta') = (2 (2a + 1), 2 (2a - 1)), so the meta-gradients are
    -a <v, g_0> = 4a (1 + 2a) > 0 (lambda_0 falls) and -a <v, g_1> = -4a (1 - 2a) < 0 (lambda_1
    rises). Quadratics: the central difference is exact."""
    a = 0.1
    w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))

    def train():
        return torch.stack([(w[0] - 1) ** 2, (w[1] - 1) ** 2])

    def val():
        return torch.stack([(w[0] + 1) ** 2, (w[1] - 1) ** 2])

    method = AutoLambda(2, [w], lr=a, weight_lr=0.01).double()
    grad = method.meta_step(train, val)
    assert_close(grad, [4 * a * (1 + 2 * a), -4 * a * (1 - 2 * a)], rtol=1e-9)
    for _ in range(4):
        method.meta_step(train, val)
    assert method.task_weights[0] < 1.0 < method.task_weights[1]
    assert_close(method.task_weights, [1 - 5 * 0.01, 1 + 5 * 0.01], rtol=1e-4)  # Adam: ~weight_lr a step

    # Task 1 alone primary: task 0's validation loss does not count; its training step does not
    # reach w1, so its meta-gradient is 0.
    only = AutoLambda(2, [w], lr=a, primary=[1]).double()
    grad = only.meta_gradient(train, val)
    assert grad[0].item() == 0.0 and grad[1].item() < 0


def test_a_flat_validation_loss_gives_a_zero_meta_gradient():
    w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    method = AutoLambda(2, [w], lr=0.1).double()
    grad = method.meta_step(lambda: (w - 1) ** 2, lambda: (w - 0.2) ** 2)  # theta' = (0.2, 0.2): its minimum
    assert grad.tolist() == [0.0, 0.0]
    assert method.task_weights.tolist() == [1.0, 1.0]


# ---- (4) state round trip


def test_state_dict_round_trip_gives_identical_next_meta_steps():
    model_a = Toy()
    batches = [(toy_data(seed=s), toy_data(seed=100 + s)) for s in range(6)]
    a = AutoLambda(3, list(model_a.shared.parameters()), lr=0.5, weight_lr=0.02, init=[1.0, 0.5, 2.0]).double()
    for train, val in batches[:3]:
        a.meta_step(losses_fn(model_a, *train), losses_fn(model_a, *val))
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    assert set(state) >= {"task_weights", "adam_exp_avg", "adam_exp_avg_sq", "_extra_state"}
    assert not any(key.startswith("params") for key in state)  # the model's, not the method's

    model_b = copy.deepcopy(model_a)
    b = AutoLambda(3, list(model_b.shared.parameters()), lr=0.5, weight_lr=0.02).double()
    b.load_state_dict(state)
    fresh = AutoLambda(3, list(model_b.shared.parameters()), lr=0.5, weight_lr=0.02).double()
    fresh.task_weights.copy_(a.task_weights)  # the same lambda, but Adam starting over
    for train, val in batches[3:]:
        ga = a.meta_step(losses_fn(model_a, *train), losses_fn(model_a, *val))
        gb = b.meta_step(losses_fn(model_b, *train), losses_fn(model_b, *val))
        fresh.meta_gradient(losses_fn(model_b, *train), losses_fn(model_b, *val))
        assert torch.equal(ga, gb)
        assert torch.equal(a.task_weights, b.task_weights)
    fresh_steps = [fresh.meta_step(losses_fn(model_b, *t), losses_fn(model_b, *v)) for t, v in batches[3:]]
    assert fresh_steps and not torch.equal(fresh.task_weights, a.task_weights)


# ---- forward: a Weighting like the others


def test_forward_is_the_lambda_weighted_sum_and_weights_are_lambda():
    w = torch.nn.Parameter(torch.zeros(1))
    method = AutoLambda(3, [w], init=[0.5, 1.0, 2.0])
    assert isinstance(method, Weighting)
    assert list(method.parameters()) == []  # lambda is a buffer: the model optimizer must not step it
    losses = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    loss = method(losses)
    assert loss.item() == pytest.approx(0.5 + 2.0 + 6.0)
    (grad,) = torch.autograd.grad(loss, losses)
    assert torch.equal(method.weights, grad)
    assert torch.equal(method.weights, torch.tensor([0.5, 1.0, 2.0]))
    assert method(losses.double().detach()).dtype == torch.float64
    assert "AutoLambda" in repr(method) and "weight_lr" in repr(method)


# ---- (5) bad inputs


def _param():
    return torch.nn.Parameter(torch.zeros(2))


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"num_tasks": 0}, "num_tasks"),
        ({"num_tasks": 2.0}, "num_tasks"),
        ({"num_tasks": True}, "num_tasks"),
        ({"lr": 0}, "lr"),
        ({"lr": -0.1}, "lr"),
        ({"lr": math.nan}, "lr"),
        ({"lr": math.inf}, "lr"),
        ({"weight_lr": 0}, "weight_lr"),
        ({"weight_lr": -1e-4}, "weight_lr"),
        ({"weight_lr": "1e-4"}, "weight_lr"),
        ({"init": -1.0}, "init"),
        ({"init": [1.0, -0.5]}, "init"),
        ({"init": [1.0, 1.0, 1.0]}, "init"),
        ({"init": math.nan}, "init"),
        ({"init": "one"}, "init"),
        ({"primary": [2]}, "primary"),
        ({"primary": [-1]}, "primary"),
        ({"primary": [0, 0]}, "primary"),
        ({"primary": []}, "primary"),
        ({"primary": [0.5]}, "primary"),
        ({"primary": 1}, "primary"),
        ({"params": []}, "params"),
        ({"params": [torch.zeros(2)]}, "params"),
        ({"params": [torch.zeros(2, dtype=torch.long)]}, "params"),
        ({"params": 3}, "params"),
    ],
)
def test_bad_constructor_arguments_raise_value_error_naming_them(kwargs, argument):
    arguments = {"num_tasks": 2, "params": [_param()], **kwargs}
    with pytest.raises(ValueError, match=f"AutoLambda: argument '{argument}'"):
        AutoLambda(**arguments)


@pytest.mark.parametrize(
    "bad, why",
    [
        (lambda w: w.sum().reshape(1), "shape"),
        (lambda w: torch.stack([w.sum(), w.sum(), w.sum()]), "shape"),
        (lambda w: w.sum(), "shape"),
        (lambda w: [w[0], w[1]], "Tensor"),
        (lambda w: w * math.inf, "finite"),
        (lambda w: w.detach() ** 2, "differentiable"),
        (lambda w: torch.stack([w[0], w[1]]).long(), "floating"),
    ],
)
@pytest.mark.parametrize("which", ["train_losses_fn", "val_losses_fn"])
def test_callables_returning_bad_losses_raise_value_error_naming_them(bad, why, which):
    w = _param()
    method = AutoLambda(2, [w], lr=0.1)

    def good():
        return (w - 1) ** 2

    def wrong():
        return bad(w)

    fns = (wrong, good) if which == "train_losses_fn" else (good, wrong)
    if why == "floating":
        fns = tuple(f if f is good else (lambda: torch.tensor([1, 2])) for f in fns)
    with pytest.raises(ValueError, match=f"AutoLambda: argument '{which}'.*{why}"):
        method.meta_step(*fns)
    assert w.tolist() == [0.0, 0.0]
    assert method.task_weights.tolist() == [1.0, 1.0]


def test_non_callables_raise_value_error_naming_them():
    w = _param()
    method = AutoLambda(2, [w])
    with pytest.raises(ValueError, match="AutoLambda: argument 'train_losses_fn'"):
        method.meta_step(torch.zeros(2), lambda: (w - 1) ** 2)
    with pytest.raises(ValueError, match="AutoLambda: argument 'val_losses_fn'"):
        method.meta_step(lambda: (w - 1) ** 2, None)


def test_bad_forward_losses_raise_like_every_weighting():
    method = AutoLambda(2, [_param()])
    with pytest.raises(ValueError, match="AutoLambda: argument 'losses'"):
        method(torch.zeros(3))


# ---- (6) it trains


def test_training_with_meta_steps_lowers_the_validation_loss():
    """Three regression tasks on one input: SGD on sum lambda_t L_t with a meta step before each
    step (the validation batch another draw of the training distribution, as the official code)."""
    torch.manual_seed(0)
    num_tasks, d_in = 3, 4
    model = Toy(num_tasks=num_tasks, d_in=d_in, hidden=8, seed=3)
    generator = torch.Generator().manual_seed(5)
    true = torch.randn(d_in, num_tasks, generator=generator, dtype=torch.float64)

    def batch(rows=32):
        x = torch.randn(rows, d_in, generator=generator, dtype=torch.float64)
        return x, torch.tanh(x @ true)

    val = batch(64)
    method = AutoLambda(num_tasks, list(model.parameters()), lr=0.1, weight_lr=0.01).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def val_loss():
        with torch.no_grad():
            return per_task_mse(model(val[0]), val[1]).sum().item()

    start = val_loss()
    for _ in range(150):
        train, meta_val = batch(), batch()
        method.meta_step(losses_fn(model, *train), losses_fn(model, *meta_val))
        optimizer.zero_grad()
        method(per_task_mse(model(train[0]), train[1])).backward()
        optimizer.step()
    end = val_loss()
    assert end < 0.5 * start, (start, end)
    assert bool((method.task_weights >= 0).all())
    assert not torch.equal(method.task_weights, torch.ones(num_tasks, dtype=torch.float64))
