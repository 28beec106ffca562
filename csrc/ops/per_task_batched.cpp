// The batched backward of the ops whose fused kernel the tasks cannot share: fused_experts_backward,
// gated_mixture_backward and fused_mlp_norm_backward at the Batched key of torch's legacy vmap
// (ops/legacy_batched.h), which torch.autograd.grad(..., is_grads_batched=True) runs on. torch's
// fallback looped gated_mixture_backward with stack copies and refused the two that return tensor
// lists, after which fastmtl.mtl_backward threw the vmapped pass away and redid the backward once
// per task. Here the op's own kernel runs on each task's cotangent and every output is stacked.
//
// Why the kernel per task and not batched ATen ops: written with the tasks as a leading dimension
// (einsum / bmm), the experts' and gates' backward measured 1.4-3.8x slower than their kernel once
// per task (one thread, MMoE 64 -> 4 experts [256, 128]: experts at T = 8, B = 1024: 95 against 38
// ms; T = 16, B = 128: 16.3 against 9.4 ms; the gates 23.6 against 6.3 and 4.7 against 3.2 ms): the
// kernels already run their GEMMs at full width (all experts, or all gates, in one call), so the
// tasks have no multiply-adds to share, and the contractions add permute copies. Where the
// cotangents do share work (FusedMLP from 8 tasks, the heads) the ops have their own batched rules
// (ops/fused_mlp_batched.cpp, ops/head_loss_batched.cpp). fastmtl.mtl_backward's planner sends
// graphs through these ops down its task loop (engine/trunk_gram.py), which makes the same kernel
// calls without the stacks; this rule serves every other batched backward (the streamed path, the
// cosine report, torch.autograd.grad with is_grads_batched).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "ops/legacy_batched.h"
#include "ops/per_task_batched.h"

namespace fastmtl::ops {
namespace {

bool holds_batched(const c10::IValue& value) {
  if (value.isTensor()) return at::isBatchedTensor(value.toTensor());
  if (value.isTensorList())
    for (const at::Tensor& t : value.toTensorVector())
      if (at::isBatchedTensor(t)) return true;
  return false;
}

// An output the op leaves out ([0]-sized: dx without need_input_grad, db without biases) stays one
// unbatched [0] tensor, as the op's own results; the others are stacked over the tasks.
at::Tensor stacked_output(const std::vector<at::Tensor>& per_task, int64_t level) {
  if (per_task[0].dim() == 1 && per_task[0].size(0) == 0) return per_task[0];
  return batched_at(at::stack(per_task), level);
}

}  // namespace

void kernel_per_task(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const c10::FunctionSchema& schema = op.schema();
  const std::string name = schema.operator_name().name.substr(std::string("fastmtl::").size());
  const size_t num_args = schema.arguments().size();
  std::vector<c10::IValue> args(stack->end() - num_args, stack->end());
  torch::jit::drop(*stack, num_args);
  const std::string cotangent = schema.arguments()[0].name();
  bool others_batched = false;
  for (size_t i = 1; i < num_args; ++i) others_batched = others_batched || holds_batched(args[i]);
  TORCH_CHECK(args[0].isTensor(), "fastmtl.", name, ": argument '", cotangent, "' expected a tensor");
  check_only_cotangent_batched(others_batched, args[0].toTensor(), name.c_str(), cotangent.c_str(),
                               "any argument but the cotangent");
  int64_t level = 0;
  const at::Tensor physical = physical_batch_first(args[0].toTensor(), &level, name.c_str(), cotangent.c_str());
  check_some_cotangents(physical, name.c_str(), cotangent.c_str());

  const size_t num_returns = schema.returns().size();
  // per_return[r][i][t]: task t's i-th tensor of return r (one for a Tensor, one per entry of a list).
  std::vector<std::vector<std::vector<at::Tensor>>> per_return(num_returns);
  for (int64_t t = 0; t < physical.size(0); ++t) {
    torch::jit::Stack call(args.begin(), args.end());
    call[0] = physical[t];
    op.callBoxed(&call);
    for (size_t r = 0; r < num_returns; ++r) {
      std::vector<at::Tensor> tensors =
          call[r].isTensor() ? std::vector<at::Tensor>{call[r].toTensor()} : call[r].toTensorVector();
      if (t == 0) per_return[r].resize(tensors.size());
      for (size_t i = 0; i < tensors.size(); ++i) per_return[r][i].push_back(std::move(tensors[i]));
    }
  }
  for (size_t r = 0; r < num_returns; ++r) {
    if (schema.returns()[r].type()->kind() == c10::TypeKind::TensorType) {
      torch::jit::push(*stack, stacked_output(per_return[r][0], level));
    } else {
      std::vector<at::Tensor> list;
      for (const auto& per_task : per_return[r]) list.push_back(stacked_output(per_task, level));
      torch::jit::push(*stack, c10::IValue(list));
    }
  }
}

TORCH_LIBRARY_IMPL(fastmtl, Batched, m) {
  for (const char* op : {"fused_experts_backward", "gated_mixture_backward", "fused_mlp_norm_backward"})
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&kernel_per_task>());
}

}  // namespace fastmtl::ops
