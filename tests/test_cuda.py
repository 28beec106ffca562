"""16-bit dtypes on every device (error within 2x plain PyTorch's in the same dtype; every op,
module and engine path in float16 / bfloat16 against the float64 CPU result), and what only CUDA
has: opcheck and torch.compile on CUDA, CUDA-graph capture of a training step, bit-for-bit repeatable
reductions, the task-table split of the kernels (> 128 tasks), NaN for invalid targets (the CPU op
raises; CUDA cannot without a host synchronisation), and clear errors for mixed devices.

The accuracy criterion and the 16-bit op, module and engine checks run on the CPU (where 16-bit
storage takes the portable steps in float32, csrc/kernels/select.cpp) and on CUDA; everything
else here needs a GPU and fastmtl's CUDA kernels, and skips otherwise. On CUDA every op, module and
engine path is also checked in float32, with both kernel choices
(FASTMTL_KERNELS=custom: the CUDA kernels; =portable: the ATen steps, the default on CUDA until a
GPU run has verified the custom ones). None of this has run on a GPU yet.
"""

import copy
import math

import pytest
import torch

import fastmtl
from conftest import (
    HAS_CUDA_KERNELS,
    assert_rel_close,
    assert_within_twice_plain,
    mixed_tasks,
    random_head_inputs,
    random_targets,
    trunk_cases,
)
from fastmtl import Task, ops, reference
from fastmtl.nn import FusedMLP, MultiTaskHeads, MultiTaskModel
from op_cases import case_id, convert, flatten, op_cases

needs_cuda = pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a GPU and fastmtl built with CUDA kernels")

ACTIVATIONS = list(ops.ACTIVATIONS)
HALF_DTYPES = [torch.bfloat16, torch.float16]
# (device, dtype) pairs of the accuracy criterion: float32 and the 16-bit dtypes on every device.
ACCURACY_CASES = [("cpu", dtype) for dtype in [torch.float32] + HALF_DTYPES] + [
    pytest.param("cuda", dtype, marks=needs_cuda) for dtype in [torch.float32] + HALF_DTYPES
]
# (device, dtype) pairs checked against the float64 CPU result: 16-bit on the CPU, all on CUDA.
DEVICE_DTYPE_CASES = [("cpu", dtype) for dtype in HALF_DTYPES] + [
    pytest.param("cuda", dtype, marks=needs_cuda) for dtype in [torch.float32] + HALF_DTYPES
]


def make_trunk(in_features, widths, generator):
    weights, biases, fan_in = [], [], in_features
    for w in widths:
        weights.append(torch.randn(w, fan_in, generator=generator, dtype=torch.float64) / math.sqrt(fan_in))
        biases.append(0.1 * torch.randn(w, generator=generator, dtype=torch.float64))
        fan_in = w
    return weights, biases


def leaves(tensors, device, dtype):
    return [t.detach().to(device, dtype).requires_grad_() for t in tensors]


# ---- accuracy in the 16-bit dtypes (and float32: the criterion itself)


