"""FusedMLP with norm / dropout (the towers of recommendation models) against its plain twin,
nn.Sequential(Linear, BatchNorm1d | LayerNorm, Act, Dropout, ...), and fastmtl.convert /
unconvert on such towers, torch-rechub's MMOE / PLE / SharedBottom included where installed."""

import copy

import pytest
import torch
from torch import nn

import fastmtl
from conftest import assert_rel_close
from fastmtl.nn import FusedMLP, MultiTaskHeads, MultiTaskModel


def plain_twin(fused: FusedMLP) -> nn.Sequential:
    """The plain modules of a FusedMLP, sharing nothing with it (fastmtl.unconvert's)."""
    return fastmtl.unconvert(copy.deepcopy(fused))


def parameters_in_plain_order(fused: FusedMLP, plain: nn.Sequential):
    """The fused module's parameters matched to the plain ones (by value: they are copies)."""
    return [next(q for q in fused.parameters() if q.shape == p.shape and torch.equal(q, p)) for p in plain.parameters()]


@pytest.mark.parametrize("norm", ["batch", "layer", None])
@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh", "softmax"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fused_tower_matches_its_plain_twin(norm, activation, mode):
    torch.manual_seed(0)
    # No biases before batch norm: their gradient is exactly 0 (rounding noise on both sides).
    fused = FusedMLP(12, [24, 16, 8], activation=activation, norm=norm, dropout=0.0, bias=norm != "batch")
    plain = plain_twin(fused)
    x = torch.randn(33, 12)
    fused.train(), plain.train()
    for _ in range(3):  # running statistics move in training
        fused(x), plain(x)
    getattr(fused, mode)(), getattr(plain, mode)()
    x2 = torch.randn(33, 12)
    out_f = fused(x2.clone().requires_grad_())
    out_p = plain(x2)
    assert_rel_close(out_f, out_p, rtol=1e-5, what="output")
    twins = parameters_in_plain_order(fused, plain)
    xf, xp = x2.clone().requires_grad_(), x2.clone().requires_grad_()
    weight = torch.randn(33, 8)
    gf = torch.autograd.grad((fused(xf) * weight).sum(), [xf] + twins)
    gp = torch.autograd.grad((plain(xp) * weight).sum(), [xp] + list(plain.parameters()))
    for i, (a, b) in enumerate(zip(gf, gp)):
        assert_rel_close(a, b, rtol=1e-5, what=f"gradient {i}")
    for (name, a), (_, b) in zip(
        sorted(fused.state_dict().items()), sorted(fastmtl.convert(plain)[0].state_dict().items())
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_batch_norm_buffers_follow_batchnorm1d_including_cumulative_momentum():
    torch.manual_seed(1)
    fused = FusedMLP(6, [10, 4], norm="batch", norm_momentum=None)
    plain = plain_twin(fused)
    for _ in range(4):
        x = torch.randn(16, 6)
        fused(x), plain(x)
    bns = [m for m in plain if isinstance(m, nn.BatchNorm1d)]
    for mine, theirs in zip(fused.norms, bns):
        assert int(mine.num_batches_tracked) == int(theirs.num_batches_tracked) == 4
        torch.testing.assert_close(mine.running_mean, theirs.running_mean)
        torch.testing.assert_close(mine.running_var, theirs.running_var)


def test_dropout_is_random_in_training_reproducible_by_seed_and_off_in_eval():
    fused = FusedMLP(8, [64], norm="layer", dropout=0.25)
    x = torch.randn(256, 8)
    torch.manual_seed(3)
    a = fused(x)
    torch.manual_seed(3)
    b = fused(x)
    assert torch.equal(a, b)
    zero_fraction = (a == 0).float().mean().item()
    relu_zero_fraction = (fused.eval()(x) == 0).float().mean().item()
    # An entry is 0 when the ReLU made it 0 or dropout dropped it: z + (1 - z) p.
    dropped = (zero_fraction - relu_zero_fraction) / (1 - relu_zero_fraction)
    assert 0.2 <= dropped <= 0.3
    assert torch.equal(fused(x), fused(x)), "no dropout in eval"


def test_tower_options_are_checked_and_shown():
    with pytest.raises(ValueError, match=r"FusedMLP: argument 'norm' expected None, 'batch' or 'layer', got 'group'"):
        FusedMLP(4, [4], norm="group")
    with pytest.raises(ValueError, match=r"FusedMLP: argument 'dropout' expected a probability in \[0, 1\], got 2"):
        FusedMLP(4, [4], dropout=2)
    fused = FusedMLP(4, [4], norm="batch", dropout=0.1)
    assert "norm='batch'" in repr(fused) and "dropout=0.1" in repr(fused)
    with pytest.raises(ValueError, match=r"FusedMLP.op_arguments: a FusedMLP with norm='batch'"):
        _ = fused.op_arguments
    with pytest.raises(ValueError, match=r"expected shape \[B, 4\] with norm='batch'"):
        fused(torch.randn(2, 3, 4))


def test_autocast_keeps_batch_norm_statistics_float32_and_updates_them():
    torch.manual_seed(4)
    fused = FusedMLP(8, [16, 4], norm="batch")
    before = fused.norms[0].running_mean.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(torch.randn(32, 8))
    assert out.dtype == torch.bfloat16
    assert fused.norms[0].running_mean.dtype == torch.float32
    assert not torch.equal(fused.norms[0].running_mean, before)
    out.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in fused.parameters())


