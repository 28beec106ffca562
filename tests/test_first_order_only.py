"""The fused ops' backward is first order: a double backward through any of them (create_graph=True,
then a backward of the gradient) raises a message that names the op and the alternatives, where
torch's fallback for ops without an autograd kernel warned and gave None second-order gradients.
create_graph=True for the first-order gradients alone still works and gives the same gradients."""

import warnings

import pytest
import torch

import fastmtl
from fastmtl import Task

torch.manual_seed(0)


def fused_mlp():
    return fastmtl.nn.FusedMLP(4, [8, 3]), "fused_mlp_backward"


def fused_mlp_norm():
    return fastmtl.nn.FusedMLP(4, [8, 3], norm="batch"), "fused_mlp_norm_backward"


def mmoe():
    return fastmtl.nn.MMoE(4, 3, [8], 2), "_backward"  # experts or the gated mixture, whichever comes first


def output_sum(out):
    if isinstance(out, torch.Tensor):
        return out.sum()
    return sum(o.sum() for o in out)


@pytest.mark.parametrize("make", [fused_mlp, fused_mlp_norm, mmoe])
def test_a_double_backward_through_a_fused_module_raises_naming_the_op(make):
    module, op = make()
    x = torch.randn(6, 4, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not torch's "no autograd kernel" warning
        (grad,) = torch.autograd.grad(output_sum(module(x)), x, create_graph=True)
        (plain,) = torch.autograd.grad(output_sum(module(x)), x)
        torch.testing.assert_close(grad, plain, rtol=0, atol=0)  # the first-order gradient is the same
        with pytest.raises(RuntimeError, match=rf"fastmtl\.\w*{op}: a backward through the gradient .* first order"):
            (grad**2).sum().backward()


def test_a_double_backward_through_the_fused_head_losses_raises():
    tasks = [Task("click", "binary"), Task("price", "regression")]
    model = fastmtl.nn.MultiTaskModel(fastmtl.nn.FusedMLP(4, [8]), fastmtl.nn.MultiTaskHeads(8, tasks))
    x = torch.randn(6, 4, requires_grad=True)
    targets = {"click": torch.rand(6).round(), "price": torch.randn(6)}
    (grad,) = torch.autograd.grad(model(x, targets).loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"first order only.*fastmtl\.unconvert"):
        grad.square().sum().backward()


def test_a_first_order_backward_with_create_graph_leaves_no_error_behind_when_unused():
    module = fastmtl.nn.FusedMLP(4, [8, 3])
    x = torch.randn(6, 4, requires_grad=True)
    loss = output_sum(module(x))
    grads = torch.autograd.grad(loss, [x, *module.parameters()], create_graph=True)
    assert all(g.requires_grad for g in grads)  # part of a graph, whose backward would raise
    (module(x).sum() + 0 * grads[0].detach().sum()).backward()  # an ordinary step still runs
    assert all(p.grad is not None for p in module.parameters())
