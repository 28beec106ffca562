// fastmtl::multitask_head_loss and its backward: argument checks and device dispatch.
#include <torch/library.h>

#include <cmath>

#include "cpu/multitask_head_loss.h"
#include "ops/checks.h"
#include "ops/task_spec.h"

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
  const TaskLayout layout = parse_task_layout(kOp, losses, num_outputs);
  check_dim(z, 2, kOp, "z");
  check_float_dtype(z, kOp, "z");
  TORCH_CHECK_VALUE(z.size(0) >= 1, "fastmtl.multitask_head_loss: argument 'z' expected a batch of at least 1 row, "
                    "got shape ", shape_str(z.sizes()));
  check_dim(weight, 2, kOp, "weight");
  check_like(weight, z, kOp, "weight", "z");
  check_size(weight, 0, layout.logit_cols, kOp, "weight", "sum of num_outputs over tasks");
  check_size(weight, 1, z.size(1), kOp, "weight", "z.shape[1]");
  if (bias.has_value()) {
    check_dim(*bias, 1, kOp, "bias");
    check_like(*bias, z, kOp, "bias", "z");
    check_size(*bias, 0, layout.logit_cols, kOp, "bias", "sum of num_outputs over tasks");
  }
  check_dim(targets, 2, kOp, "targets");
  check_like(targets, z, kOp, "targets", "z");
  check_size(targets, 0, z.size(0), kOp, "targets", "z.shape[0], the batch");
  check_size(targets, 1, layout.target_cols, kOp, "targets",
             "packed target columns: num_outputs for regression, 1 for bce and ce");
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
  const int64_t num_tasks = static_cast<int64_t>(num_outputs.size());
  int64_t logit_cols = 0;
  for (int64_t n : num_outputs) logit_cols += n;
  check_dim(grad_losses, 1, op, "grad_losses");
  check_like(grad_losses, z, op, "grad_losses", "z");
  check_size(grad_losses, 0, num_tasks, op, "grad_losses", "one per task");
  check_like(scale, z, op, "scale", "z");
  check_size(scale, 0, num_tasks, op, "scale", "one per task");
  check_like(weight, z, op, "weight", "z");
  check_size(weight, 0, logit_cols, op, "weight", "sum of num_outputs");
  check_like(logit_grad, z, op, "logit_grad", "z");
  TORCH_CHECK_VALUE(logit_grad.dim() == 2 && logit_grad.size(0) == z.size(0) && logit_grad.size(1) == logit_cols,
                    "fastmtl.multitask_head_loss_backward: argument 'logit_grad' expected shape [", z.size(0), ", ",
                    logit_cols, "], got ", shape_str(logit_grad.sizes()));
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

TORCH_LIBRARY_IMPL(fastmtl, CUDA, m) {
  m.impl("multitask_head_loss", &multitask_head_loss_entry);
  m.impl("multitask_head_loss_backward", &multitask_head_loss_backward_entry);
}

}  // namespace fastmtl::ops
