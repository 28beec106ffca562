// Argument checks of the ops that take E stacked experts (weights [E, out, in] per layer):
// fused_experts, gated_mixture and the stacked form of fused_mlp_norm.
#pragma once

#include <string>
#include <vector>

#include "common/activation.h"
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

// The expert each gate entry weighs, [T * K]: expert_index, or 0..K-1 for every task when empty.
inline std::vector<int64_t> check_gates(const char* op, const at::Tensor& x, const at::Tensor& gate_weight,
                                        const at::Tensor& experts, c10::ArrayRef<int64_t> expert_index) {
  check_batch(x, op);
  check_dim(gate_weight, 3, op, "gate_weight");
  check_like(gate_weight, x, op, "gate_weight", "x");
  check_dim(experts, 3, op, "experts");
  check_like(experts, x, op, "experts", "x");
  const int64_t tasks = gate_weight.size(0), width = gate_weight.size(1);
  const int64_t num_experts = experts.size(0);
  TORCH_CHECK_VALUE(tasks >= 1, "fastmtl.", op, ": argument 'gate_weight' expected at least 1 task gate, got shape ",
                    shape_str(gate_weight.sizes()));
  TORCH_CHECK_VALUE(width >= 1, "fastmtl.", op,
                    ": argument 'gate_weight' expected at least 1 expert per gate, got shape ",
                    shape_str(gate_weight.sizes()));
  TORCH_CHECK_VALUE(num_experts >= 1, "fastmtl.", op, ": argument 'experts' expected at least 1 expert, got shape ",
                    shape_str(experts.sizes()));
  TORCH_CHECK_VALUE(experts.size(2) >= 1, "fastmtl.", op,
                    ": argument 'experts' expected at least 1 feature, got shape ", shape_str(experts.sizes()));
  check_size(gate_weight, 2, x.size(-1), op, "gate_weight", "x.shape[-1]");
  check_size(experts, 1, x.size(-2), op, "experts", "the batch size, x.shape[-2]");
  if (x.dim() == 3) check_size(x, 0, tasks, op, "x", "one gate input per task: gate_weight.shape[0]");
  std::vector<int64_t> index(tasks * width);
  if (expert_index.empty()) {
    TORCH_CHECK_VALUE(width == num_experts, "fastmtl.", op, ": argument 'gate_weight' expected size ", num_experts,
                      " in dimension 1 (one gate entry per expert, experts.shape[0], when 'expert_index' is empty), "
                      "got shape ",
                      shape_str(gate_weight.sizes()));
    for (int64_t t = 0; t < tasks; ++t)
      for (int64_t k = 0; k < width; ++k) index[t * width + k] = k;
    return index;
  }
  TORCH_CHECK_VALUE(static_cast<int64_t>(expert_index.size()) == tasks * width, "fastmtl.", op,
                    ": argument 'expert_index' expected ", tasks * width,
                    " entries (gate_weight.shape[0] * "
                    "gate_weight.shape[1]) or none, got ",
                    expert_index.size());
  for (size_t i = 0; i < expert_index.size(); ++i) {
    TORCH_CHECK_VALUE(expert_index[i] >= 0 && expert_index[i] < num_experts, "fastmtl.", op,
                      ": argument 'expert_index' expected entries in [0, ", num_experts, ") (experts.shape[0]), got ",
                      expert_index[i], " at position ", i);
    index[i] = expert_index[i];
  }
  return index;
}

// fused_experts_backward's arguments (shapes, dtypes, devices, the saved list); returns the activation.
// Shared by the op and the checks of its callers before they slice (ops/per_task_batched.cpp runs
// the op itself on every task's slice).
inline Activation check_fused_experts_backward_args(const at::Tensor& grad_out, const at::Tensor& x,
                                                    const std::vector<at::Tensor>& weights, const at::Tensor& out,
                                                    const std::vector<at::Tensor>& saved,
                                                    const std::string& activation) {
  constexpr const char* op = "fused_experts_backward";
  const Activation act = check_activation(op, activation);
  check_experts(op, x, weights, {});
  const size_t expected_saved = saved_kind(act) == SavedKind::Pre ? weights.size() : weights.size() - 1;
  TORCH_CHECK_VALUE(saved.size() == expected_saved, "fastmtl.fused_experts_backward: argument 'saved' expected ",
                    expected_saved, " tensors for activation '", activation, "', got ", saved.size());
  check_like(grad_out, out, op, "grad_out", "out");
  const std::vector<int64_t> out_shape{weights[0].size(0), x.size(-2), weights.back().size(1)};
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef(out_shape), "fastmtl.fused_experts_backward: argument 'out' ",
                    "expected shape ", shape_str(out_shape), ", got ", shape_str(out.sizes()));
  TORCH_CHECK_VALUE(grad_out.sizes() == out.sizes(), "fastmtl.fused_experts_backward: argument 'grad_out' expected ",
                    "shape ", shape_str(out.sizes()), " (the shape of 'out'), got ", shape_str(grad_out.sizes()));
  for (size_t l = 0; l < saved.size(); ++l) {
    const std::vector<int64_t> shape{weights[0].size(0), x.size(-2), weights[l].size(1)};
    TORCH_CHECK_VALUE(saved[l].sizes() == at::IntArrayRef(shape), "fastmtl.fused_experts_backward: argument '",
                      indexed("saved", l), "' expected shape ", shape_str(shape), ", got ",
                      shape_str(saved[l].sizes()));
    check_like(saved[l], x, op, indexed("saved", l), "x");
  }
  return act;
}

// gated_mixture_backward's arguments; returns the expert each gate entry weighs ([T * K]).
inline std::vector<int64_t> check_gated_mixture_backward_args(const at::Tensor& grad_mixtures, const at::Tensor& x,
                                                              const at::Tensor& gate_weight, const at::Tensor& experts,
                                                              const at::Tensor& gates,
                                                              c10::ArrayRef<int64_t> expert_index) {
  constexpr const char* op = "gated_mixture_backward";
  const std::vector<int64_t> index = check_gates(op, x, gate_weight, experts, expert_index);
  const int64_t tasks = gate_weight.size(0), width = gate_weight.size(1), rows = x.size(-2);
  const std::vector<int64_t> gate_shape =
      x.dim() == 2 ? std::vector<int64_t>{rows, tasks, width} : std::vector<int64_t>{tasks, rows, width};
  TORCH_CHECK_VALUE(gates.sizes() == at::IntArrayRef(gate_shape),
                    "fastmtl.gated_mixture_backward: argument 'gates' "
                    "expected shape ",
                    shape_str(gate_shape), ", got ", shape_str(gates.sizes()));
  check_like(gates, x, op, "gates", "x");
  const std::vector<int64_t> out_shape{tasks, rows, experts.size(2)};
  TORCH_CHECK_VALUE(grad_mixtures.sizes() == at::IntArrayRef(out_shape), "fastmtl.gated_mixture_backward: argument ",
                    "'grad_mixtures' expected shape ", shape_str(out_shape), ", got ",
                    shape_str(grad_mixtures.sizes()));
  check_like(grad_mixtures, x, op, "grad_mixtures", "x");
  return index;
}

}  // namespace fastmtl::ops
