"""The cross-Gram methods (requires = "cross_gram": MoDo, SDMGrad, CR-MOGM over them) through both
engines (issue 17): fastmtl.mtl_backward on losses [K, T] of K = 2 or 3 independent batches against
fastmtl.reference.mtl_backward (per-task autograd.grad calls per batch) and torchjd's own weightings,
on every path of the exact Gram; model.mtl_backward on the batch's two halves; the refusals."""

import copy

import pytest
import torch
from torch import nn

import fastmtl
import fastmtl.aggregation as agg
from conftest import assert_rel_close, mixed_tasks, random_targets

T_TASKS = 3

METHODS = {
    "MoDo": lambda: agg.MoDo(gamma=0.5, rho=0.05),
    "SDMGrad": lambda: agg.SDMGrad(lr=2.0, n_iter=5),
    "CRMOGM(MoDo)": lambda: agg.CRMOGM(agg.MoDo(gamma=0.5), alpha=0.5),
}


def mlp_trunk():
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.ReLU())


def conv_trunk():
    # Conv and BatchNorm: their vmap rules loop over the tasks, so the plan is the task loop.
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 12))


class CrossBatchModel(nn.Module):
    """A trunk run once over K stacked batches, one linear head per task, per-task MSEs ``[K, T]``
    (a task may be unlabelled in one batch)."""

    def __init__(self, trunk, num_tasks=T_TASKS, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = trunk
        self.heads = nn.ModuleList(nn.Linear(12, 1) for _ in range(num_tasks))
        self.double()

    def losses(self, x, y, unlabelled=()):
        K, B = y.shape[:2]
        z = self.trunk(x.reshape(K * B, *x.shape[2:]))
        rows = []
        for k in range(K):
            zk = z[k * B : (k + 1) * B]
            per_task = []
            for t, head in enumerate(self.heads):
                err = (head(zk).squeeze(-1) - y[k, :, t]) ** 2
                per_task.append(err.sum() * 0.0 if (k, t) in unlabelled else err.mean())
            rows.append(torch.stack(per_task))
        return torch.stack(rows), z


def batches(K, B=6, shape=(6,), num_tasks=T_TASKS, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(K, B, *shape, generator=g, dtype=torch.float64)
    return x, torch.randn(K, B, num_tasks, generator=g, dtype=torch.float64)


def step(model, run):
    model.zero_grad(set_to_none=True)
    result = run()
    return result, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(model, x, y, method, rtol=1e-10, unlabelled=(), steps=1, **options):
    """``steps`` successive steps of fastmtl and of the reference, each with its own copy of the
    (stateful) method; the gradients, weights and cross-Gram of every step agree."""
    ours, theirs = method(), method()
    for _ in range(steps):

        def engine():
            losses, z = model.losses(x, y, unlabelled)
            return fastmtl.mtl_backward(losses, z, ours, keep_jacobian=True, **options)

        def reference():
            losses, z = model.losses(x, y, unlabelled)
            return fastmtl.reference.mtl_backward(losses, z, theirs, keep_jacobian=True)

        got, got_grads = step(model, engine)
        want, want_grads = step(model, reference)
        assert got_grads.keys() == want_grads.keys()
        for name in want_grads:
            assert_rel_close(got_grads[name], want_grads[name], rtol, name)
        assert_rel_close(got.gram, want.gram, rtol, "cross-Gram")
        assert_rel_close(got.weights, want.weights, rtol, "weights")
        assert_rel_close(got.jacobian, want.jacobian, rtol, "jacobian")
        assert got.losses.shape == (x.shape[0], T_TASKS)
    return got


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("K", [2, 3])
def test_cross_gram_methods_match_the_reference_over_steps(name, K):
    model = CrossBatchModel(mlp_trunk())
    x, y = batches(K)
    result = compare(model, x, y, METHODS[name], steps=3)
    assert result.path == "batched" and result.gram.shape == (T_TASKS, T_TASKS)
    assert not torch.allclose(result.gram, result.gram.T)  # a cross-Gram, not a Gram matrix


@pytest.mark.parametrize(
    "trunk, options, path",
    [
        (mlp_trunk, dict(memory_budget=0), "streamed"),
        (conv_trunk, {}, "task-loop"),
    ],
)
def test_every_gram_path_supplies_the_cross_gram(trunk, options, path):
    model = CrossBatchModel(trunk())
    x, y = batches(2, shape=(2, 4, 4)) if trunk is conv_trunk else batches(2)
    # keep_jacobian materialises the streamed path's Jacobian: check the streamed plan without it too.
    compare(model, x, y, METHODS["MoDo"], **options)
    losses, z = model.losses(x, y)
    assert fastmtl.mtl_backward(losses, z, agg.MoDo(), **options).path == path


def test_weights_and_update_match_torchjd_two_and_three_batch_examples():
    torchjd_aggregation = pytest.importorskip("torchjd.aggregation")
    model = CrossBatchModel(mlp_trunk())
    shared = list(model.trunk.parameters())
    for K in (2, 3):
        x, y = batches(K, seed=K)
        losses, z = model.losses(x, y)
        model.zero_grad(set_to_none=True)
        result = fastmtl.mtl_backward(losses, z, agg.MoDo(gamma=0.5, rho=0.1))
        got = torch.cat([p.grad.reshape(-1) for p in shared])
        # torchjd's documented MoDo loop: J_1, J_2 by autograd, G = J_1 J_2^T, its weighting.
        losses, z = model.losses(x, y)
        J = [
            torch.stack(
                [
                    torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)])
                    for loss in row
                ]
            )
            for row in losses
        ]
        weights = torchjd_aggregation.MoDoWeighting(gamma=0.5, rho=0.1)(J[0] @ J[1].T)
        assert_rel_close(result.weights, weights, 1e-12, "weights")
        # The update: the two batches' mean loss (K = 2, eq. 2.9b), the third batch (K = 3).
        want = weights @ ((J[0] + J[1]) / 2 if K == 2 else J[2])
        assert_rel_close(got, want, 1e-12, f"update, K={K}")
        sdm = torchjd_aggregation.SDMGradWeighting()(J[0] @ J[1].T)
        assert_rel_close(agg.SDMGrad()(cross_gram=(J[0] @ J[1].T).detach()), sdm, 1e-12, "SDMGrad weights")


