"""Transfer learning: MultiTaskModel.add_tasks, freeze_trunk / unfreeze_trunk."""

import math

import pytest
import torch

from fastmtl import Task
from fastmtl.nn import FusedMLP, MMoE, MultiTaskHeads, MultiTaskModel


def make_data(batch=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 10, generator=gen)
    signal = x @ torch.randn(10, 3, generator=gen)
    targets = {
        "a": signal[:, 0],
        "b": (signal[:, 1] > 0).float(),
        "c": torch.bucketize(signal[:, 2].contiguous(), torch.tensor([-1.0, 0.0, 1.0])),  # 4 classes
    }
    return x, targets


def train(model, x, targets, steps, lr=1e-2):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        model.loss(x, targets).backward()
        opt.step()


def test_pretrain_freeze_and_fine_tune_new_task():
    torch.manual_seed(0)
    x, targets = make_data()
    old_tasks = [Task("a", "regression"), Task("b", "binary")]
    model = MultiTaskModel(FusedMLP(10, [32, 16]), MultiTaskHeads(16, old_tasks))
    train(model, x, {k: targets[k] for k in "ab"}, 30)

    model.freeze_trunk().add_tasks([Task("c", "multiclass", num_outputs=4)])
    assert [t.name for t in model.tasks] == ["a", "b", "c"]
    trunk_before = [p.detach().clone() for p in model.trunk.parameters()]
    new_rows = slice(2, 6)
    new_loss_before = model.losses(x, targets)[2].item()
    train(model, x, targets, 80)

    for p, before in zip(model.trunk.parameters(), trunk_before):
        assert torch.equal(p, before), "the frozen trunk is bit-identical"
        assert p.grad is None and not p.requires_grad
    assert model.heads.weight.grad[new_rows].abs().sum() > 0
    new_loss_after = model.losses(x, targets)[2].item()
    assert new_loss_after < 0.7 * new_loss_before, (new_loss_before, new_loss_after)

    model.unfreeze_trunk()
    assert all(p.requires_grad for p in model.trunk.parameters())


def test_add_tasks_keeps_the_trained_heads():
    torch.manual_seed(1)
    x, _ = make_data(16)
    model = MultiTaskModel(FusedMLP(10, [8]), MultiTaskHeads(8, [Task("a", "regression"), Task("b", "binary")]))
    before = model(x)
    weight, bias = model.heads.weight.detach().clone(), model.heads.bias.detach().clone()
    model.add_tasks([Task("c", "multiclass", num_outputs=4), Task("d", "regression", num_outputs=2, weight=0.5)])
    after = model(x)
    for name in "ab":
        assert torch.equal(after[name], before[name])
    assert torch.equal(model.heads.weight[:2], weight) and torch.equal(model.heads.bias[:2], bias)
    assert after["c"].shape == (16, 4) and after["d"].shape == (16, 2)
    assert model.heads.task_weights.tolist() == [1.0, 1.0, 1.0, 0.5]
    # New heads are initialised like nn.Linear(8, n): U(-1/sqrt(8), 1/sqrt(8)).
    assert model.heads.weight[2:].abs().max() <= 1 / math.sqrt(8)


def test_add_tasks_bad_input():
    model = MultiTaskModel(FusedMLP(4, [8]), MultiTaskHeads(8, [Task("a", "regression")]))
    with pytest.raises(ValueError, match=r"has task 'a', which the model has already"):
        model.add_tasks([Task("a", "binary")])
    mmoe = MultiTaskModel(MMoE(4, 2, [8], 1), MultiTaskHeads(8, [Task("a", "regression")]))
    with pytest.raises(ValueError, match=r"MMoE trunk has one representation per task"):
        mmoe.add_tasks([Task("b", "binary")])
