"""fastmtl.ops.multitask_head_loss (and pack_targets) against fastmtl.reference, gradcheck,
opcheck, missing labels and bad input."""

import math

import pytest
import torch

from conftest import assert_rel_close, mixed_tasks, random_head_inputs, random_targets
from fastmtl import Task, ops, reference

CASES = [
    # (batch, features, num_tasks, tasks with no label at all)
    (1, 1, 1, ()),
    (1, 7, 6, ()),
    (13, 17, 6, ("task2",)),
    (33, 9, 40, ("task0", "task1", "task2", "task3")),
    (256, 128, 40, ("task7",)),
    (64, 31, 64, ()),
]


def _to(device, dtype, *tensors, requires_grad=True):
    return [t.to(device, dtype).requires_grad_(requires_grad) for t in tensors]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-d{c[1]}-T{c[2]}-unlabelled{len(c[3])}")
def test_float32_losses_and_gradients_match_float64_reference(device, case):
    batch, features, num_tasks, unlabelled = case
    gen = torch.Generator().manual_seed(batch * 100 + num_tasks)
    tasks = mixed_tasks(num_tasks)
    targets = random_targets(tasks, batch, gen, missing=0.2, unlabelled=unlabelled)
    z64, w64, b64 = random_head_inputs(tasks, batch, features, gen)
    upstream = torch.randn(num_tasks, generator=gen, dtype=torch.float64)

    ref_leaves = _to("cpu", torch.float64, z64, w64, b64)
    ref_losses = reference.multitask_head_loss(*ref_leaves, targets, tasks)
    ref_grads = torch.autograd.grad(ref_losses, ref_leaves, upstream)

    leaves = _to(device, torch.float32, z64, w64, b64)
    targets_dev = {k: v.to(device) for k, v in targets.items()}
    losses = ops.multitask_head_loss(*leaves, targets_dev, tasks)
    assert losses.shape == (num_tasks,) and losses.dtype == torch.float32
    assert_rel_close(losses, ref_losses, what="losses")
    grads = torch.autograd.grad(losses, leaves, upstream.to(device, torch.float32))
    for name, g, rg in zip(["z", "weight", "bias"], grads, ref_grads):
        assert_rel_close(g, rg, what=f"grad of {name}")
    for name in unlabelled:
        assert losses[[t.name for t in tasks].index(name)].item() == 0.0


def test_task_with_nothing_labelled_has_zero_loss_and_zero_gradient(device):
    tasks = mixed_tasks(6)
    gen = torch.Generator().manual_seed(11)
    targets = random_targets(tasks, 10, gen, unlabelled=[t.name for t in tasks])  # nothing labelled anywhere
    z, w, b = _to(device, torch.float32, *random_head_inputs(tasks, 10, 5, gen))
    losses = ops.multitask_head_loss(z, w, b, {k: v.to(device) for k, v in targets.items()}, tasks)
    assert torch.equal(losses, torch.zeros_like(losses))
    grads = torch.autograd.grad(losses.sum(), [z, w, b])
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g)), "no NaN, no gradient where nothing is labelled"


def test_each_regression_column_can_be_missing_on_its_own(device):
    task = Task("r", "regression", num_outputs=3)
    z = torch.eye(3, dtype=torch.float64, device=device)
    w = torch.eye(3, dtype=torch.float64, device=device)  # logits == z
    targets = torch.tensor(
        [[0.0, math.nan, 0.0], [math.nan, 0.0, 0.0], [0.0, 0.0, math.nan]], dtype=torch.float64, device=device
    )
    # Labelled entries: 6; squared errors: row0 col0 = 1, row1 col1 = 1, others 0 -> mean 2/6.
    loss = ops.multitask_head_loss(z, w, None, targets, [task])
    assert loss.item() == pytest.approx(2.0 / 6.0, rel=1e-15)