def test_mtl_backward_with_a_tower_trunk_matches_the_plain_twin():
    torch.manual_seed(5)
    tasks = [fastmtl.Task("click", "binary"), fastmtl.Task("buy", "binary"), fastmtl.Task("t", "regression")]
    trunk = FusedMLP(10, [16, 8], norm="batch", dropout=0.0)
    model = MultiTaskModel(trunk, MultiTaskHeads(8, tasks))
    plain = MultiTaskModel(plain_twin(trunk), copy.deepcopy(model.heads))
    x = torch.randn(40, 10)
    targets = {"click": (torch.rand(40) > 0.5).float(), "buy": (torch.rand(40) > 0.7).float(), "t": torch.randn(40)}
    got = model.mtl_backward(x, targets, fastmtl.aggregation.UPGrad())
    want = plain.mtl_backward(x, targets, fastmtl.aggregation.UPGrad())
    torch.testing.assert_close(got.gram, want.gram, rtol=1e-5, atol=1e-7)
    for q, p in zip(parameters_in_plain_order(trunk, plain.trunk), plain.trunk.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7)


# ---- convert / unconvert


def rec_tower(widths, dropout=0.0, norm=nn.BatchNorm1d, output=True):
    """torch-rechub's MLP: (Linear, BatchNorm1d, ReLU, Dropout) per layer, then Linear(., 1)."""
    layers, d = [], widths[0]
    for w in widths[1:]:
        layers += [nn.Linear(d, w), norm(w), nn.ReLU(), nn.Dropout(dropout)]
        d = w
    return nn.Sequential(*layers, *([nn.Linear(d, 1)] if output else []))


class RecStyleMMoE(nn.Module):
    """As the recommendation libraries write it: experts and towers are rechub MLPs."""

    def __init__(self, d=12, experts=3, tasks=2):
        super().__init__()
        self.experts = nn.ModuleList([rec_tower([d, 16, 8], output=False) for _ in range(experts)])
        self.gates = nn.ModuleList([nn.Sequential(nn.Linear(d, experts), nn.Softmax(dim=1)) for _ in range(tasks)])
        self.towers = nn.ModuleList([rec_tower([8, 4]) for _ in range(tasks)])
        # Distinct normalisation parameters, so each has one twin of equal value after convert.
        for m in self.modules():
            if isinstance(m, nn.BatchNorm1d):
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.1, 0.1)

    def forward(self, x):
        e = torch.stack([m(x) for m in self.experts], dim=1)
        return torch.cat([t((g(x).unsqueeze(2) * e).sum(1)) for g, t in zip(self.gates, self.towers)], dim=1)


def assert_same_function(a, b, x, mode):
    getattr(a, mode)(), getattr(b, mode)()
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-6)
    a.zero_grad(), b.zero_grad()
    a(x).square().sum().backward()
    b(x).square().sum().backward()
    # Each plain parameter's copy in the converted model (matched by value) has its gradient.
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    for name, p in pb.items():
        twin = next(q for q in pa.values() if q.shape == p.shape and torch.allclose(q, p))
        torch.testing.assert_close(twin.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_convert_rec_style_mmoe_replaces_every_expert_and_tower(mode):
    torch.manual_seed(6)
    model = RecStyleMMoE()
    model.train()
    model(torch.randn(32, 12))  # move the running statistics off their initial values
    converted, report = fastmtl.convert(model)
    replaced = {path for path, _ in report.replaced}
    assert {f"experts.{i}.0..4" for i in range(3)} <= replaced and {"towers.0.0", "towers.1.0"} <= replaced
    assert {"gates.0.0", "gates.1.0"} <= replaced, "the gates (Linear, Softmax) too"
    assert all(why.endswith("no activation after it") for _, why in report.left_alone), report
    assert_same_function(converted, model, torch.randn(32, 12), mode)


def test_convert_checkpoints_round_trip_with_running_statistics():
    torch.manual_seed(7)
    model = rec_tower([6, 10, 5], dropout=0.2)
    model.train()
    model(torch.randn(16, 6))
    converted, _ = fastmtl.convert(model)
    fresh, _ = fastmtl.convert(rec_tower([6, 10, 5], dropout=0.2))
    fresh.load_state_dict(model.state_dict())  # the original's keys, running statistics included
    x = torch.randn(9, 6)
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x))
    back = fastmtl.unconvert(converted)
    assert list(back.state_dict()) == list(model.state_dict())
    assert [type(m) for m in back] == [type(m) for m in model]
    for (k, a), b in zip(back.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k


def test_convert_leaves_what_it_cannot_fuse_and_says_why():
    torch.manual_seed(8)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.LayerNorm(6, bias=False), nn.ReLU(),
        nn.Linear(6, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.1),
        nn.Linear(6, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(6, 6), nn.BatchNorm1d(6), nn.LeakyReLU(),
    )  # fmt: skip
    converted, report = fastmtl.convert(model)
    why = dict(report.left_alone)
    assert "LayerNorm(bias=False)" in why["0"]
    assert "followed by LeakyReLU" in why["11"]
    fused = [m for m in converted if isinstance(m, FusedMLP)]
    assert [m.dropout for m in fused] == [0.1, 0.3], "a change of dropout ends the run"
    model.eval(), converted.eval()
    x = torch.randn(5, 4)
    torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-6)


