"""torch.func over the fused ops: refused with a message naming the op and the alternatives
(csrc/ops/functorch_refusal.cpp), while torch.autograd and fastmtl.mtl_backward keep working."""

import pytest
import torch
from torch.func import functional_call, grad, jacrev, vmap

import fastmtl
from fastmtl.nn import FusedMLP, MMoE, MultiTaskHeads, MultiTaskModel

MESSAGE = (
    r"fastmtl\.{op}: torch\.func transforms \(grad, vmap, jacrev, vjp, \.\.\.\) are not supported.*torch\.autograd"
)


def modules():
    return {
        "fused_mlp": FusedMLP(4, [6, 3]),
        "fused_mlp_norm": FusedMLP(4, [6, 3], norm="layer"),
        "fused_experts": MMoE(4, 3, [5], 2),
    }


@pytest.mark.parametrize("op", list(modules()))
@pytest.mark.parametrize("transform", ["grad", "vmap", "jacrev"])
def test_torch_func_over_a_fused_module_names_the_op(op, transform):
    module = modules()[op]
    x = torch.randn(5, 4)
    params = dict(module.named_parameters())

    def out_sum(p):
        out = functional_call(module, p, (x,))
        return (out if isinstance(out, torch.Tensor) else torch.stack(list(out))).sum()

    with pytest.raises(NotImplementedError, match=MESSAGE.format(op=op)):
        if transform == "grad":
            grad(out_sum)(params)
        elif transform == "jacrev":
            jacrev(out_sum)(params)
        else:
            vmap(lambda row: module(row[None]))(x)


def test_head_loss_under_vmap_names_the_op():
    tasks = [fastmtl.Task("y", "regression"), fastmtl.Task("c", "binary")]
    heads = MultiTaskHeads(3, tasks)
    z = torch.randn(2, 6, 3)
    packed = heads.pack_targets({"y": torch.randn(6), "c": torch.ones(6)})
    with pytest.raises(NotImplementedError, match=MESSAGE.format(op="multitask_head_loss")):
        vmap(lambda zi: heads.losses(zi, packed))(z)


def test_autograd_and_mtl_backward_still_work_outside_torch_func():
    torch.manual_seed(0)
    tasks = [fastmtl.Task("y", "regression"), fastmtl.Task("c", "binary")]
    model = MultiTaskModel(FusedMLP(4, [6, 6]), MultiTaskHeads(6, tasks))
    x, targets = torch.randn(8, 4), {"y": torch.randn(8), "c": (torch.rand(8) > 0.5).float()}
    model.loss(x, targets).backward()
    features = model.trunk(x)
    losses = model.heads.losses(features, targets)
    # The batched backward goes through the FusedMLP node (tests/test_fused_mlp_batched_backward.py).
    result = fastmtl.mtl_backward(losses, features, fastmtl.aggregation.UPGrad())
    assert result.gram.shape == (2, 2) and torch.isfinite(result.gram).all()
