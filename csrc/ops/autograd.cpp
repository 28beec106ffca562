// Autograd for the fused ops, registered at the Autograd dispatch key in C++.
//
// Why C++ and not torch.library.register_autograd: registered from Python, every call of an op goes
// through a Python autograd kernel (pytree flattening of the tensor lists, argument defaulting,
// redispatch) and every backward through a Python node. Measured on the 2-core CI machine, that
// cost about 300 us per op per step, more than all the GEMMs of a small training step (see
// bench/bench_step.py). Here the forward redispatches below autograd to the device kernel (CPU,
// CUDA, or the fake kernel when torch.compile traces), and the backward calls the *_backward ops
// through the dispatcher, so torch.compile and opcheck trace both.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "ops/layer_stack_autograd.h"

namespace fastmtl::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Typed dispatcher handles (signatures as the kernels in multitask_head_loss.cpp).
const auto& head_loss_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastmtl::multitask_head_loss", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                           const std::vector<std::string>&, c10::ArrayRef<int64_t>)>();
  return op;
}

const auto& head_loss_backward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastmtl::multitask_head_loss_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, c10::ArrayRef<int64_t>, bool, bool)>();
  return op;
}

// Inputs: z, weight, bias (optional), targets, losses, num_outputs.
// Outputs: losses [T], then logit_grad and scale (saved for backward, not differentiable).
struct HeadLossFunction : public torch::autograd::Function<HeadLossFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& z, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& targets,
                               const std::vector<std::string>& losses, c10::ArrayRef<int64_t> num_outputs) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [task_losses, logit_grad, scale] = head_loss_op().call(z, weight, bias, targets, losses, num_outputs);
    ctx->save_for_backward({z, weight, logit_grad, scale});
    ctx->saved_data["num_outputs"] = num_outputs.vec();
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->mark_non_differentiable({logit_grad, scale});
    ctx->set_materialize_grads(false);
    return {task_losses, logit_grad, scale};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(6);
    if (!grads[0].defined()) return result;
    const variable_list saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool need_z_grad = ctx->needs_input_grad(0);
    const std::vector<int64_t> num_outputs = ctx->saved_data["num_outputs"].toIntVector();
    auto [grad_z, grad_weight, grad_bias] = head_loss_backward_op().call(grads[0], saved[0], saved[1], saved[2],
                                                                         saved[3], num_outputs, has_bias, need_z_grad);
    if (need_z_grad) result[0] = grad_z;
    result[1] = grad_weight;
    if (has_bias) result[2] = grad_bias;
    return result;
  }
};

struct FusedMlpOps {
  static constexpr const char* forward = "fastmtl::fused_mlp";
  static constexpr const char* backward = "fastmtl::fused_mlp_backward";
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> head_loss_autograd(const at::Tensor& z, const at::Tensor& weight,
                                                                  const std::optional<at::Tensor>& bias,
                                                                  const at::Tensor& targets,
                                                                  const std::vector<std::string>& losses,
                                                                  c10::ArrayRef<int64_t> num_outputs) {
  variable_list outputs = HeadLossFunction::apply(z, weight, bias, targets, losses, num_outputs);
  return {outputs[0], outputs[1], outputs[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmtl, Autograd, m) {
  m.impl("fused_mlp", &LayerStackFunction<FusedMlpOps>::kernel);
  m.impl("multitask_head_loss", &head_loss_autograd);
}

}  // namespace fastmtl::ops
