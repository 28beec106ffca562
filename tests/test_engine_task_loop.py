"""The task-loop path of fastmtl.mtl_backward (trunks with conv, batch norm, attention): each of the
T passes starts at its task's own loss, the heads get their gradients from those passes, the
per-task gradients land in one [T, P] Jacobian, and the step matches the reference."""

import pytest
import torch
from torch import nn

import fastmtl
import fastmtl.aggregation as agg
from conftest import assert_rel_close, assert_same_step
from fastmtl.engine.task_jacobian import TaskJacobian
from fastmtl.engine.trunk_gram import task_loss_edges

T_TASKS = 3


class CountBackward(torch.autograd.Function):
    """The identity, counting how often autograd runs its backward."""

    @staticmethod
    def forward(ctx, x, counter):
        ctx.counter = counter
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.counter[0] += 1
        return grad, None


class ConvTasks(nn.Module):
    """A conv + BatchNorm trunk (the task-loop path) and one linear head per task; ``build`` says how
    the per-task losses become the [T] tensor."""

    def __init__(self, num_tasks=T_TASKS, shared_head=False):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.shared_head = shared_head
        if shared_head:  # one Linear whose output t is task t's prediction
            self.heads = nn.ModuleList([nn.Linear(4, num_tasks)])
        else:
            self.heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(num_tasks))
        self.counts = [[0] for _ in range(num_tasks)]
        self.to(torch.float64)

    def losses(self, x, y, build="stack", constant=()):
        z = self.trunk(x)
        pooled = z.mean((2, 3))
        per_task = []
        for t in range(y.shape[1]):
            if t in constant:
                per_task.append(torch.tensor(0.0, dtype=y.dtype))
                continue
            out = self.heads[0](pooled)[:, t] if self.shared_head else self.heads[t](pooled)[:, 0]
            out = CountBackward.apply(out, self.counts[t])
            per_task.append(((out - y[:, t]) ** 2).mean())
        if build == "stack":
            losses = torch.stack(per_task)
        elif build == "cat":
            losses = torch.cat([loss.reshape(1) for loss in per_task])
        else:  # an op after the stack: the passes cannot start at the tasks' own losses
            losses = torch.stack(per_task) * 1.0
        return losses, z


def conv_batch(num_tasks=T_TASKS):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 2, 6, 6, generator=g, dtype=torch.float64)
    return x, torch.randn(5, num_tasks, generator=g, dtype=torch.float64)


def step(model, x, y, engine, **kwargs):
    model.zero_grad(set_to_none=True)
    for count in model.counts:
        count[0] = 0
    losses, z = model.losses(x, y, **kwargs)
    result = engine(losses, z, agg.UPGrad())
    return result, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("build", ["stack", "cat"])
def test_each_head_runs_its_backward_once_per_step(build):
    # T passes from the losses with one-hot cotangents ran every head in every pass (the stack hands
    # the other heads zero gradients, which autograd does not skip), plus a pass for the heads'
    # gradients: T + 1 backward calls per head. From each task's own loss: its own pass, and the
    # pass for the heads' gradients after them (held from the passes, they raised the peak memory).
    model = ConvTasks()
    x, y = conv_batch()
    result, _ = step(model, x, y, fastmtl.mtl_backward, build=build)
    assert result.path == "task-loop"
    assert [c[0] for c in model.counts] == [2] * T_TASKS


@pytest.mark.parametrize("build", ["stack", "cat", "other"])
@pytest.mark.parametrize("shared_head", [False, True])
def test_the_step_matches_the_reference_however_the_losses_are_built(build, shared_head):
    model = ConvTasks(shared_head=shared_head)
    x, y = conv_batch()
    got = step(model, x, y, fastmtl.mtl_backward, build=build)
    assert got[0].path == "task-loop"
    assert_same_step(got, step(model, x, y, fastmtl.reference.mtl_backward, build=build), 1e-9)
    if build == "other":  # the fallback: every pass runs every head, still the same step
        assert all(c[0] >= T_TASKS for c in model.counts)


def test_a_constant_task_loss_in_the_stack_has_a_zero_row():
    model = ConvTasks()
    x, y = conv_batch()
    got = step(model, x, y, fastmtl.mtl_backward, constant=(1,))
    assert got[0].path == "task-loop"
    assert torch.all(got[0].gram[1] == 0) and torch.all(got[0].gram[:, 1] == 0)
    assert_same_step(got, step(model, x, y, fastmtl.reference.mtl_backward, constant=(1,)), 1e-9)
    assert "heads.1.weight" not in got[1]  # the constant task's head took no part


