"""Every op runs end to end on the meta device (shapes only): the C++ orchestrations, with the
portable steps, through torch.ops.fastmtl_portable (csrc/ops/library.cpp says why a separate
library: torch.ops.fastmtl.* on meta tensors reaches the Python fake kernels instead). A meta tensor
has no data, so any data-dependent host synchronisation in an orchestration (.item(), reading a
pointer, a host branch on values) fails here. The outputs must have the shapes and dtypes of the
fake kernels (which serve torch.compile) and of the CPU op."""

import pytest
import torch

from op_cases import case_id, convert, flatten, op_cases

CASES = op_cases(activations=("relu", "gelu"))


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_op_runs_on_meta_with_the_shapes_of_the_cpu_op_and_the_fake(case):
    name, args, _ = case
    meta_args = convert(args, lambda t: t.to("meta"))
    if name == "pack_targets":  # integer and bool targets go to meta too
        meta_args = ([t.to("meta") for t in args[0]], *args[1:])
    if name == "fused_mlp_norm_backward":  # and the dropout masks among the saved tensors
        meta_args = (*meta_args[:9], [t.to("meta") for t in args[9]], *meta_args[10:])
    got = flatten(getattr(torch.ops.fastmtl_portable, name)(*meta_args))
    cpu = flatten(getattr(torch.ops.fastmtl, name)(*args))
    fake = flatten(getattr(torch.ops.fastmtl, name)(*meta_args))  # the Python fake kernel
    assert len(got) == len(cpu) == len(fake)
    for i, (g, c, f) in enumerate(zip(got, cpu, fake)):
        assert g.shape == c.shape == f.shape, f"{name} output {i}: {g.shape}, cpu {c.shape}, fake {f.shape}"
        assert g.dtype == c.dtype == f.dtype, f"{name} output {i}"
        # Host-side metadata (the Gram path each layer took) stays on the CPU, as in the fake.
        assert g.device.type == ("cpu" if c.dtype == torch.int64 else "meta"), f"{name} output {i}"


def test_float32_ops_on_meta():
    name, args, _ = next(c for c in CASES if c[0] == "mtl_trunk_gram")
    meta_args = convert(args, lambda t: t.to("meta", torch.float32))
    gram, jacobian, paths = torch.ops.fastmtl_portable.mtl_trunk_gram(*meta_args)
    assert gram.dtype == jacobian.dtype == torch.float32 and gram.is_meta