@pytest.mark.parametrize("device, dtype", ACCURACY_CASES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fused_mlp_error_within_twice_plain_pytorch(device, dtype, activation):
    gen = torch.Generator().manual_seed(101)
    batch, in_features, widths = 96, 72, [128, 96, 40]
    x64 = torch.randn(batch, in_features, generator=gen, dtype=torch.float64)
    w64, b64 = make_trunk(in_features, widths, gen)
    grad_out = torch.randn(batch, widths[-1], generator=gen, dtype=torch.float64)

    def run(fn, dev, dt):
        inputs = leaves([x64] + w64 + b64, dev, dt)
        x, ws, bs = inputs[0], inputs[1 : 1 + len(widths)], inputs[1 + len(widths) :]
        out = fn(x, ws, bs, activation)
        return [out] + list(torch.autograd.grad(out, inputs, grad_out.to(dev, dt)))

    exact = run(reference.fused_mlp, "cpu", torch.float64)
    plain = run(reference.fused_mlp, device, dtype)
    fast = run(ops.fused_mlp, device, dtype)
    assert fast[0].dtype == dtype and fast[0].device.type == device
    names = ["output", "dx"] + [f"dW{l}" for l in range(len(widths))] + [f"db{l}" for l in range(len(widths))]
    for name, f, p, e in zip(names, fast, plain, exact):
        assert_within_twice_plain(f, p, e, dtype, f"{activation} {name}")


@pytest.mark.parametrize("device, dtype", ACCURACY_CASES)
def test_head_loss_error_within_twice_plain_pytorch(device, dtype):
    tasks = mixed_tasks(12)
    gen = torch.Generator().manual_seed(102)
    batch, features = 200, 48
    targets = random_targets(tasks, batch, gen, missing=0.2)
    z64, w64, b64 = random_head_inputs(tasks, batch, features, gen)
    upstream = torch.rand(len(tasks), generator=gen, dtype=torch.float64) + 0.5

    def run(fn, dev, dt):
        inputs = leaves([z64, w64, b64], dev, dt)
        losses = fn(*inputs, {k: v.to(dev) for k, v in targets.items()}, tasks)
        return [losses] + list(torch.autograd.grad(losses, inputs, upstream.to(dev, losses.dtype)))

    exact = run(reference.multitask_head_loss, "cpu", torch.float64)
    plain = run(reference.multitask_head_loss, device, dtype)
    fast = run(ops.multitask_head_loss, device, dtype)
    assert fast[0].dtype == ops.loss_dtype(dtype) and fast[1].dtype == dtype
    for name, f, p, e in zip(["losses", "dz", "dweight", "dbias"], fast, plain, exact):
        assert_within_twice_plain(f, p, e, dtype, name)


# ---- dtype rules that hold without a GPU


def test_loss_dtype():
    assert ops.loss_dtype(torch.bfloat16) == torch.float32 and ops.loss_dtype(torch.float16) == torch.float32
    assert ops.loss_dtype(torch.float64) == torch.float64 and ops.loss_dtype(torch.float32) == torch.float32


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64])
def test_non_float_dtypes_raise(dtype):
    x = torch.zeros(3, 4, dtype=dtype)
    with pytest.raises(
        TypeError,
        match=r"fastmtl.fused_mlp: argument 'x' expected dtype torch.float32, torch.float64, torch.float16 or "
        r"torch.bfloat16, got torch\.(int64|complex64)",
    ):
        ops.fused_mlp(x, [torch.zeros(2, 4, dtype=dtype)], None, "relu")


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_fake_kernels_give_float32_losses_for_16bit_inputs(dtype):
    tasks = mixed_tasks(4)
    total = sum(t.num_outputs for t in tasks)
    width = sum(t.target_width for t in tasks)
    z = torch.empty(5, 3, dtype=dtype, device="meta")
    w = torch.empty(total, 3, dtype=dtype, device="meta")
    packed = torch.empty(5, width, dtype=torch.float32, device="meta")
    losses, logit_grad, scale = torch.ops.fastmtl.multitask_head_loss.default(
        z, w, None, packed, [t.loss for t in tasks], [t.num_outputs for t in tasks]
    )
    assert losses.dtype == torch.float32 and scale.dtype == torch.float32 and logit_grad.dtype == dtype
    assert losses.shape == (4,) and logit_grad.shape == (5, total)


