"""fused_mlp_norm on stacked towers (weights [E, out, in]: the experts of MMoE / PLE, per-task
towers) against its plain-PyTorch reference, which runs the E towers one by one with their own
normalisation: every normalisation, training and eval, running statistics, dropout (the op's masks
replayed), a shared or per-tower input, float32 / float64 / 16-bit, gradcheck, opcheck, bad input."""

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


def towers(num=3, widths=(5, 7, 4), batch=9, dtype=torch.float64, seed=0, bias=True, shared=True):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=gen, dtype=dtype)

    x = randn(batch, widths[0]) if shared else randn(num, batch, widths[0])
    outs = widths[1:]
    ws = [randn(num, o, i) / math.sqrt(i) for i, o in zip(widths[:-1], outs)]
    bs = [randn(num, o, scale=0.1) for o in outs] if bias else []
    stats = dict(
        gammas=[1 + randn(num, o, scale=0.2) for o in outs],
        betas=[randn(num, o, scale=0.1) for o in outs],
        means=[randn(num, o, scale=0.1) for o in outs],
        variances=[1 + torch.rand(num, o, generator=gen, dtype=dtype) for o in outs],
    )
    return x, ws, bs, stats


def norm_args(norm, affine, running, stats):
    return dict(
        norm_weights=stats["gammas"] if affine else [],
        norm_biases=stats["betas"] if affine else [],
        running_means=[m.clone() for m in stats["means"]] if running else [],
        running_vars=[v.clone() for v in stats["variances"]] if running else [],
    )


@pytest.mark.parametrize("norm, affine, running", NORM_CASES)
@pytest.mark.parametrize("activation", ["relu", "gelu", "softmax"])
@pytest.mark.parametrize("training, dropout", [(True, 0.0), (True, 0.4), (False, 0.4)])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("batch", [9, 130])  # 130: the tower-major order of the CPU (128 rows or more)
def test_matches_reference_in_float64(norm, affine, running, activation, training, dropout, shared, batch):
    x, ws, bs, stats = towers(shared=shared, batch=batch)
    leaves = [t.clone().requires_grad_() for t in [x] + ws + bs]
    x_, ws_, bs_ = leaves[0], leaves[1:3], leaves[3:]
    kw, kw_ref = norm_args(norm, affine, running, stats), norm_args(norm, affine, running, stats)
    out, saved = ops.fused_mlp_norm_with_saved(x_, ws_, bs_, norm, activation, dropout, training, **kw)
    dropping = training and dropout > 0
    masks = [saved[ops.norm_trunk.SAVED_PER_LAYER * l + 4] for l in range(len(ws))] if dropping else None
    if dropping:
        assert all(m.shape == (3, batch, w.shape[1]) and 0 < m.float().mean() < 1 for m, w in zip(masks, ws))
    expected = reference.fused_mlp_norm(
        x_, ws_, bs_, norm, activation, dropout, training, dropout_masks=masks, **kw_ref
    )
    assert out.shape == (3, batch, 4)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    grad_out = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, leaves, grad_out)
    want = torch.autograd.grad(expected, leaves, grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)
    for a, b in zip(kw["running_means"] + kw["running_vars"], kw_ref["running_means"] + kw_ref["running_vars"]):
        torch.testing.assert_close(
            a, b, rtol=1e-12, atol=1e-14, msg="each tower's running statistics as F.batch_norm's"
        )
    if running and training:
        assert not torch.equal(kw["running_means"][0], stats["means"][0]), "training updates the running statistics"


