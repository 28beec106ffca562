"""fused_mlp_norm (Linear -> [BatchNorm | LayerNorm] -> activation -> [Dropout] towers in one op)
against its plain-PyTorch reference: every normalisation, training and eval, running statistics,
dropout (the op's masks replayed), float32 / float64 / 16-bit, gradcheck, opcheck, bad input."""

import itertools
import math

import pytest
import torch

from fastmtl import ops, reference

NORM_CASES = [
    # (norm, affine, running statistics)
    ("batch", True, True),
    ("batch", False, True),
    ("batch", True, False),
    ("layer", True, False),
    ("layer", False, False),
    ("none", False, False),
]
ACTS = ["relu", "gelu", "tanh", "identity", "softmax"]


def tower(widths=(5, 7, 4), batch=9, dtype=torch.float64, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, widths[0], generator=gen, dtype=dtype)
    ws = [torch.randn(o, i, generator=gen, dtype=dtype) / math.sqrt(i) for i, o in zip(widths[:-1], widths[1:])]
    bs = [0.1 * torch.randn(o, generator=gen, dtype=dtype) for o in widths[1:]] if bias else []
    gammas = [1 + 0.2 * torch.randn(o, generator=gen, dtype=dtype) for o in widths[1:]]
    betas = [0.1 * torch.randn(o, generator=gen, dtype=dtype) for o in widths[1:]]
    means = [0.1 * torch.randn(o, generator=gen, dtype=dtype) for o in widths[1:]]
    variances = [1 + torch.rand(o, generator=gen, dtype=dtype) for o in widths[1:]]
    return x, ws, bs, gammas, betas, means, variances


def norm_kwargs(norm, affine, running, gammas, betas, means, variances):
    return dict(
        norm_weights=gammas if affine else [],
        norm_biases=betas if affine else [],
        running_means=[m.clone() for m in means] if running else [],
        running_vars=[v.clone() for v in variances] if running else [],
    )


@pytest.mark.parametrize("norm, affine, running", NORM_CASES)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("training, dropout", [(True, 0.0), (True, 0.4), (False, 0.4)])
def test_matches_reference_in_float64(norm, affine, running, activation, training, dropout):
    x, ws, bs, gammas, betas, means, variances = tower()
    kw = norm_kwargs(norm, affine, running, gammas, betas, means, variances)
    kw_ref = norm_kwargs(norm, affine, running, gammas, betas, means, variances)
    out, saved = ops.fused_mlp_norm_with_saved(
        x, ws, bs, norm, activation, dropout, training, kw["norm_weights"], kw["norm_biases"],
        kw["running_means"], kw["running_vars"],
    )  # fmt: skip
    dropping = training and dropout > 0
    masks = [saved[ops.norm_trunk.SAVED_PER_LAYER * l + 4] for l in range(len(ws))] if dropping else None
    if dropping:
        assert all(m.dtype == torch.bool and 0 < m.float().mean() < 1 for m in masks)
    expected = reference.fused_mlp_norm(x, ws, bs, norm, activation, dropout, training, dropout_masks=masks, **kw_ref)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(kw["running_means"] + kw["running_vars"], kw_ref["running_means"] + kw_ref["running_vars"]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14, msg="running statistics as F.batch_norm's")
    if running and training:
        assert not torch.equal(kw["running_means"][0], means[0]), "training updates the running statistics"


@pytest.mark.parametrize("norm, affine, running", NORM_CASES)
def test_float32_matches_float64_reference(norm, affine, running):
    # No biases before batch norm: their gradient is exactly 0, and the comparison would weigh
    # rounding noise against it.
    x, ws, bs, gammas, betas, means, variances = tower(widths=(11, 33, 17), batch=31, bias=norm != "batch")
    inputs64 = [x] + ws + bs + (gammas + betas if affine else [])
    grad_out = torch.randn(31, 17, dtype=torch.float64)

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in inputs64]
        nb = len(bs)
        x_, ws_, bs_ = leaves[0], leaves[1:3], leaves[3 : 3 + nb]
        g_, b_ = (leaves[3 + nb : 5 + nb], leaves[5 + nb : 7 + nb]) if affine else ([], [])
        stats = [m.to(dtype) for m in means] if running else [], [v.to(dtype) for v in variances] if running else []
        out = fn(x_, ws_, bs_, norm, "gelu", 0.0, True, g_, b_, *stats)
        return [out] + list(torch.autograd.grad(out, leaves, grad_out.to(dtype)))

    for got, want in zip(run(ops.fused_mlp_norm, torch.float32), run(reference.fused_mlp_norm, torch.float64)):
        scale = want.abs().max().item()
        assert (got.double() - want).abs().max().item() <= 1e-5 * max(scale, 1e-6)


