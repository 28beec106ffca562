"""MMoE, PLE and SoftSharedLinear against plain PyTorch modules written as the recommendation
libraries write them (plain_mixtures: a Python loop over experts, gates and tasks); MultiTaskModel
over them. Normalisation, dropout, towers and gate MLPs: test_nn_experts_towers.py."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmtl
from conftest import PLAIN_ACTIVATIONS, assert_rel_close, mixed_tasks, random_targets
from fastmtl import Task
from fastmtl.nn import PLE, MMoE, MultiTaskHeads, MultiTaskModel, SoftSharedLinear
from plain_mixtures import PlainMMoE, PlainPLE, assert_grads_match


@pytest.mark.parametrize("activation", list(PLAIN_ACTIVATIONS))
@pytest.mark.parametrize(
    "shape",
    [(1, 1, 1, [1], 1), (7, 5, 1, [3], 2), (13, 9, 8, [31, 5], 6), (64, 33, 3, [17, 9, 4], 1)],
    ids=lambda s: f"B{s[0]}-in{s[1]}-E{s[2]}-{'x'.join(map(str, s[3]))}-T{s[4]}",
)
def test_mmoe_matches_plain_loop(activation, shape):
    batch, d, E, hidden, T = shape
    torch.manual_seed(batch + E)
    fused = MMoE(d, E, hidden, T, activation=activation)
    plain = PlainMMoE(fused.double(), activation)
    fused = fused.float()
    x64 = torch.randn(batch, d, dtype=torch.float64)
    ref_out = plain(x64)
    cot = [torch.randn_like(r) for r in ref_out]
    sum((r * c).sum() for r, c in zip(ref_out, cot)).backward()
    x = x64.float().requires_grad_()
    out = fused(x)
    for o, r in zip(out, ref_out):
        assert_rel_close(o, r, what="task representation")
    sum((o * c.float()).sum() for o, c in zip(out, cot)).backward()
    assert_grads_match(fused, plain.grads(fused))


PLE_CASES = [
    # (shared experts, task experts, tasks, levels, hidden)
    (1, 1, 1, 1, [4]),
    (2, 1, 3, 1, [8, 5]),
    (0, 2, 2, 2, [6]),
    (3, 0, 2, 2, [7]),
    (2, 2, 4, 3, [9, 4]),
]


@pytest.mark.parametrize("case", PLE_CASES, ids=lambda c: f"S{c[0]}-P{c[1]}-T{c[2]}-L{c[3]}")
@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_ple_matches_plain_loop(case, activation):
    S, P, T, L, hidden = case
    torch.manual_seed(S * 10 + P + L)
    fused = PLE(11, S, P, hidden, T, num_levels=L, activation=activation)
    plain = PlainPLE(fused.double(), activation)
    fused = fused.float()
    x64 = torch.randn(17, 11, dtype=torch.float64)
    ref_out = plain(x64)
    cot = [torch.randn_like(r) for r in ref_out]
    sum((r * c).sum() for r, c in zip(ref_out, cot)).backward()
    out = fused(x64.float())
    for o, r in zip(out, ref_out):
        assert_rel_close(o, r, what="task representation")
    sum((o * c.float()).sum() for o, c in zip(out, cot)).backward()
    assert_grads_match(fused, plain.grads(fused))


def test_ple_one_level_is_cgc_over_shared_and_own_experts():
    torch.manual_seed(0)
    ple = PLE(6, 2, 1, [4], 3).double()
    assert len(ple.shared_gates) == 0 and ple.task_gates[0].expert_index == [0, 1, 2, 0, 1, 3, 0, 1, 4]


def test_gradcheck_float64_modules():
    torch.manual_seed(1)
    mmoe = MMoE(4, 3, [5, 3], 2, activation="tanh").double()
    ple = PLE(4, 1, 1, [3], 2, num_levels=2, activation="gelu").double()
    soft = SoftSharedLinear(4, 3, 2).double()
    with torch.no_grad():
        soft.task_weight.normal_()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    for module in (mmoe, ple, soft):
        assert torch.autograd.gradcheck(lambda x, module=module: module.task_features(x), (x,))


@pytest.mark.parametrize("per_task_input", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_soft_shared_linear_matches_per_task_linear(per_task_input, bias):
    torch.manual_seed(2)
    layer = SoftSharedLinear(7, 5, 3, bias=bias)
    with torch.no_grad():
        layer.task_weight.normal_(0, 0.1)
    x64 = torch.randn(*((3, 9, 7) if per_task_input else (9, 7)), dtype=torch.float64)
    w64 = layer.weight.detach().double().requires_grad_()
    tw64 = layer.task_weight.detach().double().requires_grad_()
    b64 = None if layer.bias is None else layer.bias.detach().double().requires_grad_()
    ref = torch.stack(
        [F.linear(x64[t] if per_task_input else x64, w64 + tw64[t], None if b64 is None else b64[t]) for t in range(3)]
    )
    out = layer(x64.float())
    assert out.shape == (3, 9, 5)
    assert_rel_close(out, ref, what="outputs")
    cot = torch.randn_like(ref)
    ref_params = [w64, tw64] + ([b64] if bias else [])
    ref_grads = torch.autograd.grad((ref * cot).sum(), ref_params)
    grads = torch.autograd.grad((out * cot.float()).sum(), list(layer.parameters()))
    for g, r in zip(grads, ref_grads):
        assert_rel_close(g, r, what="gradient")
    assert_rel_close(layer.penalty(), tw64.square().sum(), what="penalty")


def test_soft_shared_linear_starts_as_hard_sharing():
    layer = SoftSharedLinear(4, 2, 3)
    assert layer.penalty().item() == 0.0
    out = layer(torch.randn(5, 4))
    assert torch.allclose(out[0] - layer.bias[0], out[2] - layer.bias[2])


def plain_routed_losses(reps, heads, tasks, targets):
    """Task t's head (a plain Linear on its rows of the stacked weight) on representation t."""
    from fastmtl import reference

    losses, row = [], 0
    for t, task in enumerate(tasks):
        n = task.num_outputs
        one = reference.multitask_head_loss(
            reps[t], heads.weight[row : row + n], heads.bias[row : row + n], {task.name: targets[task.name]}, [task]
        )
        losses.append(one[0])
        row += n
    return torch.stack(losses)


