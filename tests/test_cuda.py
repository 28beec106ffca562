"""What only the CUDA kernels have: 16-bit dtypes (error within 2x plain PyTorch's in the same dtype),
opcheck and torch.compile on CUDA, CUDA-graph capture of a training step, bit-for-bit repeatable
reductions, the task-table split of the kernels (> 128 tasks), NaN for invalid targets (the CPU op
raises; CUDA cannot without a host synchronisation), and clear errors for mixed devices.

The accuracy criterion runs on CPU in float32 as well (fastmtl float32 against PyTorch float32),
so its logic is exercised where there is no GPU; the 16-bit dtypes and everything else here need
a GPU and fastmtl's CUDA kernels, and skip otherwise.
"""

import copy
import math

import pytest
import torch

from fastmtl import Task, ops, reference
from fastmtl.nn import FusedMLP, MultiTaskHeads, MultiTaskModel
from conftest import HAS_CUDA_KERNELS, assert_rel_close, mixed_tasks, random_head_inputs, random_targets

needs_cuda = pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a GPU and fastmtl built with CUDA kernels")

ACTIVATIONS = list(ops.ACTIVATIONS)
HALF_DTYPES = [torch.bfloat16, torch.float16]
# (device, dtype) pairs of the accuracy criterion: float32 everywhere, 16-bit only on CUDA.
ACCURACY_CASES = [("cpu", torch.float32)] + [
    pytest.param("cuda", dtype, marks=needs_cuda) for dtype in [torch.float32] + HALF_DTYPES
]


def scaled_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64 on the CPU."""
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    scale = expected.abs().max().item()
    return (actual - expected).abs().max().item() / max(scale, 1e-30)


def assert_within_twice_plain(fast, plain, exact, dtype, what):
    """fastmtl's error against the float64 result is at most 2x plain PyTorch's in the same dtype,
    plus two units of the dtype's rounding (so that a plain result that happens to be exact does
    not demand exactness)."""
    fast_err, plain_err = scaled_error(fast, exact), scaled_error(plain, exact)
    assert math.isfinite(fast_err), f"{what}: non-finite"
    bound = 2.0 * plain_err + 2.0 * torch.finfo(dtype).eps
    assert fast_err <= bound, f"{what}: fastmtl error {fast_err:.3g} > 2 x plain PyTorch {plain_err:.3g} (+2 eps)"


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


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_16bit_on_cpu_raises(dtype):
    x = torch.randn(3, 4, dtype=dtype)
    with pytest.raises(TypeError, match=r"'x' expected dtype torch.float32 or torch.float64, got torch\.b?float16"):
        ops.fused_mlp(x, [torch.randn(2, 4, dtype=dtype)], None, "relu")


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
    out, saved = torch.ops.fastmtl.fused_mlp.default(x.detach(), [w.detach() for w in ws], [b.detach() for b in bs], activation)
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
    return MultiTaskModel(
        FusedMLP(24, [64, 32], activation=activation), MultiTaskHeads(32, tasks)
    ).to("cuda", dtype)


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
    assert torch.equal(packed.cpu().nan_to_num(nan=-7.0), reference.pack_targets(targets, tasks, torch.float64).nan_to_num(nan=-7.0))
    got = ops.multitask_head_loss(*inputs, cuda_targets, tasks)
    assert_rel_close(got, ref, what="losses")
    assert got[7].item() == 0.0 and got[129].item() == 0.0
    for g, rg, name in zip(torch.autograd.grad(got, inputs, upstream.cuda().float()), ref_grads, ["dz", "dW", "db"]):
        assert_rel_close(g, rg, what=name)


@needs_cuda
@pytest.mark.parametrize(
    "task, bad",
    [
        (Task("b", "binary"), 0.5),
        (Task("c", "multiclass", num_outputs=3), 3.0),
        (Task("c", "multiclass", num_outputs=3), 1.5),
        (Task("r", "regression", num_outputs=2), math.inf),
    ],
    ids=["bce-not-0-1", "ce-out-of-range", "ce-not-integer", "regression-inf"],
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
    with pytest.raises(TypeError, match=r"'targets' expected dtype torch.float32 \(losses, scales and targets of a torch.bfloat16 'z'"):
        ops.multitask_head_loss(z, w, b, packed, tasks)