GRADCHECK_CASES = [
    (norm, affine, running, act, training, dropout)
    for (norm, affine, running), act, (training, dropout) in itertools.product(
        NORM_CASES, ["relu", "gelu", "identity", "softmax"], [(True, 0.0), (True, 0.3), (False, 0.0)]
    )
]


@pytest.mark.parametrize("norm, affine, running, activation, training, dropout", GRADCHECK_CASES)
def test_gradcheck(norm, affine, running, activation, training, dropout):
    x, ws, bs, gammas, betas, means, variances = tower(widths=(4, 6, 3), batch=7)
    params = [x] + ws + bs + (gammas + betas if affine else [])
    leaves = [t.clone().requires_grad_() for t in params]

    def fn(*args):
        torch.manual_seed(5)  # the same dropout mask at every evaluation
        x_, w_, b_ = args[0], list(args[1:3]), list(args[3:5])
        g_, be_ = (list(args[5:7]), list(args[7:9])) if affine else ([], [])
        stats = ([m.clone() for m in means], [v.clone() for v in variances]) if running else ([], [])
        return ops.fused_mlp_norm(x_, w_, b_, norm, activation, dropout, training, g_, be_, *stats)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("norm, affine, running", NORM_CASES)
@pytest.mark.parametrize("training", [True, False])
def test_opcheck(norm, affine, running, training, kernels):
    # kernels: the portable steps too (their ATen calls once recorded a graph inside the backward op)
    x, ws, bs, gammas, betas, means, variances = tower(widths=(4, 6, 3), batch=7, dtype=torch.float32)
    x.requires_grad_()
    ws = [w.requires_grad_() for w in ws]
    kw = norm_kwargs(norm, affine, running, gammas, betas, means, variances)
    args = (x, ws, bs, kw["norm_weights"], kw["norm_biases"], kw["running_means"], kw["running_vars"], norm, "relu")
    torch.library.opcheck(torch.ops.fastmtl.fused_mlp_norm.default, (*args, 0.0, training, 0.1, 1e-5))
    # The backward op is first order (a backward through it raises): its opcheck takes inputs that
    # do not require grad, so test_aot_dispatch_dynamic compares its outputs, not gradients through it.
    from conftest import detach_all

    detached = [detach_all(a) for a in args]
    out, saved, _ = torch.ops.fastmtl.fused_mlp_norm.default(*detached, 0.3, training, 0.1, 1e-5)
    backward_args = (torch.randn_like(out), *detached[:7], out, saved, norm, "relu")
    torch.library.opcheck(
        torch.ops.fastmtl.fused_mlp_norm_backward.default, (*backward_args, 0.3, training, 0.1, 1e-5, True)
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", ["batch", "layer"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_16bit_within_twice_plain_pytorch(norm, dtype, seed):
    from conftest import assert_within_twice_plain

    # gelu, not relu: a normalisation centres its outputs at 0, where relu's derivative jumps, and one
    # entry rounded to the other side of 0 moves a gradient by a whole term, so the max error would
    # measure which side each rounding fell on (either implementation's), not its accuracy.
    # No biases before batch norm: their gradient is exactly 0 (a relative error of rounding noise).
    x, ws, bs, gammas, betas, means, variances = tower(widths=(24, 48, 16), batch=64, seed=seed, bias=norm != "batch")
    grad_out = torch.randn(64, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))

    def run(fn, dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in [x] + ws + bs + gammas + betas]
        nb = len(bs)
        out = fn(
            leaves[0], leaves[1:3], leaves[3 : 3 + nb], norm, "gelu", 0.0, True,
            leaves[3 + nb : 5 + nb], leaves[5 + nb : 7 + nb],
        )  # fmt: skip
        return [out] + list(torch.autograd.grad(out, leaves, grad_out.to(dt)))

    exact, plain, fast = (
        run(reference.fused_mlp_norm, torch.float64),
        run(reference.fused_mlp_norm, dtype),
        run(ops.fused_mlp_norm, dtype),
    )
    assert fast[0].dtype == dtype
    for i, (f, p, e) in enumerate(zip(fast, plain, exact)):
        assert_within_twice_plain(f, p, e, dtype, f"{norm} output {i}")