@pytest.mark.parametrize("batch", [9, 130])
def test_each_tower_is_the_tower_op_on_its_own_slice(batch):
    """The stacked op is E tower-op calls, not only its reference: tower e alone gives slice e."""
    x, ws, bs, stats = towers(shared=False, batch=batch)
    kw = norm_args("batch", True, True, stats)
    out = ops.fused_mlp_norm(x, ws, bs, "batch", "gelu", 0.0, True, **kw)
    for e in range(3):
        own = {k: [t[e].clone() for t in v] for k, v in norm_args("batch", True, True, stats).items()}
        alone = ops.fused_mlp_norm(x[e], [w[e] for w in ws], [b[e] for b in bs], "batch", "gelu", 0.0, True, **own)
        torch.testing.assert_close(out[e], alone, rtol=1e-12, atol=1e-13)
        for a, b in zip(kw["running_means"] + kw["running_vars"], own["running_means"] + own["running_vars"]):
            torch.testing.assert_close(a[e], b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("norm, affine, running", NORM_CASES)
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("batch", [31, 131])  # 131: the CPU's tower-major order
def test_float32_matches_float64_reference(norm, affine, running, shared, batch):
    # No biases before batch norm: their gradient is exactly 0, and the comparison would weigh
    # rounding noise against it.
    x, ws, bs, stats = towers(num=4, widths=(11, 33, 17), batch=batch, bias=norm != "batch", shared=shared)
    extra = stats["gammas"] + stats["betas"] if affine else []
    inputs64 = [x] + ws + bs + extra
    grad_out = torch.randn(4, batch, 17, dtype=torch.float64)

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in inputs64]
        nb = len(bs)
        x_, ws_, bs_ = leaves[0], leaves[1:3], leaves[3 : 3 + nb]
        g_, b_ = (leaves[3 + nb : 5 + nb], leaves[5 + nb : 7 + nb]) if affine else ([], [])
        means = [m.to(dtype) for m in stats["means"]] if running else []
        variances = [v.to(dtype) for v in stats["variances"]] if running else []
        out = fn(x_, ws_, bs_, norm, "gelu", 0.0, True, g_, b_, means, variances)
        return [out] + list(torch.autograd.grad(out, leaves, grad_out.to(dtype)))

    for got, want in zip(run(ops.fused_mlp_norm, torch.float32), run(reference.fused_mlp_norm, torch.float64)):
        scale = want.abs().max().item()
        assert (got.double() - want).abs().max().item() <= 1e-5 * max(scale, 1e-6)


GRADCHECK_CASES = [
    (norm, affine, running, act, training, dropout, shared)
    for (norm, affine, running), act, (training, dropout), shared in itertools.product(
        NORM_CASES, ["gelu", "softmax"], [(True, 0.0), (True, 0.3), (False, 0.0)], [True, False]
    )
]


@pytest.mark.parametrize("norm, affine, running, activation, training, dropout, shared", GRADCHECK_CASES)
def test_gradcheck(norm, affine, running, activation, training, dropout, shared):
    x, ws, bs, stats = towers(num=2, widths=(4, 5, 3), batch=6, shared=shared)
    params = [x] + ws + bs + (stats["gammas"] + stats["betas"] if affine else [])
    leaves = [t.clone().requires_grad_() for t in params]

    def fn(*args):
        torch.manual_seed(5)  # the same dropout mask at every evaluation
        x_, w_, b_ = args[0], list(args[1:3]), list(args[3:5])
        g_, be_ = (list(args[5:7]), list(args[7:9])) if affine else ([], [])
        kw = norm_args(norm, False, running, stats)
        return ops.fused_mlp_norm(
            x_, w_, b_, norm, activation, dropout, training, g_, be_, kw["running_means"], kw["running_vars"]
        )

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("norm, affine, running", NORM_CASES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("batch", [7, 130])  # 130: the CPU's tower-major order
def test_opcheck(norm, affine, running, training, shared, kernels, batch):
    # kernels: the portable steps too (their ATen calls once recorded a graph inside the backward op)
    x, ws, bs, stats = towers(num=2, widths=(4, 6, 3), batch=batch, dtype=torch.float32, shared=shared)
    x.requires_grad_()
    ws = [w.requires_grad_() for w in ws]
    kw = norm_args(norm, affine, running, stats)
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
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("batch", [64, 160])  # 160: the CPU's tower-major order
def test_16bit_within_twice_plain_pytorch(norm, dtype, seed, batch):
    from conftest import assert_within_twice_plain

    # gelu and no biases before batch norm: as in test_ops_mlp_norm's 16-bit test.
    x, ws, bs, stats = towers(num=3, widths=(24, 48, 16), batch=batch, seed=seed, bias=norm != "batch")
    grad_out = torch.randn(3, batch, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))

    def run(fn, dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in [x] + ws + bs + stats["gammas"] + stats["betas"]]
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


