"""MMoE, PLE and SharedBottom with the layers torch-rechub and DeepCTR put in their expert, gate
and tower MLPs (Linear -> BatchNorm1d / LayerNorm -> activation -> Dropout), per-task towers and
gate MLPs, against the plain PyTorch loop of plain_mixtures: outputs, every gradient and the
running statistics in training and in eval; dropout; mtl_backward's task-specific towers;
checkpoints; bad options."""

import copy
import io

import pytest
import torch
from torch import nn

import fastmtl
from conftest import assert_rel_close, mixed_tasks, random_targets
from fastmtl.nn import PLE, MMoE, MultiTaskHeads, MultiTaskModel, SharedBottom
from plain_mixtures import PlainMMoE, PlainPLE, assert_grads_match, plain_bank, stacked_grads

MMOE_CASES = [
    # (batch, in, experts, expert widths, tasks, tower widths, gate widths)
    (24, 9, 3, [16, 8], 2, [6], []),
    (33, 5, 1, [7], 1, [], [4]),
    (40, 12, 5, [10], 4, [9, 3], [6, 5]),
]


def run_and_compare(fused, plain, x64, training):
    """Forward both (fused in float32, plain in float64), backward a random cotangent, compare the
    outputs, every gradient and the running statistics."""
    fused.train(training)
    plain.train(training)
    ref = plain(x64)
    cot = [torch.randn_like(r) for r in ref]
    sum((r * c).sum() for r, c in zip(ref, cot)).backward()
    out = fused(x64.float())
    for t, (o, r) in enumerate(zip(out, ref)):
        assert_rel_close(o, r, rtol=2e-5, what=f"task {t} representation")
    sum((o * c.float()).sum() for o, c in zip(out, cot)).backward()
    assert_grads_match(fused, plain.grads(fused), rtol=2e-5)


@pytest.mark.parametrize("norm", ["batch", "layer", None])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", MMOE_CASES, ids=lambda c: f"B{c[0]}-E{c[2]}-T{c[4]}-tw{len(c[5])}-gw{len(c[6])}")
def test_mmoe_with_norm_towers_and_gate_mlps_matches_plain_loop(norm, training, case):
    batch, d, E, hidden, T, towers, gate_hidden = case
    torch.manual_seed(batch + E)
    fused = MMoE(d, E, hidden, T, norm=norm, tower_hidden=towers, gate_hidden=gate_hidden)
    if norm == "batch":  # non-trivial running statistics and affine parameters, so eval tests them
        randomise_norms(fused)
    plain = PlainMMoE(fused.double())
    fused = fused.float()
    run_and_compare(fused, plain, torch.randn(batch, d, dtype=torch.float64) * 2, training)
    assert fused.out_features == (towers or hidden)[-1]


PLE_CASES = [
    # (shared, task experts, tasks, levels, expert widths, tower widths, gate widths)
    (2, 1, 3, 2, [8, 5], [4], []),
    (0, 2, 2, 2, [6], [], [5]),
    (1, 1, 1, 1, [7], [3], [5]),  # LayerNorm over few features is ill-conditioned
]


