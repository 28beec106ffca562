"""fastmtl.mtl_backward (any PyTorch trunk) against fastmtl.reference.mtl_backward: T separate
autograd.grad calls, their Gram, the same aggregator, the weighted sum."""

import pytest
import torch
from torch import nn

import fastmtl
import fastmtl.aggregation as agg
from conftest import assert_rel_close, assert_same_step

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
    # The methods that need more than the Gram matrix (requires "jacobian" / "cross_gram") are
    # compared in tests/test_mtl_engine.py and tests/test_engine_cross_gram.py.
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


# --- the exact Gram's paths (fastmtl.engine.trunk_gram), partial Gram, cosine report -----------------------


def conv_model(dtype=torch.float64, num_tasks=T_TASKS):
    """Conv (stride 2, grouped), BatchNorm, a residual add: the ops vmap loops over. (No conv bias
    before a BatchNorm: its true gradient is 0, the rounding noise around it cannot be compared.)"""
    torch.manual_seed(0)

    class ConvTrunk(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(4), nn.ReLU())
            self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(4))

        def forward(self, x):
            h = self.stem(x)
            return torch.relu(h + self.body(h)).permute(0, 2, 3, 1)  # [B, H, W, C]

    return TwoPartModel(ConvTrunk(), 4, num_tasks).to(dtype)


