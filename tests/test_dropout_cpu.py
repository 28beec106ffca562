"""The CPU dropout of the tower ops (csrc/cpu/dropout.cpp): a counter-based mask, its loops written
without a branch so they vectorise, compiled for AVX2 and for the baseline ISA. Both give the same
bits for the same seed (masks and outputs), and a dropped entry is exactly 0 whatever the input
(inf and NaN included), a kept one the input times 1 / (1 - p)."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastmtl import ops

P = 0.3


def identity_tower(x, dtype):
    """One layer with an identity weight, no norm, no activation: the op's output is dropout(x)."""
    eye = torch.eye(x.shape[1], dtype=dtype)
    return ops.fused_mlp_norm(x.to(dtype), [eye], [], norm="none", activation="identity", dropout=P, training=True)


SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from fastmtl import ops
    x = torch.linspace(-3.0, 3.0, 4099 * 7).reshape(4099, 7)
    out = {}
    for name in ("float32", "float64", "bfloat16"):
        dtype = getattr(torch, name)
        torch.manual_seed(11)
        xi = x.to(dtype).requires_grad_()
        y = ops.fused_mlp_norm(xi, [torch.eye(7, dtype=dtype)], [], norm="none", activation="identity",
                               dropout=0.3, training=True)
        (g,) = torch.autograd.grad(y, xi, torch.ones_like(y))
        out[name] = (y.detach(), g)
    torch.save(out, sys.argv[1])
    """
)


def test_baseline_and_avx2_loops_give_the_same_masks_and_values(tmp_path):
    results = []
    for disable in ("0", "1"):
        path = tmp_path / f"dropout-{disable}.pt"
        env = dict(os.environ, FASTMTL_DISABLE_AVX2=disable)
        done = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        results.append(torch.load(path))
    for name in ("float32", "float64", "bfloat16"):
        (y0, g0), (y1, g1) = results[0][name], results[1][name]
        assert torch.equal(y0, y1) and torch.equal(g0, g1), name
        kept = (y0 != 0).float().mean().item()
        assert abs(kept - (1 - P)) < 0.01, (name, kept)  # 28693 entries: 4 sigma is 0.011


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 2.0])
def test_dropped_entries_are_zero_whatever_the_input(dtype, value):
    torch.manual_seed(3)
    # One column through a [1, 1] identity weight: the GEMM passes inf and NaN through unchanged.
    y = identity_tower(torch.full((2048, 1), value), dtype).float()[:, 0]
    zero = y == 0
    assert 0 < int(zero.sum()) < 2048
    assert not torch.signbit(y[zero]).any()  # +0, as a masked-out entry
    kept = y[~zero]
    if math.isnan(value):
        assert torch.isnan(kept).all()
    else:
        expected = torch.full_like(kept, value / (1 - P))
        torch.testing.assert_close(kept, expected, rtol=0 if dtype == torch.float64 else 1e-2, atol=0)


def test_the_mask_follows_the_seed_and_not_the_thread_count():
    x = torch.ones(3001, 5)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.manual_seed(5)
            outs.append(identity_tower(x, torch.float32))
        torch.manual_seed(6)
        other = identity_tower(x, torch.float32)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], other)
