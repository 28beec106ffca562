"""The fused per-task engine of MultiTaskModel (FusedMLP trunk): model.mtl_backward against
fastmtl.reference.mtl_backward (T autograd.grad calls through the plain model), the Gram op against
fastmtl.reference.task_gram, ghost against materialise, gram_every, opcheck and bad input."""

import math

import pytest
import torch

import fastmtl
import fastmtl.aggregation as agg
from conftest import assert_rel_close, mixed_tasks, random_targets

AGGREGATORS = {
    "Mean": agg.Mean,
    "Sum": agg.Sum,
    "Constant": lambda: agg.Constant([1.0, 0.5, 2.0, 1.5]),
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


def make_model(tasks, widths=(9, 7), in_features=5, activation="relu", bias=True, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    trunk = fastmtl.nn.FusedMLP(in_features, list(widths), activation=activation, bias=bias)
    return fastmtl.nn.MultiTaskModel(trunk, fastmtl.nn.MultiTaskHeads(widths[-1], tasks)).to(dtype)


def make_batch(tasks, B=11, in_features=5, dtype=torch.float64, seed=1, missing=0.2, unlabelled=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, in_features, generator=g, dtype=torch.float64).to(dtype)
    targets = random_targets(tasks, B, g, missing=missing, unlabelled=unlabelled)
    return x, {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in targets.items()}


def reference_step(model, x, targets, aggregator, mode="exact", keep_jacobian=False):
    """The plain T-call reference on the same model: losses weighted by task.weight, trunk shared."""
    z = model.trunk(x)
    losses = model.heads.losses(z, targets)
    return fastmtl.reference.mtl_backward(
        losses * model.heads.task_weights,
        z,
        aggregator,
        shared_params=list(model.trunk.parameters()),
        mode=mode,
        keep_jacobian=keep_jacobian,
    )


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(model, x, targets, make_aggregator, mode="exact", rtol=1e-9, rng=5, **kwargs):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(rng)
    got = model.mtl_backward(x, targets, make_aggregator(), mode=mode, **kwargs)
    got_grads = grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(rng)
    want = reference_step(
        model, x, targets, make_aggregator(), mode=mode, keep_jacobian=kwargs.get("keep_jacobian", False)
    )
    want_grads = grads(model)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        assert_rel_close(got_grads[name], want_grads[name], rtol, name)
    assert_rel_close(got.gram, want.gram, rtol, "gram")
    assert_rel_close(got.weights, want.weights, rtol, "weights")
    return got, want


TASKS = mixed_tasks(4)


JACOBIAN_METHODS = {
    "GradDrop": lambda: agg.GradDrop(seed=0),
    "TrimmedMean": lambda: agg.TrimmedMean(1),
    "ExcessMTL": agg.ExcessMTL,
    "MoCo": agg.MoCo,
}


def methods_requiring(requires):
    return {
        name
        for name in agg.__all__
        if isinstance(getattr(agg, name), type)
        and issubclass(getattr(agg, name), agg.Aggregator)
        and name not in agg.INTERFACES
        and getattr(agg, name).requires == requires
    }


def test_every_aggregator_of_the_package_is_compared():
    # The methods that need more than the Gram matrix: "jacobian" ones are compared with the generic
    # engine below (JACOBIAN_METHODS); "cross_gram" ones in tests/test_engine_cross_gram.py.
    assert set(AGGREGATORS) == methods_requiring("gram")
    assert set(JACOBIAN_METHODS) == methods_requiring("jacobian")


@pytest.mark.parametrize("name", list(AGGREGATORS))
@pytest.mark.parametrize("mode", ["exact", "rep"])
def test_every_aggregator_matches_the_reference_in_float64(name, mode):
    model = make_model(TASKS)
    x, targets = make_batch(TASKS)
    compare(model, x, targets, AGGREGATORS[name], mode=mode)


@pytest.mark.parametrize("activation", fastmtl.ops.ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("gram_path", ["materialise", "ghost"])
def test_both_gram_paths_match_the_reference_for_every_activation(activation, bias, gram_path):
    model = make_model(TASKS, widths=(8, 6, 7), activation=activation, bias=bias)
    x, targets = make_batch(TASKS)
    compare(model, x, targets, agg.UPGrad, gram_path=gram_path)


def test_ghost_and_materialise_give_the_same_gram_and_jacobian_matches_the_reference():
    tasks = mixed_tasks(6)
    model = make_model(tasks, widths=(16, 13))
    x, targets = make_batch(tasks, B=7)
    heads = model.heads
    args = (
        [p.detach() for p in model.trunk.weights],
        [p.detach() for p in model.trunk.biases],
        "relu",
        heads.weight.detach(),
        heads.bias.detach(),
        targets,
        tasks,
    )
    ghost = fastmtl.ops.task_gram(x, *args, gram_path="ghost")
    materialised = fastmtl.ops.task_gram(x, *args, gram_path="materialise")
    assert_rel_close(ghost, materialised, 1e-12, "ghost vs materialise")
    assert_rel_close(ghost, fastmtl.reference.task_gram(x, *args), 1e-12, "ghost vs reference")
    assert torch.equal(ghost, ghost.T)
    got, want = compare(model, x, targets, agg.MGDA, keep_jacobian=True)
    assert_rel_close(got.jacobian, want.jacobian, 1e-12, "jacobian")


def layer_paths(B, widths, in_features, keep_jacobian=False):
    """The Gram path mtl_trunk_gram takes per layer ("auto"), for three tasks."""
    tasks = mixed_tasks(3)
    model = make_model(tasks, widths=widths, in_features=in_features, bias=False)
    x, targets = make_batch(tasks, B=B, in_features=in_features)
    ws = [w.detach() for w in model.trunk.weights]
    out, saved = torch.ops.fastmtl.fused_mlp.default(x, ws, [], "relu")
    head, widths_out = model.heads.weight.detach(), [t.num_outputs for t in tasks]
    _, logit_grad, count_scale = torch.ops.fastmtl.multitask_head_loss.default(
        out, head, None, model.heads.pack_targets(targets), [t.loss for t in tasks], widths_out
    )
    _, _, paths = torch.ops.fastmtl.mtl_trunk_gram.default(
        x,
        ws,
        out,
        saved,
        "relu",
        False,
        head,
        logit_grad,
        count_scale,
        model.heads.task_weights,
        widths_out,
        "auto",
        keep_jacobian,
    )
    return paths.tolist()


def test_the_cost_model_picks_ghost_for_a_small_batch_and_materialise_for_a_large_one():
    # 4 rows against 48- and 64-wide inputs: K = X X^T is 4 x 4, far cheaper than 3 x 3072 gradients.
    assert layer_paths(4, (64, 40), 48) == [1, 1]
    # 256 rows against 5- and 6-wide inputs: the 3 x 30 gradients are cheaper than a 256 x 256 K.
    assert layer_paths(256, (6, 7), 5) == [0, 0]
    assert layer_paths(4, (64, 40), 48, keep_jacobian=True) == [0, 0]  # the Jacobian is the materialised g_t


@pytest.mark.parametrize("name", ["Mean", "UPGrad", "MGDA"])
@pytest.mark.parametrize("mode", ["exact", "rep"])
def test_float32_matches_the_float64_reference(name, mode):
    model64 = make_model(TASKS, activation="gelu")
    model32 = make_model(TASKS, activation="gelu", dtype=torch.float32)
    x, targets = make_batch(TASKS)
    model64.zero_grad(set_to_none=True)
    reference_step(model64, x, targets, AGGREGATORS[name](), mode=mode)
    x32, targets32 = make_batch(TASKS, dtype=torch.float32)
    model32.mtl_backward(x32, targets32, AGGREGATORS[name](), mode=mode)
    for (n, p64), (_, p32) in zip(model64.named_parameters(), model32.named_parameters()):
        assert_rel_close(p32.grad, p64.grad, 1e-5, n)


def test_gradients_accumulate_over_two_calls():
    model = make_model(TASKS)
    x, targets = make_batch(TASKS)
    model.zero_grad(set_to_none=True)
    model.mtl_backward(x, targets, agg.UPGrad())
    once = grads(model)
    model.mtl_backward(x, targets, agg.UPGrad())
    for name, g in grads(model).items():
        assert_rel_close(g, 2 * once[name], 1e-12, name)


def test_heads_get_the_gradient_of_their_own_weighted_loss():
    model = make_model(TASKS)
    x, targets = make_batch(TASKS)
    model.zero_grad(set_to_none=True)
    model.mtl_backward(x, targets, agg.MGDA())
    losses = model.losses(x, targets)
    want = torch.autograd.grad(torch.dot(losses, model.heads.task_weights), [model.heads.weight, model.heads.bias])
    assert_rel_close(model.heads.weight.grad, want[0], 1e-12, "head weight")
    assert_rel_close(model.heads.bias.grad, want[1], 1e-12, "head bias")


@pytest.mark.parametrize("B, num_tasks, widths", [(1, 3, (5,)), (8, 1, (6, 4)), (1, 1, (3,)), (5, 40, (17, 9, 12))])
def test_odd_shapes(B, num_tasks, widths):
    tasks = mixed_tasks(num_tasks)
    model = make_model(tasks, widths=widths)
    x, targets = make_batch(tasks, B=B)
    for mode in ("exact", "rep"):
        for path in ("materialise", "ghost"):
            compare(model, x, targets, agg.UPGrad, mode=mode, gram_path=path)


def test_wide_inputs_are_materialised_in_column_chunks():
    # 150 inputs and 3 rows: the gradients of layer 0 (and 130 inputs of layer 1) are materialised
    # in chunks of 128 columns (and 22); the Gram and the Jacobian assembled from them match the reference.
    tasks = mixed_tasks(5)
    model = make_model(tasks, widths=(130, 7), in_features=150)
    x, targets = make_batch(tasks, B=3, in_features=150)
    got, want = compare(model, x, targets, agg.UPGrad, gram_path="materialise", keep_jacobian=True)
    assert_rel_close(got.jacobian, want.jacobian, 1e-12, "jacobian")
    compare(model, x, targets, agg.UPGrad, gram_path="ghost")


def test_a_task_without_labels_has_a_zero_row_and_nothing_is_nan():
    model = make_model(TASKS)
    x, targets = make_batch(TASKS, unlabelled=(TASKS[1].name,))
    for make in (agg.UPGrad, agg.MGDA, agg.NashMTL, agg.IMTLG, agg.CAGrad):
        for mode in ("exact", "rep"):
            got, _ = compare(model, x, targets, make, mode=mode)
            assert float(got.gram[1].abs().max()) == 0.0 and float(got.gram[:, 1].abs().max()) == 0.0
            assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def test_no_jacobian_unless_asked():
    model = make_model(TASKS)
    x, targets = make_batch(TASKS)
    assert model.mtl_backward(x, targets, agg.UPGrad()).jacobian is None
    result = model.mtl_backward(x, targets, agg.UPGrad(), keep_jacobian=True)
    assert result.jacobian.shape == (4, sum(p.numel() for p in model.trunk.parameters()))


def test_gram_every_reuses_the_weights_between_gram_steps():
    model = make_model(TASKS)
    batches = [make_batch(TASKS, seed=s) for s in range(5)]
    computed = []
    for mode in ("exact", "rep"):
        kept = None
        model.zero_grad(set_to_none=True)
        for _step, (x, targets) in enumerate(batches):
            model.zero_grad(set_to_none=True)
            result = model.mtl_backward(x, targets, agg.UPGrad(), mode=mode, gram_every=2)
            computed.append(result.gram_computed)
            if result.gram_computed:
                kept = result.weights
                continue
            assert torch.equal(result.weights, kept)
            # A reuse step is the ordinary backward of sum_t a_t w_t L_t for the trunk.
            got = grads(model)
            model.zero_grad(set_to_none=True)
            losses = model.losses(x, targets)
            trunk = list(model.trunk.parameters())
            want = torch.autograd.grad(torch.dot(losses, kept * model.heads.task_weights), trunk)
            for p, g in zip(model.trunk.named_parameters(), want):
                assert_rel_close(got["trunk." + p[0]], g, 1e-12, p[0])
    assert computed == [True, False, True, False, True] * 2


def test_gram_every_in_the_generic_path():
    torch.manual_seed(0)
    trunk, head = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)
    aggregator = agg.UPGrad()
    flags = []
    for _step in range(4):
        x, y = torch.randn(8, 4), torch.randn(8, 3)
        z = trunk(x)
        losses = ((head(z) - y) ** 2).mean(0)
        trunk.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        result = fastmtl.mtl_backward(losses, z, aggregator, gram_every=3)
        flags.append(result.gram_computed)
        if not result.gram_computed:
            z = trunk(x)
            losses = ((head(z) - y) ** 2).mean(0)
            want = torch.autograd.grad(torch.dot(losses, result.weights), [trunk.weight, trunk.bias], retain_graph=True)
            assert_rel_close(trunk.weight.grad, want[0], 1e-6)
            assert_rel_close(head.weight.grad, torch.autograd.grad(losses.sum(), head.weight)[0], 1e-6)
    assert flags == [True, False, False, True]


def test_input_that_requires_grad_gets_the_aggregated_gradient():
    model = make_model(TASKS)
    x, targets = make_batch(TASKS)
    embedding = torch.randn(x.shape, dtype=torch.float64, requires_grad=True)
    model.zero_grad(set_to_none=True)
    result = model.mtl_backward(x + embedding, targets, agg.UPGrad())
    losses = model.losses(x + embedding, targets)
    want = torch.autograd.grad(torch.dot(losses, result.weights * model.heads.task_weights), embedding)[0]
    assert_rel_close(embedding.grad, want, 1e-12, "upstream gradient")


def test_a_plain_trunk_goes_through_the_generic_engine():
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh())
    model = fastmtl.nn.MultiTaskModel(trunk, fastmtl.nn.MultiTaskHeads(7, TASKS)).double()
    x, targets = make_batch(TASKS)
    compare(model, x, targets, agg.UPGrad)
    # gram_every keeps its schedule on the model here too: a fresh aggregator per call continues it.
    flags = [model.mtl_backward(x, targets, agg.UPGrad(), gram_every=2).gram_computed for _ in range(3)]
    assert flags == [True, False, True]
    with pytest.raises(ValueError, match="'gram_path' applies to a FusedMLP trunk only"):
        model.mtl_backward(x, targets, agg.UPGrad(), gram_path="ghost")


def test_the_engine_ops_pass_opcheck():
    tasks = mixed_tasks(5)
    for activation, bias in (("relu", True), ("gelu", False)):
        model = make_model(tasks, activation=activation, bias=bias)
        x, targets = make_batch(tasks)
        ws = [w.detach() for w in model.trunk.weights]
        bs = [b.detach() for b in model.trunk.biases] if bias else []
        out, saved = torch.ops.fastmtl.fused_mlp.default(x, ws, bs, activation)
        head, packed = model.heads.weight.detach(), model.heads.pack_targets(targets)
        names, widths = [t.loss for t in tasks], [t.num_outputs for t in tasks]
        _, logit_grad, scale = torch.ops.fastmtl.multitask_head_loss.default(
            out, head, model.heads.bias.detach(), packed, names, widths
        )
        tw = model.heads.task_weights
        for path, keep in (("auto", False), ("ghost", False), ("materialise", True)):
            torch.library.opcheck(
                torch.ops.fastmtl.mtl_trunk_gram.default,
                (x, ws, out, saved, activation, bias, head, logit_grad, scale, tw, widths, path, keep),
            )
        torch.library.opcheck(torch.ops.fastmtl.mtl_representation_gram.default, (head, logit_grad, scale, tw, widths))
        for need_input_grad in (False, True):
            torch.library.opcheck(
                torch.ops.fastmtl.mtl_weighted_backward.default,
                (
                    x,
                    ws,
                    out,
                    saved,
                    activation,
                    bias,
                    head,
                    True,
                    logit_grad,
                    scale,
                    tw,
                    0.5 * tw,
                    widths,
                    need_input_grad,
                ),
            )


def test_inputs_are_not_modified():
    model = make_model(TASKS)
    x, targets = make_batch(TASKS)
    before_x = x.clone()
    before_targets = {k: v.clone() for k, v in targets.items()}
    before_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.mtl_backward(x, targets, agg.UPGrad(), gram_path="ghost")
    assert torch.equal(x, before_x)
    for k, v in targets.items():
        assert torch.equal(v, before_targets[k]) or (
            v.is_floating_point()
            and torch.equal(v.isnan(), before_targets[k].isnan())
            and torch.equal(v.nan_to_num(), before_targets[k].nan_to_num())
        )
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before_params[n]), n


