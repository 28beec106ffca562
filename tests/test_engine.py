"""fastmtl.mtl_backward (any PyTorch trunk) against fastmtl.reference.mtl_backward: T separate
autograd.grad calls, their Gram, the same aggregator, the weighted sum."""

import pytest
import torch
from torch import nn

import fastmtl
import fastmtl.aggregation as agg
from conftest import assert_rel_close

T_TASKS = 3


class TwoPartModel(nn.Module):
    """A trunk and one small head per task; losses are per-task MSEs (task t may be unlabelled)."""

    def __init__(self, trunk: nn.Module, width: int, num_tasks: int):
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(num_tasks))

    def losses(self, x, y, unlabelled=()):
        z = self.trunk(x)
        flat = z.reshape(z.shape[0], -1) if z.dim() == 2 else z.mean(dim=tuple(range(1, z.dim() - 1)))
        per_task = []
        for t, head in enumerate(self.heads):
            err = (head(flat).squeeze(-1) - y[:, t]) ** 2
            per_task.append(err.sum() * 0.0 if t in unlabelled else err.mean())
        return torch.stack(per_task), z


def mlp_model(dtype=torch.float64, num_tasks=T_TASKS, seed=0):
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.ReLU())
    return TwoPartModel(trunk, 12, num_tasks).to(dtype)


def batch(B=8, num_tasks=T_TASKS, dtype=torch.float64, seed=1, features=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, features, generator=g, dtype=dtype), torch.randn(B, num_tasks, generator=g, dtype=dtype)


def grads_after(model, run):
    model.zero_grad(set_to_none=True)
    result = run()
    return result, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(model, x, y, make_aggregator, mode="exact", rtol=1e-9, reset_rng=None, **kwargs):
    def ours():
        if reset_rng is not None:
            torch.manual_seed(reset_rng)
        losses, z = model.losses(x, y, **kwargs)
        return fastmtl.mtl_backward(losses, z, make_aggregator(), mode=mode, keep_jacobian=mode == "exact")

    def reference():
        if reset_rng is not None:
            torch.manual_seed(reset_rng)
        losses, z = model.losses(x, y, **kwargs)
        return fastmtl.reference.mtl_backward(losses, z, make_aggregator(), mode=mode, keep_jacobian=mode == "exact")

    got, got_grads = grads_after(model, ours)
    want, want_grads = grads_after(model, reference)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        assert_rel_close(got_grads[name], want_grads[name], rtol, name)
    assert_rel_close(got.gram, want.gram, rtol, "gram")
    assert_rel_close(got.weights, want.weights, rtol, "weights")
    if mode == "exact":
        assert_rel_close(got.jacobian, want.jacobian, rtol, "jacobian")
    return got


AGGREGATORS = {
    "Mean": agg.Mean,
    "Sum": agg.Sum,
    "Constant": lambda: agg.Constant([1.0, 0.5, 2.0]),
    "Random": lambda: agg.Random(seed=0),
    "MGDA": agg.MGDA,
    "UPGrad": agg.UPGrad,
    "DualProj": agg.DualProj,
    "PCGrad": lambda: agg.PCGrad(seed=0),
    "GradVac": agg.GradVac,
    "CAGrad": agg.CAGrad,
    "IMTLG": agg.IMTLG,
    "AlignedMTL": agg.AlignedMTL,
    "NashMTL": agg.NashMTL,
    "ConFIG": agg.ConFIG,
    "FairGrad": agg.FairGrad,
    "Krum": lambda: agg.Krum(n_byzantine=0),
    "PCD": agg.PCD,
    "CRMOGM": lambda: agg.CRMOGM(agg.UPGrad(), alpha=0.5),
}


def test_every_aggregator_of_the_package_is_compared():
    # The methods that need more than the Gram matrix (requires "jacobian" / "cross_gram") are not
    # supplied by the engines yet; they refuse a Gram matrix, saying what they need (test below).
    classes = {
        name
        for name in agg.__all__
        if isinstance(getattr(agg, name), type)
        and issubclass(getattr(agg, name), agg.Aggregator)
        and name not in agg.INTERFACES
        and getattr(agg, name).requires == "gram"
    }
    assert set(AGGREGATORS) == classes


@pytest.mark.parametrize("name", list(AGGREGATORS))
@pytest.mark.parametrize("mode", ["exact", "rep"])
def test_every_aggregator_matches_the_reference_in_float64(name, mode):
    model = mlp_model()
    x, y = batch()
    compare(model, x, y, AGGREGATORS[name], mode=mode, reset_rng=5)


@pytest.mark.parametrize("name", ["Mean", "UPGrad", "MGDA"])
def test_float32_matches_the_float64_reference(name):
    model64, model32 = mlp_model(torch.float64), mlp_model(torch.float32)
    x, y = batch()
    model64.zero_grad()
    losses, z = model64.losses(x, y)
    fastmtl.reference.mtl_backward(losses, z, AGGREGATORS[name]())
    model32.zero_grad()
    losses, z = model32.losses(x.float(), y.float())
    fastmtl.mtl_backward(losses, z, AGGREGATORS[name]())
    for (n, p64), (_, p32) in zip(model64.named_parameters(), model32.named_parameters()):
        assert_rel_close(p32.grad, p64.grad, 1e-5, n)