def test_hand_computed_losses(device):
    tasks = [
        Task("b", "binary"),
        Task("c", "multiclass", num_outputs=3),
        Task("h", "regression", loss="huber"),
        Task("l", "regression", loss="l1"),
    ]
    z = torch.ones(1, 1, dtype=torch.float64, device=device)
    w = torch.tensor([[2.0], [0.0], [1.0], [0.0], [3.0], [-1.0]], dtype=torch.float64, device=device)  # logits = w^T
    targets = torch.tensor([[1.0, 2.0, 0.5, 1.0]], dtype=torch.float64, device=device)
    losses = ops.multitask_head_loss(z, w, None, targets, tasks)
    expected = [
        math.log1p(math.exp(-2.0)),  # bce(2, 1)
        math.log(math.exp(0) + math.exp(1) + math.exp(0)) - 0.0,  # ce([0, 1, 0], class 2)
        3.0 - 0.5 - 0.5,  # huber(d = 2.5) = |d| - 0.5
        2.0,  # l1(-1 - 1)
    ]
    assert losses.tolist() == pytest.approx(expected, rel=1e-14)


def test_bce_is_stable_for_huge_logits(device):
    z = torch.tensor([[1.0], [1.0]], dtype=torch.float32, device=device)
    w = torch.tensor([[200.0]], dtype=torch.float32, device=device).requires_grad_()
    targets = torch.tensor([[0.0], [1.0]], device=device)
    loss = ops.multitask_head_loss(z, w, None, targets, [Task("b", "binary")])
    assert loss.item() == pytest.approx(100.0, rel=1e-6)  # (200 + 0) / 2
    loss.backward()
    assert torch.isfinite(w.grad).all()


def test_ce_is_stable_for_huge_logits(device):
    z = torch.ones(1, 1, device=device)
    w = torch.tensor([[1000.0], [-1000.0], [0.0]], device=device).requires_grad_()
    targets = torch.tensor([[1.0]], device=device)
    loss = ops.multitask_head_loss(z, w, None, targets, [Task("c", "multiclass", num_outputs=3)])
    assert loss.item() == pytest.approx(2000.0, rel=1e-6)
    loss.backward()
    assert torch.isfinite(w.grad).all()


def test_gradcheck_float64(device):
    tasks = mixed_tasks(7)
    gen = torch.Generator().manual_seed(12)
    targets = random_targets(tasks, 6, gen, missing=0.2)
    packed = ops.pack_targets(targets, tasks, torch.float64).to(device)
    z, w, b = _to(device, torch.float64, *random_head_inputs(tasks, 6, 4, gen))
    assert torch.autograd.gradcheck(lambda z, w, b: ops.multitask_head_loss(z, w, b, packed, tasks), (z, w, b))
    assert torch.autograd.gradcheck(lambda z, w: ops.multitask_head_loss(z, w, None, packed, tasks), (z, w))


def test_non_contiguous_inputs(device):
    tasks = mixed_tasks(5)
    gen = torch.Generator().manual_seed(13)
    targets = random_targets(tasks, 9, gen)
    packed = ops.pack_targets(targets, tasks, torch.float64)
    z, w, b = random_head_inputs(tasks, 9, 6, gen)
    z_t = z.t().contiguous().t().to(device)  # column-major
    w_wide = torch.stack([w, -w], dim=2).reshape(w.shape[0], -1).to(device)[:, ::2]  # == w, strided
    packed_t = packed.t().contiguous().t().to(device)
    assert not z_t.is_contiguous() and not w_wide.is_contiguous() and not packed_t.is_contiguous()
    got = ops.multitask_head_loss(z_t, w_wide, b.to(device), packed_t, tasks)
    assert_rel_close(got, reference.multitask_head_loss(z, w, b, packed, tasks), rtol=1e-12)


