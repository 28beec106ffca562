"""fastmtl.convert on hand-written models (custom forward, nested Sequentials) against the
originals; MultiTaskHeads.from_linears."""

import copy

import pytest
import torch
from torch import nn

import fastmtl
from conftest import PLAIN_ACTIVATIONS, assert_rel_close
from fastmtl import Task
from fastmtl.nn import FusedMLP, MultiTaskHeads


class HandWritten(nn.Module):
    """A plain PyTorch MTL model with its own forward: a residual skip and per-task towers."""

    def __init__(self, activation="relu"):
        super().__init__()
        act = PLAIN_ACTIVATIONS[activation]
        self.body = nn.Sequential(nn.Linear(12, 32), act(), nn.Linear(32, 16), act())
        self.skip = nn.Linear(12, 16)
        self.towers = nn.ModuleDict(
            {
                "click": nn.Sequential(nn.Linear(16, 8), act(), nn.Linear(8, 1)),
                "rating": nn.Sequential(nn.Linear(16, 8), nn.LeakyReLU(), nn.Linear(8, 5)),
            }
        )

    def forward(self, x):
        z = self.body(x) + self.skip(x)
        return {name: tower(z) for name, tower in self.towers.items()}


def compare(original, converted, x, rtol=1e-6):
    """Outputs and the gradients of the input and of every parameter of the original that the
    converted model still holds (matched by value: the conversion copies weights)."""
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out1, out2 = original(x1), converted(x2)
    if isinstance(out1, dict):
        assert out1.keys() == out2.keys()
        out1, out2 = list(out1.values()), list(out2.values())
    else:
        out1, out2 = [out1], [out2]
    gen = torch.Generator().manual_seed(0)
    cots = [torch.randn(o.shape, generator=gen) for o in out1]
    for a, b in zip(out2, out1):
        assert_rel_close(a, b, rtol=rtol, what="output")
    sum((o * c).sum() for o, c in zip(out1, cots)).backward()
    sum((o * c).sum() for o, c in zip(out2, cots)).backward()
    assert_rel_close(x2.grad, x1.grad, rtol=rtol, what="input gradient")
    # Every original parameter's gradient appears among the converted model's, as a whole
    # parameter or as a layer of a FusedMLP built from it.
    converted_params = [p for p in converted.parameters()]
    for name, p in original.named_parameters():
        match = [q for q in converted_params if q.shape == p.shape and torch.equal(q.detach(), p.detach())]
        assert match, f"no converted parameter carries {name}"
        assert_rel_close(match[0].grad, p.grad, rtol=rtol, what=f"gradient of {name}")


@pytest.mark.parametrize("activation", list(PLAIN_ACTIVATIONS))
def test_hand_written_model_with_custom_forward(activation):
    torch.manual_seed(0)
    model = HandWritten(activation)
    converted, report = fastmtl.convert(model)
    assert isinstance(converted.body, FusedMLP) and converted.body.hidden_features == (32, 16)
    assert isinstance(converted.towers["click"][0], FusedMLP) and isinstance(converted.towers["click"][1], nn.Linear)
    assert not any(isinstance(m, FusedMLP) for m in converted.towers["rating"])  # LeakyReLU is not supported
    assert type(converted.skip) is nn.Linear
    left = dict(report.left_alone)
    assert "skip" in left and "custom forward" in left["skip"]
    assert "LeakyReLU" in left["towers.rating.0"]
    assert {p for p, _ in report.replaced} == {"body.0..2", "towers.click.0"}
    compare(model, converted, torch.randn(37, 12))
    assert all(type(m) is not FusedMLP for m in model.modules()), "inplace=False leaves the original alone"


def test_nested_sequentials_merge_into_one_fused_mlp():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Sequential(nn.Linear(6, 9), nn.SiLU()),
        nn.Sequential(nn.Sequential(nn.Linear(9, 7), nn.SiLU()), nn.Linear(7, 5), nn.SiLU()),
        nn.Linear(5, 3),
        nn.SiLU(),
        nn.Dropout(0.0),
        nn.Linear(3, 2),
    )
    converted, report = fastmtl.convert(model)
    # The Dropout(0.0) after the fourth layer goes into the run (and comes back with unconvert).
    assert isinstance(converted[0], FusedMLP) and converted[0].hidden_features == (9, 7, 5, 3)
    assert type(converted[1]) is nn.Linear and len(converted) == 2
    assert converted[0].plain_dropout_modules == (False, False, False, True)
    compare(model, converted, torch.randn(5, 6))


