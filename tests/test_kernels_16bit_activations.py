"""The CPU's 16-bit activation loops (csrc/cpu/activation_16bit.cpp): float32 math and one rounding,
as the portable steps they replace, so the two agree to within one rounding of the 16-bit dtype,
for every activation, forward and backward, and both agree with float64 to 16-bit precision."""

import pytest
import torch

ACTIVATIONS = ["relu", "gelu", "gelu_tanh", "silu", "tanh", "identity"]
EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # half an ulp at 1


def run(namespace, x, w, b, activation, grad):
    op = getattr(torch.ops, namespace).fused_mlp_norm.default
    out, saved, _ = op(x, [w], [b], [], [], [], [], "none", activation, 0.0, True, 0.1, 1e-5)
    backward = getattr(torch.ops, namespace).fused_mlp_norm_backward.default
    grads = backward(grad, x, [w], [b], [], [], [], [], out, saved, "none", activation, 0.0, True, 0.1, 1e-5, True)
    return [out, grads[0], grads[1][0]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_the_16bit_activation_loops_agree_with_the_portable_steps(activation, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 24, generator=g).to(dtype)
    w = (torch.randn(40, 24, generator=g) / 5).to(dtype)
    b = (torch.randn(40, generator=g) / 10).to(dtype)
    grad = torch.randn(300, 40, generator=g).to(dtype)
    custom = run("fastmtl", x, w, b, activation, grad)
    portable = run("fastmtl_portable", x, w, b, activation, grad)
    for got, want in zip(custom, portable):
        assert got.dtype == dtype
        scale = want.float().abs().max().item()
        # one rounding each side: at most an ulp of the entry apart (plus a floor for entries near 0),
        # except where the GEMM that follows sums such differences
        torch.testing.assert_close(got.float(), want.float(), rtol=4 * EPS[dtype], atol=8 * EPS[dtype] * scale)
    exact = run("fastmtl", x.double(), w.double(), b.double(), activation, grad.double())
    for got, want in zip(custom, exact):
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double(), want, rtol=16 * EPS[dtype], atol=16 * EPS[dtype] * scale)