# ---- CUDA only


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_opcheck_fused_mlp_on_cuda(dtype, activation):
    gen = torch.Generator().manual_seed(103)
    w64, b64 = make_trunk(6, [9, 5], gen)
    x = torch.randn(7, 6, generator=gen).to("cuda", dtype).requires_grad_()
    ws, bs = leaves(w64, "cuda", dtype), leaves(b64, "cuda", dtype)
    for biases in (bs, []):
        torch.library.opcheck(torch.ops.fastmtl.fused_mlp.default, (x, ws, biases, activation))
    out, saved = torch.ops.fastmtl.fused_mlp.default(
        x.detach(), [w.detach() for w in ws], [b.detach() for b in bs], activation
    )
    grad_out = torch.randn_like(out)
    for need_input_grad in (True, False):
        torch.library.opcheck(
            torch.ops.fastmtl.fused_mlp_backward.default,
            (grad_out, x.detach(), [w.detach() for w in ws], out, saved, activation, True, need_input_grad),
        )


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_opcheck_head_loss_and_pack_targets_on_cuda(dtype):
    tasks = mixed_tasks(6)
    gen = torch.Generator().manual_seed(104)
    targets = random_targets(tasks, 9, gen)
    packed = ops.pack_targets(targets, tasks, ops.loss_dtype(dtype)).cuda()
    z, w, b = leaves(random_head_inputs(tasks, 9, 5, gen), "cuda", dtype)
    losses, num_outputs = [t.loss for t in tasks], [t.num_outputs for t in tasks]
    for bias in (b, None):
        torch.library.opcheck(torch.ops.fastmtl.multitask_head_loss.default, (z, w, bias, packed, losses, num_outputs))
    _, logit_grad, scale = torch.ops.fastmtl.multitask_head_loss.default(
        z.detach(), w.detach(), b.detach(), packed, losses, num_outputs
    )
    upstream = torch.randn(len(tasks), device="cuda", dtype=ops.loss_dtype(dtype))
    for has_bias in (True, False):
        for need_z_grad in (True, False):
            torch.library.opcheck(
                torch.ops.fastmtl.multitask_head_loss_backward.default,
                (upstream, z.detach(), w.detach(), logit_grad, scale, num_outputs, has_bias, need_z_grad),
            )
    labelled = random_targets(tasks, 9, gen, missing=0.0)  # opcheck compares without equal_nan
    values = [labelled[t.name].cuda() for t in tasks]
    torch.library.opcheck(
        torch.ops.fastmtl.pack_targets.default, (values, [t.name for t in tasks], losses, num_outputs, torch.float32)
    )


def cuda_model(tasks, dtype=torch.float32, activation="relu", seed=0):
    torch.manual_seed(seed)
    return MultiTaskModel(FusedMLP(24, [64, 32], activation=activation), MultiTaskHeads(32, tasks)).to("cuda", dtype)


def cuda_batch(model, rows, generator, dtype):
    """(x, packed targets) on CUDA for cuda_model."""
    x = torch.randn(rows, 24, generator=generator).to("cuda", dtype)
    targets = random_targets(model.heads.tasks, rows, generator)
    return x, model.heads.pack_targets({k: v.cuda() for k, v in targets.items()})


@needs_cuda
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_torch_compile_fullgraph_on_cuda(activation):
    tasks = mixed_tasks(8)
    model = cuda_model(tasks, activation=activation)
    gen = torch.Generator().manual_seed(105)
    x = torch.randn(33, 24, generator=gen).cuda()
    targets = {k: v.cuda() for k, v in random_targets(tasks, 33, gen).items()}
    eager = model.loss(x, targets)
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    got = torch.compile(model.loss, fullgraph=True)(x, targets)
    got.backward()
    assert_rel_close(got, eager, rtol=1e-6, what="loss")
    for p, g in zip(model.parameters(), eager_grads):
        assert_rel_close(p.grad, g, rtol=1e-6, what="grad")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_capture_and_replay_of_a_training_step(dtype):
    tasks = mixed_tasks(10)
    model = cuda_model(tasks, dtype=dtype)
    gen = torch.Generator().manual_seed(106)
    batches = [cuda_batch(model, 64, gen, dtype) for _ in range(3)]
    static_x, static_t = batches[0][0].clone(), batches[0][1].clone()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs asks
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            model.loss(static_x, static_t).backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = model.loss(static_x, static_t)
        static_loss.backward()

    for x, t in batches[1:] + batches[:1]:
        static_x.copy_(x)
        static_t.copy_(t)
        graph.replay()
        torch.cuda.synchronize()
        replayed = [p.grad.clone() for p in model.parameters()]
        replayed_loss = static_loss.clone()
        eager_model = copy.deepcopy(model)
        eager_model.zero_grad(set_to_none=True)
        eager_loss = eager_model.loss(x, t)
        eager_loss.backward()
        # The same kernels on the same data; a tolerance of a few units of the dtype's rounding
        # only in case cuBLAS picks another algorithm on the capture stream.
        rtol = 1e-5 if dtype == torch.float32 else 2e-2
        assert_rel_close(replayed_loss, eager_loss, rtol=rtol, what="loss")
        for g, p in zip(replayed, eager_model.parameters()):
            assert_rel_close(g, p.grad, rtol=rtol, what="replayed gradient")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_input_same_bits_on_cuda(dtype):
    tasks = mixed_tasks(9)
    model = cuda_model(tasks, dtype=dtype)
    gen = torch.Generator().manual_seed(107)
    x, packed = cuda_batch(model, 1000, gen, dtype)
    runs = []
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        loss = model.loss(x, packed)
        loss.backward()
        runs.append([loss.detach().clone()] + [p.grad.clone() for p in model.parameters()])
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


