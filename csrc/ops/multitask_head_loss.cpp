// fastmtl::multitask_head_loss and its backward: argument checks (ops/head_loss_checks.h), then
// the one orchestration (ops/heads.cpp) with the steps kernels/select.h picks for the device. On
// CPU an invalid target raises ValueError naming the task; elsewhere (no host synchronisation) it
// makes that task's loss NaN.
#include <torch/library.h>

#include "kernels/select.h"
#include "ops/head_loss_checks.h"
#include "ops/heads.h"

namespace fastmtl::ops {
namespace {

template <kernels::Choice choice>
std::tuple<at::Tensor, at::Tensor, at::Tensor> multitask_head_loss_entry(const at::Tensor& z, const at::Tensor& weight,
                                                                         const std::optional<at::Tensor>& bias,
                                                                         const at::Tensor& targets,
                                                                         const std::vector<std::string>& losses,
                                                                         c10::ArrayRef<int64_t> num_outputs) {
  const TaskLayout layout = check_head_loss_args(z, weight, bias, targets, losses, num_outputs);
  if (z.is_cuda()) {  // the CUDA kernel indexes task columns with 32-bit offsets
    check_fits_int32(layout.logit_cols, "multitask_head_loss", "the sum of num_outputs");
    check_fits_int32(layout.target_cols, "multitask_head_loss", "the number of packed target columns");
  }
  const OpEntryGuard guard(z);
  HeadLossForward result =
      head_loss_forward(kernels::steps_for("multitask_head_loss", z, choice), z.contiguous(), weight.contiguous(),
                        bias.has_value() ? bias->contiguous() : at::Tensor(), targets.contiguous(), layout.tasks);
  if (result.bad.row >= 0) {
    const HeadTask& task = layout.tasks[result.bad.task];
    TORCH_CHECK_VALUE(false, "fastmtl.multitask_head_loss: argument 'targets' has an invalid value at row ",
                      result.bad.row, ", column ", result.bad.column, " (task ", result.bad.task, ", loss '",
                      losses[result.bad.task], "', num_outputs ", task.num_outputs, "): expected ",
                      expected_target(task.loss), ", got ", result.bad.value);
  }
  return {result.losses, result.logit_grad, result.scale};
}

template <kernels::Choice choice>
std::tuple<at::Tensor, at::Tensor, at::Tensor> multitask_head_loss_backward_entry(
    const at::Tensor& grad_losses, const at::Tensor& z, const at::Tensor& weight, const at::Tensor& logit_grad,
    const at::Tensor& scale, c10::ArrayRef<int64_t> num_outputs, bool has_bias, bool need_z_grad) {
  constexpr const char* op = "multitask_head_loss_backward";
  const int64_t logit_cols = check_head_loss_backward_args(grad_losses, z, weight, logit_grad, scale, num_outputs);
  if (z.is_cuda()) check_fits_int32(logit_cols, op, "the sum of num_outputs");
  const OpEntryGuard guard(z);
  return head_loss_backward(kernels::steps_for(op, z, choice), grad_losses.contiguous(), z.contiguous(),
                            weight.contiguous(), logit_grad.contiguous(), scale.contiguous(), num_outputs.vec(),
                            has_bias, need_z_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmtl, CPU, m) {
  m.impl("multitask_head_loss", &multitask_head_loss_entry<kernels::Choice::Auto>);
  m.impl("multitask_head_loss_backward", &multitask_head_loss_backward_entry<kernels::Choice::Auto>);
}

TORCH_LIBRARY_IMPL(fastmtl, CUDA, m) {
  m.impl("multitask_head_loss", &multitask_head_loss_entry<kernels::Choice::Auto>);
  m.impl("multitask_head_loss_backward", &multitask_head_loss_backward_entry<kernels::Choice::Auto>);
}

TORCH_LIBRARY_IMPL(fastmtl_portable, CompositeExplicitAutograd, m) {
  m.impl("multitask_head_loss", &multitask_head_loss_entry<kernels::Choice::ForcePortable>);
  m.impl("multitask_head_loss_backward", &multitask_head_loss_backward_entry<kernels::Choice::ForcePortable>);
}

}  // namespace fastmtl::ops
