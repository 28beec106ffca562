// The op schemas of the fastmtl namespace (the fused ops' in ops/schemas.h). Kernels are
// registered per device beside each op's entry point in this directory (one orchestration per op;
// kernels/select.h picks its steps); fake kernels live in python/fastmtl/ops/, autograd in
// autograd.cpp.
//
// Forward ops return, after their result, the tensors their backward needs; the Python wrappers
// return only the result. Backward ops return [0]-sized tensors for gradients not asked for.
//
// fastmtl_portable: the same fused ops with the same schemas, implemented for every dispatch key
// (CompositeExplicitAutograd) by the same orchestrations with the portable ATen steps forced. Why a
// second library: FakeTensor tracing (torch.compile, opcheck) and meta tensors reach fastmtl:: ops
// through the Python fake kernels, which keep shapes symbolic (a C++ Meta kernel with concrete
// int64 sizes would break torch.compile(dynamic=True)), so fastmtl:: ops on meta tensors never run
// the C++ orchestration. torch.ops.fastmtl_portable.* on meta tensors does: tests/test_meta.py calls
// every op that way, which proves the orchestrations make no data-dependent host synchronisation;
// tests/test_kernels_portable.py compares the portable and the custom steps on CPU in one process.
// It has no autograd (the tests call forward and backward ops directly).
#include <torch/library.h>

#include "ops/schemas.h"

TORCH_LIBRARY(fastmtl, m) {
  for (const char* schema : fastmtl::ops::kFusedOpSchemas) m.def(schema);

  // Aggregation: batches of Gram matrices gram [N, T, T] -> task weights [N, T], solved in double
  // precision on the CPU (csrc/cpu/aggregation/). Non-differentiable: the weights are constants of
  // the update, as in every method they implement.
  // UPGrad / DualProj: for each u [N, K, T], the v >= u minimising v^T H v, H = G / tr(G) + reg_eps I.
  m.def("dual_cone_projection(Tensor gram, Tensor u, float norm_eps, float reg_eps) -> Tensor");
  // UPGrad (each) / DualProj (not each) as weights in one call; gram [T, T] or [N, T, T], pref [T] or [N, T].
  m.def("dual_cone_weights(Tensor gram, Tensor pref, float norm_eps, float reg_eps, bool each) -> Tensor");
  // MGDA: the weights of the minimum-norm point of the convex hull of the gradients.
  m.def("min_norm_weights(Tensor gram) -> Tensor");
  m.def("cagrad_weights(Tensor gram, float c, float norm_eps) -> Tensor");
  // Nash-MTL (exponent 1) and FairGrad (exponent 1/alpha): the x > 0 with G x = x^(-exponent).
  // Returns (weights [N, T], relative residuals [N] in float64: above 1e-9 where Newton did not converge).
  m.def("power_system_weights(Tensor gram, float exponent) -> (Tensor, Tensor, Tensor)");
  // order [N, T, T]: for each task, the order in which the others are visited.
  m.def("pcgrad_weights(Tensor gram, Tensor order) -> Tensor");
  // order [N, T, T - 1]; targets [N, T, T] the EMA cosine targets. Returns (weights, new targets).
  m.def("gradvac_weights(Tensor gram, Tensor order, Tensor targets, float beta, float eps) -> (Tensor, Tensor)");
  m.def("aligned_mtl_weights(Tensor gram, Tensor pref, str scale_mode) -> Tensor");
  m.def("imtlg_weights(Tensor gram) -> Tensor");
  m.def("config_weights(Tensor gram, Tensor pref) -> Tensor");
}

TORCH_LIBRARY(fastmtl_portable, m) {
  for (const char* schema : fastmtl::ops::kFusedOpSchemas) m.def(schema);
}