def _rechub_models():
    """torch-rechub's own models (an optional peer: skipped where it is not installed)."""
    multi_task = pytest.importorskip("torch_rechub.models.multi_task")
    features = pytest.importorskip("torch_rechub.basic.features")
    feats = [features.SparseFeature(f"c{i}", vocab_size=20, embed_dim=4) for i in range(3)] + [
        features.DenseFeature(f"d{i}") for i in range(2)
    ]
    towers = [{"dims": [8]}] * 3
    return {
        "MMOE": multi_task.MMOE(
            feats, ["classification"] * 3, n_expert=4, expert_params={"dims": [32, 16]}, tower_params_list=towers
        ),
        "PLE": multi_task.PLE(
            feats,
            ["classification"] * 3,
            n_level=2,
            n_expert_specific=1,
            n_expert_shared=2,
            expert_params={"dims": [16]},
            tower_params_list=towers,
        ),  # fmt: skip
        "SharedBottom": multi_task.SharedBottom(
            feats, ["classification"] * 3, bottom_params={"dims": [32]}, tower_params_list=towers
        ),
    }


@pytest.mark.parametrize("name", ["MMOE", "PLE", "SharedBottom"])
def test_convert_torch_rechub_models(name):
    torch.manual_seed(9)
    model = _rechub_models()[name]
    batch = {f"c{i}": torch.randint(0, 20, (64,)) for i in range(3)} | {f"d{i}": torch.randn(64) for i in range(2)}
    converted, report = fastmtl.convert(model)
    # Every expert / bottom, gate (Linear, BatchNorm1d, Softmax, Dropout) and tower MLP (Linear,
    # BatchNorm1d, ReLU, Dropout runs) is replaced; only each tower's output Linear(., 1) is not.
    left = [why for _, why in report.left_alone]
    assert all("no activation after it" in why for why in left), report
    assert any("Softmax" in what or "softmax" in what for _, what in report.replaced) == (name != "SharedBottom")
    for mode in ("train", "eval"):
        getattr(model, mode)(), getattr(converted, mode)()
        torch.testing.assert_close(converted(batch), model(batch), rtol=1e-5, atol=1e-6)
    model.train(), converted.train()
    model(batch).sum().backward()
    converted(batch).sum().backward()
    back = fastmtl.unconvert(converted)
    assert list(back.state_dict()) == list(model.state_dict())
    grads = {n: p.grad for n, p in model.named_parameters()}
    converted_params = list(converted.parameters())
    for n, g in grads.items():
        twin = [
            q
            for q in converted_params
            if q.grad is not None and q.shape == g.shape and torch.allclose(q.grad, g, rtol=1e-5, atol=1e-6)
        ]
        assert twin, f"no converted parameter has the gradient of {n}"


def test_compiled_tower_step_matches_eager_including_running_statistics():
    torch.manual_seed(10)
    compiled_model = FusedMLP(8, [16, 4], norm="batch")
    eager_model = copy.deepcopy(compiled_model)
    x = torch.randn(32, 8)

    def loss_of(module):
        return module(x).square().sum()

    torch.compile(loss_of, fullgraph=True)(compiled_model).backward()
    loss_of(eager_model).backward()
    for mine, theirs in zip(compiled_model.norms, eager_model.norms):
        torch.testing.assert_close(mine.running_mean, theirs.running_mean)
        torch.testing.assert_close(mine.running_var, theirs.running_var)
        assert int(mine.num_batches_tracked) == int(theirs.num_batches_tracked) == 1
    for a, b in zip(compiled_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
