"""Contracts fixed in issue 14, each checked on CPU with the custom kernels and the portable steps:
bce targets are probabilities in [0, 1] (soft labels, as BCE-with-logits users expect), NaN is
missing and anything else is invalid (CPU: ValueError naming the task; CUDA: that task's loss is
NaN, tests/test_cuda.py); a trunk with zero input features is rejected."""

import math

import pytest
import torch

from conftest import assert_rel_close
from fastmtl import Task, ops, reference


def bce_case(soft_values):
    tasks = [Task("click", "binary"), Task("y", "regression")]
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    w = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    b = torch.randn(2, generator=gen, dtype=torch.float64)
    targets = {
        "click": torch.tensor(soft_values, dtype=torch.float64),
        "y": torch.randn(6, generator=gen, dtype=torch.float64),
    }
    return z, w, b, targets, tasks


@pytest.mark.parametrize("namespace", ["fastmtl", "fastmtl_portable"])
def test_bce_accepts_soft_labels_and_matches_bce_with_logits(namespace):
    z, w, b, targets, tasks = bce_case([0.0, 0.25, 0.5, 1.0, math.nan, 0.875])
    packed = ops.pack_targets(targets, tasks, torch.float64)
    losses, _, _ = getattr(torch.ops, namespace).multitask_head_loss(
        z, w, b, packed, [t.loss for t in tasks], [t.num_outputs for t in tasks]
    )
    logits = z @ w[0] + b[0]
    labelled = ~targets["click"].isnan()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[labelled], targets["click"][labelled])
    assert_rel_close(losses[0], expected, rtol=1e-12, what="soft-label bce")
    assert_rel_close(losses, reference.multitask_head_loss(z, w, b, targets, tasks), rtol=1e-12, what="losses")


@pytest.mark.parametrize("bad", [1.25, -0.5, math.inf])
def test_bce_target_outside_unit_interval_raises_naming_the_task(bad):
    z, w, b, targets, tasks = bce_case([0.0, 1.0, bad, 1.0, 0.5, 0.0])
    with pytest.raises(
        ValueError,
        match=r"row 2, column 0 \(task 0, loss 'bce', num_outputs 1\): expected a "
        r"probability in \[0, 1\] \(soft labels allowed; NaN = missing\)",
    ):
        ops.multitask_head_loss(z, w, b, targets, tasks)


def test_bce_soft_label_gradient_matches_reference():
    z, w, b, targets, tasks = bce_case([0.1, 0.25, 0.5, 0.75, 0.9, 0.3])
    leaves = [t.clone().requires_grad_() for t in (z, w, b)]
    ref_leaves = [t.clone().requires_grad_() for t in (z, w, b)]
    upstream = torch.tensor([0.7, 1.3], dtype=torch.float64)
    grads = torch.autograd.grad(ops.multitask_head_loss(*leaves, targets, tasks), leaves, upstream)
    ref = torch.autograd.grad(reference.multitask_head_loss(*ref_leaves, targets, tasks), ref_leaves, upstream)
    for g, r, name in zip(grads, ref, ["dz", "dW", "db"]):
        assert_rel_close(g, r, rtol=1e-10, what=name)


@pytest.mark.parametrize("namespace", ["fastmtl", "fastmtl_portable"])
def test_fused_mlp_rejects_zero_input_features(namespace):
    x = torch.randn(4, 0)
    with pytest.raises(
        ValueError,
        match=r"fastmtl.fused_mlp: argument 'x' expected at least 1 input feature "
        r"\(in_features >= 1\), got shape \[4, 0\]",
    ):
        getattr(torch.ops, namespace).fused_mlp(x, [torch.randn(3, 0)], [torch.randn(3)], "relu")


def test_fused_experts_rejects_zero_input_features():
    with pytest.raises(ValueError, match=r"fastmtl.fused_experts: argument 'x' expected at least 1 input feature"):
        ops.fused_experts(torch.randn(4, 0), [torch.randn(2, 3, 0)], None, "relu")
