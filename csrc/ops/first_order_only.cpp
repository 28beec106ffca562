// The *_backward ops are first order only: a backward through them (a double backward, as
// torch.autograd.grad(..., create_graph=True) followed by a backward of the gradient asks) raises a
// message that names the op and the alternatives, as torch.autograd.function.once_differentiable
// does, instead of the silent zero gradients of torch's fallback for ops without an autograd kernel
// (it warned "may lead to silently incorrect behavior" and gave the second-order terms as None).
//
// The kernel sits at the Autograd key: it runs the op below autograd and, when grad mode is on and
// an input requires grad (create_graph=True), gives its outputs an Error node as their grad_fn. The
// error is raised only if a backward reaches that node, so create_graph=True for the first-order
// gradients alone still works.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace fastmtl::ops {
namespace {

void tensors_of(const c10::IValue& value, std::vector<at::Tensor>& out) {
  if (value.isTensor()) {
    out.push_back(value.toTensor());
  } else if (value.isTensorList()) {
    for (const at::Tensor& t : value.toTensorList()) out.push_back(t);
  } else if (value.isList()) {  // Tensor?[]
    for (const c10::IValue& item : value.toListRef())
      if (item.isTensor()) out.push_back(item.toTensor());
  }
}

std::string message(const c10::OperatorHandle& op) {
  const std::string& full = op.schema().name();
  const std::string name = full.substr(full.find("::") + 2);
  const std::string forward = name.substr(0, name.rfind("_backward"));
  return "fastmtl." + name + ": a backward through the gradient of fastmtl." + forward +
         " (a double backward: create_graph=True, then a backward of the gradient) is not supported; the fused "
         "backward is first order only. For second-order terms (gradient penalties, meta-gradients) use plain "
         "PyTorch modules (fastmtl.unconvert(model) for a converted model) or finite differences, as "
         "fastmtl.weighting.AutoLambda does";
}

void first_order_only(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const size_t num_arguments = schema.arguments().size();
  std::vector<at::Tensor> differentiable;
  if (at::GradMode::is_enabled()) {
    std::vector<at::Tensor> inputs;
    for (size_t i = stack->size() - num_arguments; i < stack->size(); ++i) tensors_of((*stack)[i], inputs);
    for (const at::Tensor& t : inputs)
      if (t.defined() && t.requires_grad()) differentiable.push_back(t);
  }
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  if (differentiable.empty()) return;
  auto node =
      c10::make_intrusive<torch::autograd::Error>(message(op), torch::autograd::collect_next_edges(differentiable));
  const size_t num_returns = schema.returns().size();
  std::vector<at::Tensor> outputs;
  for (size_t i = stack->size() - num_returns; i < stack->size(); ++i) tensors_of((*stack)[i], outputs);
  for (at::Tensor& t : outputs)
    if (t.defined() && torch::autograd::isDifferentiableType(t.scalar_type())) torch::autograd::set_history(t, node);
}

constexpr const char* kBackwardOps[] = {
    "fused_mlp_backward",     "fused_mlp_norm_backward", "multitask_head_loss_backward",
    "fused_experts_backward", "gated_mixture_backward",  "mtl_weighted_backward",
};

}  // namespace

TORCH_LIBRARY_IMPL(fastmtl, Autograd, m) {
  for (const char* op : kBackwardOps) m.impl(op, torch::CppFunction::makeFromBoxedFunction<&first_order_only>());
}

}  // namespace fastmtl::ops