def test_a_task_unlabelled_in_one_batch_has_a_zero_row_and_nothing_is_nan():
    model = CrossBatchModel(mlp_trunk())
    x, y = batches(2)
    result = compare(model, x, y, METHODS["SDMGrad"], unlabelled={(1, 2)})
    assert torch.equal(result.gram[:, 2], torch.zeros(T_TASKS, dtype=torch.float64))
    assert torch.isfinite(result.weights).all()


def test_heads_get_the_mean_over_the_batches_of_their_own_loss():
    model = CrossBatchModel(mlp_trunk())
    x, y = batches(2)
    losses, z = model.losses(x, y)
    model.zero_grad(set_to_none=True)
    fastmtl.mtl_backward(losses, z, agg.MoDo())
    losses, _ = model.losses(x, y)
    for t, head in enumerate(model.heads):
        want = torch.autograd.grad(losses[:, t].mean(), head.weight, retain_graph=True)[0]
        assert_rel_close(head.weight.grad, want, 1e-12, f"head {t}")


def test_gram_every_keeps_the_method_weights_and_its_state_moves_once_per_computed_step():
    model = CrossBatchModel(mlp_trunk())
    x, y = batches(2)
    method, twin = agg.MoDo(gamma=0.5), agg.MoDo(gamma=0.5)
    results = []
    for _ in range(3):
        losses, z = model.losses(x, y)
        results.append(fastmtl.mtl_backward(losses, z, method, gram_every=2))
    assert [r.gram_computed for r in results] == [True, False, True]
    assert torch.equal(results[1].weights, results[0].weights) and torch.equal(results[1].gram, results[0].gram)
    for r in (results[0], results[2]):  # two computed steps: the twin's two calls on the same cross-Gram
        assert_rel_close(r.weights, twin(cross_gram=r.gram), 1e-12, "weights")


def test_partial_gram_and_report_cosine():
    model = CrossBatchModel(mlp_trunk())
    x, y = batches(2)
    last = list(model.trunk[2].parameters())
    method = agg.MoDo()
    before = copy.deepcopy(method.state_dict())
    losses, z = model.losses(x, y)
    result = fastmtl.mtl_backward(losses, z, method, gram_params=last, report_cosine=True)
    assert result.path.startswith("partial/") and result.gram.shape == (T_TASKS, T_TASKS)
    assert 0.0 < result.cosine <= 1.0 + 1e-12
    # The exact update was computed with a copy: the method's state moved once.
    twin = agg.MoDo()
    twin.load_state_dict(before)
    assert_rel_close(result.weights, twin(cross_gram=result.gram), 1e-12, "weights")