def test_inputs_are_not_modified(device):
    tasks = mixed_tasks(6)
    gen = torch.Generator().manual_seed(14)
    targets = {k: v.to(device) for k, v in random_targets(tasks, 8, gen).items()}
    z, w, b = _to(device, torch.float32, *random_head_inputs(tasks, 8, 5, gen))
    before = [t.detach().clone() for t in (z, w, b)]
    targets_before = {k: v.clone() for k, v in targets.items()}
    ops.multitask_head_loss(z, w, b, targets, tasks).sum().backward()
    for a, c in zip((z, w, b), before):
        assert torch.equal(a.detach(), c)
    for k, v in targets.items():  # NaN marks missing labels: compare with NaN mapped to a sentinel
        assert torch.equal(torch.nan_to_num(v, nan=-7.0), torch.nan_to_num(targets_before[k], nan=-7.0))


def test_deterministic_for_any_thread_count():
    tasks = mixed_tasks(12)
    gen = torch.Generator().manual_seed(15)
    targets = random_targets(tasks, 300, gen)
    z, w, b = _to("cpu", torch.float32, *random_head_inputs(tasks, 300, 16, gen), requires_grad=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.multitask_head_loss(z, w, b, targets, tasks)
    finally:
        torch.set_num_threads(threads)
    again = ops.multitask_head_loss(z, w, b, targets, tasks)
    assert torch.equal(one, again)


def test_opcheck(device):
    tasks = mixed_tasks(6)
    gen = torch.Generator().manual_seed(16)
    targets = random_targets(tasks, 7, gen)
    packed = ops.pack_targets(targets, tasks, torch.float32).to(device)
    z, w, b = _to(device, torch.float32, *random_head_inputs(tasks, 7, 5, gen))
    losses, num_outputs = [t.loss for t in tasks], [t.num_outputs for t in tasks]
    torch.library.opcheck(torch.ops.fastmtl.multitask_head_loss.default, (z, w, b, packed, losses, num_outputs))
    torch.library.opcheck(torch.ops.fastmtl.multitask_head_loss.default, (z, w, None, packed, losses, num_outputs))
    _, logit_grad, scale = torch.ops.fastmtl.multitask_head_loss.default(
        z.detach(), w.detach(), b.detach(), packed, losses, num_outputs
    )
    upstream = torch.randn(len(tasks), device=device)
    for has_bias in (True, False):
        for need_z_grad in (True, False):
            torch.library.opcheck(
                torch.ops.fastmtl.multitask_head_loss_backward.default,
                (upstream, z.detach(), w.detach(), logit_grad, scale, num_outputs, has_bias, need_z_grad),
            )
    # opcheck compares outputs without equal_nan, so pack fully labelled targets here.
    labelled = random_targets(tasks, 7, gen, missing=0.0)
    values = [labelled[t.name].to(device) for t in tasks]
    torch.library.opcheck(
        torch.ops.fastmtl.pack_targets.default, (values, [t.name for t in tasks], losses, num_outputs, torch.float32)
    )


# ---- pack_targets


def test_pack_targets_matches_reference_and_accepts_bool_and_2d(device):
    tasks = [
        Task("r", "regression", num_outputs=2),
        Task("b", "binary"),
        Task("c", "multiclass", num_outputs=4),
        Task("s", "regression"),
    ]
    targets = {
        "r": torch.tensor([[1.0, math.nan], [3.0, 4.0], [5.0, 6.0]]),
        "b": torch.tensor([True, False, True]),
        "c": torch.tensor([[3], [-100], [0]], dtype=torch.int32),
        "s": torch.tensor([0.5, 1.5, 2.5], dtype=torch.float64),
    }
    # A key that names no task is refused since issue 18 (test_robustness.py), no longer ignored.
    expected = reference.pack_targets(targets, tasks, torch.float64)
    packed = ops.pack_targets({k: v.to(device) for k, v in targets.items()}, tasks, torch.float64)
    assert packed.shape == (3, 5) and packed.device.type == device.type
    packed = packed.cpu()
    assert torch.equal(torch.nan_to_num(packed, nan=-7.0), torch.nan_to_num(expected, nan=-7.0))


@pytest.mark.parametrize(
    "targets, error, pattern",
    [
        ({"r": torch.zeros(4), "c": torch.zeros(4, dtype=torch.long)}, ValueError, r"no entry for task 'b'"),
        (
            {"r": torch.zeros(4), "b": torch.zeros(4), "c": torch.zeros(4)},
            TypeError,
            r"targets\['c'\]' \(multiclass task\) expected integer class indices.*got dtype torch.float32",
        ),
        (
            {"r": torch.zeros(4, dtype=torch.long), "b": torch.zeros(4), "c": torch.zeros(4, dtype=torch.long)},
            TypeError,
            r"targets\['r'\]' \(regression task\) expected a floating tensor",
        ),
        (
            {"r": torch.zeros(4), "b": torch.zeros(3), "c": torch.zeros(4, dtype=torch.long)},
            ValueError,
            r"targets\['b'\]' expected shape \[4\].*got \[3\]",
        ),
        (
            {"r": torch.zeros(4, 2), "b": torch.zeros(4), "c": torch.zeros(4, dtype=torch.long)},
            ValueError,
            r"targets\['r'\]' expected shape.*got \[4, 2\]",
        ),
        (
            {"r": torch.zeros(0), "b": torch.zeros(0), "c": torch.zeros(0, dtype=torch.long)},
            ValueError,
            r"targets\['r'\]'.*B >= 1",
        ),
        (
            {"r": [0.0] * 4, "b": torch.zeros(4), "c": torch.zeros(4, dtype=torch.long)},
            TypeError,
            r"targets\['r'\]' expected a tensor, got list",
        ),
    ],
    ids=["missing-task", "float-classes", "int-regression", "batch-mismatch", "width", "empty-batch", "not-tensor"],
)
def test_bad_targets_dict(targets, error, pattern):
    tasks = [Task("r", "regression"), Task("b", "binary"), Task("c", "multiclass", num_outputs=3)]
    z = torch.zeros(4, 2)
    w = torch.zeros(5, 2)
    with pytest.raises(error, match=pattern):
        ops.multitask_head_loss(z, w, None, targets, tasks)


# ---- bad input of the op


def _head_args():
    tasks = [Task("r", "regression"), Task("b", "binary"), Task("c", "multiclass", num_outputs=3)]
    z = torch.randn(4, 2)
    w = torch.randn(5, 2)
    b = torch.randn(5)
    packed = torch.tensor([[0.5, 1.0, 2.0], [0.1, 0.0, 0.0], [math.nan, math.nan, -100.0], [1.0, 1.0, 1.0]])
    return z, w, b, packed, tasks


@pytest.mark.parametrize(
    "mutate, error, pattern",
    [
        (lambda z, w, b, t, ts: (z, w[:4], b, t, ts), ValueError, r"'weight' expected size 5 in dimension 0"),
        (lambda z, w, b, t, ts: (z, w[:, :1], b, t, ts), ValueError, r"'weight' expected size 2 in dimension 1"),
        (lambda z, w, b, t, ts: (z, w, b[:3], t, ts), ValueError, r"'bias' expected size 5"),
        (lambda z, w, b, t, ts: (z, w, b, t[:3], ts), ValueError, r"'targets' expected size 4 in dimension 0"),
        (lambda z, w, b, t, ts: (z, w, b, t[:, :2], ts), ValueError, r"'targets' expected size 3 in dimension 1"),
        (lambda z, w, b, t, ts: (z, w, b, t.double(), ts), TypeError, r"'targets' expected dtype torch.float32"),
        (lambda z, w, b, t, ts: (z.double(), w, b, t, ts), TypeError, r"'weight' expected dtype torch.float64"),
        (
            lambda z, w, b, t, ts: (z.int(), w, b, t, ts),
            TypeError,
            r"'z' expected dtype torch.float32, torch.float64, torch.float16 or torch.bfloat16",
        ),
        (lambda z, w, b, t, ts: (z[:0], w, b, t[:0], ts), ValueError, r"'z' expected a batch of at least 1 row"),
        (lambda z, w, b, t, ts: (z, w, b, t, []), ValueError, r"'tasks' expected at least one Task, got 0"),
        (lambda z, w, b, t, ts: (z, w, b, t, ts[:2] + ["c"]), TypeError, r"'tasks\[2\]' expected a fastmtl.Task"),
    ],
    ids=[
        "weight-rows",
        "weight-cols",
        "bias",
        "batch",
        "target-cols",
        "target-dtype",
        "weight-dtype",
        "z-int",
        "empty-batch",
        "no-tasks",
        "not-a-task",
    ],
)
def test_bad_input_raises_with_argument_name(mutate, error, pattern):
    with pytest.raises(error, match=pattern):
        ops.multitask_head_loss(*mutate(*_head_args()))


@pytest.mark.parametrize(
    "row, col, value, pattern",
    [
        (
            0,
            2,
            3.0,
            r"row 0, column 2 \(task 2, loss 'ce', num_outputs 3\): expected a class index in \[0, num_outputs\) or -100.*got 3",
        ),
        (1, 2, -1.0, r"row 1, column 2.*got -1"),
        (3, 2, 1.5, r"row 3, column 2.*got 1.5"),
        (2, 2, math.nan, r"row 2, column 2.*got nan"),
        (
            1,
            1,
            2.0,
            r"row 1, column 1 \(task 1, loss 'bce'.*expected a probability in \[0, 1\] \(soft labels allowed; NaN = missing\), got 2",
        ),
        (3, 0, math.inf, r"row 3, column 0 \(task 0, loss 'mse'.*expected a finite value"),
    ],
    ids=["class-too-big", "class-negative", "class-fractional", "class-nan", "bce-2", "regression-inf"],
)
def test_invalid_target_values_raise(row, col, value, pattern):
    z, w, b, packed, tasks = _head_args()
    packed[row, col] = value
    with pytest.raises(ValueError, match=r"'targets' has an invalid value at " + pattern):
        ops.multitask_head_loss(z, w, b, packed, tasks)


def test_class_index_out_of_range_in_dict_targets():
    tasks = [Task("c", "multiclass", num_outputs=3)]
    with pytest.raises(ValueError, match=r"invalid value at row 1.*got 7"):
        ops.multitask_head_loss(torch.randn(2, 2), torch.randn(3, 2), None, {"c": torch.tensor([0, 7])}, tasks)


def test_op_level_loss_names_are_checked():
    z = torch.randn(2, 2)
    with pytest.raises(ValueError, match=r"'losses\[0\]' expected one of mse, l1, huber, bce, ce, got 'hinge'"):
        torch.ops.fastmtl.multitask_head_loss.default(z, torch.randn(1, 2), None, torch.zeros(2, 1), ["hinge"], [1])
    with pytest.raises(ValueError, match=r"'num_outputs\[0\]' expected 1 for a bce"):
        torch.ops.fastmtl.multitask_head_loss.default(z, torch.randn(2, 2), None, torch.zeros(2, 1), ["bce"], [2])


def test_meta_and_cpu_tensors_mixed_raise():
    z, w, b, packed, tasks = _head_args()
    with pytest.raises(ValueError, match=r"'weight' expected device meta \(the device of 'z'\), got cpu"):
        ops.multitask_head_loss(z.to("meta"), w, b, packed, tasks)


@pytest.mark.parametrize("logit", [-60.0, -20.0, -3.0, -1e-3, 0.0, 0.7, 15.0])
def test_bce_is_accurate_where_the_loss_is_tiny_or_large(device, logit):
    # loss(x, t=0) = log1p(exp(x)): for very negative x a float32 result still has full relative
    # accuracy (a naive log(1 + exp(x)) rounds it to 0).
    z = torch.tensor([[logit]], device=device)
    w = torch.ones(1, 1, device=device)
    targets = torch.tensor([[0.0]], device=device)
    got = ops.multitask_head_loss(z, w, None, targets, [Task("b", "binary")]).item()
    expected = max(logit, 0.0) + math.log1p(math.exp(-abs(logit)))
    assert got == pytest.approx(expected, rel=2e-6)
