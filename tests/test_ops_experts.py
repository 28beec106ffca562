"""fastmtl.ops.fused_experts / gated_mixture against fastmtl.reference (a Python loop over experts
and tasks): float32 vs float64, gradcheck, opcheck, odd shapes, bad input, torch.compile."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import assert_rel_close
from fastmtl import ops, reference

ACTIVATIONS = list(ops.ACTIVATIONS)


def make_experts(num_experts, in_features, widths, bias, generator, dtype=torch.float64):
    weights, biases = [], []
    fan_in = in_features
    for w in widths:
        weights.append(torch.randn(num_experts, w, fan_in, generator=generator, dtype=dtype) / math.sqrt(fan_in))
        biases.append(0.1 * torch.randn(num_experts, w, generator=generator, dtype=dtype))
        fan_in = w
    return weights, (biases if bias else None)


def leaves(tensors, device, dtype):
    return None if tensors is None else [t.to(device, dtype).requires_grad_() for t in tensors]


EXPERT_SHAPES = [
    # (experts, batch, in_features, widths, per-expert input)
    (1, 1, 1, [1], False),
    (1, 5, 7, [3, 2], False),
    (3, 1, 6, [5], True),
    (8, 13, 17, [31, 9], False),
    (5, 33, 11, [7, 3, 5], True),
    (4, 130, 64, [65, 32], False),
]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize(
    "shape",
    EXPERT_SHAPES,
    ids=lambda s: f"E{s[0]}-B{s[1]}-in{s[2]}-{'x'.join(map(str, s[3]))}-{'per' if s[4] else 'shared'}",
)
@pytest.mark.parametrize("bias", [True, False])
def test_fused_experts_float32_matches_float64_reference(device, activation, shape, bias):
    num_experts, batch, in_features, widths, per_expert = shape
    gen = torch.Generator().manual_seed(num_experts * 100 + batch)
    x_shape = (num_experts, batch, in_features) if per_expert else (batch, in_features)
    x64 = torch.randn(*x_shape, generator=gen, dtype=torch.float64)
    w64, b64 = make_experts(num_experts, in_features, widths, bias, gen)
    grad_out = torch.randn(num_experts, batch, widths[-1], generator=gen, dtype=torch.float64)

    rx, rw, rb = x64.clone().requires_grad_(), leaves(w64, "cpu", torch.float64), leaves(b64, "cpu", torch.float64)
    ref = reference.fused_experts(rx, rw, rb, activation)
    ref_grads = torch.autograd.grad(ref, [rx, *rw, *(rb or [])], grad_out)

    x = x64.to(device, torch.float32).requires_grad_()
    ws, bs = leaves(w64, device, torch.float32), leaves(b64, device, torch.float32)
    out = ops.fused_experts(x, ws, bs, activation)
    assert out.shape == (num_experts, batch, widths[-1]) and out.dtype == torch.float32
    assert_rel_close(out, ref, what="output")
    grads = torch.autograd.grad(out, [x, *ws, *(bs or [])], grad_out.to(device, torch.float32))
    names = ["x"] + [f"weights[{i}]" for i in range(len(ws))] + [f"biases[{i}]" for i in range(len(bs or []))]
    for name, g, r in zip(names, grads, ref_grads):
        assert_rel_close(g, r, what=f"grad of {name}")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("per_expert", [False, True])
def test_fused_experts_gradcheck_float64(device, activation, bias, per_expert):
    gen = torch.Generator().manual_seed(2)
    x = (
        torch.randn(*((3, 4, 5) if per_expert else (4, 5)), generator=gen, dtype=torch.float64)
        .to(device)
        .requires_grad_()
    )
    ws, bs = make_experts(3, 5, [6, 3], bias, gen)
    ws, bs = leaves(ws, device, torch.float64), leaves(bs, device, torch.float64)
    num_layers = len(ws)

    def fn(x, *params):
        return ops.fused_experts(x, params[:num_layers], params[num_layers:] or None, activation)

    assert torch.autograd.gradcheck(fn, (x, *ws, *(bs or [])))


def test_fused_experts_mixed_bias_layers():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    ws, bs = make_experts(2, 4, [5, 3], True, gen)
    ws, bs = leaves(ws, "cpu", torch.float64), leaves(bs, "cpu", torch.float64)
    mixed = [None, bs[1]]
    out, ref = ops.fused_experts(x, ws, mixed, "tanh"), reference.fused_experts(x, ws, mixed, "tanh")
    assert_rel_close(out, ref, rtol=1e-12)
    for a, b in zip(torch.autograd.grad(out.sum(), [*ws, bs[1]]), torch.autograd.grad(ref.sum(), [*ws, bs[1]])):
        assert_rel_close(a, b, rtol=1e-12)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("per_expert", [False, True])
def test_fused_experts_opcheck(device, activation, per_expert):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(*((3, 5, 4) if per_expert else (5, 4)), generator=gen).to(device).requires_grad_()
    ws, bs = make_experts(3, 4, [6, 3], True, gen, dtype=torch.float32)
    ws, bs = leaves(ws, device, torch.float32), leaves(bs, device, torch.float32)
    torch.library.opcheck(torch.ops.fastmtl.fused_experts.default, (x, ws, bs, activation))
    torch.library.opcheck(torch.ops.fastmtl.fused_experts.default, (x, ws, [], activation))
    detached = [w.detach() for w in ws]
    out, saved = torch.ops.fastmtl.fused_experts.default(x.detach(), detached, [], activation)
    grad_out = torch.randn_like(out)
    for has_bias in (True, False):
        for need_input_grad in (True, False):
            torch.library.opcheck(
                torch.ops.fastmtl.fused_experts_backward.default,
                (grad_out, x.detach(), detached, out, saved, activation, has_bias, need_input_grad),
            )


def test_fused_experts_inputs_are_not_modified():
    gen = torch.Generator().manual_seed(5)
    for x in (torch.randn(8, 6, generator=gen), torch.randn(3, 8, 6, generator=gen)):
        x.requires_grad_()
        ws, bs = make_experts(3, 6, [7, 7, 3], True, gen, dtype=torch.float32)
        ws, bs = leaves(ws, "cpu", torch.float32), leaves(bs, "cpu", torch.float32)
        grad_out = torch.randn(3, 8, 3)
        before = [t.detach().clone() for t in [x, *ws, *bs, grad_out]]
        for activation in ACTIVATIONS:
            ops.fused_experts(x, ws, bs, activation).backward(grad_out)
        for a, b in zip([x, *ws, *bs, grad_out], before):
            assert torch.equal(a.detach(), b)


def test_fused_experts_bias_gradient_bits_do_not_depend_on_thread_count():
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(333, 40, generator=gen)
    ws, bs = make_experts(4, 40, [90, 50], True, gen, dtype=torch.float32)
    ws, bs = leaves(ws, "cpu", torch.float32), leaves(bs, "cpu", torch.float32)
    grad_out = torch.randn(4, 333, 50, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.autograd.grad(ops.fused_experts(x, ws, bs, "relu"), bs, grad_out)
    finally:
        torch.set_num_threads(threads)
    many = torch.autograd.grad(ops.fused_experts(x, ws, bs, "relu"), bs, grad_out)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def _experts32():
    gen = torch.Generator().manual_seed(9)
    ws, bs = make_experts(3, 4, [6, 2], True, gen, dtype=torch.float32)
    return torch.randn(5, 4, generator=gen), [w.float() for w in ws], [b.float() for b in bs]


@pytest.mark.parametrize(
    "mutate, error, pattern",
    [
        (lambda x, ws, bs: (x[:, :3], ws, bs, "relu"), ValueError, r"'weights\[0\]' expected size 3 in dimension 2"),
        (
            lambda x, ws, bs: (x, [ws[0], ws[1][:, :, :5]], bs, "relu"),
            ValueError,
            r"'weights\[1\]'.*got shape \[3, 2, 5\]",
        ),
        (
            lambda x, ws, bs: (x, [ws[0], ws[1][:2]], bs, "relu"),
            ValueError,
            r"'weights\[1\]' expected size 3 in dimension 0",
        ),
        (
            lambda x, ws, bs: (x, [w[:0] for w in ws], [b[:0] for b in bs], "relu"),
            ValueError,
            r"'weights\[0\]' expected at least 1 expert",
        ),
        (
            lambda x, ws, bs: (x, ws, [bs[0][:, :5], bs[1]], "relu"),
            ValueError,
            r"'biases\[0\]' expected size 6 in dimension 1",
        ),
        (lambda x, ws, bs: (x, ws, bs[:1], "relu"), ValueError, r"'biases' expected 2 entries"),
        (lambda x, ws, bs: (x, ws, bs, "swish"), ValueError, r"'activation' expected one of relu.*got 'swish'"),
        (lambda x, ws, bs: (x[:0], ws, bs, "relu"), ValueError, r"'x' expected a batch of at least 1 row"),
        (lambda x, ws, bs: (x[0], ws, bs, "relu"), ValueError, r"'x' expected a 2-D \[B, d\] or 3-D"),
        (lambda x, ws, bs: (x.expand(2, 5, 4), ws, bs, "relu"), ValueError, r"'x' expected size 3 in dimension 0"),
        (
            lambda x, ws, bs: (x.long(), ws, bs, "relu"),
            TypeError,
            r"'x' expected dtype torch.float32, torch.float64, torch.float16 or torch.bfloat16",
        ),
        (
            lambda x, ws, bs: (x, [ws[0].double(), ws[1]], bs, "relu"),
            TypeError,
            r"'weights\[0\]' expected dtype torch.float32",
        ),
        (lambda x, ws, bs: (x, [], [], "relu"), ValueError, r"'weights' expected at least one layer"),
        (lambda x, ws, bs: (x, [ws[0][0]], [], "relu"), ValueError, r"'weights\[0\]' expected a 3-D tensor"),
    ],
    ids=[
        "x-width",
        "chain",
        "expert-count",
        "no-experts",
        "bias-size",
        "bias-count",
        "activation",
        "empty-batch",
        "x-1d",
        "x-experts",
        "x-int",
        "dtype-mix",
        "no-layers",
        "weight-2d",
    ],
)
def test_fused_experts_bad_input_names_the_argument(mutate, error, pattern):
    with pytest.raises(error, match=pattern):
        ops.fused_experts(*mutate(*_experts32()))


def test_fused_experts_meta_and_cpu_mixed_raise():
    x, ws, bs = _experts32()
    with pytest.raises(ValueError, match=r"device"):
        ops.fused_experts(x.to("meta"), ws, bs, "relu")


# ---- gated_mixture

GATE_SHAPES = [
    # (tasks, batch, d, experts, h, gate width K or None for all experts, per-task x)
    (1, 1, 1, 1, 1, None, False),
    (1, 7, 5, 3, 4, None, True),
    (6, 13, 9, 8, 17, None, False),
    (3, 1, 4, 5, 3, 2, True),
    (4, 65, 33, 7, 31, 3, False),
    (2, 200, 16, 6, 64, 4, True),
]


def make_gates(shape, generator, bias=True):
    tasks, batch, d, num_experts, h, width, per_task = shape
    width = width or num_experts
    x = torch.randn(*((tasks, batch, d) if per_task else (batch, d)), generator=generator, dtype=torch.float64)
    gate_weight = torch.randn(tasks, width, d, generator=generator, dtype=torch.float64)
    gate_bias = torch.randn(tasks, width, generator=generator, dtype=torch.float64) if bias else None
    experts = torch.randn(num_experts, batch, h, generator=generator, dtype=torch.float64)
    index = None
    if width != num_experts:
        index = [torch.randperm(num_experts, generator=generator)[:width].tolist() for _ in range(tasks)]
    return x, gate_weight, gate_bias, experts, index


@pytest.mark.parametrize(
    "shape", GATE_SHAPES, ids=lambda s: f"T{s[0]}-B{s[1]}-d{s[2]}-E{s[3]}-h{s[4]}-K{s[5]}-{'per' if s[6] else 'shared'}"
)
@pytest.mark.parametrize("bias", [True, False])
def test_gated_mixture_float32_matches_float64_reference(device, shape, bias):
    gen = torch.Generator().manual_seed(shape[0] * 31 + shape[1])
    x, gw, gb, experts, index = make_gates(shape, gen, bias)
    inputs64 = [t.clone().requires_grad_() for t in (x, gw, experts)] + ([gb.clone().requires_grad_()] if bias else [])
    ref = reference.gated_mixture(inputs64[0], inputs64[1], inputs64[3] if bias else None, inputs64[2], index)
    grad_out = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, inputs64, grad_out)

    inputs = [t.to(device, torch.float32).requires_grad_() for t in (x, gw, experts)]
    inputs += [gb.to(device, torch.float32).requires_grad_()] if bias else []
    out = ops.gated_mixture(inputs[0], inputs[1], inputs[3] if bias else None, inputs[2], index)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert_rel_close(out, ref, what="mixtures")
    grads = torch.autograd.grad(out, inputs, grad_out.to(device, torch.float32))
    for name, g, r in zip(["x", "gate_weight", "experts", "gate_bias"], grads, ref_grads):
        assert_rel_close(g, r, what=f"grad of {name}")


@pytest.mark.parametrize("shape", [GATE_SHAPES[1], GATE_SHAPES[3], (3, 4, 5, 4, 3, None, False)])
@pytest.mark.parametrize("bias", [True, False])
def test_gated_mixture_gradcheck_float64(device, shape, bias):
    gen = torch.Generator().manual_seed(4)
    x, gw, gb, experts, index = make_gates(shape, gen, bias)
    inputs = [t.to(device).requires_grad_() for t in (x, gw, experts)] + (
        [gb.to(device).requires_grad_()] if bias else []
    )

    def fn(x, gw, experts, *gb):
        return ops.gated_mixture(x, gw, gb[0] if gb else None, experts, index)

    assert torch.autograd.gradcheck(fn, tuple(inputs))


def test_gated_mixture_large_logits_stay_finite():
    gen = torch.Generator().manual_seed(11)
    x, gw, gb, experts, _ = make_gates((2, 9, 4, 3, 5, None, False), gen)
    out = ops.gated_mixture(x, 1e3 * gw, gb, experts)
    assert torch.isfinite(out).all()
    assert_rel_close(out, reference.gated_mixture(x, 1e3 * gw, gb, experts), rtol=1e-10)


@pytest.mark.parametrize("per_task", [False, True])
def test_gated_mixture_opcheck(device, per_task):
    gen = torch.Generator().manual_seed(8)
    x, gw, gb, experts, index = make_gates((3, 6, 5, 4, 7, 2, per_task), gen)
    x, gw, gb, experts = (t.float().to(device).requires_grad_() for t in (x, gw, gb, experts))
    flat = ops.expert_index_list(index)
    torch.library.opcheck(torch.ops.fastmtl.gated_mixture.default, (x, gw, gb, experts, flat))
    torch.library.opcheck(torch.ops.fastmtl.gated_mixture.default, (x, gw, None, experts, flat))
    out, gates = torch.ops.fastmtl.gated_mixture.default(x.detach(), gw.detach(), gb.detach(), experts.detach(), flat)
    grad = torch.randn_like(out)
    for has_bias in (True, False):
        for need_x_grad in (True, False):
            torch.library.opcheck(
                torch.ops.fastmtl.gated_mixture_backward.default,
                (grad, x.detach(), gw.detach(), experts.detach(), gates, flat, has_bias, need_x_grad),
            )


def test_gated_mixture_inputs_are_not_modified():
    gen = torch.Generator().manual_seed(12)
    for per_task in (False, True):
        x, gw, gb, experts, index = make_gates((3, 10, 5, 4, 6, 3, per_task), gen)
        inputs = [t.float().requires_grad_() for t in (x, gw, gb, experts)]
        grad = torch.randn(3, 10, 6)
        before = [t.detach().clone() for t in inputs + [grad]]
        ops.gated_mixture(inputs[0], inputs[1], inputs[2], inputs[3], index).backward(grad)
        for a, b in zip(inputs + [grad], before):
            assert torch.equal(a.detach(), b)


def _gates32():
    gen = torch.Generator().manual_seed(13)
    x, gw, gb, experts, _ = make_gates((2, 5, 4, 3, 6, None, False), gen)
    return x.float(), gw.float(), gb.float(), experts.float()


@pytest.mark.parametrize(
    "mutate, error, pattern",
    [
        (
            lambda x, gw, gb, ex: (x[:, :3], gw, gb, ex, None),
            ValueError,
            r"'gate_weight' expected size 3 in dimension 2",
        ),
        (
            lambda x, gw, gb, ex: (x, gw[:, :2], gb[:, :2], ex, None),
            ValueError,
            r"'gate_weight' expected size 3 in dimension 1",
        ),
        (lambda x, gw, gb, ex: (x, gw, gb[:, :2], ex, None), ValueError, r"'gate_bias' expected size 3 in dimension 1"),
        (lambda x, gw, gb, ex: (x, gw, gb, ex[:, :4], None), ValueError, r"'experts' expected size 5 in dimension 1"),
        (lambda x, gw, gb, ex: (x, gw, gb, ex[:0], None), ValueError, r"'experts' expected at least 1 expert"),
        (
            lambda x, gw, gb, ex: (x, gw, gb, ex, [[0, 1, 3], [0, 1, 2]]),
            ValueError,
            r"'expert_index' expected entries in \[0, 3\).*got 3",
        ),
        (lambda x, gw, gb, ex: (x, gw, gb, ex, [[0, 1], [0, 1]]), ValueError, r"'expert_index' expected 6 entries"),
        (
            lambda x, gw, gb, ex: (x, gw, gb, ex, [[0, 1.0, 2], [0, 1, 2]]),
            TypeError,
            r"'expert_index' expected integers",
        ),
        (
            lambda x, gw, gb, ex: (x.expand(3, 5, 4), gw, gb, ex, None),
            ValueError,
            r"'x' expected size 2 in dimension 0",
        ),
        (
            lambda x, gw, gb, ex: (x, gw.double(), gb, ex, None),
            TypeError,
            r"'gate_weight' expected dtype torch.float32",
        ),
        (lambda x, gw, gb, ex: (x, gw[0], gb, ex, None), ValueError, r"'gate_weight' expected a 3-D tensor"),
        (lambda x, gw, gb, ex: (x[:0], gw, gb, ex[:, :0], None), ValueError, r"'x' expected a batch of at least 1 row"),
    ],
    ids=[
        "d",
        "K-vs-E",
        "bias",
        "batch",
        "no-experts",
        "index-range",
        "index-count",
        "index-type",
        "x-tasks",
        "dtype",
        "weight-2d",
        "empty-batch",
    ],
)
def test_gated_mixture_bad_input_names_the_argument(mutate, error, pattern):
    with pytest.raises(error, match=pattern):
        ops.gated_mixture(*mutate(*_gates32()))


# ---- torch.compile


def test_compile_fullgraph_forward_and_backward():
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(9, 6, generator=gen)
    ws, bs = make_experts(4, 6, [8, 5], True, gen, dtype=torch.float32)
    ws, bs = leaves(ws, "cpu", torch.float32), leaves(bs, "cpu", torch.float32)
    gw = torch.randn(3, 4, 6, generator=gen).requires_grad_()
    gb = torch.randn(3, 4, generator=gen).requires_grad_()

    def step(x, ws, bs, gw, gb):
        experts = ops.fused_experts(x, ws, bs, "gelu")
        return ops.gated_mixture(x, gw, gb, experts).square().sum()

    params = [*ws, *bs, gw, gb]
    eager = torch.autograd.grad(step(x, ws, bs, gw, gb), params)
    compiled = torch.compile(step, fullgraph=True)
    got = torch.autograd.grad(compiled(x, ws, bs, gw, gb), params)
    for a, b in zip(got, eager):
        assert_rel_close(a, b, rtol=1e-6)


def test_baseline_isa_loops_match_the_reference_too():
    # The epilogue and mixture loops are compiled for AVX2 + FMA and for the baseline ISA, picked at run time
    # (csrc/cpu/isa.h); FASTMTL_DISABLE_AVX2=1 runs the baseline ones, in a fresh process since
    # the choice is made once.
    script = textwrap.dedent("""
        import torch
        import fastmtl
        from fastmtl import ops, reference
        assert fastmtl.build_info()["cpu_avx2_kernels"] is False
        gen = torch.Generator().manual_seed(0)
        for per_task in (False, True):
            x = torch.randn(*((3, 37, 5) if per_task else (37, 5)), generator=gen, dtype=torch.float64)
            gw = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
            gb = torch.randn(3, 4, generator=gen, dtype=torch.float64)
            ex = torch.randn(6, 37, 19, generator=gen, dtype=torch.float64, requires_grad=True)
            index = [[0, 1, 2, 3], [2, 3, 4, 5], [5, 0, 1, 4]]
            out = ops.gated_mixture(x.float(), gw.float(), gb.float(), ex.float(), index)
            ref = reference.gated_mixture(x, gw, gb, ex, index)
            torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
            cot = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
            g, = torch.autograd.grad(ops.gated_mixture(x, gw, gb, ex, index), ex, cot)
            r, = torch.autograd.grad(ref, ex, cot)
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
        for activation in ("relu", "gelu", "tanh"):
            x = torch.randn(21, 7, generator=gen, dtype=torch.float64)
            ws = [torch.randn(3, 9, 7, generator=gen, dtype=torch.float64, requires_grad=True),
                  torch.randn(3, 5, 9, generator=gen, dtype=torch.float64, requires_grad=True)]
            bs = [torch.randn(3, 9, generator=gen, dtype=torch.float64, requires_grad=True),
                  torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)]
            out, ref = ops.fused_experts(x, ws, bs, activation), reference.fused_experts(x, ws, bs, activation)
            torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
            for g, r in zip(torch.autograd.grad(out.sum(), ws + bs), torch.autograd.grad(ref.sum(), ws + bs)):
                torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
        print("ok")
    """)
    env = dict(os.environ, FASTMTL_DISABLE_AVX2="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
