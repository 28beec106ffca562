// torch.func (grad, vmap, jacrev, functional_call + grad, ...) over a fastmtl op: refused with a
// message that names the op and the alternatives, instead of torch's generic "cannot use C++
// torch::autograd::Function with functorch transforms" or "Batching rule not implemented".
//
// Why refuse rather than support: the fused ops' autograd is a C++ autograd::Function (see
// autograd.cpp for why), which functorch cannot transform, and a batching rule per op would be a
// second implementation of each. The kernel sits at the FuncTorchDynamicLayerFrontMode key, which
// the dispatcher reaches first whenever a torch.func transform is active. NotImplementedError is a
// RuntimeError: fastmtl.mtl_backward's batched backward (is_grads_batched, a vmap) still catches it
// and runs those nodes once per task.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace fastmtl::ops {
namespace {

void refuse_functorch(const c10::OperatorHandle& op, torch::jit::Stack*) {
  const std::string& name = op.schema().name();
  TORCH_CHECK_NOT_IMPLEMENTED(false, "fastmtl.", name.substr(name.find("::") + 2),
                              ": torch.func transforms (grad, vmap, jacrev, vjp, ...) are not supported by the fused "
                              "ops; use torch.autograd instead (loss.backward(), torch.autograd.grad), and for "
                              "per-task gradients of the shared parameters fastmtl.mtl_backward or "
                              "fastmtl.ops.task_gram");
}

constexpr const char* kOps[] = {
    "fused_mlp",
    "fused_mlp_backward",
    "fused_mlp_norm",
    "fused_mlp_norm_backward",
    "multitask_head_loss",
    "multitask_head_loss_backward",
    "fused_experts",
    "fused_experts_backward",
    "gated_mixture",
    "gated_mixture_backward",
    "pack_targets",
    "mtl_trunk_gram",
    "mtl_representation_gram",
    "mtl_weighted_backward",
};

}  // namespace

TORCH_LIBRARY_IMPL(fastmtl, FuncTorchDynamicLayerFrontMode, m) {
  for (const char* op : kOps) m.impl(op, torch::CppFunction::makeFromBoxedFunction<&refuse_functorch>());
}

}  // namespace fastmtl::ops
