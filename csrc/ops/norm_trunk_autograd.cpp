// Autograd of fused_mlp_norm, registered at the Autograd key in C++ (see autograd.cpp for why):
// one node for the whole tower; its backward calls fused_mlp_norm_backward through the dispatcher.
// Differentiable inputs: x, weights, biases, norm_weights, norm_biases; the running statistics
// are buffers (the forward returns their update in training; the backward reads them in eval).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "ops/norm_trunk.h"

namespace fastmtl::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using TensorVec = std::vector<at::Tensor>;

const auto& forward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastmtl::fused_mlp_norm", "")
                       .typed<std::tuple<at::Tensor, TensorVec, TensorVec>(
                           const at::Tensor&, const TensorVec&, const TensorVec&, const TensorVec&, const TensorVec&,
                           const TensorVec&, const TensorVec&, const std::string&, const std::string&, double, bool,
                           double, double)>();
  return op;
}

const auto& backward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastmtl::fused_mlp_norm_backward", "")
                       .typed<std::tuple<at::Tensor, TensorVec, TensorVec, TensorVec, TensorVec>(
                           const at::Tensor&, const at::Tensor&, const TensorVec&, const TensorVec&, const TensorVec&,
                           const TensorVec&, const TensorVec&, const TensorVec&, const at::Tensor&, const TensorVec&,
                           const std::string&, const std::string&, double, bool, double, double, bool)>();
  return op;
}

TensorVec take(const variable_list& saved, size_t& at, size_t n) {
  TensorVec out(saved.begin() + static_cast<std::ptrdiff_t>(at), saved.begin() + static_cast<std::ptrdiff_t>(at + n));
  at += n;
  return out;
}

struct NormTrunkFunction : public torch::autograd::Function<NormTrunkFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                               at::TensorList norm_weights, at::TensorList norm_biases, at::TensorList running_means,
                               at::TensorList running_vars, const std::string& norm, const std::string& activation,
                               double dropout, bool training, double momentum, double eps) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, saved, running] =
        forward_op().call(x, weights.vec(), biases.vec(), norm_weights.vec(), norm_biases.vec(), running_means.vec(),
                          running_vars.vec(), norm, activation, dropout, training, momentum, eps);
    variable_list to_save{x, out};
    for (at::TensorList list : {weights, biases, norm_weights, norm_biases})
      to_save.insert(to_save.end(), list.begin(), list.end());
    // The running statistics only where the backward reads them (eval): in training the caller
    // writes their update into them, and the backward uses the batch statistics.
    const size_t kept_running = training ? 0 : running_means.size();
    to_save.insert(to_save.end(), running_means.begin(), running_means.begin() + kept_running);
    to_save.insert(to_save.end(), running_vars.begin(), running_vars.begin() + kept_running);
    to_save.insert(to_save.end(), saved.begin(), saved.end());
    ctx->save_for_backward(to_save);
    ctx->saved_data["sizes"] =
        std::vector<int64_t>{static_cast<int64_t>(weights.size()), static_cast<int64_t>(biases.size()),
                             static_cast<int64_t>(norm_weights.size()), static_cast<int64_t>(running_means.size()),
                             static_cast<int64_t>(kept_running)};
    ctx->saved_data["norm"] = norm;
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["dropout"] = dropout;
    ctx->saved_data["training"] = training;
    ctx->saved_data["momentum"] = momentum;
    ctx->saved_data["eps"] = eps;
    variable_list constants(saved);
    constants.insert(constants.end(), running.begin(), running.end());
    ctx->mark_non_differentiable(constants);
    ctx->set_materialize_grads(false);
    variable_list outputs{out};
    outputs.insert(outputs.end(), constants.begin(), constants.end());
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const std::vector<int64_t> sizes = ctx->saved_data["sizes"].toIntVector();
    const size_t layers = sizes[0], nb = sizes[1], ng = sizes[2], nr = sizes[3], kept_running = sizes[4];
    // One gradient per forward input: x, each tensor of each list, and the six non-tensor arguments.
    variable_list result(1 + layers + nb + 2 * ng + 2 * nr + 6);
    if (!grads[0].defined()) return result;
    const variable_list saved = ctx->get_saved_variables();
    size_t at = 2;
    const TensorVec weights = take(saved, at, layers), biases = take(saved, at, nb);
    const TensorVec norm_weights = take(saved, at, ng), norm_biases = take(saved, at, ng);
    const TensorVec running_means = take(saved, at, kept_running), running_vars = take(saved, at, kept_running);
    const TensorVec kept(saved.begin() + static_cast<std::ptrdiff_t>(at), saved.end());
    const bool need_input_grad = ctx->needs_input_grad(0);
    auto [grad_x, grad_w, grad_b, grad_g, grad_beta] = backward_op().call(
        grads[0], saved[0], weights, biases, norm_weights, norm_biases, running_means, running_vars, saved[1], kept,
        ctx->saved_data["norm"].toStringRef(), ctx->saved_data["activation"].toStringRef(),
        ctx->saved_data["dropout"].toDouble(), ctx->saved_data["training"].toBool(),
        ctx->saved_data["momentum"].toDouble(), ctx->saved_data["eps"].toDouble(), need_input_grad);
    size_t i = 0;
    if (need_input_grad) result[i] = grad_x;
    ++i;
    for (const TensorVec* list : {&grad_w, &grad_b, &grad_g, &grad_beta})
      for (const at::Tensor& g : *list) result[i++] = g;
    return result;
  }
};

std::tuple<at::Tensor, TensorVec, TensorVec> fused_mlp_norm_autograd(
    const at::Tensor& x, const TensorVec& weights, const TensorVec& biases, const TensorVec& norm_weights,
    const TensorVec& norm_biases, const TensorVec& running_means, const TensorVec& running_vars,
    const std::string& norm, const std::string& activation, double dropout, bool training, double momentum,
    double eps) {
  variable_list outputs = NormTrunkFunction::apply(
      x, at::TensorList(weights), at::TensorList(biases), at::TensorList(norm_weights), at::TensorList(norm_biases),
      at::TensorList(running_means), at::TensorList(running_vars), norm, activation, dropout, training, momentum, eps);
  const auto saved_end = outputs.begin() + 1 + static_cast<std::ptrdiff_t>(kSavedPerLayer * weights.size());
  return {outputs[0], TensorVec(outputs.begin() + 1, saved_end), TensorVec(saved_end, outputs.end())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmtl, Autograd, m) { m.impl("fused_mlp_norm", &fused_mlp_norm_autograd); }

}  // namespace fastmtl::ops
