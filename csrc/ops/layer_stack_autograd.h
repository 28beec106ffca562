// Autograd of the ops with fused_mlp's signature: fused_mlp and fused_experts (a stack of layers
// z_l = act(z_{l-1} W_l^T + b_l), one per expert for the latter). Both forward ops take
// (x, weights, biases, activation) and return (output, saved for backward); both backward ops take
// (grad_out, x, weights, out, saved, activation, has_bias, need_input_grad) and return
// (dx, dW per layer, db per layer). So one autograd Function serves both, parametrised by the op
// names (see autograd.cpp for why autograd is registered in C++).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

#include <string>
#include <tuple>
#include <vector>

namespace fastmtl::ops {

// Ops: a struct with static constexpr const char* forward and backward, the two op names.
template <typename Ops>
struct LayerStackFunction : public torch::autograd::Function<LayerStackFunction<Ops>> {
  using TensorVec = std::vector<at::Tensor>;
  using variable_list = torch::autograd::variable_list;
  using AutogradContext = torch::autograd::AutogradContext;

  static const auto& forward_op() {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow(Ops::forward, "")
                         .template typed<std::tuple<at::Tensor, TensorVec>(const at::Tensor&, const TensorVec&,
                                                                           const TensorVec&, const std::string&)>();
    return op;
  }

  static const auto& backward_op() {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow(Ops::backward, "")
                         .template typed<std::tuple<at::Tensor, TensorVec, TensorVec>(
                             const at::Tensor&, const at::Tensor&, const TensorVec&, const at::Tensor&,
                             const TensorVec&, const std::string&, bool, bool)>();
    return op;
  }

  // Inputs (flattened by autograd): x, weights[0..L), biases[0..L or 0), activation.
  // Outputs: the op's output, then the tensors saved for backward (not differentiable).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                               const std::string& activation) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, saved] = forward_op().call(x, weights.vec(), biases.vec(), activation);
    variable_list to_save{x, out};
    to_save.insert(to_save.end(), weights.begin(), weights.end());
    to_save.insert(to_save.end(), saved.begin(), saved.end());
    ctx->save_for_backward(to_save);
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["num_layers"] = static_cast<int64_t>(weights.size());
    ctx->saved_data["has_bias"] = !biases.empty();
    ctx->mark_non_differentiable(saved);
    ctx->set_materialize_grads(false);  // no zero-filled gradients for the saved outputs
    variable_list outputs{out};
    outputs.insert(outputs.end(), saved.begin(), saved.end());
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const int64_t num_layers = ctx->saved_data["num_layers"].toInt();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    variable_list result(1 + num_layers + (has_bias ? num_layers : 0) + 1);
    if (!grads[0].defined()) return result;  // the output was not used: no gradients
    const variable_list saved = ctx->get_saved_variables();
    const TensorVec weights(saved.begin() + 2, saved.begin() + 2 + num_layers);
    const TensorVec kept(saved.begin() + 2 + num_layers, saved.end());
    const bool need_input_grad = ctx->needs_input_grad(0);
    auto [grad_x, grad_weights, grad_biases] =
        backward_op().call(grads[0], saved[0], weights, saved[1], kept, ctx->saved_data["activation"].toStringRef(),
                           has_bias, need_input_grad);
    if (need_input_grad) result[0] = grad_x;
    for (int64_t l = 0; l < num_layers; ++l) result[1 + l] = grad_weights[l];
    for (size_t l = 0; l < grad_biases.size(); ++l) result[1 + num_layers + l] = grad_biases[l];
    return result;
  }

  // The Autograd-key kernel: the op's schema, through the Function above.
  static std::tuple<at::Tensor, TensorVec> kernel(const at::Tensor& x, const TensorVec& weights,
                                                  const TensorVec& biases, const std::string& activation) {
    variable_list outputs = LayerStackFunction::apply(x, at::TensorList(weights), at::TensorList(biases), activation);
    return {outputs[0], TensorVec(outputs.begin() + 1, outputs.end())};
  }
};

}  // namespace fastmtl::ops
