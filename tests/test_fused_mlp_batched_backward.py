"""The batched backward through a FusedMLP (csrc/ops/fused_mlp_batched.cpp): fastmtl::fused_mlp_backward
at the Batched key of torch's legacy vmap, which torch.autograd.grad(..., is_grads_batched=True) and so
fastmtl.mtl_backward's batched path run. Against T separate backward passes, for every activation,
with and without biases and an input gradient, on both of its branches (the op once per task below 8
tasks, the batched ATen chain from 8), in float64, float32 and bfloat16."""

import pytest
import torch

import fastmtl
from conftest import assert_rel_close

ACTIVATIONS = fastmtl.ops.ACTIVATIONS


def trunk_and_input(activation, bias, dtype, seed=0):
    torch.manual_seed(seed)
    trunk = fastmtl.nn.FusedMLP(7, [9, 6, 5], activation=activation, bias=bias).to(dtype)
    x = torch.randn(13, 7, dtype=dtype)
    return trunk, x


def batched_and_looped(trunk, x, T, input_grad):
    x = x.clone().requires_grad_(input_grad)
    z = trunk(x)
    g = torch.Generator().manual_seed(1)
    cot = torch.randn((T,) + tuple(z.shape), generator=g, dtype=torch.float64).to(z.dtype)
    inputs = list(trunk.parameters()) + ([x] if input_grad else [])
    batched = torch.autograd.grad(z, inputs, grad_outputs=cot, is_grads_batched=True, retain_graph=True)
    passes = [torch.autograd.grad(z, inputs, grad_outputs=cot[t], retain_graph=True) for t in range(T)]
    return batched, [torch.stack(per) for per in zip(*passes)]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("T", [3, 8, 17])
def test_batched_backward_equals_task_passes_in_float64(activation, bias, input_grad, T):
    trunk, x = trunk_and_input(activation, bias, torch.float64)
    batched, looped = batched_and_looped(trunk, x, T, input_grad)
    assert len(batched) == len(looped)
    for got, want in zip(batched, looped):
        assert got.shape == want.shape
        assert_rel_close(got, want, 1e-12, "gradient")


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("T", [3, 12])
def test_batched_backward_in_float32_and_bfloat16_against_float64(dtype, rtol, T):
    trunk64, x64 = trunk_and_input("gelu", True, torch.float64)
    trunk = fastmtl.nn.FusedMLP(7, [9, 6, 5], activation="gelu").to(dtype)
    trunk.load_state_dict({k: v.to(dtype) for k, v in trunk64.state_dict().items()})
    got, _ = batched_and_looped(trunk, x64.to(dtype), T, True)
    # The float64 reference on the weights and inputs as the low-precision model holds them.
    trunk64.load_state_dict({k: v.to(dtype).double() for k, v in trunk64.state_dict().items()})
    want, _ = batched_and_looped(trunk64, x64.to(dtype).double(), T, True)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        assert_rel_close(g.double(), w, rtol, "gradient")


def test_mtl_backward_runs_one_batched_fused_backward_for_many_tasks():
    torch.manual_seed(2)
    T = 16
    trunk = fastmtl.nn.FusedMLP(8, [12, 10]).double()
    heads = torch.nn.Linear(10, T).double()
    x, y = torch.randn(20, 8, dtype=torch.float64), torch.randn(20, T, dtype=torch.float64)
    z = trunk(x)
    losses = ((heads(z) - y) ** 2).mean(0)
    with torch.profiler.profile() as prof:
        result = fastmtl.mtl_backward(losses, z, fastmtl.aggregation.UPGrad(), keep_jacobian=True)
    calls = sum(e.count for e in prof.key_averages() if e.key == "fastmtl::fused_mlp_backward")
    assert result.path == "batched"
    assert calls == 1  # one batched call for the T per-task gradients (the update is their weighted sum)
    z = trunk(x)
    losses = ((heads(z) - y) ** 2).mean(0)
    want = fastmtl.reference.mtl_backward(losses, z, fastmtl.aggregation.UPGrad(), keep_jacobian=True)
    assert_rel_close(result.jacobian, want.jacobian, 1e-12, "jacobian")
    assert_rel_close(result.gram, want.gram, 1e-12, "gram")


def test_batching_anything_but_the_cotangent_is_refused_naming_the_argument():
    trunk, x = trunk_and_input("relu", True, torch.float64)
    weights = [w.detach() for w in trunk.weights]
    out, saved = fastmtl.ops.fused_mlp_with_saved(x, weights, [b.detach() for b in trunk.biases], "relu")
    g = torch.ones_like(out)
    xs = torch.stack([x, x])
    from torch._vmap_internals import _vmap

    with pytest.raises(RuntimeError, match="fused_mlp_backward: a vmap over the forward's tensors.*'grad_out'"):
        _vmap(lambda xi: torch.ops.fastmtl.fused_mlp_backward(g, xi, weights, out, saved, "relu", True, False)[1][0])(
            xs
        )