def test_bad_input_raises_naming_the_argument():
    model = make_model(TASKS)
    x, targets = make_batch(TASKS)
    with pytest.raises(ValueError, match="'mode' expected one of"):
        model.mtl_backward(x, targets, agg.Mean(), mode="fast")
    with pytest.raises(ValueError, match="'gram_path' expected one of"):
        model.mtl_backward(x, targets, agg.Mean(), gram_path="fast")
    with pytest.raises(ValueError, match="'gram_every' expected an int >= 1"):
        model.mtl_backward(x, targets, agg.Mean(), gram_every=0)
    with pytest.raises(ValueError, match=r"'aggregator' expected a callable returning weights of shape \[4\]"):
        model.mtl_backward(x, targets, lambda gram: torch.ones(3, dtype=gram.dtype))
    with pytest.raises(ValueError, match="'aggregator' expected finite weights"):
        model.mtl_backward(x, targets, lambda gram: torch.full((4,), math.nan, dtype=gram.dtype))
    with pytest.raises(ValueError, match="has no entry for task"):
        model.mtl_backward(x, {k: v for k, v in list(targets.items())[1:]}, agg.Mean())
    with pytest.raises(ValueError, match=r"'x' expected a \[B, 5\] tensor"):
        model.mtl_backward(x[:, :3], targets, agg.Mean())
    # The ops name their arguments too.
    ws = [w.detach() for w in model.trunk.weights]
    out, saved = torch.ops.fastmtl.fused_mlp.default(x, ws, [], "relu")
    head = model.heads.weight.detach()
    widths = [t.num_outputs for t in TASKS]
    logit_grad = torch.zeros(x.shape[0], head.shape[0], dtype=x.dtype)
    scale = tw = torch.ones(4, dtype=x.dtype)
    op = torch.ops.fastmtl.mtl_trunk_gram.default
    with pytest.raises(ValueError, match="'gram_path' expected one of auto, materialise, ghost"):
        op(x, ws, out, saved, "relu", False, head, logit_grad, scale, tw, widths, "fast", False)
    with pytest.raises(ValueError, match="'saved' expected 1 tensors"):
        op(x, ws, out, [], "relu", False, head, logit_grad, scale, tw, widths, "auto", False)
    with pytest.raises(ValueError, match="'logit_grad' expected size 11 in dimension 0"):
        op(x, ws, out, saved, "relu", False, head, logit_grad[:3], scale, tw, widths, "auto", False)
    with pytest.raises(ValueError, match="'task_weights' expected size 4 in dimension 0"):
        op(x, ws, out, saved, "relu", False, head, logit_grad, scale, tw[:2], widths, "auto", False)
    with pytest.raises(ValueError, match="'head_weight' expected size"):
        op(x, ws, out, saved, "relu", False, head[:, :3], logit_grad, scale, tw, widths, "auto", False)
    with pytest.raises(TypeError, match="'head_weight' expected dtype torch.float64"):
        op(x, ws, out, saved, "relu", False, head.float(), logit_grad, scale, tw, widths, "auto", False)


