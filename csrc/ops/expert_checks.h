// Argument checks of the ops that take E stacked experts (weights [E, out, in] per layer):
// fused_experts, gated_mixture and the stacked form of fused_mlp_norm.
#pragma once

#include <string>
#include <vector>

#include "ops/trunk_checks.h"

namespace fastmtl::ops {

// x [B, d] (shared by every expert) or [E, B, d] (one input per expert), in a compute dtype.
inline void check_batch(const at::Tensor& x, const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 3, "fastmtl.", op, ": argument 'x' expected a 2-D [B, d] or 3-D ",
                    "tensor, got shape ", shape_str(x.sizes()));
  check_compute_dtype(x, op, "x");
  TORCH_CHECK_VALUE(x.size(-2) >= 1, "fastmtl.", op, ": argument 'x' expected a batch of at least 1 row, got shape ",
                    shape_str(x.sizes()));
}

// Weights [E, out_l, in_l] chained layer to layer (in_0 = x.shape[-1]), biases [E, out_l] per
// layer or none, all on x's device and dtype; E >= 1 and x's leading size E when x is 3-D.
inline void check_experts(const char* op, const at::Tensor& x, const std::vector<at::Tensor>& weights,
                          const std::vector<at::Tensor>& biases) {
  check_batch(x, op);
  TORCH_CHECK_VALUE(x.size(-1) >= 1, "fastmtl.", op,
                    ": argument 'x' expected at least 1 input feature (in_features >= 1), got shape ",
                    shape_str(x.sizes()));
  TORCH_CHECK_VALUE(!weights.empty(), "fastmtl.", op, ": argument 'weights' expected at least one layer, got 0");
  TORCH_CHECK_VALUE(biases.empty() || biases.size() == weights.size(), "fastmtl.", op, ": argument 'biases' expected ",
                    weights.size(), " tensors (one per layer) or none, got ", biases.size());
  check_dim(weights[0], 3, op, "weights[0]");
  const int64_t experts = weights[0].size(0);
  TORCH_CHECK_VALUE(experts >= 1, "fastmtl.", op, ": argument 'weights[0]' expected at least 1 expert ",
                    "(num_experts >= 1), got shape ", shape_str(weights[0].sizes()));
  if (x.dim() == 3) check_size(x, 0, experts, op, "x", "one input per expert: weights[0].shape[0]");
  int64_t in_features = x.size(-1);
  for (size_t l = 0; l < weights.size(); ++l) {
    const std::string name = indexed("weights", l);
    check_dim(weights[l], 3, op, name);
    check_like(weights[l], x, op, name, "x");
    check_size(weights[l], 0, experts, op, name, "the number of experts, weights[0].shape[0]");
    TORCH_CHECK_VALUE(weights[l].size(1) >= 1, "fastmtl.", op, ": argument '", name,
                      "' expected at least 1 output feature, got shape ", shape_str(weights[l].sizes()));
    check_size(weights[l], 2, in_features, op, name,
               l == 0 ? std::string("x.shape[-1]") : "weights[" + std::to_string(l - 1) + "].shape[1]");
    in_features = weights[l].size(1);
    if (!biases.empty()) {
      const std::string bname = indexed("biases", l);
      check_dim(biases[l], 2, op, bname);
      check_like(biases[l], x, op, bname, "x");
      check_size(biases[l], 0, experts, op, bname, "the number of experts");
      check_size(biases[l], 1, in_features, op, bname, name + ".shape[1]");
    }
  }
}

}  // namespace fastmtl::ops
