// Argument checks of the ops that take a fused trunk (its input, weights, and what its forward
// saved): fused_mlp's backward and the per-task engine ops.
#pragma once

#include <string>
#include <vector>

#include "common/activation.h"
#include "ops/checks.h"

namespace fastmtl::ops {

inline Activation check_activation(const char* op, const std::string& name) {
  Activation act;
  TORCH_CHECK_VALUE(parse_activation(name, &act), "fastmtl.", op, ": argument 'activation' expected one of ",
                    activation_names(), ", got '", name, "'");
  return act;
}

// x [B, d0] float (16-bit floats on CUDA too), weights chained layer to layer (W_l [d_l, d_{l-1}]),
// all on x's device and dtype.
inline void check_trunk_weights(const char* op, const at::Tensor& x, const std::vector<at::Tensor>& weights) {
  check_dim(x, 2, op, "x");
  check_compute_dtype(x, op, "x");
  TORCH_CHECK_VALUE(x.size(0) >= 1, "fastmtl.", op, ": argument 'x' expected a batch of at least 1 row, got shape ",
                    shape_str(x.sizes()));
  TORCH_CHECK_VALUE(!weights.empty(), "fastmtl.", op, ": argument 'weights' expected at least one layer, got 0");
  int64_t in_features = x.size(1);
  for (size_t l = 0; l < weights.size(); ++l) {
    const std::string name = indexed("weights", l);
    check_dim(weights[l], 2, op, name);
    check_like(weights[l], x, op, name, "x");
    check_size(weights[l], 1, in_features, op, name,
               l == 0 ? std::string("x.shape[1]") : "weights[" + std::to_string(l - 1) + "].shape[0]");
    in_features = weights[l].size(0);
  }
}

// What fused_mlp's forward returned for this trunk: out [B, d_L] and saved (one [B, d_l] per layer
// for pre-activation activations, per layer but the last otherwise).
inline void check_trunk_saved(const char* op, Activation act, const std::string& activation, const at::Tensor& x,
                              const std::vector<at::Tensor>& weights, const at::Tensor& out,
                              const std::vector<at::Tensor>& saved) {
  const int64_t rows = x.size(0);
  const size_t expected = saved_kind(act) == SavedKind::Pre ? weights.size() : weights.size() - 1;
  TORCH_CHECK_VALUE(saved.size() == expected, "fastmtl.", op, ": argument 'saved' expected ", expected,
                    " tensors for activation '", activation, "' (as fused_mlp returned them), got ", saved.size());
  check_like(out, x, op, "out", "x");
  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(0) == rows && out.size(1) == weights.back().size(0), "fastmtl.", op,
                    ": argument 'out' expected shape [", rows, ", ", weights.back().size(0), "], got ",
                    shape_str(out.sizes()));
  for (size_t l = 0; l < saved.size(); ++l) {
    const std::string name = indexed("saved", l);
    check_like(saved[l], x, op, name, "x");
    TORCH_CHECK_VALUE(saved[l].dim() == 2 && saved[l].size(0) == rows && saved[l].size(1) == weights[l].size(0),
                      "fastmtl.", op, ": argument '", name, "' expected shape [", rows, ", ", weights[l].size(0),
                      "], got ", shape_str(saved[l].sizes()));
  }
}

inline std::vector<at::Tensor> contiguous_all(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

}  // namespace fastmtl::ops
