"""fastmtl.ops.fused_mlp against fastmtl.reference.fused_mlp, gradcheck, opcheck and bad input."""

import math

import pytest
import torch

from conftest import assert_rel_close
from fastmtl import ops, reference

ACTIVATIONS = list(ops.ACTIVATIONS)


def make_trunk(in_features, widths, bias, generator, dtype=torch.float64):
    weights, biases = [], []
    fan_in = in_features
    for w in widths:
        weights.append(torch.randn(w, fan_in, generator=generator, dtype=dtype) / math.sqrt(fan_in))
        biases.append(0.1 * torch.randn(w, generator=generator, dtype=dtype))
        fan_in = w
    return weights, (biases if bias else None)


def on(device, dtype, tensors, requires_grad=True):
    if tensors is None:
        return None
    return [t.to(device, dtype).requires_grad_(requires_grad) for t in tensors]


SHAPES = [
    # (batch, in_features, widths)
    (1, 1, [1]),
    (1, 7, [5, 3]),
    (13, 17, [31, 9, 5]),
    (64, 33, [65, 65, 65, 65]),
    (257, 128, [256, 256, 256]),
]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-in{s[1]}-{'x'.join(map(str, s[2]))}")
@pytest.mark.parametrize("bias", [True, False])
def test_float32_forward_and_gradients_match_float64_reference(device, activation, shape, bias):
    batch, in_features, widths = shape
    gen = torch.Generator().manual_seed(batch * 1000 + in_features)
    x64 = torch.randn(batch, in_features, generator=gen, dtype=torch.float64)
    w64, b64 = make_trunk(in_features, widths, bias, gen)
    grad_out = torch.randn(batch, widths[-1], generator=gen, dtype=torch.float64)

    ref_inputs = [x64.clone().requires_grad_()] + on("cpu", torch.float64, w64) + (on("cpu", torch.float64, b64) or [])
    ref_out = reference.fused_mlp(
        ref_inputs[0], ref_inputs[1 : 1 + len(widths)], ref_inputs[1 + len(widths) :] or None, activation
    )
    ref_grads = torch.autograd.grad(ref_out, ref_inputs, grad_out)

    x = x64.to(device, torch.float32).requires_grad_()
    ws = on(device, torch.float32, w64)
    bs = on(device, torch.float32, b64)
    out = ops.fused_mlp(x, ws, bs, activation)
    assert out.dtype == torch.float32 and out.device.type == device.type
    assert_rel_close(out, ref_out, what="output")
    inputs = [x] + ws + (bs or [])
    grads = torch.autograd.grad(out, inputs, grad_out.to(device, torch.float32))
    names = ["x"] + [f"weights[{i}]" for i in range(len(ws))] + [f"biases[{i}]" for i in range(len(bs or []))]
    for name, g, rg in zip(names, grads, ref_grads):
        assert_rel_close(g, rg, what=f"grad of {name}")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_float64_matches_reference_exactly_enough(device, activation):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, 6, generator=gen, dtype=torch.float64, device="cpu").to(device)
    ws, bs = make_trunk(6, [7, 4], True, gen)
    ws, bs = on(device, torch.float64, ws, False), on(device, torch.float64, bs, False)
    assert_rel_close(ops.fused_mlp(x, ws, bs, activation), reference.fused_mlp(x, ws, bs, activation), rtol=1e-12)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(device, activation, bias):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    ws, bs = make_trunk(4, [6, 3, 2], bias, gen)
    ws = on(device, torch.float64, ws)
    bs = on(device, torch.float64, bs)
    num_layers = len(ws)

    def fn(x, *params):
        return ops.fused_mlp(x, params[:num_layers], params[num_layers:] or None, activation)

    assert torch.autograd.gradcheck(fn, (x, *ws, *(bs or [])))


def test_mixed_bias_layers_get_gradients_only_where_present(device):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64).to(device)
    ws, bs = make_trunk(4, [5, 3], True, gen)
    ws, bs = on(device, torch.float64, ws), on(device, torch.float64, bs)
    mixed = [None, bs[1]]
    out = ops.fused_mlp(x, ws, mixed, "silu")
    ref = reference.fused_mlp(x, ws, mixed, "silu")
    assert_rel_close(out, ref, rtol=1e-12)
    g = torch.autograd.grad(out.sum(), [*ws, bs[1]])
    rg = torch.autograd.grad(ref.sum(), [*ws, bs[1]])
    for a, b in zip(g, rg):
        assert_rel_close(a, b, rtol=1e-12)