def test_gradients_accumulate_over_two_calls():
    model = mlp_model()
    x, y = batch()
    once = {}
    model.zero_grad(set_to_none=True)
    for _ in range(2):
        losses, z = model.losses(x, y)
        fastmtl.mtl_backward(losses, z, agg.UPGrad())
    twice = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    losses, z = model.losses(x, y)
    fastmtl.mtl_backward(losses, z, agg.UPGrad())
    once = {n: p.grad.clone() for n, p in model.named_parameters()}
    for n in once:
        assert_rel_close(twice[n], 2 * once[n], 1e-12, n)


def test_heads_get_their_own_task_gradient():
    model = mlp_model()
    x, y = batch()
    model.zero_grad(set_to_none=True)
    losses, z = model.losses(x, y)
    fastmtl.mtl_backward(losses, z, agg.MGDA())
    for t, head in enumerate(model.heads):
        losses, _ = model.losses(x, y)
        own = torch.autograd.grad(losses[t], list(head.parameters()))
        for p, g in zip(head.parameters(), own):
            assert_rel_close(p.grad, g, 1e-12, f"head {t}")


@pytest.mark.parametrize("B, num_tasks", [(1, 3), (8, 1), (1, 1), (5, 12)])
def test_odd_shapes(B, num_tasks):
    model = mlp_model(num_tasks=num_tasks)
    x, y = batch(B=B, num_tasks=num_tasks)
    for mode in ("exact", "rep"):
        compare(model, x, y, agg.UPGrad, mode=mode)


def test_a_task_without_labels_has_a_zero_row_and_nothing_is_nan():
    model = mlp_model()
    x, y = batch()
    for make in (agg.UPGrad, agg.MGDA, agg.NashMTL, agg.IMTLG, agg.CAGrad):
        result = compare(model, x, y, make, unlabelled=(1,))
        assert float(result.gram[1].abs().max()) == 0.0 and float(result.gram[:, 1].abs().max()) == 0.0
        assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def test_cnn_trunk():
    torch.manual_seed(0)
    trunk = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, bias=False), nn.BatchNorm2d(5), nn.ReLU()
    )

    class ChannelsLast(nn.Module):
        def forward(self, x):
            return trunk(x).permute(0, 2, 3, 1)  # [B, H, W, C]: the model averages over H, W

    model = TwoPartModel(ChannelsLast(), 5, T_TASKS).double()
    model.add_module("conv", trunk.double())
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 2, 7, 7, generator=g, dtype=torch.float64)
    y = torch.randn(4, T_TASKS, generator=g, dtype=torch.float64)
    for mode in ("exact", "rep"):
        compare(model, x, y, agg.UPGrad, mode=mode)


def test_transformer_encoder_trunk():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    model = TwoPartModel(encoder, 8, T_TASKS).double()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    y = torch.randn(3, T_TASKS, generator=g, dtype=torch.float64)
    for mode in ("exact", "rep"):
        compare(model, x, y, agg.MGDA, mode=mode)


def test_explicit_shared_params_and_several_feature_tensors():
    model = mlp_model()
    x, y = batch()
    model.zero_grad(set_to_none=True)
    z1 = model.trunk[:2](x)
    z2 = model.trunk[2:](z1)
    losses = torch.stack([((h(z2).squeeze(-1) - y[:, t]) ** 2).mean() for t, h in enumerate(model.heads)])
    shared = list(model.trunk.parameters())
    result = fastmtl.mtl_backward(losses, [z2], agg.Mean(), shared_params=shared, keep_jacobian=True)
    assert result.jacobian.shape == (T_TASKS, sum(p.numel() for p in shared))
    summed = torch.autograd.grad(
        (
            (
                torch.stack(
                    [((h(model.trunk(x)).squeeze(-1) - y[:, t]) ** 2).mean() for t, h in enumerate(model.heads)]
                )
            ).mean()
        ),
        shared,
    )
    for p, g in zip(shared, summed):
        assert_rel_close(p.grad, g, 1e-12)


