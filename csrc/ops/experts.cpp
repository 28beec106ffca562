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
  const Activation act = check_fused_experts_backward_args(grad_out, x, weights, out, saved, activation);
  const OpEntryGuard guard(x);
  return experts_backward(kernels::steps_for("fused_experts_backward", x, choice), grad_out.contiguous(),
                          x.contiguous(), contiguous_all(weights), out.contiguous(), contiguous_all(saved), act,
                          has_bias, need_input_grad);
}

// ---- gated_mixture

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
  const std::vector<int64_t> index =
      check_gated_mixture_backward_args(grad_mixtures, x, gate_weight, experts, gates, expert_index);
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