def test_non_contiguous_inputs(device):
    gen = torch.Generator().manual_seed(4)
    # Leaves are contiguous; the op sees strided / transposed views of them.
    x_base = torch.randn(11, 20, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    w0_base = torch.randn(10, 8, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    w1_base = torch.randn(5, 16, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    b0_base = torch.randn(16, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    leaves = [x_base, w0_base, w1_base, b0_base]

    def views():
        return x_base[:, ::2], [w0_base.t(), w1_base[:, ::2]], [b0_base[::2], w1_base[:, 0]]

    x, ws, bs = views()
    assert (
        not x.is_contiguous() and not ws[0].is_contiguous() and not ws[1].is_contiguous() and not bs[0].is_contiguous()
    )
    grad_out = torch.randn(5, 11, generator=gen, dtype=torch.float64).to(device).t()
    assert not grad_out.is_contiguous()
    out = ops.fused_mlp(x, ws, bs, "gelu")
    grads = torch.autograd.grad(out, leaves, grad_out)
    x, ws, bs = views()
    ref = reference.fused_mlp(x, ws, bs, "gelu")
    ref_grads = torch.autograd.grad(ref, leaves, grad_out)
    assert_rel_close(out, ref, rtol=1e-12)
    for g, rg in zip(grads, ref_grads):
        assert_rel_close(g, rg, rtol=1e-12)


def test_inputs_are_not_modified(device):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 6, generator=gen).to(device).requires_grad_()
    ws, bs = make_trunk(6, [7, 7, 3], True, gen, dtype=torch.float32)
    ws, bs = on(device, torch.float32, ws), on(device, torch.float32, bs)
    grad_out = torch.randn(8, 3).to(device)
    before = [t.detach().clone() for t in [x, *ws, *bs, grad_out]]
    for activation in ACTIVATIONS:
        out = ops.fused_mlp(x, ws, bs, activation)
        out.backward(grad_out)
    for a, b in zip([x, *ws, *bs, grad_out], before):
        assert torch.equal(a.detach(), b)


def test_input_gradient_is_skipped_when_not_needed_and_parameters_still_get_theirs(device):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64).to(device)  # no requires_grad: data, as in training
    ws, bs = make_trunk(3, [5, 2], True, gen)
    ws, bs = on(device, torch.float64, ws), on(device, torch.float64, bs)
    ops.fused_mlp(x, ws, bs, "tanh").sum().backward()
    reference_grads = torch.autograd.grad(reference.fused_mlp(x, ws, bs, "tanh").sum(), [*ws, *bs])
    for p, g in zip([*ws, *bs], reference_grads):
        assert_rel_close(p.grad, g, rtol=1e-12)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_opcheck(device, activation):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, 4, generator=gen).to(device).requires_grad_()
    ws, bs = make_trunk(4, [6, 3], True, gen, dtype=torch.float32)
    ws, bs = on(device, torch.float32, ws), on(device, torch.float32, bs)
    torch.library.opcheck(torch.ops.fastmtl.fused_mlp.default, (x, ws, bs, activation))
    torch.library.opcheck(torch.ops.fastmtl.fused_mlp.default, (x, ws, [], activation))
    out, saved = torch.ops.fastmtl.fused_mlp.default(x.detach(), [w.detach() for w in ws], [], activation)
    grad_out = torch.randn_like(out)
    for has_bias in (True, False):
        for need_input_grad in (True, False):
            torch.library.opcheck(
                torch.ops.fastmtl.fused_mlp_backward.default,
                (grad_out, x.detach(), [w.detach() for w in ws], out, saved, activation, has_bias, need_input_grad),
            )


def test_respects_thread_count():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(300, 64, generator=gen)
    ws, bs = make_trunk(64, [200, 200], True, gen, dtype=torch.float32)
    ws, bs = on("cpu", torch.float32, ws, False), on("cpu", torch.float32, bs, False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.fused_mlp(x, ws, bs, "gelu")
    finally:
        torch.set_num_threads(threads)
    many = ops.fused_mlp(x, ws, bs, "gelu")
    assert_rel_close(one, many, rtol=1e-6)


# ---- bad input: a Python exception that names the argument, says expected and got


def _trunk32(device="cpu"):
    gen = torch.Generator().manual_seed(9)
    ws, bs = make_trunk(4, [6, 3], True, gen, dtype=torch.float32)
    return (
        torch.randn(5, 4, generator=gen).to(device),
        on(device, torch.float32, ws, False),
        on(device, torch.float32, bs, False),
    )


@pytest.mark.parametrize(
    "mutate, error, pattern",
    [
        (lambda x, ws, bs: (x[:, :3], ws, bs, "relu"), ValueError, r"'weights\[0\]' expected size 3 in dimension 1"),
        (lambda x, ws, bs: (x, [ws[0], ws[1][:, :5]], bs, "relu"), ValueError, r"'weights\[1\]'.*got shape \[3, 5\]"),
        (lambda x, ws, bs: (x, ws, [bs[0][:5], bs[1]], "relu"), ValueError, r"'biases\[0\]' expected size 6"),
        (lambda x, ws, bs: (x, ws, bs[:1], "relu"), ValueError, r"'biases' expected 2 entries"),
        (lambda x, ws, bs: (x, ws, bs, "swish"), ValueError, r"'activation' expected one of relu.*got 'swish'"),
        (lambda x, ws, bs: (x[:0], ws, bs, "relu"), ValueError, r"'x' expected a batch of at least 1 row"),
        (lambda x, ws, bs: (x[0], ws, bs, "relu"), ValueError, r"'x' expected a 2-D tensor"),
        (
            lambda x, ws, bs: (x.long(), ws, bs, "relu"),
            TypeError,
            r"'x' expected dtype torch.float32, torch.float64, torch.float16 or torch.bfloat16, got torch.int64",
        ),
        (
            lambda x, ws, bs: (x, [ws[0].double(), ws[1]], bs, "relu"),
            TypeError,
            r"'weights\[0\]' expected dtype torch.float32",
        ),
        (lambda x, ws, bs: (x, [], [], "relu"), ValueError, r"'weights' expected at least one layer"),
        (lambda x, ws, bs: (x, [ws[0][None]], [], "relu"), ValueError, r"'weights\[0\]' expected a 2-D tensor"),
    ],
    ids=[
        "x-width",
        "chain",
        "bias-size",
        "bias-count",
        "activation",
        "empty-batch",
        "x-1d",
        "x-int",
        "dtype-mix",
        "no-layers",
        "weight-3d",
    ],
)
def test_bad_input_raises_with_argument_name(mutate, error, pattern):
    x, ws, bs = _trunk32()
    args = mutate(x, ws, bs)
    with pytest.raises(error, match=pattern):
        ops.fused_mlp(*args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_tensors_on_different_devices_raise():
    x, ws, bs = _trunk32("cpu")
    with pytest.raises((ValueError, RuntimeError), match=r"device"):
        ops.fused_mlp(x, [ws[0].cuda(), ws[1]], bs, "relu")


def test_backward_bits_do_not_depend_on_thread_count():
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(333, 40, generator=gen)
    ws, bs = make_trunk(40, [300, 300], True, gen, dtype=torch.float32)
    ws, bs = on("cpu", torch.float32, ws), on("cpu", torch.float32, bs)
    grad_out = torch.randn(333, 300, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.autograd.grad(ops.fused_mlp(x, ws, bs, "relu"), [*ws, *bs], grad_out)
    finally:
        torch.set_num_threads(threads)
    many = torch.autograd.grad(ops.fused_mlp(x, ws, bs, "relu"), [*ws, *bs], grad_out)
    for a, b in zip(one[len(ws) :], many[len(ws) :]):
        assert torch.equal(a, b), "bias gradients are reduced in a fixed order"


def test_interleaved_shapes_and_dtypes_give_the_reference_results():
    # The backward keeps per-thread scratch buffers between calls: different shapes and dtypes in
    # turn must never see each other's data.
    gen = torch.Generator().manual_seed(11)
    cases = []
    for batch, widths, dtype in [
        (300, [64, 32], torch.float32),
        (3, [5, 7, 2], torch.float64),
        (50, [128], torch.float32),
    ]:
        x = torch.randn(batch, 9, generator=gen, dtype=torch.float64)
        ws, bs = make_trunk(9, widths, True, gen)
        cases.append((x, ws, bs, dtype))
    for _ in range(2):
        for x, ws, bs, dtype in cases:
            w, b = on("cpu", dtype, ws), on("cpu", dtype, bs)
            grads = torch.autograd.grad(ops.fused_mlp(x.to(dtype), w, b, "silu").square().sum(), [*w, *b])
            w64, b64 = on("cpu", torch.float64, ws), on("cpu", torch.float64, bs)
            ref = torch.autograd.grad(reference.fused_mlp(x, w64, b64, "silu").square().sum(), [*w64, *b64])
            for g, r in zip(grads, ref):
                assert_rel_close(g, r, rtol=1e-5 if dtype == torch.float32 else 1e-12)


def test_meta_and_cpu_tensors_mixed_raise():
    x, ws, bs = _trunk32("cpu")
    with pytest.raises(ValueError, match=r"'weights\[0\]' expected device meta.*got cpu|'x'.*device"):
        ops.fused_mlp(x.to("meta"), ws, bs, "relu")