@pytest.mark.parametrize("norm", ["batch", "layer"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", PLE_CASES, ids=lambda c: f"S{c[0]}-P{c[1]}-T{c[2]}-L{c[3]}")
def test_ple_with_norm_towers_and_gate_mlps_matches_plain_loop(norm, training, case):
    S, P, T, L, hidden, towers, gate_hidden = case
    torch.manual_seed(S * 10 + P + L)
    fused = PLE(11, S, P, hidden, T, num_levels=L, norm=norm, tower_hidden=towers, gate_hidden=gate_hidden)
    randomise_norms(fused)
    plain = PlainPLE(fused.double())
    fused = fused.float()
    run_and_compare(fused, plain, torch.randn(29, 11, dtype=torch.float64), training)


def randomise_norms(module):
    with torch.no_grad():
        for m in module.modules():
            if hasattr(m, "running_mean") and m.running_mean is not None:
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
            if isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)) or type(m).__name__ == "StackedLayerNorm":
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_shared_bottom_with_norm_matches_plain(norm):
    torch.manual_seed(3)
    fused = SharedBottom(10, [12, 8], [6, 4], 3, norm=norm).double()
    randomise_norms(fused)
    bottom = plain_fused_mlp(fused.bottom)
    towers = plain_bank(fused.towers)
    x = torch.randn(21, 10, dtype=torch.float64)
    h = bottom(x)
    ref = [tower(h) for tower in towers]
    out = fused.float()(x.float())
    for o, r in zip(out, ref):
        assert_rel_close(o, r, rtol=2e-5, what="tower output")
    cot = [torch.randn_like(r) for r in ref]
    sum((r * c).sum() for r, c in zip(ref, cot)).backward()
    sum((o * c.float()).sum() for o, c in zip(out, cot)).backward()
    expected = stacked_grads(fused.towers, towers, "towers.")
    for i, (linear, norm) in enumerate(zip(bottom.linears, bottom.norms)):
        expected |= {f"bottom.weights.{i}": linear.weight.grad, f"bottom.biases.{i}": linear.bias.grad}
        expected |= {f"bottom.norms.{i}.weight": norm.weight.grad, f"bottom.norms.{i}.bias": norm.bias.grad}
    assert_grads_match(fused, expected, rtol=2e-5)
    assert [p.data_ptr() for p in fused.shared_parameters()] == [p.data_ptr() for p in fused.bottom.parameters()]


def plain_fused_mlp(fused):
    """A FusedMLP with a norm as nn.Sequential(Linear, its own norm module (copied), ReLU, ...)."""
    layers, linears, norms = [], [], []
    for i, w in enumerate(fused.weights):
        linear = nn.Linear(w.shape[1], w.shape[0]).double()
        with torch.no_grad():
            linear.weight.copy_(w)
            linear.bias.copy_(fused.biases[i])
        norm = copy.deepcopy(fused.norms[i]).double()
        layers += [linear, norm, nn.ReLU()]
        linears.append(linear)
        norms.append(norm)
    plain = nn.Sequential(*layers)
    plain.linears, plain.norms = linears, norms
    return plain


def test_running_statistics_count_steps_like_batch_norm():
    torch.manual_seed(4)
    fused = MMoE(6, 3, [5], 2, norm="batch", tower_hidden=[4], norm_momentum=None)  # cumulative average
    plain = PlainMMoE(fused.double())
    fused = fused.float()
    for _step in range(3):
        x = torch.randn(16, 6, dtype=torch.float64)
        plain(x)
        fused(x.float())
    for bank, plains in ((fused.experts, plain.experts), (fused.towers, plain.towers)):
        for i, m in enumerate(bank.norms):
            assert int(m.num_batches_tracked) == 3
            assert_rel_close(m.running_mean, torch.cat([p.norms[i].running_mean for p in plains]), what="running_mean")
            assert_rel_close(m.running_var, torch.cat([p.norms[i].running_var for p in plains]), what="running_var")


def test_dropout_is_seeded_scaled_and_off_in_eval():
    torch.manual_seed(5)
    fused = MMoE(8, 4, [32], 2, norm="batch", dropout=0.5, tower_hidden=[16], gate_hidden=[8])
    x = torch.randn(64, 8)
    torch.manual_seed(11)
    first = fused.task_features(x)
    torch.manual_seed(11)
    again = fused.task_features(x)
    assert torch.equal(first, again), "the same seed must give the same dropout masks"
    torch.manual_seed(12)
    assert not torch.equal(first, fused.task_features(x)), "another seed must give other masks"
    # Dropout before the towers' ReLU outputs zeros with probability p (the kept entries scaled 1/(1-p)).
    zeros = (fused.towers(fused.gates(x, fused.experts(x))) == 0).float().mean().item()
    assert 0.6 < zeros < 0.9, f"zero fraction {zeros}: ReLU then dropout 0.5 should zero ~3/4 of the outputs"
    fused.eval()
    plain = PlainMMoE(fused.double()).eval()
    assert_rel_close(fused.float().task_features(x), torch.stack(plain(x.double())), rtol=2e-5, what="eval output")