@pytest.mark.parametrize("trunk_kind", ["mmoe", "ple", "soft"])
def test_multitask_model_routes_task_representations_to_their_heads(trunk_kind):
    torch.manual_seed(3)
    tasks = mixed_tasks(5)
    trunk = {
        "mmoe": lambda: MMoE(10, 4, [12, 6], 5),
        "ple": lambda: PLE(10, 2, 1, [6], 5, num_levels=2),
        "soft": lambda: SoftSharedLinear(10, 6, 5),
    }[trunk_kind]()
    model = MultiTaskModel(trunk, MultiTaskHeads(6, tasks)).double()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(23, 10, dtype=torch.float64)
    targets = random_targets(tasks, 23, gen, unlabelled=("task2",))
    losses = model.losses(x, targets)
    reps = model.trunk(x)
    expected = plain_routed_losses(reps, model.heads, tasks, targets)
    assert_rel_close(losses, expected, rtol=1e-10, what="losses")
    params = list(model.parameters())
    grads = torch.autograd.grad(torch.dot(losses, model.heads.task_weights), params)
    ref_grads = torch.autograd.grad(torch.dot(expected, model.heads.task_weights), params)
    for g, r in zip(grads, ref_grads):
        assert_rel_close(g, r, rtol=1e-10, what="gradient")
    logits = model(x)
    row = 0
    for t, task in enumerate(tasks):
        w, b = model.heads.weight[row : row + task.num_outputs], model.heads.bias[row : row + task.num_outputs]
        assert_rel_close(logits[task.name], F.linear(reps[t], w, b), rtol=1e-12, what=f"logits of {task.name}")
        row += task.num_outputs


