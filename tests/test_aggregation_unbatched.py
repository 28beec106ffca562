"""The lean path of UPGrad and DualProj on one CPU Gram matrix (fastmtl._C.dual_cone_weights_unbatched,
csrc/binding/unbatched_aggregation.cpp): the same weights and the same errors as the op path, and
the op path wherever the call is not a plain one (autograd, functorch, dispatch modes, fake tensors,
torch.compile, batches)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastmtl
from fastmtl import _C
from fastmtl.aggregation import DualProj, UPGrad

METHODS = {"UPGrad": (UPGrad, True), "DualProj": (DualProj, False)}


def conflicting_gram(T: int, dtype=torch.float64, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    signs = torch.where(torch.rand(T, 1, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    J = 0.7 * signs * torch.randn(1, 50, generator=g, dtype=torch.float64)
    J = J + torch.randn(T, 50, generator=g, dtype=torch.float64)
    return (J @ J.T).to(dtype)


def op_weights(gram, pref, each, norm_eps=0.0, reg_eps=1e-4):
    """The registered op on the same problem, as a batch of one: the path the lean one replaces."""
    T = gram.shape[0]
    pref = torch.full((T,), 1.0 / T, dtype=torch.float64) if pref is None else pref
    return fastmtl.ops.dual_cone_weights(gram[None], pref[None], norm_eps, reg_eps, each)[0]


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T", [1, 2, 3, 8, 17, 40])
def test_lean_path_equals_the_op(name, dtype, T):
    method, each = METHODS[name]
    for seed in range(5):
        gram = conflicting_gram(T, dtype, seed)
        before = gram.clone()
        lean = _C.dual_cone_weights_unbatched(gram, None, 0.0, 1e-4, each)
        assert lean is not None and lean.dtype == dtype and lean.shape == (T,)
        torch.testing.assert_close(lean, op_weights(gram, None, each), rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(method()(gram), lean, rtol=0, atol=0)
        assert torch.equal(gram, before)  # the input is not modified


@pytest.mark.parametrize("name", METHODS)
def test_lean_path_takes_strided_grams_preferences_and_eps(name):
    method, each = METHODS[name]
    base = conflicting_gram(12, seed=3)
    wide = torch.zeros(12, 24, dtype=torch.float64)
    wide[:, ::2] = base
    views = {"transposed": base.T, "strided": wide[:, ::2], "contiguous": base}
    pref = torch.linspace(0.5, 2.0, 12, dtype=torch.float32)
    expected = op_weights(base, pref.double(), each, norm_eps=1e-3, reg_eps=1e-6)
    for view in views.values():
        lean = _C.dual_cone_weights_unbatched(view, pref, 1e-3, 1e-6, each)
        torch.testing.assert_close(lean, expected, rtol=1e-12, atol=1e-15)
        got = method(pref_vector=pref, norm_eps=1e-3, reg_eps=1e-6)(view)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)
    # Python ints for the eps are numbers too.
    assert _C.dual_cone_weights_unbatched(base, None, 0, 1, each) is not None


def _requires_grad():
    return conflicting_gram(4).requires_grad_()


@pytest.mark.parametrize(
    "gram, pref",
    [
        pytest.param(_requires_grad(), None, id="requires-grad"),
        pytest.param(conflicting_gram(4)[None], None, id="batched"),
        pytest.param(torch.zeros(0, 0, dtype=torch.float64), None, id="T=0"),
        pytest.param(torch.zeros(4, 4, dtype=torch.float64, device="meta"), None, id="meta"),
        pytest.param(conflicting_gram(4), torch.ones(3, dtype=torch.float64), id="pref-not-[T]"),
        pytest.param(conflicting_gram(4), torch.ones(4, dtype=torch.float64, device="meta"), id="pref-meta"),
        pytest.param(conflicting_gram(4).tolist(), None, id="not-a-tensor"),
    ],
)
def test_lean_path_declines_what_is_not_a_plain_call(gram, pref):
    # None: the aggregator then takes the op path, which gives these their own results or errors.
    assert _C.dual_cone_weights_unbatched(gram, pref, 0.0, 1e-4, True) is None


class RecordingMode(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", METHODS)
def test_a_dispatch_mode_sees_the_op(name):
    method, each = METHODS[name]
    gram = conflicting_gram(5)
    with RecordingMode() as mode:
        weights = method()(gram)
    assert any("fastmtl.dual_cone_weights" in op for op in mode.ops), mode.ops
    torch.testing.assert_close(weights, op_weights(gram, None, each), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", METHODS)
def test_fake_tensors_and_vmap_take_the_op_path(name):
    from torch._subclasses.fake_tensor import FakeTensorMode

    method, each = METHODS[name]
    for _ in range(2):  # a second fake mode: nothing fake of the first one is kept
        with FakeTensorMode() as fake:
            weights = method()(fake.from_tensor(conflicting_gram(6)))
        assert weights.shape == (6,)
    gram = conflicting_gram(6)
    torch.testing.assert_close(method()(gram[None])[0], op_weights(gram, None, each), rtol=1e-12, atol=1e-15)
    grams = torch.stack([conflicting_gram(6, seed=s) for s in range(3)])
    batched = torch.vmap(method())(grams)
    expected = torch.stack([op_weights(g, None, each) for g in grams])
    torch.testing.assert_close(batched, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", METHODS)
def test_torch_compile_fullgraph_traces_the_op_path(name):
    method, each = METHODS[name]
    aggregator = method()
    compiled = torch.compile(lambda g: aggregator(g) * 2.0, fullgraph=True, backend="eager")
    gram = conflicting_gram(5)
    torch.testing.assert_close(compiled(gram), 2.0 * op_weights(gram, None, each), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lean_path_errors_name_the_method_and_argument(name, dtype):
    method = METHODS[name][0]
    nan = conflicting_gram(3, dtype)
    nan[1, 1] = float("nan")
    with pytest.raises(ValueError, match=rf"fastmtl.aggregation.{name}: .*argument 'gram' expected finite values"):
        method()(nan)
    asymmetric = conflicting_gram(3, dtype)
    asymmetric[0, 1] += 1.0
    with pytest.raises(ValueError, match=rf"{name}: .*argument 'gram' expected symmetric"):
        method()(asymmetric)
    negative = -torch.eye(3, dtype=dtype)
    with pytest.raises(ValueError, match=rf"{name}: .*argument 'gram' expected a non-negative diagonal"):
        method()(negative)
    with pytest.raises(TypeError, match=rf"{name}: .*argument 'gram' expected dtype torch.float32 or torch.float64"):
        method()(torch.eye(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"'pref_vector' expected shape \[3\]"):
        method(pref_vector=torch.ones(2))(torch.eye(3, dtype=dtype))


def test_raw_entry_validates_its_own_arguments():
    gram = conflicting_gram(3)
    with pytest.raises(ValueError, match="argument 'norm_eps' expected a finite value >= 0, got -1"):
        _C.dual_cone_weights_unbatched(gram, None, -1.0, 1e-4, True)
    with pytest.raises(ValueError, match="argument 'reg_eps' expected a finite value >= 0"):
        _C.dual_cone_weights_unbatched(gram, None, 0.0, float("nan"), True)
    with pytest.raises(TypeError, match="must be real number"):
        _C.dual_cone_weights_unbatched(gram, None, "0", 1e-4, True)
    with pytest.raises(ValueError, match="argument 'pref' expected finite values"):
        _C.dual_cone_weights_unbatched(gram, torch.tensor([1.0, float("inf"), 1.0]), 0.0, 1e-4, True)
    with pytest.raises(TypeError, match="argument 'pref' expected dtype torch.float32 or torch.float64"):
        _C.dual_cone_weights_unbatched(gram, torch.ones(3, dtype=torch.int64), 0.0, 1e-4, True)
    with pytest.raises(TypeError, match="expected 5 arguments"):
        _C.dual_cone_weights_unbatched(gram, None, 0.0)