@needs_cuda
def test_more_tasks_than_one_kernel_launch_holds():
    # 130 tasks: the loss kernel's task table takes 128 per launch, the packing kernel's 64.
    tasks = mixed_tasks(130, num_classes=3)
    gen = torch.Generator().manual_seed(108)
    targets = random_targets(tasks, 45, gen, missing=0.3, unlabelled=("task7", "task129"))
    z64, w64, b64 = random_head_inputs(tasks, 45, 6, gen)
    upstream = torch.rand(len(tasks), generator=gen, dtype=torch.float64)
    ref_inputs = leaves([z64, w64, b64], "cpu", torch.float64)
    ref = reference.multitask_head_loss(*ref_inputs, targets, tasks)
    ref_grads = torch.autograd.grad(ref, ref_inputs, upstream)
    inputs = leaves([z64, w64, b64], "cuda", torch.float32)
    cuda_targets = {k: v.cuda() for k, v in targets.items()}
    packed = ops.pack_targets(cuda_targets, tasks, torch.float64)
    assert torch.equal(
        packed.cpu().nan_to_num(nan=-7.0), reference.pack_targets(targets, tasks, torch.float64).nan_to_num(nan=-7.0)
    )
    got = ops.multitask_head_loss(*inputs, cuda_targets, tasks)
    assert_rel_close(got, ref, what="losses")
    assert got[7].item() == 0.0 and got[129].item() == 0.0
    for g, rg, name in zip(torch.autograd.grad(got, inputs, upstream.cuda().float()), ref_grads, ["dz", "dW", "db"]):
        assert_rel_close(g, rg, what=name)


@needs_cuda
@pytest.mark.parametrize(
    "task, bad",
    [
        (Task("b", "binary"), 1.5),
        (Task("c", "multiclass", num_outputs=3), 3.0),
        (Task("c", "multiclass", num_outputs=3), 1.5),
        (Task("r", "regression", num_outputs=2), math.inf),
    ],
    ids=["bce-outside-0-1", "ce-out-of-range", "ce-not-integer", "regression-inf"],
)
def test_invalid_target_makes_only_its_task_nan_on_cuda(task, bad):
    tasks = [Task("ok", "regression"), task]
    gen = torch.Generator().manual_seed(109)
    z, w, b = (t.cuda().float() for t in random_head_inputs(tasks, 6, 4, gen))
    packed = ops.pack_targets({k: v.cuda() for k, v in random_targets(tasks, 6, gen, missing=0.0).items()}, tasks)
    packed[2, 1] = bad
    losses = ops.multitask_head_loss(z, w, b, packed, tasks)
    assert torch.isfinite(losses[0]) and torch.isnan(losses[1])