def test_results_do_not_depend_on_the_thread_count():
    # What the GEMMs give (the Gram matrix, every gradient downstream of one) is MKL's: its sgemm
    # splits long reductions by the thread count on some CPUs (AVX-512 here), so the step is
    # compared at float32 rounding; fastmtl's own reductions are bit-for-bit (next test).
    tasks = mixed_tasks(7)
    model = make_model(tasks, widths=(300, 200), in_features=40, activation="gelu", dtype=torch.float32)
    x, targets = make_batch(tasks, B=333, in_features=40, dtype=torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            model.zero_grad(set_to_none=True)
            gram = model.mtl_backward(x, targets, agg.UPGrad(), gram_path="materialise").gram
            ghost = model.mtl_backward(x, targets, agg.UPGrad(), gram_path="ghost").gram
            results.append((gram, ghost, [p.grad.clone() for p in model.parameters()]))
    finally:
        torch.set_num_threads(threads)
    (gram1, ghost1, grads1), (gram2, ghost2, grads2) = results
    torch.testing.assert_close(gram1, gram2, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ghost1, ghost2, rtol=1e-5, atol=1e-7)
    for a, b in zip(grads1, grads2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bias_gradient_reduction_has_the_same_bits_for_any_thread_count():
    # The activation pass reduces bias gradients over fixed row chunks, whatever the thread count;
    # the last layer's bias gradient has no GEMM upstream of it, so its bits are fastmtl's alone.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4099, 40, generator=gen)
    weights = [torch.randn(300, 40, generator=gen) / 7]
    biases = [torch.randn(300, generator=gen)]
    out, saved = torch.ops.fastmtl.fused_mlp.default(x, weights, biases, "gelu")
    grad_out = torch.randn(out.shape, generator=gen)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            _, _, db = torch.ops.fastmtl.fused_mlp_backward.default(
                grad_out, x, weights, out, saved, "gelu", True, False
            )
            results.append(db[0])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


# ---- issue 17: methods that need the per-task gradients (requires = "jacobian") on the fused path


def generic_step(model, x, targets, aggregator, **options):
    """The same step through the generic engine (fastmtl.mtl_backward) on the same model."""
    z = model.trunk(x)
    losses = model.heads.losses(z, targets)
    weighted = losses * model.heads.task_weights.to(losses.dtype)
    return fastmtl.mtl_backward(weighted, z, aggregator, list(model.trunk.parameters()), **options)


def assert_same_weights(got, want, rtol):
    assert got.shape == want.shape and torch.equal(torch.isnan(got), torch.isnan(want))
    if not torch.isnan(want).any():
        assert_rel_close(got, want, rtol, "weights")


def both_paths(model, x, targets, make, steps=1, **options):
    """(results, grads, aggregator) of ``steps`` calls of the fused path and of the generic engine, each
    with one aggregator object (a stateful method's state moves on over the calls)."""
    assert isinstance(model.trunk, fastmtl.nn.FusedMLP) and model.trunk.plain_layers
    out = []
    for step in (
        lambda a: model.mtl_backward(x, targets, a, **options),
        lambda a: generic_step(model, x, targets, a, **options),
    ):
        aggregator = make()
        model.zero_grad(set_to_none=True)
        results = [step(aggregator) for _ in range(steps)]
        out.append((results, grads(model), aggregator))
    return out


@pytest.mark.parametrize("name", list(JACOBIAN_METHODS))
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-6), (torch.float64, 1e-10)], ids=["float32", "float64"])
def test_jacobian_methods_on_the_fused_path_match_the_generic_engine(name, dtype, rtol):
    # Missing labels, a task without any, and task weights 0.5, 1.5, 2.5.
    model = make_model(TASKS, dtype=dtype)
    x, targets = make_batch(TASKS, dtype=dtype, missing=0.3, unlabelled=("task2",))
    (fused, got, _), (generic, want, _) = both_paths(model, x, targets, JACOBIAN_METHODS[name], keep_jacobian=True)
    assert got.keys() == want.keys() == {n for n, _ in model.named_parameters()}
    for key in want:
        assert_rel_close(got[key], want[key], rtol, key)
    assert_rel_close(fused[0].jacobian, generic[0].jacobian, rtol, "jacobian")
    assert fused[0].jacobian.shape == (len(TASKS), sum(p.numel() for p in model.trunk.parameters()))
    assert_rel_close(fused[0].gram, generic[0].gram, rtol, "gram")
    assert_same_weights(fused[0].weights, generic[0].weights, rtol)
    assert torch.isnan(fused[0].weights).all() == (name in ("GradDrop", "TrimmedMean"))
    # The update is the method's on the Jacobian (columns: the trunk's weights, then its biases).
    update = JACOBIAN_METHODS[name]()(jacobian=fused[0].jacobian)
    trunk = torch.cat([got[n].reshape(-1) for n, _ in model.trunk.named_parameters(prefix="trunk")])
    assert_rel_close(trunk, update, rtol, "update")
    # No Jacobian unless asked.
    model.zero_grad(set_to_none=True)
    assert model.mtl_backward(x, targets, JACOBIAN_METHODS[name]()).jacobian is None


