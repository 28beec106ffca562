// Argument checks of fused_mlp and fused_mlp_backward, shared by the CPU entry points
// (csrc/ops/fused_mlp.cpp) and the CUDA ones (csrc/cuda/fused_mlp.cpp).
#pragma once

#include <string>
#include <vector>

#include "ops/trunk_checks.h"

namespace fastmtl::ops {

// x, weights and biases against each other (shapes chain layer to layer, one device and dtype).
inline Activation check_fused_mlp_args(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                                       const std::vector<at::Tensor>& biases, const std::string& activation) {
  constexpr const char* op = "fused_mlp";
  const Activation act = check_activation(op, activation);
  check_dim(x, 2, op, "x");
  check_compute_dtype(x, op, "x");
  TORCH_CHECK_VALUE(x.size(0) >= 1, "fastmtl.fused_mlp: argument 'x' expected a batch of at least 1 row, got shape ",
                    shape_str(x.sizes()));
  // in_features == 0 would make every layer-1 output its bias alone: no model has that, and cuBLASLt's
  // fused bias + ReLU epilogue (at::_addmm_activation) returned the bias without the ReLU there.
  TORCH_CHECK_VALUE(x.size(1) >= 1,
                    "fastmtl.fused_mlp: argument 'x' expected at least 1 input feature "
                    "(in_features >= 1), got shape ",
                    shape_str(x.sizes()));
  TORCH_CHECK_VALUE(!weights.empty(), "fastmtl.fused_mlp: argument 'weights' expected at least one layer, got 0");
  TORCH_CHECK_VALUE(biases.empty() || biases.size() == weights.size(),
                    "fastmtl.fused_mlp: argument 'biases' "
                    "expected ",
                    weights.size(), " tensors (one per layer) or none, got ", biases.size());
  int64_t in_features = x.size(1);
  for (size_t l = 0; l < weights.size(); ++l) {
    const std::string name = indexed("weights", l);
    check_dim(weights[l], 2, op, name);
    check_like(weights[l], x, op, name, "x");
    TORCH_CHECK_VALUE(weights[l].size(0) >= 1, "fastmtl.fused_mlp: argument '", name,
                      "' expected at least 1 output feature, got shape ", shape_str(weights[l].sizes()));
    check_size(weights[l], 1, in_features, op, name,
               l == 0 ? std::string("x.shape[1]") : "weights[" + std::to_string(l - 1) + "].shape[0]");
    in_features = weights[l].size(0);
    if (!biases.empty()) {
      const std::string bname = indexed("biases", l);
      check_dim(biases[l], 1, op, bname);
      check_like(biases[l], x, op, bname, "x");
      check_size(biases[l], 0, in_features, op, bname, name + ".shape[0]");
    }
  }
  return act;
}

// What fused_mlp returned must fit the trunk: the kernels read every saved tensor whole.
inline Activation check_fused_mlp_backward_args(const at::Tensor& grad_out, const at::Tensor& x,
                                                const std::vector<at::Tensor>& weights, const at::Tensor& out,
                                                const std::vector<at::Tensor>& saved, const std::string& activation) {
  constexpr const char* op = "fused_mlp_backward";
  const Activation act = check_activation(op, activation);
  check_trunk_weights(op, x, weights);
  check_trunk_saved(op, act, activation, x, weights, out, saved);
  check_like(grad_out, out, op, "grad_out", "out");
  TORCH_CHECK_VALUE(grad_out.sizes() == out.sizes(), "fastmtl.fused_mlp_backward: argument 'grad_out' expected shape ",
                    shape_str(out.sizes()), " (the shape of 'out'), got ", shape_str(grad_out.sizes()));
  return act;
}

}  // namespace fastmtl::ops
