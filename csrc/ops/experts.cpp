// fastmtl::fused_experts, fastmtl::gated_mixture and their backward ops: argument checks, then the
// one orchestration of each (ops/expert_stack.cpp, ops/gating.cpp) with the steps kernels/select.h
// picks for the device.
#include <torch/library.h>

#include "common/activation.h"
#include "kernels/select.h"
#include "ops/expert_checks.h"
#include "ops/expert_stack.h"
#include "ops/gating.h"

namespace fastmtl::ops {
namespace {

template <kernels::Choice choice>
std::tuple<at::Tensor, std::vector<at::Tensor>> fused_experts_entry(const at::Tensor& x,
                                                                    const std::vector<at::Tensor>& weights,
                                                                    const std::vector<at::Tensor>& biases,
                                                                    const std::string& activation) {
  const Activation act = check_activation("fused_experts", activation);
  check_experts("fused_experts", x, weights, biases);
  const OpEntryGuard guard(x);
  return experts_forward(kernels::steps_for("fused_experts", x, choice), x.contiguous(), contiguous_all(weights),
                         contiguous_all(biases), act);
}

template <kernels::Choice choice>
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> fused_experts_backward_entry(
    const at::Tensor& grad_out, const at::Tensor& x, const std::vector<at::Tensor>& weights, const at::Tensor& out,
    const std::vector<at::Tensor>& saved, const std::string& activation, bool has_bias, bool need_input_grad) {
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
  const OpEntryGuard guard(x);
  return experts_backward(kernels::steps_for(op, x, choice), grad_out.contiguous(), x.contiguous(),
                          contiguous_all(weights), out.contiguous(), contiguous_all(saved), act, has_bias,
                          need_input_grad);
}

// ---- gated_mixture

// The expert each gate entry weighs, [T * K]: expert_index, or 0..K-1 for every task when empty.
std::vector<int64_t> check_gates(const char* op, const at::Tensor& x, const at::Tensor& gate_weight,
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

void check_gate_bias(const char* op, const at::Tensor& bias, const at::Tensor& gate_weight, const at::Tensor& x) {
  check_dim(bias, 2, op, "gate_bias");
  check_like(bias, x, op, "gate_bias", "x");
  check_size(bias, 0, gate_weight.size(0), op, "gate_bias", "gate_weight.shape[0]");
  check_size(bias, 1, gate_weight.size(1), op, "gate_bias", "gate_weight.shape[1]");
}

template <kernels::Choice choice>
std::tuple<at::Tensor, at::Tensor> gated_mixture_entry(const at::Tensor& x, const at::Tensor& gate_weight,
                                                       const std::optional<at::Tensor>& gate_bias,
                                                       const at::Tensor& experts, c10::ArrayRef<int64_t> expert_index) {
  constexpr const char* op = "gated_mixture";
  const std::vector<int64_t> index = check_gates(op, x, gate_weight, experts, expert_index);
  at::Tensor bias;
  if (gate_bias.has_value()) {
    check_gate_bias(op, *gate_bias, gate_weight, x);
    bias = gate_bias->contiguous();
  }
  const OpEntryGuard guard(x);
  return ops::gated_mixture_forward(kernels::steps_for(op, x, choice), x.contiguous(), gate_weight.contiguous(), bias,
                                    experts.contiguous(), index);
}

template <kernels::Choice choice>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_mixture_backward_entry(
    const at::Tensor& grad_mixtures, const at::Tensor& x, const at::Tensor& gate_weight, const at::Tensor& experts,
    const at::Tensor& gates, c10::ArrayRef<int64_t> expert_index, bool has_bias, bool need_x_grad) {
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
  const OpEntryGuard guard(x);
  return ops::gated_mixture_backward(kernels::steps_for(op, x, choice), grad_mixtures.contiguous(), x.contiguous(),
                                     gate_weight.contiguous(), experts.contiguous(), gates.contiguous(), index,
                                     has_bias, need_x_grad);
}

}  // namespace

#define FASTMTL_REGISTER_EXPERT_OPS(m, CHOICE)                             \
  m.impl("fused_experts", &fused_experts_entry<CHOICE>);                   \
  m.impl("fused_experts_backward", &fused_experts_backward_entry<CHOICE>); \
  m.impl("gated_mixture", &gated_mixture_entry<CHOICE>);                   \
  m.impl("gated_mixture_backward", &gated_mixture_backward_entry<CHOICE>);

TORCH_LIBRARY_IMPL(fastmtl, CPU, m){FASTMTL_REGISTER_EXPERT_OPS(m, kernels::Choice::Auto)} TORCH_LIBRARY_IMPL(fastmtl,
                                                                                                              CUDA, m){
    FASTMTL_REGISTER_EXPERT_OPS(m, kernels::Choice::Auto)} TORCH_LIBRARY_IMPL(fastmtl_portable,
                                                                              CompositeExplicitAutograd, m) {
  FASTMTL_REGISTER_EXPERT_OPS(m, kernels::Choice::ForcePortable)
}
#undef FASTMTL_REGISTER_EXPERT_OPS

}  // namespace fastmtl::ops
