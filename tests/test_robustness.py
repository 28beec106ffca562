"""Regression tests of issue 18 (nothing crashes, nothing is silently wrong), the Python side: each
test failed before its fix. The generated cases are in test_fuzz.py."""

from __future__ import annotations

import math

import pytest
import torch

import fastmtl
from fastmtl import Task, ops

TASKS = [Task("a", "regression"), Task("b", "binary")]


def _targets(batch=8):
    return {"a": torch.randn(batch), "b": torch.randint(0, 2, (batch,)).float()}


# ---- 1. Task weight


@pytest.mark.parametrize("weight", [math.nan, math.inf, -math.inf])
def test_task_refuses_a_non_finite_weight(weight):
    with pytest.raises(ValueError, match=r"Task 'a': argument 'weight' expected a finite number"):
        Task("a", "regression", weight=weight)


# ---- 2. and 3. targets


def test_pack_targets_refuses_a_key_that_names_no_task():
    targets = {**_targets(), "typo": torch.zeros(8)}
    with pytest.raises(ValueError, match=r"pack_targets: argument 'targets' has keys \['typo'\].*\['a', 'b'\]"):
        ops.pack_targets(targets, TASKS)


def test_model_losses_refuse_a_key_that_names_no_task():
    model = fastmtl.nn.MultiTaskModel(fastmtl.nn.FusedMLP(4, [6]), fastmtl.nn.MultiTaskHeads(6, TASKS))
    with pytest.raises(ValueError, match=r"'typo'"):
        model.losses(torch.randn(8, 4), {**_targets(), "typo": torch.zeros(8)})


def test_a_target_that_requires_grad_is_refused():
    targets = _targets()
    targets["a"] = targets["a"].requires_grad_()
    with pytest.raises(ValueError, match=r"targets\['a'\]' expected a tensor that does not require grad.*detach"):
        ops.pack_targets(targets, TASKS)
    packed = ops.pack_targets(_targets(), TASKS).requires_grad_()
    with pytest.raises(ValueError, match=r"multitask_head_loss: argument 'targets'.*does not require grad"):
        ops.multitask_head_loss(torch.randn(8, 5), torch.randn(2, 5), None, packed, TASKS)


# ---- 4. bias lists


@pytest.mark.parametrize("biases", [[None], [None, None, None]])
def test_fused_mlp_refuses_a_bias_list_of_nones_of_the_wrong_length(biases):
    x, ws = torch.randn(3, 4), [torch.randn(5, 4), torch.randn(2, 5)]
    with pytest.raises(ValueError, match=r"fused_mlp: argument 'biases' expected 2 entries"):
        ops.fused_mlp(x, ws, biases)
    # The right length of Nones, None and [] still mean "no bias".
    expected = ops.fused_mlp(x, ws, None)
    for none in ([None, None], [], None):
        assert torch.equal(ops.fused_mlp(x, ws, none), expected)


# ---- 5. task_gram


def _gram_args():
    return torch.randn(8, 4), [torch.randn(6, 4), torch.randn(5, 6)], torch.randn(2, 5)


@pytest.mark.parametrize("mode", ["exact", "rep"])
def test_task_gram_checks_gram_path_in_both_modes(mode):
    x, ws, head = _gram_args()
    with pytest.raises(ValueError, match=r"task_gram: argument 'gram_path' expected one of"):
        ops.task_gram(x, ws, None, "relu", head, None, _targets(), TASKS, mode=mode, gram_path="bogus")


def test_task_gram_names_its_own_arguments():
    x, ws, head = _gram_args()
    with pytest.raises(TypeError, match=r"task_gram: argument 'x' expected a tensor, got float"):
        ops.task_gram(1.0, ws, None, "relu", head, None, _targets(), TASKS)
    with pytest.raises(ValueError, match=r"task_gram: argument 'head_weight' expected shape \[2, 5\]"):
        ops.task_gram(x, ws, None, "relu", torch.randn(2, 4), None, _targets(), TASKS)
    with pytest.raises(ValueError, match=r"task_gram: argument 'head_bias' expected shape \[2\]"):
        ops.task_gram(x, ws, None, "relu", head, torch.zeros(3), _targets(), TASKS)
    with pytest.raises(ValueError, match=r"task_gram: argument 'head_weight' expected dtype torch.float32"):
        ops.task_gram(x, ws, None, "relu", head.double(), None, _targets(), TASKS)
    with pytest.raises(ValueError, match=r"task_gram: argument 'biases' expected 2 entries"):
        ops.task_gram(x, ws, [None], "relu", head, None, _targets(), TASKS)


# ---- 6. modules


def test_modules_name_the_class_and_argument():
    with pytest.raises(TypeError, match=r"FusedMLP: argument 'hidden_features' expected an int or a sequence"):
        fastmtl.nn.FusedMLP(3, None)
    with pytest.raises(TypeError, match=r"MultiTaskHeads: argument 'tasks' expected a sequence of fastmtl.Task"):
        fastmtl.nn.MultiTaskHeads(4, None)
    heads = fastmtl.nn.MultiTaskHeads(4, TASKS)
    with pytest.raises(ValueError, match=r"MultiTaskHeads.forward: argument 'z' expected shape \[..., 4\]"):
        heads(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"MultiTaskHeads.losses: argument 'z' expected shape \[..., 4\]"):
        heads.losses(torch.randn(2, 5), _targets(2))


