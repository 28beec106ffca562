"""The models the command line builds (SharedBottom, MMoE, PLE, with an embedding front for
categorical fields) and the speed comparison's plain PyTorch model: it computes the same losses as
fastmtl's model, and the usual way (LibMTL's loop) takes the same step as fastmtl's engine, so the
"x faster" column compares one computation done two ways."""

import math

import pytest
import torch

import fastmtl
from fastmtl.cli.names import make_method
from fastmtl.cli.speed import PlainModel, make_variants, markdown_table, time_steps
from fastmtl.cli.training import TrainingConfig, build_model, model_gram
from fastmtl.data import MultiTaskDataset, recommender

TASKS = [
    fastmtl.Task("c", "multiclass", num_outputs=3),
    fastmtl.Task("y", "regression", num_outputs=2),
    fastmtl.Task("b", "binary"),
    fastmtl.Task("h", "regression", loss="huber"),
]


def dense_data(rows=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    targets = {
        "c": torch.randint(0, 3, (rows,), generator=g),
        "y": torch.randn(rows, 2, generator=g),
        "b": torch.randint(0, 2, (rows,), generator=g).float(),
        "h": 3 * torch.randn(rows, generator=g),
    }
    targets["c"][::5] = -100  # missing labels of every kind
    targets["y"][1::4, 0] = math.nan
    targets["b"][::3] = math.nan
    return MultiTaskDataset(torch.randn(rows, 7, generator=g), targets, TASKS)


def test_plain_model_computes_fastmtl_models_losses():
    data = dense_data()
    config = TrainingConfig(hidden=(9, 5), activation="gelu")
    model = build_model(data.num_features, data.tasks, config)
    plain = PlainModel(model)
    x, targets = data[:]
    _, plain_losses = plain.features_and_losses(x, targets)
    torch.testing.assert_close(plain_losses, model.losses(x, targets), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method, mode", [("UPGrad", "exact"), ("MGDA", "exact"), ("UPGrad", "rep")])
def test_the_usual_way_takes_the_same_step_as_fastmtl(method, mode):
    data = dense_data(rows=32)
    config = TrainingConfig(hidden=(11, 6), mode=mode, batch_size=32, lr=1e-2)
    variants = {v.name: v for v in make_variants(data, [method], config)}
    x, targets = data[:]
    for name in (f"fastmtl {method}", f"loop {method}"):
        variants[name].step(x, targets)
    fastmtl_model, plain = variants[f"fastmtl {method}"].model, variants[f"loop {method}"].model
    after_fastmtl = [w.detach() for w in fastmtl_model.trunk.weights]
    after_loop = [m.weight.detach() for m in plain.trunk if isinstance(m, torch.nn.Linear)]
    start = build_model(data.num_features, data.tasks, config)
    for a, b, w0 in zip(after_fastmtl, after_loop, start.trunk.weights):
        assert not torch.equal(a, w0)  # the step moved the weights
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_time_steps_reports_every_aggregator_and_rejects_other_trunks():
    data = dense_data(rows=64)
    config = TrainingConfig(hidden=(8,), batch_size=16)
    speed = time_steps(data, ["UPGrad", "PCGrad"], config, rounds=2)
    assert [row["method"] for row in speed["rows"]] == ["UPGrad", "PCGrad"]
    for row in speed["rows"]:
        assert row["fastmtl_ms"] > 0 and row["loop_ms"] > 0
        assert row["times_faster"] == pytest.approx(row["loop_ms"] / row["fastmtl_ms"])
        assert row["loop_over_plain"] == pytest.approx(row["loop_ms"] / speed["plain_ms"])
    table = markdown_table(speed)
    assert table.count("\n") == 1 + 2 + 1 and "× faster" in table
    with pytest.raises(ValueError, match="SharedBottom"):
        time_steps(data, ["UPGrad"], TrainingConfig(hidden=(8,), arch="MMoE"), rounds=1)


@pytest.mark.parametrize("arch", ["SharedBottom", "MMoE", "PLE"])
def test_models_for_categorical_fields_and_the_gram_of_any_trunk(arch):
    data = recommender(64, seed=1)
    config = TrainingConfig(hidden=(6, 6), arch=arch, embedding_dim=3)
    model = build_model(data.num_features, data.tasks, config, data.field_cardinalities)
    assert isinstance(model.trunk, fastmtl.nn.EmbeddedTrunk) and model.trunk.front.cardinalities == tuple(
        data.field_cardinalities
    )
    x, targets = data[:]
    gram = model_gram(model, x, targets, "exact")  # one autograd.grad per task (not a FusedMLP trunk)
    result = build_model(data.num_features, data.tasks, config, data.field_cardinalities).mtl_backward(
        x, targets, make_method("UPGrad", 3, 0)
    )
    torch.testing.assert_close(gram, result.gram, rtol=1e-4, atol=1e-7)
    assert model(x)["click"].shape == (64, 1)


def test_dense_models_of_every_architecture():
    data = dense_data()
    for arch, trunk in (("SharedBottom", fastmtl.nn.FusedMLP), ("MMoE", fastmtl.nn.MMoE), ("PLE", fastmtl.nn.PLE)):
        model = build_model(data.num_features, data.tasks, TrainingConfig(hidden=(5, 5), arch=arch))
        assert isinstance(model.trunk, trunk)
    with pytest.raises(ValueError, match="--arch"):
        build_model(data.num_features, data.tasks, TrainingConfig(arch="Cross"))