@pytest.mark.parametrize("name", list(JACOBIAN_METHODS))
def test_jacobian_methods_state_evolves_the_same_on_both_paths(name):
    model = make_model(TASKS)
    x, targets = make_batch(TASKS)
    (fused, got, fused_method), (generic, want, generic_method) = both_paths(
        model, x, targets, JACOBIAN_METHODS[name], steps=2
    )
    for key in want:  # two steps accumulated
        assert_rel_close(got[key], want[key], 1e-10, key)
    for a, b in zip(fused, generic):
        assert_same_weights(a.weights, b.weights, 1e-10)
    assert_same_state(fused_method.state_dict(), generic_method.state_dict(), "state")


def assert_same_state(got, want, what):
    """A state_dict (its extra state: dicts of tensors, numbers, generator states) alike to 1e-10."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), what
        for key in want:
            assert_same_state(got[key], want[key], f"{what}.{key}")
    elif isinstance(want, torch.Tensor) and want.is_floating_point():
        assert_rel_close(got, want, 1e-10, what)
    elif isinstance(want, torch.Tensor):
        assert torch.equal(got, want), what
    else:
        assert got == want, what


def test_jacobian_method_input_gets_the_gradient_of_the_weighted_loss_sum():
    # As the generic engine gives a parameter the losses depend on that is not shared: d sum_t w_t L_t.
    model = make_model(TASKS)
    x, targets = make_batch(TASKS)
    embedding = torch.randn(x.shape, dtype=torch.float64, requires_grad=True)
    out = []
    for step in (model.mtl_backward, lambda *a: generic_step(model, *a)):
        model.zero_grad(set_to_none=True)
        embedding.grad = None
        step(x + embedding, targets, agg.TrimmedMean(1))
        out.append((grads(model), embedding.grad.clone()))
    (got, got_upstream), (want, want_upstream) = out
    for key in want:
        assert_rel_close(got[key], want[key], 1e-10, key)
    assert_rel_close(got_upstream, want_upstream, 1e-10, "upstream gradient")
    losses = model.losses(x + embedding, targets)
    sum_grad = torch.autograd.grad(torch.dot(losses, model.heads.task_weights), embedding)[0]
    assert_rel_close(got_upstream, sum_grad, 1e-10, "d sum_t w_t L_t")


def test_fused_path_refuses_what_it_cannot_supply_naming_the_argument():
    model = make_model(TASKS)
    x, targets = make_batch(TASKS)
    model.zero_grad(set_to_none=True)
    cases = [
        (agg.GradDrop(), dict(mode="rep"), "argument 'mode' expected 'exact' with GradDrop.*got 'rep'"),
        (agg.MoCo(), dict(gram_every=2), "argument 'gram_every' expected 1 with MoCo.*got 2"),
        (agg.SDMGrad(), dict(mode="rep"), "argument 'mode' expected 'exact' with SDMGrad.*cross-Gram.*got 'rep'"),
    ]
    for method, options, words in cases:
        with pytest.raises(ValueError, match=words):
            model.mtl_backward(x, targets, method, **options)
        # The generic engine refuses it with the same words (one rule for both).
        with pytest.raises(ValueError, match=words):
            generic_step(model, x, targets, method, **options)
    assert all(p.grad is None for p in model.parameters())  # refused before any backward