def test_runs_split_where_activation_bias_or_width_changes():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Linear(4, 6),
        nn.ReLU(),
        nn.Linear(6, 6),
        nn.Tanh(),
        nn.Linear(6, 5, bias=False),
        nn.Tanh(),
        nn.Linear(5, 5, bias=False),
        nn.Tanh(),
        nn.Linear(5, 3),
        nn.Tanh(),
    )
    converted, _ = fastmtl.convert(model)
    kinds = [(m.activation, m.biases is not None, m.hidden_features) for m in converted]
    assert kinds == [("relu", True, (6,)), ("tanh", True, (6,)), ("tanh", False, (5, 5)), ("tanh", True, (3,))]
    compare(model, converted, torch.randn(1, 4))


def test_whole_sequential_becomes_a_fused_mlp_and_inplace_edits_the_model():
    torch.manual_seed(3)
    holder = nn.Module()
    holder.trunk = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 4), nn.GELU())
    reference = copy.deepcopy(holder.trunk)
    same, _ = fastmtl.convert(holder, inplace=True)
    assert same is holder and isinstance(holder.trunk, FusedMLP) and holder.trunk.activation == "gelu"
    compare(reference, holder.trunk, torch.randn(8, 3))


def test_frozen_layers_stay_frozen():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    for p in model.parameters():
        p.requires_grad_(False)
    converted, _ = fastmtl.convert(model)
    assert not any(p.requires_grad for p in converted.parameters())


def test_unsupported_layer_in_a_run_is_reported_and_strict_raises():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ELU(), nn.Linear(4, 2), nn.ReLU())
    converted, report = fastmtl.convert(model)
    assert [type(m).__name__ for m in converted] == ["FusedMLP", "Linear", "ELU", "FusedMLP"]
    assert any("followed by ELU, not a supported activation" in why for _, why in report.left_alone)
    assert "left alone 2: Linear followed by ELU" in str(report)
    with pytest.raises(ValueError, match=r"(?s)strict=True.*left alone 2: Linear followed by ELU"):
        fastmtl.convert(model, strict=True)


def test_strict_accepts_a_model_whose_linears_all_converted():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Dropout(0.1), nn.Linear(4, 2), nn.ReLU())
    converted, report = fastmtl.convert(model, strict=True)
    # Linear, ReLU, Dropout(0.1) is a tower layer; the dropout change splits the run in two.
    assert len(report.replaced) == 2 and report.left_alone == []


def test_bad_arguments():
    with pytest.raises(TypeError, match=r"'model' expected an nn.Module, got dict"):
        fastmtl.convert({})
    with pytest.raises(TypeError, match=r"'inplace' and 'strict' expected bools"):
        fastmtl.convert(nn.Linear(2, 2), inplace="yes")


def test_converted_plain_mtl_model_trains_like_the_original():
    torch.manual_seed(4)
    model = HandWritten()
    converted, _ = fastmtl.convert(model)
    x = torch.randn(32, 12)
    y = {"click": torch.randn(32, 1), "rating": torch.randn(32, 5)}
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, converted)]
    for _ in range(3):
        for m, opt in zip((model, converted), optimizers):
            opt.zero_grad()
            out = m(x)
            sum(((out[k] - y[k]) ** 2).mean() for k in y).backward()
            opt.step()
    for a, b in zip(converted(x).values(), model(x).values()):
        assert_rel_close(a, b, rtol=1e-5, what="after three steps")


def test_heads_from_linears_dict_and_list():
    torch.manual_seed(5)
    tasks = [Task("a", "regression", num_outputs=2), Task("b", "multiclass", num_outputs=3), Task("c", "binary")]
    linears = {"c": nn.Linear(6, 1), "a": nn.Linear(6, 2), "b": nn.Linear(6, 3, bias=False)}
    z = torch.randn(7, 6)
    for given in (linears, [linears["a"], linears["b"], linears["c"]], nn.ModuleDict(linears)):
        heads = MultiTaskHeads.from_linears(given, tasks)
        out = heads(z)
        for name, linear in linears.items():
            assert_rel_close(out[name], linear(z), rtol=1e-6, what=name)
    with pytest.raises(ValueError, match=r"has no head for tasks \['c'\]"):
        MultiTaskHeads.from_linears({"a": linears["a"], "b": linears["b"]}, tasks)
    with pytest.raises(ValueError, match=r"head of task 'a' expected weight shape \[2, 6\], got \[3, 6\]"):
        MultiTaskHeads.from_linears([linears["b"], linears["b"], linears["c"]], tasks)


