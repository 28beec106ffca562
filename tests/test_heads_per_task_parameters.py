"""MultiTaskHeads(per_task_parameters=True): one nn.Linear per task, so an optimizer's parameter
groups can give one task's head its own learning rate and weight decay (issue 15), against the
stacked heads and against plain per-task nn.Linear heads."""

import pytest
import torch
from torch import nn

from fastmtl import Task
from fastmtl.aggregation import UPGrad
from fastmtl.nn import FusedMLP, MMoE, MultiTaskHeads, MultiTaskModel

TASKS = [
    Task("click", "binary"),
    Task("rating", "multiclass", num_outputs=5),
    Task("dwell", "regression", weight=0.5),
]
D = 7  # an odd width


def make_targets(batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    click = torch.randint(0, 2, (batch,), generator=g).to(torch.float64)
    click[::3] = float("nan")  # missing labels
    return {
        "click": click,
        "rating": torch.randint(0, 5, (batch,), generator=g),
        "dwell": torch.randn(batch, generator=g, dtype=torch.float64),
    }


def twin_heads(dtype=torch.float64):
    """Stacked heads and per-task heads with the same weights (through the other kind's checkpoint)."""
    torch.manual_seed(0)
    stacked = MultiTaskHeads(D, TASKS, dtype=dtype)
    per_task = MultiTaskHeads(D, TASKS, dtype=dtype, per_task_parameters=True)
    per_task.load_state_dict(stacked.state_dict(), strict=True)
    return stacked, per_task


def test_per_task_heads_are_one_linear_per_task():
    heads = MultiTaskHeads(D, TASKS, per_task_parameters=True)
    assert [type(h) for h in heads.task_heads] == [nn.Linear] * 3
    assert [tuple(p.shape) for p in heads.task_parameters("rating")] == [(5, D), (5,)]
    assert sorted(heads.state_dict()) == sorted(f"task_heads.{t}.{n}" for t in range(3) for n in ("weight", "bias"))
    weight, bias = heads.stacked_parameters()
    assert weight.shape == (7, D) and bias.shape == (7,)
    assert "per_task_parameters=True" in repr(heads)


@pytest.mark.parametrize("batch", [1, 10])
def test_logits_losses_and_gradients_match_the_stacked_heads(batch):
    stacked, per_task = twin_heads()
    z = torch.randn(batch, D, dtype=torch.float64)
    targets = make_targets(batch)
    for a, b in zip(stacked(z).values(), per_task(z).values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    loss_s, loss_p = stacked.losses(z, targets), per_task.losses(z, targets)
    torch.testing.assert_close(loss_s, loss_p, rtol=0, atol=0)
    loss_s.sum().backward()
    loss_p.sum().backward()
    rows = stacked.weight.grad.split(stacked.num_outputs)
    bias_rows = stacked.bias.grad.split(stacked.num_outputs)
    for t, task in enumerate(TASKS):
        w, b = per_task.task_parameters(task.name)
        torch.testing.assert_close(w.grad, rows[t], rtol=1e-15, atol=1e-15)
        torch.testing.assert_close(b.grad, bias_rows[t], rtol=1e-15, atol=1e-15)


def test_gradcheck_through_the_per_task_parameters():
    _, heads = twin_heads()
    z = torch.randn(4, D, dtype=torch.float64, requires_grad=True)
    targets = heads.pack_targets(make_targets(4))
    params = [p for name in heads.task_names for p in heads.task_parameters(name)]
    # gradcheck perturbs its inputs in place: the Parameters themselves are the inputs here.
    assert torch.autograd.gradcheck(lambda z, *ps: heads.losses(z, targets), [z, *params])


def test_a_task_gets_its_own_learning_rate_and_weight_decay():
    """AdamW groups per task head: the same steps as plain per-task nn.Linear heads with the same
    groups, and different from one shared learning rate."""
    _, heads = twin_heads()
    plain = heads.to_linears()
    groups = {"click": {"lr": 0.05, "weight_decay": 0.0}, "rating": {"lr": 0.001, "weight_decay": 0.3}, "dwell": {}}
    fused_opt = torch.optim.AdamW(
        [{"params": heads.task_parameters(n), **g} for n, g in groups.items()], lr=0.01, weight_decay=0.01
    )
    plain_opt = torch.optim.AdamW(
        [{"params": plain[n].parameters(), **g} for n, g in groups.items()], lr=0.01, weight_decay=0.01
    )
    start = heads.stacked_parameters()[0].detach().clone()
    for step in range(4):
        z = torch.randn(16, D, dtype=torch.float64)
        targets = make_targets(16, seed=step)
        fused_opt.zero_grad()
        (heads.losses(z, targets) * heads.task_weights).sum().backward()
        fused_opt.step()
        plain_opt.zero_grad()
        logits = {n: plain[n](z) for n in heads.task_names}
        loss = (
            nn.functional.binary_cross_entropy_with_logits(
                logits["click"][:, 0][~targets["click"].isnan()], targets["click"][~targets["click"].isnan()]
            )
            + nn.functional.cross_entropy(logits["rating"], targets["rating"])
            + 0.5 * nn.functional.mse_loss(logits["dwell"][:, 0], targets["dwell"])
        )
        loss.backward()
        plain_opt.step()
    for name in heads.task_names:
        for fused_p, plain_p in zip(heads.task_parameters(name), plain[name].parameters()):
            torch.testing.assert_close(fused_p, plain_p, rtol=1e-12, atol=1e-12)
    moved = (heads.stacked_parameters()[0].detach() - start).abs().split(heads.num_outputs)
    # the click head (lr 0.05) moved far more per entry than the rating head (lr 0.001)
    assert moved[0].mean() > 10 * moved[1].mean()


def test_checkpoints_load_across_both_kinds():
    stacked, per_task = twin_heads()
    back = MultiTaskHeads(D, TASKS, dtype=torch.float64)
    back.load_state_dict(per_task.state_dict(), strict=True)
    torch.testing.assert_close(back.weight, stacked.weight, rtol=0, atol=0)
    torch.testing.assert_close(back.bias, stacked.bias, rtol=0, atol=0)
    for name, linear in per_task.to_linears().items():
        w, b = per_task.task_parameters(name)
        assert linear.weight.data_ptr() != w.data_ptr()  # copies
        torch.testing.assert_close(linear.weight, w, rtol=0, atol=0)
        torch.testing.assert_close(linear.bias, b, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="Missing key"):
        per_task.load_state_dict({"weight": stacked.weight.detach()}, strict=True)


def test_copy_and_load_from_linears():
    _, per_task = twin_heads()
    plain = {t.name: nn.Linear(D, t.num_outputs, dtype=torch.float64) for t in TASKS}
    plain["dwell"] = nn.Linear(D, 1, bias=False, dtype=torch.float64)
    per_task.load_from_linears(plain)
    torch.testing.assert_close(per_task.task_parameters("rating")[0], plain["rating"].weight, rtol=0, atol=0)
    assert per_task.task_parameters("dwell")[1].eq(0).all()
    also = MultiTaskHeads.from_linears(plain, TASKS, per_task_parameters=True)
    assert also.per_task_parameters
    torch.testing.assert_close(also.stacked_parameters()[0], per_task.stacked_parameters()[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"copy_stacked_: rows 1\.\.4 expected to start and end at task boundaries"):
        per_task.copy_stacked_(torch.zeros(3, D, dtype=torch.float64), None, first_row=1)
    with pytest.raises(ValueError, match=r"copy_stacked_: argument 'weight' expected shape \[n, 7\]"):
        per_task.copy_stacked_(torch.zeros(1, D + 1, dtype=torch.float64), None)


def test_bad_arguments_are_named():
    stacked, per_task = twin_heads()
    with pytest.raises(
        ValueError, match="task_parameters: the heads keep one stacked weight.*per_task_parameters=True"
    ):
        stacked.task_parameters("click")
    with pytest.raises(ValueError, match=r"task_parameters: argument 'task' expected one of \['click'"):
        per_task.task_parameters("like")
    with pytest.raises(TypeError, match="argument 'per_task_parameters' expected a bool, got int"):
        MultiTaskHeads(D, TASKS, per_task_parameters=1)


def _models(trunk_factory, x_dim):
    """The same model with stacked and with per-task heads."""
    torch.manual_seed(3)
    trunk = trunk_factory().double()
    features = 6
    stacked = MultiTaskModel(trunk, MultiTaskHeads(features, TASKS, dtype=torch.float64))
    twin_trunk = trunk_factory().double()
    twin_trunk.load_state_dict(trunk.state_dict())
    per_task = MultiTaskModel(
        twin_trunk, MultiTaskHeads(features, TASKS, dtype=torch.float64, per_task_parameters=True)
    )
    per_task.heads.load_state_dict(stacked.heads.state_dict())
    return stacked, per_task, torch.randn(12, x_dim, dtype=torch.float64)


TRUNKS = {
    "fused_mlp": (lambda: FusedMLP(5, [9, 6]), 5),  # the fused path of model.mtl_backward
    "mmoe": (lambda: MMoE(5, 3, [6], len(TASKS)), 5),  # the generic path, per-task representations
}


@pytest.mark.parametrize("trunk", sorted(TRUNKS))
@pytest.mark.parametrize("mode", ["exact", "rep"])
def test_mtl_backward_gives_each_task_head_its_rows(trunk, mode):
    stacked, per_task, x = _models(*TRUNKS[trunk])
    targets = make_targets(len(x))
    result_s = stacked.mtl_backward(x, targets, UPGrad(), mode=mode)
    result_p = per_task.mtl_backward(x, targets, UPGrad(), mode=mode)
    torch.testing.assert_close(result_s.weights, result_p.weights, rtol=1e-12, atol=1e-12)
    rows = stacked.heads.weight.grad.split(stacked.heads.num_outputs)
    bias_rows = stacked.heads.bias.grad.split(stacked.heads.num_outputs)
    for t, task in enumerate(TASKS):
        w, b = per_task.heads.task_parameters(task.name)
        torch.testing.assert_close(w.grad, rows[t], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(b.grad, bias_rows[t], rtol=1e-12, atol=1e-14)
    for a, b in zip(stacked.trunk.parameters(), per_task.trunk.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)


def test_fused_mtl_backward_under_bf16_autocast_reaches_the_per_task_parameters():
    stacked, per_task, x = _models(*TRUNKS["fused_mlp"])
    stacked.float(), per_task.float()
    x = x.float()
    targets = make_targets(len(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stacked.mtl_backward(x, targets, UPGrad())
        per_task.mtl_backward(x, targets, UPGrad())
    rows = stacked.heads.weight.grad.split(stacked.heads.num_outputs)
    for t, task in enumerate(TASKS):
        grad = per_task.heads.task_parameters(task.name)[0].grad
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, rows[t], rtol=0, atol=0)


def test_forward_with_targets_to_dtype_compile_and_add_tasks():
    stacked, per_task, x = _models(*TRUNKS["fused_mlp"])
    targets = make_targets(len(x))
    out_s, out_p = stacked(x, targets), per_task(x, targets)
    torch.testing.assert_close(out_s.loss, out_p.loss, rtol=0, atol=0)
    compiled = torch.compile(per_task, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, targets).loss, out_p.loss, rtol=1e-14, atol=0)
    bf16 = MultiTaskModel(FusedMLP(5, [9, 6]), MultiTaskHeads(6, TASKS, per_task_parameters=True)).to(torch.bfloat16)
    assert bf16(x.to(torch.bfloat16), targets).loss.dtype == torch.float32
    assert bf16.heads.task_weights.dtype == torch.float32
    per_task.add_tasks([Task("like", "binary")])
    assert per_task.heads.per_task_parameters and len(per_task.heads.task_heads) == 4
    torch.testing.assert_close(per_task.heads.task_parameters("rating")[0], stacked.heads.weight[1:6], rtol=0, atol=0)


def test_compiled_fused_mtl_backward_writes_the_per_task_parameters():
    # fullgraph: the fused path writes each task's rows as .grad (no backward through the concatenation)
    torch._dynamo.reset()
    stacked, per_task, x = _models(*TRUNKS["fused_mlp"])
    packed = per_task.heads.pack_targets(make_targets(len(x)))
    compiled = torch.compile(per_task.mtl_backward, fullgraph=True, backend="eager")
    compiled(x, packed, UPGrad())
    stacked.mtl_backward(x, packed, UPGrad())
    rows = stacked.heads.weight.grad.split(stacked.heads.num_outputs)
    for t, task in enumerate(TASKS):
        torch.testing.assert_close(per_task.heads.task_parameters(task.name)[0].grad, rows[t], rtol=1e-12, atol=1e-14)


def test_checkpoint_edge_cases_and_op_arguments():
    stacked, per_task = twin_heads()
    # a stacked checkpoint with other rows: reported by load_state_dict, not a failed split
    other = MultiTaskHeads(D, TASKS[:2], dtype=torch.float64)
    with pytest.raises(RuntimeError, match="Missing key"):
        per_task.load_state_dict(other.state_dict())
    # assign=True: each task's Parameters get storage of their own
    fresh = MultiTaskHeads(D, TASKS, dtype=torch.float64, per_task_parameters=True)
    fresh.load_state_dict(stacked.state_dict(), assign=True)
    pointers = {p.untyped_storage().data_ptr() for p in fresh.parameters()}
    assert len(pointers) == 6
    torch.testing.assert_close(fresh.stacked_parameters()[0], stacked.weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"copy_stacked_: argument 'bias' expected shape \[7\]"):
        stacked.copy_stacked_(torch.zeros(7, D, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    weight, bias, layout, task_weights = per_task.op_arguments  # four fields, as before
    assert weight.shape == (7, D) and per_task.parameter_parts()[0][1] is per_task.task_heads[1].weight
    assert stacked.parameter_parts() is None


def test_a_frozen_task_head_stays_frozen_in_the_fused_step():
    _, per_task, x = _models(*TRUNKS["fused_mlp"])
    for p in per_task.heads.task_parameters("rating"):
        p.requires_grad_(False)
    per_task.mtl_backward(x, make_targets(len(x)), UPGrad())
    assert all(p.grad is None for p in per_task.heads.task_parameters("rating"))
    assert all(p.grad is not None for p in per_task.heads.task_parameters("click"))
