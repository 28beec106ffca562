"""torch.autocast and torch.amp.GradScaler with the fused ops (issue 15: mixed precision).

Every fastmtl op has an Autocast rule on CPU and CUDA (csrc/ops/autocast.cpp): the GEMM ops run in
the autocast dtype, as nn.Linear does, their losses in float32, and the gradients of float32
parameters come back in float32. Checked here on the CPU (bfloat16 and float16 autocast) against
the same model in plain PyTorch under the same autocast (within 2x its error against float64), and
against the float64 model where no plain twin exists (MMoE, PLE, SoftSharedLinear); the CUDA rules
are the same code with the CUDA key (tests/test_cuda.py runs the 16-bit paths on a GPU).
"""

import copy

import pytest
import torch

import fastmtl
from conftest import DEVICES, assert_rel_close, assert_within_twice_plain, mixed_tasks, random_targets, trunk_cases
from fastmtl import reference
from fastmtl.nn import FusedMLP, MultiTaskHeads, MultiTaskModel

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]
# Relative tolerance of a result under autocast against the float64 model: the dtype's rounding,
# a few operations deep (as tests/test_cuda.py's TOLERANCE).
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 6e-2}


def fastmtl_ops():
    return sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("fastmtl::"))


@pytest.mark.parametrize("key", ["AutocastCPU", "AutocastCUDA"])
def test_every_op_has_an_autocast_rule(key):
    ops = fastmtl_ops()
    assert len(ops) >= 20, ops
    missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(op, key)]
    assert not missing, f"no {key} rule for {missing}"


def plain_trunk(widths=(10, 24, 12)):
    layers = []
    for n_in, n_out in zip(widths[:-1], widths[1:]):
        layers += [torch.nn.Linear(n_in, n_out), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers)


def fused_twin(plain: torch.nn.Sequential, kind: str) -> torch.nn.Module:
    """The plain trunk as FusedMLP (built and loaded) or as fastmtl.convert gives it."""
    if kind == "converted":
        return fastmtl.convert(copy.deepcopy(plain))[0]
    linears = [m for m in plain if isinstance(m, torch.nn.Linear)]
    fused = FusedMLP(linears[0].in_features, [lin.out_features for lin in linears])
    with torch.no_grad():
        for w, b, lin in zip(fused.weights, fused.biases, linears):
            w.copy_(lin.weight)
            b.copy_(lin.bias)
    return fused


def step(trunk, heads_loss, x, dtype, params):
    """Loss and the gradients of x and of params (the trunk's) of one step under autocast."""
    params = [x] + list(params)
    with torch.autocast("cpu", dtype=dtype):
        features = trunk(x)
        logits_dtype = features.dtype
        losses = heads_loss(features)
    assert logits_dtype == dtype, f"the trunk's output under autocast is {logits_dtype}, plain nn.Linear's is {dtype}"
    assert losses.dtype == torch.float32
    grads = torch.autograd.grad(losses.sum(), params)
    for p, g in zip(params, grads):
        assert g.dtype == p.dtype, "gradients come back in the parameters' dtype"
    return [losses] + list(grads)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("kind", ["fused", "converted"])
def test_trunk_and_heads_under_autocast_within_twice_plain_pytorch(kind, dtype):
    torch.manual_seed(0)
    tasks = mixed_tasks(5)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 10)
    targets = random_targets(tasks, 64, gen)
    plain = plain_trunk()
    fused = fused_twin(plain, kind)
    heads = MultiTaskHeads(12, tasks)

    def plain_heads(z):
        return reference.multitask_head_loss(z, heads.weight, heads.bias, targets, tasks).float()

    def fused_heads(z):
        return heads.losses(z, targets)

    exact_x = x.double().requires_grad_()
    plain64, heads64 = copy.deepcopy(plain).double(), copy.deepcopy(heads).double()
    exact_losses = reference.multitask_head_loss(plain64(exact_x), heads64.weight, heads64.bias, targets, tasks)
    exact = [exact_losses] + list(torch.autograd.grad(exact_losses.sum(), [exact_x] + list(plain64.parameters())))
    plain_result = step(plain, plain_heads, x.clone().requires_grad_(), dtype, plain.parameters())
    # The fused twin's parameters in the plain trunk's order (FusedMLP lists weights, then biases).
    twins = [next(q for q in fused.parameters() if torch.equal(q, p)) for p in plain.parameters()]
    fast_result = step(fused, fused_heads, x.clone().requires_grad_(), dtype, twins)
    names = ["losses", "dx"] + [n for n, _ in plain.named_parameters()]
    for name, f, p, e in zip(names, fast_result, plain_result, exact):
        assert_within_twice_plain(f, p, e, dtype, f"{kind} {name}")