def _tower_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.0),
        nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.0),
        nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.0),
        nn.Linear(6, 1),
    ).double()  # fmt: skip


@pytest.mark.parametrize("name", ["6", "5", "4", "7"])
def test_exclude_keeps_a_layer_hookable_and_fuses_around_it(name):
    """Issue 15: after convert an intermediate layer can be hooked when named in exclude; outputs,
    gradients and the hooked tensor equal the original's, and original checkpoints still load."""
    plain = _tower_model()
    fused, report = fastmtl.convert(plain, exclude=[name])
    kept = fused.get_submodule(report.excluded[name])
    assert type(kept) is type(plain.get_submodule(name))
    assert sum(isinstance(m, FusedMLP) for m in fused.modules()) == 2  # the runs before and after
    seen = {}
    plain.get_submodule(name).register_forward_hook(lambda m, i, o: seen.__setitem__("plain", o))
    kept.register_forward_hook(lambda m, i, o: seen.__setitem__("fused", o))
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    for mode in ("train", "eval"):
        getattr(plain, mode)(), getattr(fused, mode)()
        want, got = plain(x), fused(x)
        assert_rel_close(got, want, 1e-12, "output")
        assert_rel_close(seen["fused"], seen["plain"], 1e-12, "hooked output")
    (gw,) = torch.autograd.grad(want.sum(), [x])
    (gg,) = torch.autograd.grad(got.sum(), [x])
    assert_rel_close(gg, gw, 1e-12, "input gradient")
    fused.load_state_dict(plain.state_dict(), strict=True)
    back = fastmtl.unconvert(fused)
    assert set(back.state_dict()) == set(plain.state_dict())


def test_exclude_a_submodule_of_a_model_keeps_it_whole():
    plain = nn.ModuleDict({"bottom": _tower_model()[:8], "tower": _tower_model()[:4]})
    fused, report = fastmtl.convert(plain, exclude=["tower"])
    assert fused["tower"] is not plain["tower"] and all(type(m) is not FusedMLP for m in fused["tower"].modules())
    assert isinstance(fused["bottom"], FusedMLP)
    assert report.excluded == {"tower": "tower"}
    assert (
        "tower",
        "excluded (convert(exclude=...)): kept as it is, its output a tensor of its own",
    ) in report.left_alone


def test_exclude_bad_names_are_refused_by_name():
    plain = _tower_model()
    with pytest.raises(ValueError, match=r"argument 'exclude' expected names of the model's modules .*got '13'"):
        fastmtl.convert(plain, exclude=["13"])
    with pytest.raises(TypeError, match="argument 'exclude' expected module names, got int"):
        fastmtl.convert(plain, exclude=3)
    fused, report = fastmtl.convert(plain, exclude="2")  # one name as a string
    # Linear 0 and its BatchNorm stay too (their layer would take in the ReLU): nothing before it renumbered
    assert report.excluded == {"2": "2"}
    assert isinstance(fused[4], FusedMLP) and type(fused[0]) is nn.Linear


def test_exclude_does_not_hide_what_strict_refuses_and_refuses_parts_of_a_fused_mlp():
    plain = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Dropout(), nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ValueError, match="strict=True"):
        fastmtl.convert(plain, strict=True, exclude=["2"])  # the Sigmoid, not the exclusion, stops Linear 0
    with pytest.raises(ValueError, match="a part of the FusedMLP '0'"):
        fastmtl.convert(nn.Sequential(FusedMLP(4, [4, 4]), nn.Linear(4, 4), nn.ReLU()), exclude=["0.weights"])
    relu = nn.ReLU()
    _, report = fastmtl.convert(nn.Sequential(relu, nn.Linear(4, 4), relu), exclude=["2"])
    assert report.excluded == {"2": "0"}  # a module held twice: its first name