def test_batch_of_one_row_in_eval_and_refused_in_training():
    x, ws, bs, stats = towers(batch=1, shared=False)
    kw = norm_args("batch", True, True, stats)
    out = ops.fused_mlp_norm(x, ws, bs, "batch", "relu", 0.0, False, **kw)
    torch.testing.assert_close(out, reference.fused_mlp_norm(x, ws, bs, "batch", "relu", 0.0, False, **kw))
    with pytest.raises(ValueError, match=r"fastmtl.fused_mlp_norm: argument 'x' expected more than 1 row"):
        ops.fused_mlp_norm(x, ws, bs, "batch", "relu", 0.0, True, **kw)


def _call(**change):
    x, ws, bs, stats = towers(dtype=torch.float32)
    args = dict(
        x=x, weights=ws, biases=bs, norm_weights=stats["gammas"], norm_biases=stats["betas"],
        running_means=stats["means"], running_vars=stats["variances"],
    )  # fmt: skip
    args.update(change)
    before = {k: [t.clone() for t in v] if isinstance(v, list) else v.clone() for k, v in args.items()}
    try:
        torch.ops.fastmtl.fused_mlp_norm.default(*args.values(), "batch", "relu", 0.0, True, 0.1, 1e-5)
    finally:
        for k in ("running_means", "running_vars"):
            assert all(torch.equal(a, b) for a, b in zip(args[k], before[k])), "the op never changes its inputs"


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(x=torch.randn(2, 9, 5)), ValueError, r"'x' expected size 3 in dimension 0"),
        (dict(weights=[torch.randn(3, 7, 5), torch.randn(2, 4, 7)]), ValueError, r"'weights\[1\]' expected size 3"),
        (dict(weights=[torch.randn(3, 7, 6), torch.randn(3, 4, 7)]), ValueError, r"'weights\[0\]' expected size 5"),
        (dict(weights=[torch.randn(3, 7, 5), torch.randn(4, 7)]), ValueError, r"'weights\[1\]' expected a 3-D"),
        (dict(biases=[torch.randn(7), torch.randn(4)]), ValueError, r"'biases\[0\]' expected a 2-D"),
        (dict(norm_weights=[torch.ones(7), torch.ones(4)]), ValueError, r"'norm_weights\[0\]' expected a 2-D"),
        (
            dict(running_means=[torch.zeros(2, 7), torch.zeros(3, 4)]),
            ValueError,
            r"'running_means\[0\]' expected size 3",
        ),
        (dict(running_vars=[torch.ones(3, 6), torch.ones(3, 4)]), ValueError, r"'running_vars\[0\]' expected size 7"),
    ],
)
def test_bad_input_names_the_argument(change, error, message):
    with pytest.raises(error, match=r"fastmtl.fused_mlp_norm: argument " + message):
        _call(**change)


def test_backward_rejects_saved_tensors_of_a_plain_tower():
    x, ws, bs, stats = towers(dtype=torch.float32)
    kw = norm_args("batch", True, True, stats)
    args = (x, ws, bs, *kw.values(), "batch", "relu")
    out, saved, _ = torch.ops.fastmtl.fused_mlp_norm.default(*args, 0.3, True, 0.1, 1e-5)
    bad = list(saved)
    bad[1] = bad[1][0]  # one tower's statistics
    with pytest.raises(ValueError, match=r"fused_mlp_norm_backward: argument 'saved\[1\]' expected shape \[3, 7\]"):
        torch.ops.fastmtl.fused_mlp_norm_backward.default(
            torch.ones_like(out), *args[:7], out, bad, "batch", "relu", 0.3, True, 0.1, 1e-5, True
        )
    with pytest.raises(ValueError, match=r"argument 'out' expected shape \[3, 9, 4\]"):
        torch.ops.fastmtl.fused_mlp_norm_backward.default(
            torch.ones(9, 4), *args[:7], out[0], saved, "batch", "relu", 0.3, True, 0.1, 1e-5, True
        )


def test_portable_steps_agree():
    x, ws, bs, stats = towers(shared=False)
    results = []
    for namespace in ("fastmtl", "fastmtl_portable"):
        kw = norm_args("layer", True, False, stats)
        out, _, _ = getattr(torch.ops, namespace).fused_mlp_norm(
            x, ws, bs, *kw.values(), "layer", "gelu", 0.0, True, 0.1, 1e-5
        )
        results.append(out)
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-14)
