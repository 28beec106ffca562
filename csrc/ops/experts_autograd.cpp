// Autograd of fused_experts and gated_mixture, registered at the Autograd key in C++ for the
// reasons given in csrc/ops/autograd.cpp: the forward redispatches below autograd, the backward is
// one call of the *_backward op through the dispatcher (so torch.compile and opcheck trace it).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace fastmtl::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using TensorVec = std::vector<at::Tensor>;

const auto& fused_experts_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastmtl::fused_experts", "")
                       .typed<std::tuple<at::Tensor, TensorVec>(const at::Tensor&, const TensorVec&, const TensorVec&,
                                                                const std::string&)>();
  return op;
}

const auto& fused_experts_backward_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastmtl::fused_experts_backward", "")
                       .typed<std::tuple<at::Tensor, TensorVec, TensorVec>(
                           const at::Tensor&, const at::Tensor&, const TensorVec&, const at::Tensor&, const TensorVec&,
                           const std::string&, bool, bool)>();
  return op;
}

const auto& gated_mixture_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastmtl::gated_mixture", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const std::optional<at::Tensor>&, const at::Tensor&,
                                                                 c10::ArrayRef<int64_t>)>();
  return op;
}

const auto& gated_mixture_backward_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastmtl::gated_mixture_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, c10::ArrayRef<int64_t>, bool, bool)>();
  return op;
}

// Inputs (flattened by autograd): x, weights[0..L), biases[0..L or 0), activation.
// Outputs: the expert outputs, then the tensors saved for backward (not differentiable).
struct FusedExpertsFunction : public torch::autograd::Function<FusedExpertsFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList weights,
                               at::TensorList biases, const std::string& activation) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, saved] = fused_experts_op().call(x, weights.vec(), biases.vec(), activation);
    variable_list to_save{x, out};
    to_save.insert(to_save.end(), weights.begin(), weights.end());
    to_save.insert(to_save.end(), saved.begin(), saved.end());
    ctx->save_for_backward(to_save);
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["num_layers"] = static_cast<int64_t>(weights.size());
    ctx->saved_data["has_bias"] = !biases.empty();
    ctx->mark_non_differentiable(saved);
    ctx->set_materialize_grads(false);
    variable_list outputs{out};
    outputs.insert(outputs.end(), saved.begin(), saved.end());
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const int64_t num_layers = ctx->saved_data["num_layers"].toInt();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    variable_list result(1 + num_layers + (has_bias ? num_layers : 0) + 1);
    if (!grads[0].defined()) return result;
    const variable_list saved = ctx->get_saved_variables();
    const TensorVec weights(saved.begin() + 2, saved.begin() + 2 + num_layers);
    const TensorVec kept(saved.begin() + 2 + num_layers, saved.end());
    const bool need_input_grad = ctx->needs_input_grad(0);
    auto [grad_x, grad_weights, grad_biases] = fused_experts_backward_op().call(
        grads[0], saved[0], weights, saved[1], kept, ctx->saved_data["activation"].toStringRef(), has_bias,
        need_input_grad);
    if (need_input_grad) result[0] = grad_x;
    for (int64_t l = 0; l < num_layers; ++l) result[1 + l] = grad_weights[l];
    for (size_t l = 0; l < grad_biases.size(); ++l) result[1 + num_layers + l] = grad_biases[l];
    return result;
  }
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

std::tuple<at::Tensor, TensorVec> fused_experts_autograd(const at::Tensor& x, const TensorVec& weights,
                                                         const TensorVec& biases, const std::string& activation) {
  variable_list outputs = FusedExpertsFunction::apply(x, at::TensorList(weights), at::TensorList(biases), activation);
  return {outputs[0], TensorVec(outputs.begin() + 1, outputs.end())};
}

std::tuple<at::Tensor, at::Tensor> gated_mixture_autograd(const at::Tensor& x, const at::Tensor& gate_weight,
                                                          const std::optional<at::Tensor>& gate_bias,
                                                          const at::Tensor& experts, c10::ArrayRef<int64_t> expert_index) {
  variable_list outputs = GatedMixtureFunction::apply(x, gate_weight, gate_bias, experts, expert_index);
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmtl, Autograd, m) {
  m.impl("fused_experts", &fused_experts_autograd);
  m.impl("gated_mixture", &gated_mixture_autograd);
}

}  // namespace fastmtl::ops