def model_and_batch(trunk_kind, seed, batch):
    """A 5-task model, its float64 copy, and a float32 batch with missing labels."""
    torch.manual_seed(seed)
    tasks = mixed_tasks(5)
    model = MultiTaskModel(trunk_cases()[trunk_kind](), MultiTaskHeads(6, tasks))
    x = torch.randn(batch, 10)
    targets = random_targets(tasks, batch, torch.Generator().manual_seed(seed + 1))
    return model, copy.deepcopy(model).double(), x, targets


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("trunk_kind", ["fused", "mmoe", "ple", "soft"])
def test_model_under_autocast_matches_float64(trunk_kind, dtype):
    model, model64, x, targets = model_and_batch(trunk_kind, seed=2, batch=40)
    model64(x.double(), targets).loss.backward()
    with torch.autocast("cpu", dtype=dtype):
        out = model(x, targets)
    assert out.loss.dtype == torch.float32 and out.losses.dtype == torch.float32
    assert all(v.dtype == dtype for v in out.logits.values())
    out.loss.backward()
    assert_rel_close(out.loss, model64(x.double(), targets).loss, rtol=TOLERANCE[dtype], what="loss")
    for (name, p), q in zip(model64.named_parameters(), model.parameters()):
        assert q.grad.dtype == torch.float32, name
        assert_rel_close(q.grad, p.grad, rtol=10 * TOLERANCE[dtype], what=f"grad of {name}")


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("mode", ["exact", "rep"])
@pytest.mark.parametrize("trunk_kind", ["fused", "mmoe"])
def test_mtl_backward_under_autocast_matches_float64(trunk_kind, mode, dtype):
    model, model64, x, targets = model_and_batch(trunk_kind, seed=4, batch=37)
    expected = model64.mtl_backward(x.double(), targets, fastmtl.aggregation.UPGrad(), mode=mode)
    with torch.autocast("cpu", dtype=dtype):
        got = model.mtl_backward(x, targets, fastmtl.aggregation.UPGrad(), mode=mode)
    assert got.gram.dtype == torch.float32, "a 16-bit Gram would keep too few digits for the aggregators"
    assert_rel_close(got.gram, expected.gram, rtol=10 * TOLERANCE[dtype], what="gram")
    assert_rel_close(got.weights, expected.weights, rtol=10 * TOLERANCE[dtype], what="weights")
    for (name, p), q in zip(model64.named_parameters(), model.parameters()):
        assert q.grad.dtype == torch.float32, name
        assert_rel_close(q.grad, p.grad, rtol=10 * TOLERANCE[dtype], what=f"grad of {name}")


def test_autocast_leaves_float64_alone():
    """As for at::mm: autocast casts float32 only; a float64 model runs in float64."""
    torch.manual_seed(6)
    trunk = FusedMLP(5, [7, 3]).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = trunk(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, trunk(x), rtol=0, atol=0)


def test_autocast_does_not_change_the_callers_tensors():
    torch.manual_seed(7)
    trunk = FusedMLP(5, [7, 3])
    before = [p.detach().clone() for p in trunk.parameters()]
    weights = list(trunk.weights)
    x = torch.randn(4, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fastmtl.ops.fused_mlp(x, weights, list(trunk.biases), "relu")
    assert x.dtype == torch.float32 and all(w.dtype == torch.float32 for w in weights)
    for b, p in zip(before, trunk.parameters()):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)


def test_autocast_disabled_region_runs_in_float32():
    trunk = FusedMLP(5, [7, 3])
    x = torch.randn(4, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autocast("cpu", enabled=False):
            out = trunk(x)
    assert out.dtype == torch.float32


# ---- GradScaler (float16 autocast)


def scaler_model():
    torch.manual_seed(8)
    tasks = [fastmtl.Task("y", "regression"), fastmtl.Task("c", "binary")]
    return MultiTaskModel(FusedMLP(6, [16, 8]), MultiTaskHeads(8, tasks))


def scaler_batch():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(32, 6, generator=gen)
    return x, {"y": torch.randn(32, generator=gen), "c": (torch.rand(32, generator=gen) > 0.5).float()}


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scaler_step_equals_the_unscaled_step(device):
    model, reference_model = scaler_model().to(device), scaler_model().to(device)
    x, targets = scaler_batch()
    x, targets = x.to(device), {k: v.to(device) for k, v in targets.items()}
    scaler = torch.amp.GradScaler(device, init_scale=2.0**12)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.autocast(device, dtype=torch.float16):
        loss = model(x, targets).loss
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    with torch.autocast(device, dtype=torch.float16):
        reference_model(x, targets).loss.backward()
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
        assert_rel_close(p.grad, q.grad, rtol=2e-3, what=f"unscaled grad of {name}")
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**12
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters())), "the step was taken"


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scaler_skips_a_step_whose_float16_gradients_overflow(device):
    model = scaler_model().to(device)
    x, targets = scaler_batch()
    x, targets = x.to(device), {k: v.to(device) for k, v in targets.items()}
    scaler = torch.amp.GradScaler(device, init_scale=2.0**60)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast(device, dtype=torch.float16):
        loss = model(x, targets).loss
    scaler.scale(loss).backward()  # float16 activations' gradients overflow to inf at this scale
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**60, "the overflow was found and the scale reduced"
    for b, p in zip(before, model.parameters()):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=0, msg="the overflowing step is skipped")


def test_compiled_step_under_autocast_matches_eager():
    torch.manual_seed(10)
    tasks = [fastmtl.Task("y", "regression"), fastmtl.Task("b", "binary")]
    model = MultiTaskModel(FusedMLP(10, [32, 32]), MultiTaskHeads(32, tasks))
    x, targets = torch.randn(16, 10), {"y": torch.randn(16), "b": (torch.rand(16) > 0.5).float()}

    def loss_of(inputs, labels):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(inputs, labels).loss

    compiled = torch.compile(loss_of, fullgraph=True)(x, targets)
    compiled.backward()
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = loss_of(x, targets)
    eager.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-2, atol=1e-3)
    for p, g in zip(model.parameters(), compiled_grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, p.grad, rtol=2e-2, atol=2e-3)