def sequence_model(dtype=torch.float64, num_tasks=T_TASKS):
    """Embedding (with a padding index), TransformerEncoder (attention, layer norm), a LayerNorm."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
    trunk = nn.Sequential(
        nn.Embedding(11, 8, padding_idx=0),
        nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False),
        nn.LayerNorm(8),
    )
    return TwoPartModel(trunk, 8, num_tasks).to(dtype)


def conv_batch(dtype=torch.float64, num_tasks=T_TASKS):
    g = torch.Generator().manual_seed(3)
    return torch.randn(3, 2, 7, 7, generator=g, dtype=dtype), torch.randn(3, num_tasks, generator=g, dtype=dtype)


def sequence_batch(dtype=torch.float64, num_tasks=T_TASKS):
    g = torch.Generator().manual_seed(4)
    return torch.randint(0, 11, (3, 5), generator=g), torch.randn(3, num_tasks, generator=g, dtype=dtype)


MODELS = {"mlp": (mlp_model, batch), "conv": (conv_model, conv_batch), "sequence": (sequence_model, sequence_batch)}


def run_engine(model, x, y, make_aggregator, **kwargs):
    model.zero_grad(set_to_none=True)
    losses, z = model.losses(x, y)
    result = fastmtl.mtl_backward(losses, z, make_aggregator(), **kwargs)
    return result, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def reference_run(model, x, y, make_aggregator, **kwargs):
    model.zero_grad(set_to_none=True)
    losses, z = model.losses(x, y)
    result = fastmtl.reference.mtl_backward(losses, z, make_aggregator(), **kwargs)
    return result, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind, path", [("mlp", "batched"), ("conv", "task-loop"), ("sequence", "task-loop")])
@pytest.mark.parametrize("make", [agg.UPGrad, agg.MGDA])
def test_the_planned_path_matches_the_reference(kind, path, make):
    make_model, make_batch = MODELS[kind]
    model = make_model()
    x, y = make_batch()
    got = run_engine(model, x, y, make)
    assert got[0].path == path
    assert_same_step(got, reference_run(model, x, y, make), 1e-9)


@pytest.mark.parametrize("kind", list(MODELS))
def test_streamed_gram_matches_the_jacobian_path_and_the_reference(kind):
    make_model, make_batch = MODELS[kind]
    model = make_model()
    x, y = make_batch()
    streamed = run_engine(model, x, y, agg.UPGrad, memory_budget=0)
    assert streamed[0].path == "streamed" and streamed[0].jacobian is None
    assert_same_step(streamed, run_engine(model, x, y, agg.UPGrad), 1e-9)
    assert_same_step(streamed, reference_run(model, x, y, agg.UPGrad), 1e-9)


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("budget", [None, 0])
def test_float32_paths_match_the_float64_reference(kind, budget):
    make_model, make_batch = MODELS[kind]
    x, y = make_batch()
    want = reference_run(make_model(torch.float64), x, y, agg.UPGrad)
    x32 = x.float() if x.is_floating_point() else x
    got = run_engine(make_model(torch.float32), x32, y.float(), agg.UPGrad, memory_budget=budget)
    assert_same_step(got, want, 1e-5)


def test_task_chunks_match_one_batched_backward():
    model = mlp_model(num_tasks=7)
    x, y = batch(num_tasks=7)
    whole = run_engine(model, x, y, agg.UPGrad, keep_jacobian=True)
    assert whole[0].path == "batched"
    chunked = []
    for budget in [2**k for k in range(8, 24)]:
        result = run_engine(model, x, y, agg.UPGrad, keep_jacobian=True, memory_budget=budget)
        if result[0].path == "batched" or result[0].path == "task-loop":
            chunked.append(result)
            assert_same_step(result, whole, 1e-12)
            assert_rel_close(result[0].jacobian, whole[0].jacobian, 1e-12, "jacobian")
    assert chunked
    losses, z = model.losses(x, y)
    shared = list(model.trunk.parameters())
    plans = {fastmtl.engine.trunk_gram.plan_gram([z], shared, 7, b).chunk for b in [2**k for k in range(8, 24)]}
    assert any(1 < c < 7 for c in plans), plans  # some budgets split the tasks into chunks
    cotangents = torch.autograd.grad(
        [losses], [z], [torch.eye(7, dtype=losses.dtype)], is_grads_batched=True, retain_graph=True
    )
    per_chunk = {
        c: fastmtl.engine.trunk_gram.per_task_gradients([z], shared, cotangents, c, retain_graph=True)
        for c in (1, 3, 7)
    }
    for c in (1, 3):
        for got, want in zip(per_chunk[c], per_chunk[7]):
            assert_rel_close(got, want, 1e-12, f"chunks of {c}")


def test_gram_params_gram_is_that_of_the_chosen_layers_and_the_update_reaches_every_shared_parameter():
    model = mlp_model()
    x, y = batch()
    chosen = list(model.trunk[2].parameters())  # the last Linear
    shared = list(model.trunk.parameters())
    got_result, got_grads = run_engine(model, x, y, agg.UPGrad, gram_params=chosen)
    assert got_result.path == "partial/batched"
    losses, z = model.losses(x, y)
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[t], chosen, retain_graph=True)])
        for t in range(T_TASKS)
    ]
    partial_jacobian = torch.stack(rows)
    gram = partial_jacobian @ partial_jacobian.T
    weights = agg.UPGrad()(gram)
    assert_rel_close(got_result.gram, gram, 1e-9, "gram")
    assert_rel_close(got_result.weights, weights, 1e-9, "weights")
    update = torch.autograd.grad(losses, shared, grad_outputs=weights, retain_graph=True)
    for (name, _p), u in zip(model.trunk.named_parameters(), update):
        assert_rel_close(got_grads["trunk." + name], u, 1e-9, name)
    for t, head in enumerate(model.heads):
        for name, g in zip(
            ["weight", "bias"], torch.autograd.grad(losses[t], list(head.parameters()), retain_graph=True)
        ):
            assert_rel_close(got_grads[f"heads.{t}.{name}"], g, 1e-9, f"head {t} {name}")
    all_params = run_engine(model, x, y, agg.UPGrad, gram_params=shared)  # every layer: the exact step
    assert_same_step(all_params, run_engine(model, x, y, agg.UPGrad), 1e-9)


@pytest.mark.parametrize("kind", ["conv", "sequence"])
def test_gram_params_on_conv_and_attention_trunks_match_the_reference_weights(kind):
    make_model, make_batch = MODELS[kind]
    model = make_model()
    x, y = make_batch()
    last = list(list(model.trunk.children())[-1].parameters())
    got_result, _ = run_engine(model, x, y, agg.MGDA, gram_params=last)
    losses, z = model.losses(x, y)
    want = fastmtl.reference.mtl_backward(losses, z, agg.MGDA(), shared_params=last)
    assert_rel_close(got_result.gram, want.gram, 1e-9, "gram")
    assert_rel_close(got_result.weights, want.weights, 1e-9, "weights")


def cheap_and_exact_updates(model, x, y, make, **kwargs):
    result, grads = run_engine(model, x, y, make, report_cosine=True, **kwargs)
    _, exact = run_engine(model, x, y, make)
    names = [n for n, _ in model.trunk.named_parameters()]
    return result, [grads["trunk." + n] for n in names], [exact["trunk." + n] for n in names]


def plain_cosine(a, b):
    a = torch.cat([t.reshape(-1) for t in a])
    b = torch.cat([t.reshape(-1) for t in b])
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("kwargs", [dict(mode="rep"), dict(gram_params="last"), dict(mode="exact")])
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_the_cosine_report_is_the_cosine_to_the_exact_update(kwargs, kind):
    make_model, make_batch = MODELS[kind]
    model = make_model()
    x, y = make_batch()
    if kwargs.get("gram_params") == "last":
        kwargs = dict(gram_params=list(list(model.trunk.modules())[-2].parameters()) or None)
    result, cheap, exact = cheap_and_exact_updates(model, x, y, agg.UPGrad, **kwargs)
    want = plain_cosine(cheap, exact)
    assert abs(result.cosine - want) < 1e-9, (result.cosine, want)
    if kwargs.get("mode") == "exact":
        assert result.cosine == 1.0
    else:
        assert want < 1 - 1e-6  # the approximation is visible at this size


def test_the_cosine_report_of_kept_gram_every_weights():
    model = mlp_model()
    x, y = batch()
    aggregator = agg.UPGrad()
    for call in range(2):
        model.zero_grad(set_to_none=True)
        losses, z = model.losses(x if call == 0 else x * 1.5, y)
        result = fastmtl.mtl_backward(losses, z, aggregator, gram_every=2, report_cosine=True)
    assert not result.gram_computed and result.path == "kept weights"
    kept = [p.grad.clone() for p in model.trunk.parameters()]
    _, exact = run_engine(model, x * 1.5, y, agg.UPGrad)
    want = plain_cosine(kept, [exact["trunk." + n] for n, _ in model.trunk.named_parameters()])
    assert abs(result.cosine - want) < 1e-9 and want < 1 - 1e-6


def test_the_cosine_report_leaves_a_stateful_aggregator_one_step_on():
    model = mlp_model()
    x, y = batch()
    reported, plain = agg.NashMTL(), agg.NashMTL()
    for _ in range(2):
        for aggregator, kwargs in ((reported, dict(mode="rep", report_cosine=True)), (plain, dict(mode="rep"))):
            model.zero_grad(set_to_none=True)
            losses, z = model.losses(x, y)
            result = fastmtl.mtl_backward(losses, z, aggregator, **kwargs)
            if aggregator is reported:
                weights = result.weights
        assert_rel_close(weights, result.weights, 1e-12, "NashMTL weights with and without the cosine report")


def test_bad_gram_params_and_memory_budget_raise_naming_the_argument():
    model = mlp_model()
    x, y = batch()
    losses, z = model.losses(x, y)
    with pytest.raises(ValueError, match="'gram_params' expected a subset of the shared parameters"):
        fastmtl.mtl_backward(losses, z, agg.Mean(), gram_params=list(model.heads[0].parameters()))
    with pytest.raises(ValueError, match="'gram_params' expected a non-empty subset"):
        fastmtl.mtl_backward(losses, z, agg.Mean(), gram_params=[])
    with pytest.raises(ValueError, match="'memory_budget' expected None or an int >= 0"):
        fastmtl.mtl_backward(losses, z, agg.Mean(), memory_budget=-1)
    with pytest.raises(ValueError, match="'memory_budget' expected None or an int >= 0"):
        fastmtl.mtl_backward(losses, z, agg.Mean(), memory_budget=1.5)


def test_options_of_any_trunk_are_refused_by_the_fused_path_and_checked_in_the_options():
    tasks = [fastmtl.Task("a", "regression"), fastmtl.Task("b", "binary")]
    fused = fastmtl.nn.MultiTaskModel(fastmtl.nn.FusedMLP(6, [8]), fastmtl.nn.MultiTaskHeads(8, tasks))
    targets = {"a": torch.randn(4), "b": torch.ones(4)}
    for name, value in (("gram_params", list(fused.trunk.parameters())), ("memory_budget", 0), ("report_cosine", True)):
        with pytest.raises(ValueError, match=f"'{name}' expected its default on the fused path"):
            fused.mtl_backward(torch.randn(4, 6), targets, agg.Mean(), **{name: value})
    with pytest.raises(ValueError, match="'report_cosine' expected a bool"):
        fastmtl.engine.MTLBackwardOptions(report_cosine=1)
    with pytest.raises(ValueError, match="'gram_params' expected a subset of the shared parameters"):
        fastmtl.engine.MTLBackwardOptions(gram_params=[3])
    options = fastmtl.engine.MTLBackwardOptions(gram_params=iter([torch.zeros(2)]), memory_budget=0)
    assert isinstance(options.gram_params, tuple) and options.memory_budget == 0


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


@pytest.mark.parametrize("make", [agg.MoDo, agg.SDMGrad])
def test_methods_refuse_losses_and_modes_that_cannot_supply_them_saying_what_they_need(make):
    # A cross-Gram method takes the losses of independent batches (tests/test_engine_cross_gram.py).
    model = mlp_model()
    x, y = batch()
    losses, z = model.losses(x, y)
    with pytest.raises(ValueError, match=r"argument 'losses' expected a \[2, T\] or \[3, T\] tensor .*independent"):
        fastmtl.mtl_backward(losses, z, make())
    losses, z = model.losses(x, y)
    with pytest.raises(ValueError, match="mode='exact'"):
        fastmtl.mtl_backward(losses, z, agg.GradDrop(), mode="rep")


def test_methods_that_need_the_per_task_gradients_get_them_on_every_path_and_refuse_gram_params():
    # A "jacobian" method takes the materialised Jacobian even where the Gram alone would be streamed.
    model = mlp_model()
    x, y = batch()
    shared = list(model.trunk.parameters())
    (_, want), (result, got) = (
        run_engine(model, x, y, lambda: agg.TrimmedMean(1), shared_params=shared, **kw)
        for kw in (dict(), dict(memory_budget=0))
    )
    assert result.path == "streamed" and want.keys() == got.keys()
    for name in want:
        assert_rel_close(got[name], want[name], 1e-12, name)
    losses, z = model.losses(x, y)
    with pytest.raises(ValueError, match="'gram_params' expected None with a method that needs the per-task"):
        fastmtl.mtl_backward(losses, z, agg.TrimmedMean(1), gram_params=shared[-2:])
