// Autograd of fused_experts (the layer-stack Function it shares with fused_mlp) and gated_mixture,
// registered at the Autograd key in C++ for the reasons given in csrc/ops/autograd.cpp: the forward
// redispatches below autograd, the backward is one call of the *_backward op through the
// dispatcher (so torch.compile and opcheck trace it).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "ops/layer_stack_autograd.h"

namespace fastmtl::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const auto& gated_mixture_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastmtl::gated_mixture", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const std::optional<at::Tensor>&, const at::Tensor&,
                                                                 c10::ArrayRef<int64_t>)>();
  return op;
}

const auto& gated_mixture_backward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastmtl::gated_mixture_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, c10::ArrayRef<int64_t>, bool, bool)>();
  return op;
}

struct FusedExpertsOps {
  static constexpr const char* forward = "fastmtl::fused_experts";
  static constexpr const char* backward = "fastmtl::fused_experts_backward";
};

// Inputs: x, gate_weight, gate_bias (optional), experts, expert_index. Outputs: mixtures, gates
// (saved for backward, not differentiable).
struct GatedMixtureFunction : public torch::autograd::Function<GatedMixtureFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& gate_weight,
                               const std::optional<at::Tensor>& gate_bias, const at::Tensor& experts,
                               c10::ArrayRef<int64_t> expert_index) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [mixtures, gates] = gated_mixture_op().call(x, gate_weight, gate_bias, experts, expert_index);
    ctx->save_for_backward({x, gate_weight, experts, gates});
    ctx->saved_data["expert_index"] = expert_index.vec();
    ctx->saved_data["has_bias"] = gate_bias.has_value();
    ctx->mark_non_differentiable({gates});
    ctx->set_materialize_grads(false);
    return {mixtures, gates};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(5);
    if (!grads[0].defined()) return result;
    const variable_list saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool need_x_grad = ctx->needs_input_grad(0);
    const std::vector<int64_t> index = ctx->saved_data["expert_index"].toIntVector();
    auto [grad_x, grad_weight, grad_bias, grad_experts] = gated_mixture_backward_op().call(
        grads[0], saved[0], saved[1], saved[2], saved[3], index, has_bias, need_x_grad);
    if (need_x_grad) result[0] = grad_x;
    result[1] = grad_weight;
    if (has_bias) result[2] = grad_bias;
    result[3] = grad_experts;
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor> gated_mixture_autograd(const at::Tensor& x, const at::Tensor& gate_weight,
                                                          const std::optional<at::Tensor>& gate_bias,
                                                          const at::Tensor& experts,
                                                          c10::ArrayRef<int64_t> expert_index) {
  variable_list outputs = GatedMixtureFunction::apply(x, gate_weight, gate_bias, experts, expert_index);
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmtl, Autograd, m) {
  m.impl("fused_experts", &LayerStackFunction<FusedExpertsOps>::kernel);
  m.impl("gated_mixture", &gated_mixture_autograd);
}

}  // namespace fastmtl::ops
