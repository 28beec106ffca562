"""Shared test helpers: devices, tolerances, seeded random inputs for the ops."""

import importlib.util
import math
import os
import pathlib

import pytest
import torch
from torch import nn

import fastmtl
from fastmtl import Task
from fastmtl.nn import PLE, FusedMLP, MMoE, SoftSharedLinear

# The plain PyTorch module of each fused activation, the oracle's layers.
PLAIN_ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}

TESTS = pathlib.Path(__file__).resolve().parent
# The package the tests import, wherever it is installed (site-packages in CI, the source tree in an
# editable install): its doctests are collected from there, so the modules pytest imports for them
# are the ones already imported (collecting python/fastmtl of the checkout next to an installed copy
# fails with "import file mismatch").
PACKAGE = pathlib.Path(fastmtl.__file__).resolve().parent
# Docstring examples that need an optional dependency (the 'apps' extra), by module prefix: skipped
# without it, as the core package's tests are.
DOCTEST_REQUIREMENTS = {"fastmtl.data.": "sklearn"}


def pytest_configure(config):
    """``python -m pytest tests`` runs the package's docstring examples too: pyproject.toml's
    ``--doctest-modules`` covers python/fastmtl only when it is collected, so add it when the
    whole tests directory (and nothing else) is asked for."""
    asked = [pathlib.Path(arg).resolve() for arg in config.args]
    if config.getoption("doctestmodules") and asked and all(path == TESTS for path in asked):
        config.args.append(str(PACKAGE))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if type(item).__name__ != "DoctestItem":
            continue
        for prefix, module in DOCTEST_REQUIREMENTS.items():
            if item.name.startswith(prefix) and importlib.util.find_spec(module) is None:
                item.add_marker(pytest.mark.skip(reason=f"the example needs {module} (the apps extra)"))


HAS_CUDA_KERNELS = torch.cuda.is_available() and fastmtl.build_info()["cuda"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    """Every op test runs on each device; CUDA only where a GPU and CUDA kernels are present."""
    if request.param == "cuda" and not HAS_CUDA_KERNELS:
        pytest.skip("fastmtl was built without CUDA kernels")
    return torch.device(request.param)


@pytest.fixture(params=["custom", "portable"])
def kernels(request, monkeypatch):
    """FASTMTL_KERNELS for the test: the custom kernels of the device, or the portable ATen steps
    (csrc/kernels/select.h; read by every op call, so setting it here switches the test's ops)."""
    monkeypatch.setenv("FASTMTL_KERNELS", request.param)
    return request.param


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, what: str = ""):
    """Elementwise |a - e| <= rtol * |e| + rtol * max|e|: relative to each entry, with an absolute
    floor at rtol times the tensor's scale (so entries that cancel to ~0 are judged at that scale).
    The comparison is done in float64 on the CPU."""
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-30), msg=lambda m: f"{what}: {m}")


def end_rank_process() -> None:
    """The last call of a torch.multiprocessing.spawn rank that has saved its results and destroyed
    its process group: exit at once. At the interpreter's teardown, torch's gloo threads abort the
    process now and then ("terminate called without an active exception", SIGABRT, after
    destroy_process_group returned on both ranks: about 1 run in 15 here, with plain nn.Linear
    models too), which mp.spawn reports as a failed rank. An exception before this call still
    propagates and fails the test."""
    os._exit(0)


def detach_all(arg):
    """A tensor or a list of tensors, detached; anything else as it is."""
    if isinstance(arg, torch.Tensor):
        return arg.detach()
    if isinstance(arg, list):
        return [t.detach() for t in arg]
    return arg


def assert_same_step(got, want, rtol):
    """Two engine steps, each ``(result, {parameter name: .grad})``, agree: the same parameters got
    gradients, and the gradients, Gram matrices and weights are close."""
    (got_result, got_grads), (want_result, want_grads) = got, want
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        assert_rel_close(got_grads[name], want_grads[name], rtol, name)
    assert_rel_close(got_result.gram, want_result.gram, rtol, "gram")
    assert_rel_close(got_result.weights, want_result.weights, rtol, "weights")


def mixed_tasks(num_tasks: int, num_classes: int = 5):
    """num_tasks tasks cycling through every kind and loss, with varied widths."""
    kinds = [
        dict(kind="regression", loss="mse", num_outputs=1),
        dict(kind="binary"),
        dict(kind="multiclass", num_outputs=num_classes),
        dict(kind="regression", loss="l1", num_outputs=3),
        dict(kind="regression", loss="huber", num_outputs=2),
        dict(kind="multiclass", num_outputs=2),
    ]
    return [Task(f"task{i}", **kinds[i % len(kinds)], weight=0.5 + (i % 3)) for i in range(num_tasks)]


def random_targets(tasks, batch: int, generator: torch.Generator, missing: float = 0.2, unlabelled=()):
    """Dict name -> targets with a `missing` fraction of labels missing (NaN / -100) and the tasks
    named in `unlabelled` missing entirely."""
    targets = {}
    for task in tasks:
        shape = (batch,) if task.target_width == 1 else (batch, task.target_width)
        hide = torch.rand(shape, generator=generator) < missing
        if task.name in unlabelled:
            hide[...] = True
        if task.kind == "multiclass":
            t = torch.randint(0, task.num_outputs, shape, generator=generator)
            t[hide] = -100
        elif task.kind == "binary":
            t = torch.randint(0, 2, shape, generator=generator).double()
            t[hide] = math.nan
        else:
            # Spread wide enough that l1 / huber see both of their branches.
            t = 3.0 * torch.randn(shape, generator=generator, dtype=torch.float64)
            t[hide] = math.nan
        targets[task.name] = t
    return targets


def random_head_inputs(tasks, batch: int, features: int, generator: torch.Generator, dtype=torch.float64):
    """(z, weight, bias) for multitask_head_loss, float64 leaves on the CPU."""
    total = sum(t.num_outputs for t in tasks)
    z = torch.randn(batch, features, generator=generator, dtype=dtype)
    weight = torch.randn(total, features, generator=generator, dtype=dtype) / math.sqrt(features)
    bias = 0.1 * torch.randn(total, generator=generator, dtype=dtype)
    return z, weight, bias


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


def trunk_cases():
    """Trunk factories of every kind a MultiTaskModel takes (in 10 features, out 6, 5 tasks)."""
    return {
        "fused": lambda: FusedMLP(10, [16, 6], activation="gelu"),
        "mmoe": lambda: MMoE(10, 4, [12, 6], 5),
        "ple": lambda: PLE(10, 2, 1, [6], 5, num_levels=2),
        "soft": lambda: SoftSharedLinear(10, 6, 5),
        "converted": lambda: fastmtl.convert(
            torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 6), torch.nn.ReLU())
        )[0],
    }