def test_refusals_name_the_argument_and_say_what_is_needed():
    model = CrossBatchModel(mlp_trunk())
    x, y = batches(2)
    losses, z = model.losses(x, y)
    with pytest.raises(
        ValueError, match=r"argument 'losses' expected a \[2, T\] or \[3, T\] tensor with MoDo.*got \[3\]"
    ):
        fastmtl.mtl_backward(losses[0], z, agg.MoDo())
    with pytest.raises(ValueError, match=r"argument 'losses' expected a \[2, T\] or \[3, T\].*got \[1, 3\]"):
        fastmtl.mtl_backward(losses[:1], z, agg.SDMGrad())
    with pytest.raises(ValueError, match="argument 'mode' expected 'exact' with MoDo.*cross-Gram.*got 'rep'"):
        fastmtl.mtl_backward(losses, z, agg.MoDo(), mode="rep")
    with pytest.raises(ValueError, match=r"argument 'losses' expected a 1-D tensor \[T\].*got \[2, 3\]"):
        fastmtl.mtl_backward(losses, z, agg.UPGrad())
    assert all(p.grad is None for p in model.parameters())  # refused before any backward


TASKS = mixed_tasks(4)


def fused_model(trunk=None):
    torch.manual_seed(0)
    trunk = trunk if trunk is not None else fastmtl.nn.FusedMLP(5, [9, 7])
    width = trunk.out_features if hasattr(trunk, "out_features") else 7
    return fastmtl.nn.MultiTaskModel(trunk, fastmtl.nn.MultiTaskHeads(width, TASKS)).double()


@pytest.mark.parametrize("name", list(METHODS))
def test_model_mtl_backward_uses_the_batch_halves(name):
    model = fused_model()
    x = torch.randn(11, 5, dtype=torch.float64)
    targets = random_targets(TASKS, 11, torch.Generator().manual_seed(2))
    model.zero_grad(set_to_none=True)
    got = model.mtl_backward(x, targets, METHODS[name]())
    got_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    # The same step by hand: the halves' losses [2, T] through the reference loop.
    model.zero_grad(set_to_none=True)
    z = model.trunk(x)
    halves = [slice(0, 5), slice(5, 11)]
    losses = torch.stack([model.heads.losses(z[h], {k: v[h] for k, v in targets.items()}) for h in halves])
    want = fastmtl.reference.mtl_backward(losses * model.heads.task_weights, z, METHODS[name]())
    assert got.losses.shape == (2, len(TASKS))
    assert_rel_close(got.losses, losses.detach(), 1e-12, "losses")
    assert_rel_close(got.gram, want.gram, 1e-10, "cross-Gram")
    assert_rel_close(got.weights, want.weights, 1e-10, "weights")
    for n, p in model.named_parameters():
        assert_rel_close(got_grads[n], p.grad, 1e-10, n)


def test_model_mtl_backward_on_mmoe_aggregates_the_declared_shared_experts_only():
    torch.manual_seed(0)
    trunk = fastmtl.nn.MMoE(5, 3, [6, 4], len(TASKS))
    model = fastmtl.nn.MultiTaskModel(trunk, fastmtl.nn.MultiTaskHeads(4, TASKS)).double()
    x = torch.randn(10, 5, dtype=torch.float64)
    targets = random_targets(TASKS, 10, torch.Generator().manual_seed(3))
    shared = model.shared_parameters()
    assert 0 < len(shared) < len(list(model.trunk.parameters()))
    model.zero_grad(set_to_none=True)
    result = model.mtl_backward(x, targets, agg.MoDo(), keep_jacobian=True)
    numel = sum(p.numel() for p in shared)
    assert result.jacobian.shape == (2 * len(TASKS), numel) and result.path
    assert all(p.grad is not None for p in model.parameters())


def test_model_mtl_backward_refuses_a_batch_of_one_and_the_fused_path_refuses_cross_gram():
    model = fused_model()
    x = torch.randn(1, 5, dtype=torch.float64)
    targets = random_targets(TASKS, 1, torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match="argument 'x' expected a batch of at least 2 examples with MoDo.*got 1"):
        model.mtl_backward(x, targets, agg.MoDo())
    with pytest.raises(ValueError, match="argument 'mode' expected 'exact' with SDMGrad"):
        model.mtl_backward(
            torch.randn(4, 5, dtype=torch.float64),
            random_targets(TASKS, 4, torch.Generator().manual_seed(5)),
            agg.SDMGrad(),
            mode="rep",
        )
    with pytest.raises(ValueError, match="argument 'aggregator' expected a method the fused path supplies.*got MoDo"):
        fastmtl.engine.fused_model_backward(
            model,
            torch.randn(4, 5, dtype=torch.float64),
            random_targets(TASKS, 4, torch.Generator().manual_seed(5)),
            agg.MoDo(),
        )
    assert all(p.grad is None for p in model.parameters())