def test_multitask_model_with_mmoe_trains_and_runs_mtl_backward():
    torch.manual_seed(5)
    tasks = [Task("click", "binary"), Task("rating", "multiclass", num_outputs=5), Task("time", "regression")]
    model = MultiTaskModel(MMoE(8, 4, [16, 8], 3), MultiTaskHeads(8, tasks))
    x = torch.randn(64, 8)
    targets = {"click": (x[:, 0] > 0).float(), "rating": (x[:, 1].abs() * 2).long().clamp(max=4), "time": x[:, 2]}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = model.loss(x, targets).item()
    for _ in range(60):
        opt.zero_grad()
        model.loss(x, targets).backward()
        opt.step()
    assert model.loss(x, targets).item() < 0.7 * first
    opt.zero_grad()
    result = model.mtl_backward(x, targets, fastmtl.aggregation.UPGrad())
    assert result.gram.shape == (3, 3) and torch.isfinite(result.weights).all()
    assert all(p.grad is not None for p in model.trunk.parameters())


def test_torch_compile_fullgraph_over_an_mmoe_model():
    torch.manual_seed(6)
    tasks = mixed_tasks(3)
    model = MultiTaskModel(MMoE(6, 3, [8], 3, activation="gelu"), MultiTaskHeads(8, tasks))
    x = torch.randn(11, 6)
    packed = model.heads.pack_targets(random_targets(tasks, 11, torch.Generator().manual_seed(7)))
    eager = model.loss(x, packed)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    compiled = torch.compile(model.loss, fullgraph=True)
    got = compiled(x, packed)
    assert_rel_close(got, eager, rtol=1e-6)
    for a, b in zip(torch.autograd.grad(got, list(model.parameters())), eager_grads):
        assert_rel_close(a, b, rtol=1e-5)


def test_initialised_like_nn_linear():
    torch.manual_seed(8)
    mmoe = MMoE(100, 3, [50, 20], 2)
    for w, fan_in in zip(mmoe.experts.weights, [100, 50]):
        bound = 1 / fan_in**0.5  # kaiming_uniform(a=sqrt(5)) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert mmoe.gates.weight.abs().max() <= 0.1


@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda: MMoE(8, 0, [4], 2), r"'num_experts' expected an int >= 1, got 0"),
        (lambda: MMoE(8, 2, [], 2), r"'expert_hidden' expected at least one layer width"),
        (lambda: MMoE(8, 2, [4, 0], 2), r"'expert_hidden\[1\]' expected an int >= 1, got 0"),
        (lambda: MMoE(8, 2, [4], 0), r"'num_tasks' expected an int >= 1"),
        (lambda: MMoE(8, 2, [4], 2, activation="swish"), r"'activation' expected one of relu"),
        (lambda: PLE(8, 0, 0, [4], 2), r"at least one expert per gate"),
        (lambda: PLE(8, 1, 1, [4], 2, num_levels=0), r"'num_levels' expected an int >= 1"),
        (lambda: SoftSharedLinear(8, 0, 2), r"'out_features' expected an int >= 1"),
    ],
)
def test_bad_construction(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


def test_bad_inputs():
    mmoe = MMoE(8, 2, [4], 2)
    with pytest.raises(ValueError, match=r"MMoE: input expected shape \[B, 8\], got \[3, 7\]"):
        mmoe(torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"SoftSharedLinear: input expected shape"):
        SoftSharedLinear(8, 4, 3)(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"gives 2 per-task representations but heads have 3 tasks"):
        MultiTaskModel(mmoe, MultiTaskHeads(4, mixed_tasks(3)))
    with pytest.raises(ValueError, match=r"trunk outputs 3 features but heads expect in_features=4"):
        MultiTaskModel(SoftSharedLinear(8, 3, 2), MultiTaskHeads(4, mixed_tasks(2)))

    class ThreeReps(nn.Module):  # a hand-written trunk returning one representation per task, one too many
        def forward(self, x):
            return [x[:, :4]] * 3

    with pytest.raises(ValueError, match=r"per-task representations expected shape \[2, B, 4\].*got \[3, 5, 4\]"):
        MultiTaskModel(ThreeReps(), MultiTaskHeads(4, mixed_tasks(2))).losses(
            torch.randn(5, 8), random_targets(mixed_tasks(2), 5, torch.Generator().manual_seed(0))
        )


def test_ops_registered():
    for name in ("fused_experts", "fused_experts_backward", "gated_mixture", "gated_mixture_backward"):
        assert hasattr(torch.ops.fastmtl, name)
