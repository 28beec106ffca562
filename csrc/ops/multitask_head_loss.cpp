// fastmtl::multitask_head_loss and its backward on CPU: argument checks (ops/head_loss_checks.h,
// shared with the CUDA entry points in csrc/cuda/) and the CPU kernels.
#include <torch/library.h>

#include <cmath>

#include "cpu/multitask_head_loss.h"
#include "ops/head_loss_checks.h"

namespace fastmtl::ops {
namespace {

constexpr const char* kOp = "multitask_head_loss";

const char* expected_target(LossKind loss) {
  switch (loss) {
    case LossKind::Bce: return "0 or 1 (NaN = missing)";
    case LossKind::Ce: return "a class index in [0, num_outputs) or -100 (missing)";
    default: return "a finite value (NaN = missing)";
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multitask_head_loss_entry(
    const at::Tensor& z, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, const std::vector<std::string>& losses, c10::ArrayRef<int64_t> num_outputs) {
  const TaskLayout layout = check_head_loss_args(z, weight, bias, targets, losses, num_outputs);
  if (!z.is_cpu()) no_kernel_for_device(kOp, z, "z");

  std::optional<at::Tensor> bias_c;
  if (bias.has_value()) bias_c = bias->contiguous();
  cpu::HeadLossForward result = cpu::multitask_head_loss_forward(z.contiguous(), weight.contiguous(), bias_c,
                                                                 targets.contiguous(), layout.tasks);
  if (result.bad.row >= 0) {
    const HeadTask& task = layout.tasks[result.bad.task];
    TORCH_CHECK_VALUE(false, "fastmtl.multitask_head_loss: argument 'targets' has an invalid value at row ",
                      result.bad.row, ", column ", result.bad.column, " (task ", result.bad.task, ", loss '",
                      losses[result.bad.task], "', num_outputs ", task.num_outputs, "): expected ",
                      expected_target(task.loss), ", got ", result.bad.value);
  }
  return {result.losses, result.logit_grad, result.scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multitask_head_loss_backward_entry(
    const at::Tensor& grad_losses, const at::Tensor& z, const at::Tensor& weight, const at::Tensor& logit_grad,
    const at::Tensor& scale, c10::ArrayRef<int64_t> num_outputs, bool has_bias, bool need_z_grad) {
  constexpr const char* op = "multitask_head_loss_backward";
  check_head_loss_backward_args(grad_losses, z, weight, logit_grad, scale, num_outputs);
  if (!z.is_cpu()) no_kernel_for_device(op, z, "z");
  return cpu::multitask_head_loss_backward(grad_losses.contiguous(), z.contiguous(), weight.contiguous(),
                                           logit_grad.contiguous(), scale.contiguous(), num_outputs.vec(), has_bias,
                                           need_z_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmtl, CPU, m) {
  m.impl("multitask_head_loss", &multitask_head_loss_entry);
  m.impl("multitask_head_loss_backward", &multitask_head_loss_backward_entry);
}

#if !FASTMTL_WITH_CUDA
// A build without CUDA kernels still checks CUDA tensors, then says it has no kernel for them.
TORCH_LIBRARY_IMPL(fastmtl, CUDA, m) {
  m.impl("multitask_head_loss", &multitask_head_loss_entry);
  m.impl("multitask_head_loss_backward", &multitask_head_loss_backward_entry);
}
#endif

}  // namespace fastmtl::ops
