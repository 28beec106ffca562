// The lean path of the dual-cone weights (UPGrad, DualProj) for one Gram matrix [T, T] on the CPU:
// the same checks, normalisation and solver as the op fastmtl::dual_cone_weights, without the
// dispatcher's work and without tensors other than the result. An unbatched call solves a T x T
// problem in a few microseconds, and the op's boxed call path (schema parsing of the Python
// arguments, the Autograd and CPU kernels, the double copies) cost several times that (issue 17).
// The binding (csrc/binding/unbatched_aggregation.cpp) takes this path only for plain CPU tensors;
// everything else goes through the op.
#pragma once

#include <ATen/ATen.h>

namespace fastmtl::ops {

// gram: a CPU [T, T] float32/float64 tensor, any strides; pref: undefined (1/T each) or a CPU [T]
// tensor. Raises the op's ValueError/TypeError naming the argument. Returns [T] in gram's dtype.
at::Tensor dual_cone_weights_unbatched(const at::Tensor& gram, const at::Tensor& pref, double norm_eps, double reg_eps,
                                       bool each);

}  // namespace fastmtl::ops