def test_mtl_backward_gives_towers_and_gates_their_own_task_gradient():
    torch.manual_seed(6)
    tasks = mixed_tasks(3)
    trunk = MMoE(7, 3, [8], 3, norm="batch", tower_hidden=[5], gate_hidden=[4])
    model = MultiTaskModel(trunk, MultiTaskHeads(5, tasks)).double()
    shared = {id(p) for p in model.shared_parameters()}
    assert shared == {id(p) for p in trunk.experts.parameters()}
    x = torch.randn(32, 7, dtype=torch.float64)
    targets = random_targets(tasks, 32, torch.Generator().manual_seed(7))
    model.eval()  # fixed statistics: the step's losses do not depend on how often forward runs
    losses = model.losses(x, targets)
    weighted = losses * model.heads.task_weights
    model.mtl_backward(x, targets, fastmtl.aggregation.UPGrad())
    for t in range(3):
        own = torch.autograd.grad(
            weighted[t], [trunk.towers.weights[0], trunk.gates.hidden.weights[0]], retain_graph=True
        )
        assert_rel_close(trunk.towers.weights[0].grad[t], own[0][t], rtol=1e-9, what=f"tower {t}")
        assert_rel_close(trunk.gates.hidden.weights[0].grad[t], own[1][t], rtol=1e-9, what=f"gate MLP {t}")


@pytest.mark.parametrize(
    "make",
    [
        lambda: MMoE(6, 3, [5, 4], 2, norm="batch", dropout=0.1, tower_hidden=[3], gate_hidden=[4]),
        lambda: PLE(6, 1, 1, [5], 2, num_levels=2, norm="layer", tower_hidden=3),
        lambda: SharedBottom(6, [5], [4], 2, norm="batch", dropout=0.2),
    ],
    ids=["mmoe", "ple", "shared_bottom"],
)
def test_state_dict_round_trip(make):
    torch.manual_seed(8)
    source = make()
    source(torch.randn(16, 6))  # training step: running statistics move
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(9)
    target = make()
    target.load_state_dict(torch.load(buffer))
    source.eval()
    target.eval()
    x = torch.randn(5, 6)
    assert torch.equal(torch.stack(source(x)), torch.stack(target(x)))


