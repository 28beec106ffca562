"""The streamed path's ghost product for Linear layers (fastmtl.engine.linear_ghost): the weight's
Gram share from K = x x^T and the T cotangents, where the cost model says it is cheaper than
materialising the T weight gradients; a weight with a second use is materialised. Every case is
checked against the reference (T backward passes, the Jacobian materialised)."""

import pytest
import torch
from torch import nn

import fastmtl
import fastmtl.aggregation as agg
import fastmtl.engine.batched_backward as batched_backward
from conftest import assert_same_step
from fastmtl.engine.batched_backward import GraphWalk
from fastmtl.engine.linear_ghost import ghost_is_cheaper, ghost_weights

T_TASKS = 3


class Tasks(nn.Module):
    """A trunk and one linear head per task (MSE); ``tied``: the trunk's middle layer applied twice."""

    def __init__(self, trunk, width, num_tasks=T_TASKS, tied=None):
        super().__init__()
        self.trunk, self.tied = trunk, tied
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(num_tasks))

    def losses(self, x, y):
        z = self.trunk(x)
        if self.tied is not None:
            z = torch.tanh(self.tied(z))
        pooled = z if z.dim() == 2 else z.mean(1)
        return torch.stack([((h(pooled)[:, 0] - y[:, t]) ** 2).mean() for t, h in enumerate(self.heads)]), z


def mlp(width, bias=True, tied=False):
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, width, bias=bias), nn.ReLU())
    return Tasks(trunk, width, tied=trunk[2] if tied else None).double()


def data(batch, features=6, sequence=None):
    g = torch.Generator().manual_seed(1)
    shape = (batch, features) if sequence is None else (batch, sequence, features)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(
        batch, T_TASKS, generator=g, dtype=torch.float64
    )


def step(model, x, y, engine, **kwargs):
    model.zero_grad(set_to_none=True)
    losses, z = model.losses(x, y)
    result = engine(losses, z, agg.UPGrad(), **kwargs)
    return result, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def ghost_calls(monkeypatch):
    """How many Linear weights got their Gram share by the ghost product."""
    calls = []
    original = batched_backward.ghost_linear

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(batched_backward, "ghost_linear", spy)
    return calls


@pytest.mark.parametrize("bias", [True, False])
def test_a_small_batch_on_wide_layers_takes_the_ghost_product_and_matches_the_reference(bias, ghost_calls):
    model = mlp(width=48, bias=bias)
    x, y = data(batch=3)
    got = step(model, x, y, fastmtl.mtl_backward, memory_budget=0)
    assert got[0].path == "streamed"
    assert sum(ghost_calls) == 2  # both Linear layers (addmm, and mm without bias)
    assert_same_step(got, step(model, x, y, fastmtl.reference.mtl_backward), 1e-10)


def test_a_large_batch_on_narrow_layers_materialises(ghost_calls):
    model = mlp(width=4)
    x, y = data(batch=40)
    got = step(model, x, y, fastmtl.mtl_backward, memory_budget=0)
    assert ghost_calls and not any(ghost_calls)
    assert_same_step(got, step(model, x, y, fastmtl.reference.mtl_backward), 1e-10)


def test_a_weight_used_twice_is_materialised(ghost_calls):
    model = mlp(width=48, tied=True)  # trunk[2] applied twice: cross terms between its uses
    x, y = data(batch=3)
    losses, z = model.losses(x, y)
    walk = GraphWalk([z])
    params = list(model.trunk.parameters())
    found = ghost_weights(walk.order, walk.nexts, {id(p): i for i, p in enumerate(params)})
    assert sorted(found.values()) == [0]  # the first layer's weight only, not the tied one (index 2)
    got = step(model, x, y, fastmtl.mtl_backward, memory_budget=0)
    assert sum(ghost_calls) == 1
    assert_same_step(got, step(model, x, y, fastmtl.reference.mtl_backward), 1e-10)


def test_a_sequence_input_flattened_into_the_linear_rows_matches_the_reference(ghost_calls):
    model = mlp(width=48)
    x, y = data(batch=2, sequence=2)  # [B, S, d]: nn.Linear views it as B*S rows
    got = step(model, x, y, fastmtl.mtl_backward, memory_budget=0)
    assert any(ghost_calls)
    assert_same_step(got, step(model, x, y, fastmtl.reference.mtl_backward), 1e-10)


def test_float32_ghost_shares_match_the_float64_reference(ghost_calls):
    model = mlp(width=48)
    x, y = data(batch=3)
    want = step(model, x, y, fastmtl.reference.mtl_backward)
    got = step(model.float(), x.float(), y.float(), fastmtl.mtl_backward, memory_budget=0)
    assert any(ghost_calls)
    assert_same_step(got, want, 1e-5)


def test_the_cost_model_prefers_the_ghost_product_for_few_rows_against_the_width():
    assert ghost_is_cheaper(rows=8, d_in=1024, d_out=1024, num_tasks=3)
    assert not ghost_is_cheaper(rows=4096, d_in=64, d_out=64, num_tasks=3)
    # the crossover sits near rows = T d_in d_out / (d_in + T d_out) = 768 here
    assert ghost_is_cheaper(rows=700, d_in=1024, d_out=1024, num_tasks=3)
    assert not ghost_is_cheaper(rows=800, d_in=1024, d_out=1024, num_tasks=3)


def test_the_plan_streams_when_the_ghost_product_saves_most_of_the_gram_work():
    from fastmtl.engine.trunk_gram import plan_gram

    torch.manual_seed(0)
    wide = Tasks(nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU()), 512, num_tasks=8)
    x, y = torch.randn(16, 64), torch.randn(16, 8)
    losses, z = wide.losses(x, y)
    plan = plan_gram([z], list(wide.trunk.parameters()), 8)
    assert plan.path == "streamed" and "ghost product" in plan.reason
    small = mlp(width=16).float()  # the same kind of trunk, too small for a stream to pay
    losses, z = small.losses(*[t.float() for t in data(batch=8)])
    assert plan_gram([z], list(small.trunk.parameters()), T_TASKS).path == "batched"
    wide = wide.double()
    x, y = x.double(), y.double()
    got = step(wide, x, y, fastmtl.mtl_backward)
    assert got[0].path == "streamed"
    assert_same_step(got, step(wide, x, y, fastmtl.reference.mtl_backward), 1e-9)