# ---- 7. fake kernels check devices: a CPU + meta mix dispatches to them and must fail, not return
# uninitialised memory.


def test_pack_targets_refuses_a_target_on_another_device():
    targets = {"a": torch.randn(8), "b": torch.ones(8, device="meta")}
    with pytest.raises(ValueError, match=r"pack_targets: argument 'targets\[1\]' expected device cpu.*got meta"):
        ops.pack_targets(targets, TASKS)


def _backward_calls():
    """(op name, the CPU arguments of its backward op, index of one tensor argument to move to meta)."""
    x, ws = torch.randn(3, 4), [torch.randn(5, 4), torch.randn(2, 5)]
    out, saved = torch.ops.fastmtl.fused_mlp.default(x, ws, [], "relu")
    yield "fused_mlp_backward", (torch.ones_like(out), x, ws, out, saved, "relu", False, True), 0
    ews = [torch.randn(2, 5, 4), torch.randn(2, 3, 5)]
    eout, esaved = torch.ops.fastmtl.fused_experts.default(x, ews, [], "relu")
    yield "fused_experts_backward", (torch.ones_like(eout), x, ews, eout, esaved, "relu", False, True), 0
    gx, gw, experts = torch.randn(6, 5), torch.randn(3, 4, 5), torch.randn(4, 6, 7)
    mix, gates = torch.ops.fastmtl.gated_mixture.default(gx, gw, None, experts, [])
    yield "gated_mixture_backward", (torch.ones_like(mix), gx, gw, experts, gates, [], False, True), 0
    z, w = torch.randn(3, 4), torch.randn(2, 4)
    packed = ops.pack_targets({"a": torch.randn(3), "b": torch.ones(3)}, TASKS)
    _losses, logit_grad, scale = torch.ops.fastmtl.multitask_head_loss.default(
        z, w, None, packed, ["mse", "bce"], [1, 1]
    )
    yield "multitask_head_loss_backward", (torch.ones(2), z, w, logit_grad, scale, [1, 1], False, True), 0


@pytest.mark.parametrize("case", list(_backward_calls()), ids=lambda c: c[0])
def test_backward_ops_refuse_a_cpu_and_meta_mix(case):
    name, args, moved = case
    args = list(args)
    args[moved] = args[moved].to("meta")
    with pytest.raises((ValueError, RuntimeError), match=r"device"):
        getattr(torch.ops.fastmtl, name).default(*args)


# ---- 8. convert keeps tied weights tied


def _num_parameters(model):
    return sum(p.numel() for p in model.parameters())


def test_convert_leaves_a_linear_used_twice_alone_and_reports_it():
    linear = torch.nn.Linear(4, 4)
    model = torch.nn.Sequential(linear, torch.nn.ReLU(), linear, torch.nn.ReLU())
    converted, report = fastmtl.convert(model)
    assert _num_parameters(converted) == _num_parameters(model) == 20
    assert converted[0] is converted[2]
    assert [path for path, _ in report.left_alone] == ["0", "2"]
    assert all("tied" in why for _, why in report.left_alone)
    x = torch.randn(3, 4)
    torch.testing.assert_close(converted(x), model(x))
    with pytest.raises(ValueError, match="tied"):
        fastmtl.convert(model, strict=True)


def test_convert_leaves_linears_sharing_a_weight_alone():
    first, second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    second.weight = first.weight
    model = torch.nn.Sequential(first, torch.nn.ReLU(), second, torch.nn.ReLU())
    converted, report = fastmtl.convert(model)
    assert _num_parameters(converted) == _num_parameters(model)
    assert converted[0].weight is converted[2].weight
    assert len(report.replaced) == 0 and len(report.left_alone) == 2


def test_convert_replaces_a_sequential_used_twice_by_one_module():
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = self.b = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())

        def forward(self, x):
            return self.b(self.a(x))

    model = Twice()
    converted, report = fastmtl.convert(model)
    assert isinstance(converted.a, fastmtl.nn.FusedMLP) and converted.a is converted.b
    assert _num_parameters(converted) == _num_parameters(model) == 20
    assert len(report.replaced) == 1
    x = torch.randn(3, 4)
    torch.testing.assert_close(converted(x), model(x))


# ---- 9. mtl_backward: the graph is kept, as documented; a second call accumulates again


def test_mtl_backward_documents_what_a_second_call_does():
    assert "not\n    freed" in fastmtl.mtl_backward.__doc__ and "accumulates" in fastmtl.mtl_backward.__doc__
    torch.manual_seed(0)
    trunk, heads = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
    z = trunk(torch.randn(16, 4))
    losses = ((heads(z) - torch.randn(16, 2)) ** 2).mean(0)
    fastmtl.mtl_backward(losses, z, fastmtl.aggregation.UPGrad())
    first = (trunk.weight.grad.clone(), heads.weight.grad.clone())
    fastmtl.mtl_backward(losses, z, fastmtl.aggregation.UPGrad())
    torch.testing.assert_close(trunk.weight.grad, 2 * first[0])
    torch.testing.assert_close(heads.weight.grad, 2 * first[1])
