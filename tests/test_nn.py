"""fastmtl.nn modules against the equivalent plain PyTorch model; torch.compile; training use."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import PLAIN_ACTIVATIONS, assert_rel_close, mixed_tasks, random_targets
from fastmtl import Task
from fastmtl.nn import FusedMLP, MultiTaskHeads, MultiTaskModel


def plain_trunk(in_features, widths, activation="relu", bias=True):
    layers, fan_in = [], in_features
    for w in widths:
        layers += [nn.Linear(fan_in, w, bias=bias), PLAIN_ACTIVATIONS[activation]()]
        fan_in = w
    return nn.Sequential(*layers)


def plain_losses(trunk, linears, tasks, x, targets):
    """The eager PyTorch model users would write: one Linear per task, a loop over losses."""
    z = trunk(x)
    out = []
    for task in tasks:
        logits, t = linears[task.name](z), targets[task.name]
        if task.kind == "multiclass":
            labelled = t != -100
            out.append(F.cross_entropy(logits[labelled], t[labelled]) if labelled.any() else logits.sum() * 0)
            continue
        t = t.reshape(logits.shape).to(logits.dtype)
        labelled = ~torch.isnan(t)
        if not labelled.any():
            out.append(logits.sum() * 0)
            continue
        fn = {"mse": F.mse_loss, "l1": F.l1_loss, "huber": F.smooth_l1_loss, "bce": F.binary_cross_entropy_with_logits}
        out.append(fn[task.loss](logits[labelled], t[labelled]))
    return torch.stack(out)


def make_pair(in_features=12, widths=(16, 8), tasks=None, activation="relu", dtype=torch.float64, seed=0):
    """(fastmtl model, plain trunk, plain heads) with the same weights."""
    tasks = tasks or mixed_tasks(6)
    torch.manual_seed(seed)
    trunk = plain_trunk(in_features, widths, activation).to(dtype)
    linears = nn.ModuleDict({t.name: nn.Linear(widths[-1], t.num_outputs) for t in tasks}).to(dtype)
    model = MultiTaskModel(
        FusedMLP(in_features, list(widths), activation=activation, dtype=dtype),
        MultiTaskHeads(widths[-1], tasks, dtype=dtype),
    )
    model.load_plain_weights(trunk, linears)
    return model, trunk, linears, tasks


def test_initialised_like_nn_linear():
    torch.manual_seed(0)
    fused = FusedMLP(5, [7, 3])
    torch.manual_seed(0)
    plain = plain_trunk(5, [7, 3])
    assert torch.equal(fused.weights[0], plain[0].weight) and torch.equal(fused.biases[1], plain[2].bias)
    heads = MultiTaskHeads(300, [Task("a", "regression", num_outputs=400)])
    bound = 1.0 / math.sqrt(300)
    assert heads.weight.abs().max() <= bound and heads.weight.abs().max() > 0.95 * bound
    assert heads.bias.abs().max() <= bound and heads.weight.std().item() == pytest.approx(
        bound / math.sqrt(3), rel=0.02
    )


@pytest.mark.parametrize("activation", list(PLAIN_ACTIVATIONS))
def test_fused_mlp_module_equals_plain_sequential(activation):
    torch.manual_seed(1)
    plain = plain_trunk(9, [11, 11, 4], activation).double()
    fused = FusedMLP.from_sequential(plain)
    assert fused.activation == activation and fused.hidden_features == (11, 11, 4)
    x = torch.randn(3, 5, 9, dtype=torch.float64)  # leading dims, as nn.Linear accepts
    assert_rel_close(fused(x), plain(x), rtol=1e-12)
    fused(x).square().sum().backward()
    plain(x).square().sum().backward()
    for i, layer in enumerate(l for l in plain if isinstance(l, nn.Linear)):
        assert_rel_close(fused.weights[i].grad, layer.weight.grad, rtol=1e-12)
        assert_rel_close(fused.biases[i].grad, layer.bias.grad, rtol=1e-12)


def test_from_sequential_rejects_what_it_cannot_fuse():
    with pytest.raises(ValueError, match="module 1 expected one of ReLU"):
        FusedMLP.from_sequential(nn.Sequential(nn.Linear(2, 2), nn.Softplus()))
    with pytest.raises(ValueError, match="same activation"):
        FusedMLP.from_sequential(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.Tanh()))
    with pytest.raises(ValueError, match=r"\(nn.Linear, activation\) pairs"):
        FusedMLP.from_sequential(nn.Sequential(nn.Linear(2, 2)))


def test_model_losses_match_plain_pytorch_model_float32(device):
    model, trunk, linears, tasks = make_pair(tasks=mixed_tasks(40), dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(37, 12, generator=gen, dtype=torch.float64)
    targets = random_targets(tasks, 37, gen, missing=0.3, unlabelled=("task5",))
    ref = plain_losses(trunk, linears, tasks, x, targets)
    weights = torch.tensor([t.weight for t in tasks], dtype=torch.float64)
    ref_grads = torch.autograd.grad((ref * weights).sum(), list(trunk.parameters()) + list(linears.parameters()))

    model32 = copy.deepcopy(model).to(device, torch.float32)
    x32 = x.to(device, torch.float32)
    targets = {k: v.to(device) for k, v in targets.items()}
    losses = model32.losses(x32, targets)
    assert losses.device.type == device.type
    assert_rel_close(losses, ref, what="losses")
    model32.loss(x32, targets).backward()
    assert_rel_close(model32.loss(x32, targets), (ref * weights).sum(), what="loss")
    plain_trunk_grads, plain_head_grads = (
        ref_grads[: len(list(trunk.parameters()))],
        ref_grads[len(list(trunk.parameters())) :],
    )
    fused_trunk = [p.grad for pair in zip(model32.trunk.weights, model32.trunk.biases) for p in pair]
    for g, rg in zip(fused_trunk, plain_trunk_grads):
        assert_rel_close(g, rg, what="trunk grad")
    head_w = torch.cat([rg for rg in plain_head_grads[0::2]])
    head_b = torch.cat([rg for rg in plain_head_grads[1::2]])
    assert_rel_close(model32.heads.weight.grad, head_w, what="head weight grad")
    assert_rel_close(model32.heads.bias.grad, head_b, what="head bias grad")


def test_forward_returns_logits_per_task_like_the_plain_heads():
    model, trunk, linears, tasks = make_pair()
    x = torch.randn(4, 12, dtype=torch.float64)
    out = model(x)
    assert list(out) == [t.name for t in tasks]
    for t in tasks:
        assert_rel_close(out[t.name], linears[t.name](trunk(x)), rtol=1e-12)


def test_targets_may_be_packed_once_and_reused():
    model, _, _, tasks = make_pair()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 12, generator=gen, dtype=torch.float64)
    targets = random_targets(tasks, 6, gen)
    packed = model.heads.pack_targets(targets)
    assert torch.equal(model.losses(x, packed), model.losses(x, targets))


def test_gradient_accumulation_and_optimizer_step():
    model, _, _, tasks = make_pair(dtype=torch.float32)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 12, generator=gen)
    targets = random_targets(tasks, 8, gen)
    model.loss(x, targets).backward()
    once = [p.grad.clone() for p in model.parameters()]
    model.loss(x, targets).backward()
    for p, g in zip(model.parameters(), once):
        assert_rel_close(p.grad, 2 * g, rtol=1e-6)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    start = model.loss(x, targets).item()
    for _ in range(30):
        opt.zero_grad()
        model.loss(x, targets).backward()
        opt.step()
    assert model.loss(x, targets).item() < 0.8 * start


def test_state_dict_roundtrip_and_to_dtype():
    model, _, _, tasks = make_pair(dtype=torch.float32)
    keys = set(model.state_dict())
    assert {"trunk.weights.0", "trunk.biases.1", "heads.weight", "heads.bias"} <= keys
    clone = MultiTaskModel(FusedMLP(12, [16, 8]), MultiTaskHeads(8, tasks))
    clone.load_state_dict(model.state_dict())
    x = torch.randn(3, 12)
    assert torch.equal(clone(x)["task0"], model(x)["task0"])
    model64 = model.to(torch.float64)
    assert model64.heads.task_weights.dtype == torch.float64
    assert model64.losses(x.double(), random_targets(tasks, 3, torch.Generator().manual_seed(0))).dtype == torch.float64


def test_torch_compile_fullgraph_matches_eager():
    model, _, _, tasks = make_pair(dtype=torch.float32, activation="gelu")
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(10, 12, generator=gen)
    targets = random_targets(tasks, 10, gen)
    eager = model.loss(x, targets)
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model.loss, fullgraph=True)
    got = compiled(x, targets)
    got.backward()
    assert_rel_close(got, eager, rtol=1e-6)
    for p, g in zip(model.parameters(), eager_grads):
        assert_rel_close(p.grad, g, rtol=1e-6)
    out = torch.compile(model, fullgraph=True)(x)
    assert_rel_close(out["task2"], model(x)["task2"], rtol=1e-6)


def test_model_bad_input():
    model, _, _, tasks = make_pair(dtype=torch.float32)
    x = torch.randn(4, 12)
    targets = random_targets(tasks, 4, torch.Generator().manual_seed(0))
    del targets["task3"]
    with pytest.raises(ValueError, match=r"no entry for task 'task3'"):
        model.losses(x, targets)
    with pytest.raises(ValueError, match=r"input expected shape \[\.\.\., 12\]"):
        model(torch.randn(4, 11))
    with pytest.raises(ValueError, match="trunk outputs 8 features but heads expect in_features=9"):
        MultiTaskModel(FusedMLP(12, [8]), MultiTaskHeads(9, tasks))
    with pytest.raises(ValueError, match="'hidden_features\\[1\\]' expected an int >= 1, got 0"):
        FusedMLP(3, [4, 0])
    with pytest.raises(ValueError, match="'activation' expected one of"):
        FusedMLP(3, [4], activation="swish")


def test_task_validation():
    assert Task("r", "regression").num_outputs == 1 and Task("r", "regression").loss == "mse"
    with pytest.raises(ValueError, match="'kind' expected one of regression, binary, multiclass"):
        Task("x", "ranking")
    with pytest.raises(ValueError, match="'loss' expected one of mse, l1, huber for a regression task, got 'ce'"):
        Task("x", "regression", loss="ce")
    with pytest.raises(ValueError, match="number of classes"):
        Task("x", "multiclass")
    with pytest.raises(ValueError, match="expected 1 for a binary task"):
        Task("x", "binary", num_outputs=2)
    with pytest.raises(ValueError, match="unique names"):
        MultiTaskHeads(4, [Task("a", "binary"), Task("a", "binary")])