@needs_cuda
def test_mixed_devices_raise_clear_errors():
    tasks = mixed_tasks(3)
    gen = torch.Generator().manual_seed(110)
    x = torch.randn(4, 5, generator=gen)
    ws = [torch.randn(3, 5, generator=gen)]
    with pytest.raises(ValueError, match=r"'weights\[0\]' expected device cuda:0 \(the device of 'x'\), got cpu"):
        ops.fused_mlp(x.cuda(), ws, None, "relu")
    with pytest.raises(ValueError, match=r"'biases\[0\]' expected device cpu \(the device of 'x'\), got cuda:0"):
        ops.fused_mlp(x, ws, [torch.zeros(3, device="cuda")], "relu")
    z, w, b = random_head_inputs(tasks, 4, 5, gen, dtype=torch.float32)
    packed = ops.pack_targets(random_targets(tasks, 4, gen), tasks)
    with pytest.raises(ValueError, match=r"'targets' expected device cuda:0 \(the device of 'z'\), got cpu"):
        ops.multitask_head_loss(z.cuda(), w.cuda(), b.cuda(), packed, tasks)
    with pytest.raises(ValueError, match=r"'weight' expected device cuda:0 \(the device of 'z'\), got cpu"):
        ops.multitask_head_loss(z.cuda(), w, b.cuda(), packed.cuda(), tasks)
    targets = random_targets(tasks, 4, gen)
    targets[tasks[1].name] = targets[tasks[1].name].cuda()
    with pytest.raises(ValueError, match=r"expected device cpu \(the device of the first task's targets\), got cuda:0"):
        ops.pack_targets(targets, tasks)


@needs_cuda
def test_16bit_targets_must_be_float32():
    tasks = mixed_tasks(3)
    gen = torch.Generator().manual_seed(111)
    z, w, b = (t.to("cuda", torch.bfloat16) for t in random_head_inputs(tasks, 4, 5, gen))
    packed = ops.pack_targets({k: v.cuda() for k, v in random_targets(tasks, 4, gen).items()}, tasks, torch.float64)
    with pytest.raises(
        TypeError, match=r"'targets' expected dtype torch.float32 \(losses, scales and targets of a torch.bfloat16 'z'"
    ):
        ops.multitask_head_loss(z, w, b, packed, tasks)


@needs_cuda
@pytest.mark.parametrize("task, soft", [(Task("b", "binary"), 0.5), (Task("b", "binary"), 0.125)])
def test_bce_soft_label_is_valid_on_cuda(task, soft):
    tasks = [Task("ok", "regression"), task]
    gen = torch.Generator().manual_seed(110)
    z, w, b = random_head_inputs(tasks, 6, 4, gen)
    targets = random_targets(tasks, 6, gen, missing=0.0)
    targets["b"][2] = soft
    expected = reference.multitask_head_loss(z, w, b, targets, tasks)
    got = ops.multitask_head_loss(
        z.cuda().float(), w.cuda().float(), b.cuda().float(), {k: v.cuda() for k, v in targets.items()}, tasks
    )
    assert_rel_close(got, expected, what="losses")


# ---- every op, module and engine path on each device and dtype against the float64 CPU result,
# with both kernel choices (16-bit CPU tensors take the portable steps under either)