def test_bad_input_raises_naming_the_argument():
    model = mlp_model()
    x, y = batch()

    def fresh():
        return model.losses(x, y)

    losses, z = fresh()
    with pytest.raises(ValueError, match="'losses' expected a 1-D tensor"):
        fastmtl.mtl_backward(losses.reshape(1, -1), z, agg.Mean())
    with pytest.raises(ValueError, match="'losses' expected a 1-D tensor"):
        fastmtl.mtl_backward(losses.sum(), z, agg.Mean())
    with pytest.raises(ValueError, match="'losses' expected a tensor in an autograd graph"):
        fastmtl.mtl_backward(losses.detach(), z, agg.Mean())
    losses, z = fresh()
    other = model.trunk(x + 1)
    with pytest.raises(ValueError, match="'features' expected tensors in the graph of 'losses'"):
        fastmtl.mtl_backward(losses, other, agg.Mean())
    losses, z = fresh()
    with pytest.raises(ValueError, match="'features' expected tensors that require grad"):
        fastmtl.mtl_backward(losses, z.detach(), agg.Mean())
    with pytest.raises(ValueError, match="'shared_params' expected tensors that require grad"):
        fastmtl.mtl_backward(losses, z, agg.Mean(), shared_params=[torch.zeros(3)])
    losses, z = fresh()
    with pytest.raises(ValueError, match=r"'aggregator' expected a callable returning weights of shape \[3\]"):
        fastmtl.mtl_backward(losses, z, lambda gram: torch.ones(2, dtype=gram.dtype))
    losses, z = fresh()
    with pytest.raises(ValueError, match="'mode' expected one of"):
        fastmtl.mtl_backward(losses, z, agg.Mean(), mode="ghost")
    with pytest.raises(ValueError, match="'features' expected a tensor or a non-empty sequence"):
        fastmtl.mtl_backward(losses, [], agg.Mean())


def test_options_are_checked_once_for_every_path():
    model = mlp_model()
    x, y = batch()
    losses, z = model.losses(x, y)
    with pytest.raises(TypeError, match=r"fastmtl.mtl_backward: unexpected keyword arguments \['gram_evry'\]"):
        fastmtl.mtl_backward(losses, z, agg.Mean(), gram_evry=2)
    with pytest.raises(ValueError, match="'gram_path' expected 'auto'"):
        fastmtl.mtl_backward(losses, z, agg.Mean(), gram_path="ghost")
    with pytest.raises(ValueError, match="'ddp_gram' expected one of"):
        fastmtl.engine.MTLBackwardOptions(ddp_gram="global")
    assert fastmtl.engine.MTLBackwardOptions.of("f", {}) == fastmtl.engine.MTLBackwardOptions()
    tasks = [fastmtl.Task("a", "regression"), fastmtl.Task("b", "binary")]
    fused = fastmtl.nn.MultiTaskModel(fastmtl.nn.FusedMLP(6, [8]), fastmtl.nn.MultiTaskHeads(8, tasks))
    targets = {"a": torch.randn(4), "b": torch.ones(4)}
    with pytest.raises(TypeError, match=r"MultiTaskModel.mtl_backward: unexpected keyword arguments \['shared'\]"):
        fused.mtl_backward(torch.randn(4, 6), targets, agg.Mean(), shared=None)


def test_the_gram_every_schedule_is_kept_by_the_engine_not_written_into_the_model():
    tasks = [fastmtl.Task("a", "regression"), fastmtl.Task("b", "binary")]
    model = fastmtl.nn.MultiTaskModel(fastmtl.nn.FusedMLP(6, [8]), fastmtl.nn.MultiTaskHeads(8, tasks))
    before = set(vars(model))
    targets = {"a": torch.randn(4), "b": torch.ones(4)}
    flags = [model.mtl_backward(torch.randn(4, 6), targets, agg.UPGrad(), gram_every=2).gram_computed for _ in range(3)]
    assert flags == [True, False, True]
    assert set(vars(model)) == before
    assert isinstance(fastmtl.engine.schedule_of(model), fastmtl.engine.WeightSchedule)


@pytest.mark.parametrize("make", [lambda: agg.GradDrop(seed=0), lambda: agg.TrimmedMean(1), agg.ExcessMTL])
def test_methods_that_need_the_per_task_gradients_get_them_in_exact_mode(make):
    # Issue 17: fastmtl.mtl_backward hands the Jacobian it materialises to a "jacobian" method and writes
    # the method's update into the shared parameters' .grad.
    model = mlp_model()
    x, y = batch()
    shared = list(model.trunk.parameters())  # the Jacobian's columns in this order
    losses, z = model.losses(x, y)
    want = fastmtl.mtl_backward(losses, z, agg.Mean(), shared_params=shared, keep_jacobian=True)
    update = make()(jacobian=want.jacobian)
    model.zero_grad(set_to_none=True)
    losses, z = model.losses(x, y)
    fastmtl.mtl_backward(losses, z, make(), shared_params=shared)
    got = torch.cat([p.grad.reshape(-1) for p in shared])
    assert_rel_close(got, update, 1e-12, "update")


@pytest.mark.parametrize(
    "make, words",
    [
        (agg.MoDo, "two independent batches"),
        (agg.SDMGrad, "two independent batches"),
    ],
)
def test_methods_the_engine_cannot_supply_are_refused_saying_what_they_need(make, words):
    model = mlp_model()
    x, y = batch()
    losses, z = model.losses(x, y)
    with pytest.raises(ValueError, match=words):
        fastmtl.mtl_backward(losses, z, make())
    losses, z = model.losses(x, y)
    with pytest.raises(ValueError, match="mode='exact'"):
        fastmtl.mtl_backward(losses, z, agg.GradDrop(), mode="rep")