def test_the_graph_is_kept_so_a_second_call_accumulates_the_same_gradients():
    model = ConvTasks()
    x, y = conv_batch()
    model.zero_grad(set_to_none=True)
    losses, z = model.losses(x, y)
    fastmtl.mtl_backward(losses, z, agg.UPGrad())
    once = {n: p.grad.clone() for n, p in model.named_parameters()}
    result = fastmtl.mtl_backward(losses, z, agg.UPGrad())
    assert result.path == "task-loop"
    for n, p in model.named_parameters():
        assert_rel_close(p.grad, 2 * once[n], 1e-12, n)


def test_the_per_task_gradients_are_one_jacobian_and_match_keep_jacobian_of_the_reference():
    model = ConvTasks()
    x, y = conv_batch()
    losses, z = model.losses(x, y)
    shared = list(model.trunk.parameters())
    result = fastmtl.mtl_backward(losses, z, agg.UPGrad(), shared, keep_jacobian=True)
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[t], shared, retain_graph=True)])
        for t in range(T_TASKS)
    ]
    assert_rel_close(result.jacobian, torch.stack(rows), 1e-12, "jacobian")


def test_task_loss_edges_finds_the_tasks_only_in_a_stack_or_cat_of_scalars():
    a = torch.randn(3, requires_grad=True)
    parts = [a.sum(), (a * 2).sum()]
    assert len(task_loss_edges(torch.stack(parts))) == 2
    assert len(task_loss_edges(torch.cat([p.reshape(1) for p in parts]))) == 2
    assert task_loss_edges(torch.stack(parts) * 2) is None
    assert task_loss_edges(torch.cat([a[:2], a[2:]])) is None  # a two-element input: not one task each
    assert task_loss_edges(torch.stack([a[0], a[1]])) is not None
    assert task_loss_edges(a) is None  # a leaf
    assert task_loss_edges(torch.stack([parts[0], torch.tensor(1.0)]))[1] is None  # a constant task


def passes(blocks):
    """A one_task callable returning the given per-task gradients."""
    return lambda t, retain: [None if b is None else b[t] for b in blocks]


def test_task_jacobian_flat_and_per_block_agree():
    torch.manual_seed(0)
    params = [
        torch.zeros(3, 2, dtype=torch.float64),
        torch.zeros(4, dtype=torch.float64),
        torch.zeros((), dtype=torch.float64),
    ]
    grads = [torch.randn(5, 3, 2, dtype=torch.float64), None, torch.randn(5, dtype=torch.float64)]
    flat = TaskJacobian.from_task_passes(5, params, passes(grads), retain_graph=True)
    assert flat.flat is not None and flat.flat.shape == (5, 6 + 4 + 1)
    full = [grads[0], torch.zeros(5, 4, dtype=torch.float64), grads[2]]
    blocks = TaskJacobian(full)
    weights = torch.rand(5, dtype=torch.float64)
    assert_rel_close(flat.gram(), blocks.gram(), 1e-12, "gram")
    for got, want in zip(flat.weighted(weights), blocks.weighted(weights)):
        assert got.shape == want.shape
        assert_rel_close(got, want, 1e-12, "update")
    assert torch.equal(flat.jacobian(), blocks.jacobian())
    assert flat.sizes() == [6, 4, 1] and [b.shape for b in flat] == [b.shape for b in full]


def test_task_jacobian_of_mixed_dtypes_keeps_blocks_and_sums_the_gram_in_float32():
    params = [torch.zeros(3, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.float32)]
    grads = [torch.randn(4, 3).bfloat16(), torch.randn(4, 2)]
    jac = TaskJacobian.from_task_passes(4, params, passes(grads), retain_graph=True)
    assert jac.flat is None
    want = torch.cat([grads[0].float(), grads[1]], dim=1)
    assert jac.gram().dtype == torch.float32
    assert_rel_close(jac.gram(), want @ want.T, 1e-6, "gram")


def test_one_graph_walk_lists_the_leaves_in_graph_leaves_order_and_the_nodes_topologically():
    from fastmtl.engine import graph_leaves
    from fastmtl.engine.batched_backward import GraphWalk

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
    sequence = nn.Sequential(nn.Embedding(11, 8), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
    z_seq = sequence(torch.randint(0, 11, (3, 5)))
    conv = ConvTasks()
    z_conv = conv.trunk(conv_batch()[0])
    w = torch.randn(4, requires_grad=True)
    shared_node = (w * 2).sum()
    for roots in ([z_seq], [z_conv], [z_conv, z_conv.sum() * w.sum()], [shared_node, shared_node + w[0]]):
        walk = GraphWalk(roots)
        assert [id(p) for p in walk.leaves] == [id(p) for p in graph_leaves(roots)]
        position = {node: i for i, node in enumerate(walk.order)}
        for node in walk.order:  # parents before children
            assert all(position[child] > position[node] for child in walk.nexts[node])