def test_running_statistics_in_another_dtype_are_updated():
    """16-bit storage with float32 running statistics (as autocast keeps them), and the reverse."""
    x, ws, bs, gammas, betas, means, variances = tower(dtype=torch.float32)
    m16, v16 = [m.bfloat16() for m in means], [v.bfloat16() for v in variances]
    ops.fused_mlp_norm(x, ws, bs, "batch", "relu", 0.0, True, gammas, betas, m16, v16)
    m32, v32 = [m.clone() for m in means], [v.clone() for v in variances]
    reference.fused_mlp_norm(x, ws, bs, "batch", "relu", 0.0, True, gammas, betas, m32, v32)
    for a, b in zip(m16 + v16, m32 + v32):
        torch.testing.assert_close(a.float(), b, rtol=1e-2, atol=1e-2)


def test_eval_batch_norm_takes_one_row_and_training_refuses_it():
    x, ws, bs, gammas, betas, means, variances = tower(batch=1)
    out = ops.fused_mlp_norm(x, ws, bs, "batch", "relu", 0.0, False, gammas, betas, means, variances)
    expected = reference.fused_mlp_norm(x, ws, bs, "batch", "relu", 0.0, False, gammas, betas, means, variances)
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match=r"fastmtl.fused_mlp_norm: argument 'x' expected more than 1 row"):
        ops.fused_mlp_norm(x, ws, bs, "batch", "relu", 0.0, True, gammas, betas, means, variances)


def test_dropout_one_drops_everything_and_zero_nothing():
    x, ws, bs, *_ = tower()
    assert torch.equal(ops.fused_mlp_norm(x, ws, bs, "none", "relu", 1.0, True), torch.zeros(9, 4, dtype=x.dtype))
    torch.testing.assert_close(ops.fused_mlp_norm(x, ws, bs, "none", "relu", 0.0, True), ops.fused_mlp(x, ws, bs))


def _bad(**change):
    x, ws, bs, gammas, betas, means, variances = tower(dtype=torch.float32)
    args = dict(
        x=x, weights=ws, biases=bs, norm="batch", activation="relu", dropout=0.0, training=True,
        norm_weights=gammas, norm_biases=betas, running_means=means, running_vars=variances,
    )  # fmt: skip
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(norm="group"), ValueError, r"argument 'norm' expected one of none, batch, layer, got 'group'"),
        (dict(dropout=1.5), ValueError, r"argument 'dropout' expected a probability in \[0, 1\], got 1.5"),
        (dict(activation="swish"), ValueError, r"argument 'activation' expected one of"),
        (dict(norm_weights=[torch.ones(7)]), ValueError, r"argument 'norm_weights' expected 2 tensors"),
        (dict(norm_biases=[]), ValueError, r"'norm_weights' and 'norm_biases' expected the same number"),
        (dict(running_means=[torch.zeros(7), torch.zeros(5)]), ValueError, r"'running_means\[1\]' expected size 4"),
        (dict(norm="layer"), ValueError, r"'running_means' expected none for norm='layer'"),
        (dict(x=torch.zeros(9, 5, dtype=torch.int64)), TypeError, r"argument 'x' expected dtype torch.float32"),
        (dict(weights=[torch.randn(7, 6), torch.randn(4, 7)]), ValueError, r"'weights\[0\]' expected size 5"),
        (dict(running_vars=[torch.ones(7, 1), torch.ones(4)]), ValueError, r"'running_vars\[0\]' expected a 1-D"),
    ],
)
def test_bad_input_names_the_argument(change, error, message):
    args = _bad(**change)
    before = {k: [t.clone() for t in v] if isinstance(v, list) else v for k, v in args.items()}
    with pytest.raises(error, match=r"fastmtl.fused_mlp_norm: (argument |arguments )?" + message):
        torch.ops.fastmtl.fused_mlp_norm.default(
            *[args[k] for k in ("x", "weights", "biases", "norm_weights", "norm_biases", "running_means")],
            args["running_vars"], args["norm"], args["activation"], args["dropout"], args["training"], 0.1, 1e-5,
        )  # fmt: skip
    for k in ("running_means", "running_vars"):
        for a, b in zip(args[k], before[k]):
            assert torch.equal(a, b), "the op never changes its inputs"


