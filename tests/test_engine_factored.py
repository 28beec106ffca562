"""The "factored" path of the exact Gram (fastmtl.engine.factored_cotangents, issue 16): on a pooled
CNN, the T cotangents of the pooled features stay ``u_t * w`` down to the last BatchNorm, and a
partial Gram over it costs one pass over the activations for all tasks. Checked against T separate
autograd.grad calls, in float64, in train and eval, through AdaptiveAvgPool2d and mean, ReLU and
threshold; where the factoring stops (a gradient asked below a BatchNorm) the plan and the sweep
fall back and still agree."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmtl
import fastmtl.aggregation as agg
from conftest import assert_rel_close
from fastmtl.engine.trunk_gram import plan_gram

T_TASKS = 5


class Block(nn.Module):
    def __init__(self, c: int, threshold: bool):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.threshold = threshold

    def forward(self, x):
        out = x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.threshold(out, 0.0, 0.0) if self.threshold else F.relu(out)


class PooledCNN(nn.Module):
    """A stem, two residual blocks, a global average pool (``nn.AdaptiveAvgPool2d`` or ``mean``)."""

    def __init__(self, c=4, pool="adaptive", threshold=False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.Sequential(Block(c, threshold), Block(c, threshold))
        self.pool = pool

    def forward(self, x):
        h = self.blocks(self.stem(x))
        return F.adaptive_avg_pool2d(h, 1).flatten(1) if self.pool == "adaptive" else h.mean((2, 3))


def make(pool="adaptive", threshold=False, seed=0):
    torch.manual_seed(seed)
    trunk = PooledCNN(pool=pool, threshold=threshold).double()
    heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(T_TASKS)).double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(6, 3, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randn(6, T_TASKS, generator=g, dtype=torch.float64)

    def losses():
        z = trunk(x)
        return torch.stack([((h(z)[:, 0] - y[:, t]) ** 2).mean() for t, h in enumerate(heads)]), z

    return trunk, heads, losses


def reference_step(trunk, heads, losses, gram_params, method):
    """T autograd.grad calls over ``gram_params``, the method, then one weighted backward."""
    trunk.zero_grad(set_to_none=True)
    heads.zero_grad(set_to_none=True)
    L, _ = losses()
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(L[t], gram_params, retain_graph=True)])
        for t in range(T_TASKS)
    ]
    J = torch.stack(rows)
    weights = method(J @ J.T)
    shared = list(trunk.parameters())
    head_params = list(heads.parameters())
    shared_grads = torch.autograd.grad(L, shared, grad_outputs=weights, retain_graph=True)
    head_grads = torch.autograd.grad(L.sum(), head_params)
    return J @ J.T, weights, dict(zip(map(id, shared + head_params), shared_grads + head_grads))


@pytest.mark.parametrize("pool", ["adaptive", "mean"])
@pytest.mark.parametrize("threshold", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_partial_gram_over_the_last_batch_norm_is_factored_and_exact(pool, threshold, training):
    trunk, heads, losses = make(pool, threshold)
    trunk.train(training)
    last = list(trunk.blocks[-1].bn2.parameters())
    gram, weights, want = reference_step(trunk, heads, losses, last, agg.UPGrad())
    trunk.zero_grad(set_to_none=True)
    heads.zero_grad(set_to_none=True)
    L, z = losses()
    result = fastmtl.mtl_backward(L, z, agg.UPGrad(), gram_params=last, keep_jacobian=True)
    assert result.path == "partial/factored"
    assert_rel_close(result.gram, gram, 1e-10, "gram")
    assert_rel_close(result.weights, weights, 1e-10, "weights")
    for p in list(trunk.parameters()) + list(heads.parameters()):
        assert_rel_close(p.grad, want[id(p)], 1e-10, "gradient")
    assert result.jacobian.shape == (T_TASKS, sum(p.numel() for p in last))


def test_the_factored_sweep_runs_one_batch_norm_backward_for_all_tasks():
    trunk, heads, losses = make()
    last = list(trunk.blocks[-1].bn2.parameters())
    L, z = losses()
    with torch.profiler.profile() as prof:
        fastmtl.mtl_backward(L, z, agg.MGDA(), gram_params=last)
    calls = {e.key: e.count for e in prof.key_averages()}
    # The partial Gram's T gradients take no batch-norm backward; the one weighted backward takes
    # one per BatchNorm of the trunk (5).
    assert calls.get("aten::native_batch_norm_backward", 0) == 5


@pytest.mark.parametrize(
    "pick, path",
    [
        (lambda trunk: [trunk.blocks[-1].conv2.weight], "partial/task-loop"),  # below the BatchNorm
        (lambda trunk: list(trunk.blocks[-1].parameters()), "partial/task-loop"),
        (lambda trunk: list(trunk.blocks[-1].bn2.parameters()) + list(trunk.blocks[-2].bn2.parameters()), None),
    ],
    ids=["conv-below-bn", "whole-block", "two-batch-norms"],
)
def test_where_the_factoring_stops_the_plan_falls_back_and_agrees(pick, path):
    trunk, heads, losses = make()
    chosen = pick(trunk)
    gram, weights, want = reference_step(trunk, heads, losses, chosen, agg.UPGrad())
    trunk.zero_grad(set_to_none=True)
    heads.zero_grad(set_to_none=True)
    L, z = losses()
    result = fastmtl.mtl_backward(L, z, agg.UPGrad(), gram_params=chosen)
    if path is not None:
        assert result.path == path
    assert_rel_close(result.gram, gram, 1e-10, "gram")
    for p in trunk.parameters():
        assert_rel_close(p.grad, want[id(p)], 1e-10, "gradient")


def test_the_streamed_sweep_materialises_factored_cotangents_where_needed():
    # Every parameter, streamed: the cotangents are factored from the pool to the last BatchNorm,
    # then materialised for its input gradient; the Gram matrix is the reference's.
    trunk, heads, losses = make()
    shared = list(trunk.parameters())
    gram, _, want = reference_step(trunk, heads, losses, shared, agg.Mean())
    trunk.zero_grad(set_to_none=True)
    heads.zero_grad(set_to_none=True)
    L, z = losses()
    result = fastmtl.mtl_backward(L, z, agg.Mean(), memory_budget=0)
    assert result.path == "streamed"
    assert_rel_close(result.gram, gram, 1e-10, "gram")
    for p in shared:
        assert_rel_close(p.grad, want[id(p)], 1e-10, "gradient")


def test_unpooled_features_are_not_factored():
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).double()
    z = trunk(torch.randn(2, 3, 4, 4, dtype=torch.float64))
    plan = plan_gram([z], list(trunk[1].parameters()), T_TASKS)
    assert plan.path == "task-loop"
    pooled = z.mean((2, 3))
    assert plan_gram([pooled], list(trunk[1].parameters()), T_TASKS).path == "factored"
    assert plan_gram([pooled], list(trunk.parameters()), T_TASKS).path == "task-loop"  # conv below the BN