@pytest.mark.parametrize(
    "make, pattern",
    [
        (
            lambda: MMoE(8, 2, [4], 2, norm="group"),
            r"MMoE: argument 'norm' expected None, 'batch' or 'layer', got 'group'",
        ),
        (
            lambda: MMoE(8, 2, [4], 2, dropout=1.5),
            r"MMoE: argument 'dropout' expected a probability in \[0, 1\], got 1.5",
        ),
        (
            lambda: MMoE(8, 2, [4], 2, tower_hidden=[3, 0]),
            r"MMoE: argument 'tower_hidden\[1\]' expected an int >= 1, got 0",
        ),
        (
            lambda: PLE(8, 1, 1, [4], 2, gate_hidden=[-2]),
            r"PLE: argument 'gate_hidden\[0\]' expected an int >= 1, got -2",
        ),
        (lambda: PLE(8, 1, 1, [4], 2, dropout="0.1"), r"PLE: argument 'dropout' expected a probability"),
        (lambda: SharedBottom(8, [4], [4], 2, norm="instance"), r"SharedBottom: argument 'norm' expected None"),
    ],
)
def test_bad_options(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


def test_autocast_bfloat16_on_cpu_close_to_float32():
    torch.manual_seed(10)
    trunk = MMoE(12, 4, [32, 16], 3, norm="batch", tower_hidden=[8], gate_hidden=[8]).eval()
    randomise_norms(trunk)
    x = torch.randn(48, 12)
    exact = trunk.task_features(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = trunk.task_features(x)
    assert low.dtype == torch.bfloat16
    err = (low.float() - exact).abs().max() / exact.abs().max()
    assert err < 0.05, f"bf16 relative error {err}"


def test_norm_eps_and_momentum_reach_every_normalisation():
    mmoe = MMoE(6, 2, [4], 2, norm="batch", tower_hidden=[3], gate_hidden=[2], norm_eps=1e-3, norm_momentum=0.3)
    norms = [m for m in mmoe.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(norms) == 3  # experts, gate MLPs, towers
    assert all(m.eps == 1e-3 and m.momentum == 0.3 for m in norms)


def test_repr_names_the_options():
    text = repr(MMoE(6, 2, [4], 2, norm="batch", dropout=0.1, tower_hidden=[3], gate_hidden=[2]))
    assert "norm='batch', dropout=0.1, tower_hidden=[3], gate_hidden=[2]" in text


@pytest.mark.parametrize("levels", [1, 2])
def test_ple_aggregates_the_shared_experts_only_and_task_experts_get_their_own_gradient(levels):
    torch.manual_seed(9)
    tasks = mixed_tasks(3)
    trunk = PLE(7, 2, 2, [6], 3, num_levels=levels, norm="batch", tower_hidden=[5])
    model = MultiTaskModel(trunk, MultiTaskHeads(5, tasks)).double()
    shared = {id(p) for p in model.shared_parameters()}
    assert shared == {id(p) for p in list(trunk.shared_experts.parameters()) + list(trunk.shared_gates.parameters())}
    assert not shared & {id(p) for p in trunk.task_experts.parameters()}
    x = torch.randn(24, 7, dtype=torch.float64)
    targets = random_targets(tasks, 24, torch.Generator().manual_seed(10))
    model.eval()  # fixed statistics: the step's losses do not depend on how often forward runs
    weighted = model.losses(x, targets) * model.heads.task_weights
    last = trunk.task_experts[-1].weights[0]  # [T P, out, in], task t's experts at rows 2t, 2t + 1
    summed = torch.autograd.grad(weighted.sum(), last, retain_graph=True)[0]
    model.mtl_backward(x, targets, fastmtl.aggregation.UPGrad())
    assert_rel_close(last.grad, summed, rtol=1e-9, what="task experts: the gradient of sum_t L_t")
    for t in range(3):  # the last level's task-t experts reach task t's loss only
        own = torch.autograd.grad(weighted[t], last, retain_graph=True)[0]
        assert_rel_close(last.grad[2 * t : 2 * t + 2], own[2 * t : 2 * t + 2], rtol=1e-9, what=f"task {t} experts")
        assert torch.count_nonzero(own[: 2 * t]) == 0 and torch.count_nonzero(own[2 * t + 2 :]) == 0


def _earlier_ple_state(ple) -> dict:
    """``ple.state_dict()`` as fastmtl saved a PLE before its shared and task experts were separate
    parameters: one bank per level, ``experts.{level}.*``, the shared experts' rows (or BatchNorm
    channels) first."""
    state = {}
    for key, value in ple.state_dict().items():
        for bank in ("shared_experts.", "task_experts."):
            if key.startswith(bank):
                state.setdefault("experts." + key[len(bank) :], []).append(value)
                break
        else:
            state[key] = value
    for key, parts in list(state.items()):
        if isinstance(parts, list):
            state[key] = parts[0] if key.endswith("num_batches_tracked") else torch.cat(parts)
    return state


@pytest.mark.parametrize(
    "shared, own, norm", [(2, 1, "batch"), (1, 2, "layer"), (0, 2, "batch"), (2, 0, None)], ids=str
)
def test_ple_loads_a_checkpoint_of_the_stacked_bank_layout(shared, own, norm):
    torch.manual_seed(11)
    source = PLE(6, shared, own, [5, 4], 2, num_levels=2, norm=norm)
    source(torch.randn(16, 6))  # training step: running statistics move
    source.eval()
    earlier = _earlier_ple_state(source)
    assert any(k.startswith("experts.") for k in earlier)
    torch.manual_seed(12)
    target = PLE(6, shared, own, [5, 4], 2, num_levels=2, norm=norm)
    target.load_state_dict(earlier)  # strict: every key mapped, none left over
    target.eval()
    x = torch.randn(9, 6)
    assert torch.equal(target.task_features(x), source.task_features(x))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
