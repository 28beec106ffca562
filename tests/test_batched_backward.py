"""fastmtl.engine.batched_backward.batched_grad against T separate torch.autograd.grad calls (float64), for
the ops with their own rule (conv, batch norm, layer norm, flash attention, embedding) and the
generic vmapped / per-task nodes."""

import pytest
import torch
from torch import nn

from conftest import assert_rel_close
from fastmtl.engine.batched_backward import batched_grad

T = 3


def per_task_reference(outputs, cotangents, inputs):
    rows = []
    for t in range(T):
        grads = torch.autograd.grad(outputs, inputs, [c[t] for c in cotangents], retain_graph=True, allow_unused=True)
        rows.append([torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)])
    return [torch.stack([r[i] for r in rows]) for i in range(len(inputs))]


def check(outputs, inputs, seed=0):
    g = torch.Generator().manual_seed(seed)
    cotangents = [torch.randn((T,) + tuple(o.shape), generator=g, dtype=o.dtype) for o in outputs]
    got = {}
    batched_grad(outputs, cotangents, inputs, lambda i, grad: got.setdefault(i, grad))
    assert sorted(got) == list(range(len(inputs)))  # every input once
    for i, want in enumerate(per_task_reference(outputs, cotangents, inputs)):
        assert_rel_close(got[i], want, 1e-10, f"input {i}")


def run_module(module, x):
    module = module.double()
    return [module(x)], list(module.parameters())


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 6, 3, padding=1),
        nn.Conv2d(4, 6, 3, stride=2, bias=False),
        nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2),
        nn.Conv1d(4, 6, 5),
        nn.ConvTranspose2d(4, 6, 3, stride=2),
    ],
)
def test_convolutions(conv):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 9, 9) if not isinstance(conv, nn.Conv1d) else torch.randn(3, 4, 9)
    x = x.double().requires_grad_()
    outputs, params = run_module(conv, x)
    check(outputs, params + [x])


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm(training, affine):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4, affine=affine).double().train(training)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    outputs, params = run_module(nn.Sequential(nn.Conv2d(4, 4, 1), bn), x)
    check([torch.tanh(outputs[0])], params + [x])


@pytest.mark.parametrize("shape", [(6,), (2, 6)])
def test_layer_norm(shape):
    torch.manual_seed(0)
    x = torch.randn((4, 3) + shape, dtype=torch.float64, requires_grad=True)
    outputs, params = run_module(nn.LayerNorm(shape), x)
    check([outputs[0] ** 2], params + [x])


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding(padding_idx):
    torch.manual_seed(0)
    embed = nn.Embedding(7, 5, padding_idx=padding_idx)
    tokens = torch.tensor([[0, 1, 1, 6], [3, 0, 2, 2]])
    outputs, params = run_module(embed, tokens)
    check(outputs, params)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attention(causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = torch.nn.functional.scaled_dot_product_attention(q, k * 2, v, is_causal=causal)
    assert out.grad_fn.name() == "ScaledDotProductFlashAttentionForCpuBackward0"
    check([out], [q, k, v])


def test_transformer_encoder_and_several_outputs_and_intermediate_inputs():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    hidden = encoder.layers[0](x)
    out = encoder.layers[1](hidden)
    check([out, hidden.sum(1)], list(encoder.parameters()) + [hidden])


def test_an_unused_input_gets_zeros_and_a_broadcast_bias_is_summed():
    torch.manual_seed(0)
    used = nn.Linear(4, 3).double()
    unused = torch.randn(2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(6, 4, dtype=torch.float64)
    check([used(x)], list(used.parameters()) + [unused])


def test_an_autograd_function_without_a_batching_rule_runs_once_per_task():
    class Cube(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x**3

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return torch.from_numpy(grad.detach().numpy()) * 3 * x**2  # a step vmap cannot batch

    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    check([Cube.apply(x * 2)], [x])


def test_the_graph_and_the_cotangents_are_left_as_they_were():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).double()
    out = lin(torch.randn(6, 4, dtype=torch.float64))
    cotangent = torch.randn(T, 6, 3, dtype=torch.float64)
    before = cotangent.clone()
    batched_grad([out], [cotangent], list(lin.parameters()), lambda i, g: None)
    assert torch.equal(cotangent, before)
    torch.autograd.grad(out.sum(), list(lin.parameters()))  # the graph is still there