def test_backward_rejects_saved_tensors_that_do_not_fit():
    x, ws, bs, gammas, betas, means, variances = tower(dtype=torch.float32)
    args = (x, ws, bs, gammas, betas, means, variances, "batch", "relu")
    out, saved, _ = torch.ops.fastmtl.fused_mlp_norm.default(*args, 0.3, True, 0.1, 1e-5)
    call = torch.ops.fastmtl.fused_mlp_norm_backward.default
    with pytest.raises(ValueError, match=r"fused_mlp_norm_backward: argument 'saved' expected 10 tensors"):
        call(torch.ones_like(out), *args[:7], out, saved[:-1], "batch", "relu", 0.3, True, 0.1, 1e-5, True)
    bad = list(saved)
    bad[4] = bad[4].float()
    with pytest.raises(TypeError, match=r"argument 'saved\[4\]' expected dtype torch.bool \(a dropout mask\)"):
        call(torch.ones_like(out), *args[:7], out, bad, "batch", "relu", 0.3, True, 0.1, 1e-5, True)
    with pytest.raises(ValueError, match=r"argument 'grad_out' expected shape \[9, 4\]"):
        call(torch.ones(9, 3), *args[:7], out, saved, "batch", "relu", 0.3, True, 0.1, 1e-5, True)


def test_raw_op_returns_the_running_statistics_and_leaves_its_inputs_alone():
    x, ws, bs, gammas, betas, means, variances = tower()
    before = [t.clone() for t in means + variances]
    _, _, updated = torch.ops.fastmtl.fused_mlp_norm(
        x, ws, bs, gammas, betas, means, variances, "batch", "relu", 0.0, True, 0.1, 1e-5
    )
    assert all(torch.equal(a, b) for a, b in zip(means + variances, before))
    m, v = [t.clone() for t in means], [t.clone() for t in variances]
    reference.fused_mlp_norm(x, ws, bs, "batch", "relu", 0.0, True, gammas, betas, m, v)
    for got, want in zip(updated, m + v):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    _, _, none = torch.ops.fastmtl.fused_mlp_norm(
        x, ws, bs, gammas, betas, means, variances, "batch", "relu", 0.0, False, 0.1, 1e-5
    )
    assert none == [], "eval returns no update"


def test_portable_and_custom_steps_update_running_statistics_alike():
    x, ws, bs, gammas, betas, means, variances = tower()
    results = []
    for namespace in ("fastmtl", "fastmtl_portable"):
        out, _, updated = getattr(torch.ops, namespace).fused_mlp_norm(
            x, ws, bs, gammas, betas, means, variances, "batch", "gelu", 0.0, True, 0.1, 1e-5
        )
        results.append([out] + updated)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_cpu_dropout_mask_is_seeded_by_torch_independent_of_threads_and_unbiased():
    x = torch.randn(4096, 33, dtype=torch.float32)
    ws = [torch.eye(33)]
    threads = torch.get_num_threads()
    masks = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.manual_seed(11)
            _, saved, _ = torch.ops.fastmtl.fused_mlp_norm(
                x, ws, [], [], [], [], [], "none", "identity", 0.3, True, 0.1, 1e-5
            )
            masks.append(saved[4])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(masks[0], masks[1]), "the same mask for any thread count"
    kept = masks[0].float().mean().item()
    assert abs(kept - 0.7) < 0.01, kept
    _, again, _ = torch.ops.fastmtl.fused_mlp_norm(x, ws, [], [], [], [], [], "none", "identity", 0.3, True, 0.1, 1e-5)
    assert not torch.equal(again[4], masks[0]), "each call draws a new mask"
    # Columns and rows are not correlated: the kept fraction per column stays near 0.7.
    assert (masks[0].float().mean(0) - 0.7).abs().max() < 0.04