CUDA_OP_CASES = op_cases(activations=("relu", "gelu", "silu", "identity"))
# Tolerance of a CUDA result in each dtype against the float64 CPU op (which the op tests check
# against fastmtl.reference): the dtype's rounding, a few operations deep.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPE_CASES)
@pytest.mark.parametrize("case", CUDA_OP_CASES, ids=[case_id(c) for c in CUDA_OP_CASES])
def test_every_op_on_device_matches_the_float64_cpu_op(case, device, dtype, kernels):
    name, args, _ = case
    expected = flatten(getattr(torch.ops.fastmtl, name)(*args))
    # Losses, scales, targets and task weights of 16-bit inputs are float32 (ops.loss_dtype).
    wide = {"pack_targets": 3, "multitask_head_loss": 3, "multitask_head_loss_backward": 0}
    device_args = list(convert(args, lambda t: t.to(device, dtype)))
    if name == "pack_targets":
        device_args = [[t.to(device) for t in args[0]], *args[1:4], torch.float32]
    elif name in wide:
        device_args[wide[name]] = args[wide[name]].to(device, ops.loss_dtype(dtype))
        if name == "multitask_head_loss_backward":
            device_args[4] = args[4].to(device, ops.loss_dtype(dtype))
    elif name.startswith("mtl_"):
        for i, a in enumerate(args):  # count_scale and task weights: loss dtype
            if isinstance(a, torch.Tensor) and a.dim() == 1 and a.shape[0] == 6:
                device_args[i] = a.to(device, ops.loss_dtype(dtype))
    got = flatten(getattr(torch.ops.fastmtl, name)(*device_args))
    rtol = TOLERANCE[dtype] * (10 if "gram" in name else 1)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.shape == e.shape, f"{name} output {i}"
        if name == "pack_targets":  # a copy: exact, NaN marking missing labels
            torch.testing.assert_close(g.cpu(), e.to(g.dtype), rtol=0, atol=0, equal_nan=True)
        elif e.numel() and e.is_floating_point():
            assert_rel_close(g, e, rtol=rtol, what=f"{name} output {i} ({kernels})")


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPE_CASES)
@pytest.mark.parametrize("trunk_kind", list(trunk_cases()))
def test_model_loss_backward_on_device_matches_float64_cpu(trunk_kind, device, dtype, kernels):
    torch.manual_seed(11)
    tasks = mixed_tasks(5)
    cpu_model = MultiTaskModel(trunk_cases()[trunk_kind](), MultiTaskHeads(6, tasks)).double()
    device_model = copy.deepcopy(cpu_model).to(device, dtype)
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(33, 10, dtype=torch.float64)
    targets = random_targets(tasks, 33, gen)
    cpu_model.loss(x, targets).backward()
    loss = device_model.loss(x.to(device, dtype), {k: v.to(device) for k, v in targets.items()})
    loss.backward()
    assert_rel_close(loss, cpu_model.loss(x, targets), rtol=TOLERANCE[dtype], what="loss")
    for (name, p), q in zip(cpu_model.named_parameters(), device_model.parameters()):
        assert_rel_close(q.grad, p.grad, rtol=10 * TOLERANCE[dtype], what=f"grad of {name}")


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPE_CASES)
@pytest.mark.parametrize("mode", ["exact", "rep"])
def test_model_mtl_backward_on_device_matches_float64_cpu(mode, device, dtype, kernels):
    torch.manual_seed(13)
    tasks = mixed_tasks(4)
    cpu_model = MultiTaskModel(FusedMLP(10, [16, 8]), MultiTaskHeads(8, tasks)).double()
    device_model = copy.deepcopy(cpu_model).to(device, dtype)
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(29, 10, dtype=torch.float64)
    targets = random_targets(tasks, 29, gen)
    expected = cpu_model.mtl_backward(x, targets, fastmtl.aggregation.UPGrad(), mode=mode)
    got = device_model.mtl_backward(
        x.to(device, dtype), {k: v.to(device) for k, v in targets.items()}, fastmtl.aggregation.UPGrad(), mode=mode
    )
    assert_rel_close(got.gram, expected.gram, rtol=10 * TOLERANCE[dtype], what="gram")
    for (name, p), q in zip(cpu_model.named_parameters(), device_model.parameters()):
        assert_rel_close(q.grad, p.grad, rtol=10 * TOLERANCE[dtype], what=f"grad of {name}")


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPE_CASES)
@pytest.mark.parametrize("trunk_kind", ["fused", "converted"])
def test_generic_mtl_backward_on_device_matches_float64_cpu(trunk_kind, device, dtype, kernels):
    torch.manual_seed(15)
    tasks = mixed_tasks(5)
    cpu_model = MultiTaskModel(trunk_cases()[trunk_kind](), MultiTaskHeads(6, tasks)).double()
    device_model = copy.deepcopy(cpu_model).to(device, dtype)
    gen = torch.Generator().manual_seed(16)
    x = torch.randn(21, 10, dtype=torch.float64)
    targets = random_targets(tasks, 21, gen)

    def step(model, inputs, device_targets):
        features = model.trunk(inputs)
        losses = model.heads.losses(features, device_targets)
        return fastmtl.mtl_backward(
            losses, features, fastmtl.aggregation.UPGrad(), shared_params=list(model.trunk.parameters())
        )

    expected = step(cpu_model, x, targets)
    got = step(device_model, x.to(device, dtype), {k: v.to(device) for k, v in targets.items()})
    assert_rel_close(got.gram, expected.gram, rtol=10 * TOLERANCE[dtype], what="gram")
    for (name, p), q in zip(cpu_model.trunk.named_parameters(), device_model.trunk.parameters()):
        assert_rel_close(q.grad, p.grad, rtol=10 * TOLERANCE[dtype], what=f"grad of {name}")
