#include "ops/heads.h"

#include "cpu/workspace.h"
#include "ops/checks.h"

namespace fastmtl::ops {

HeadLossForward head_loss_forward(const kernels::Steps& steps, const at::Tensor& z, const at::Tensor& weight,
                                  const at::Tensor& bias, const at::Tensor& targets,
                                  const std::vector<HeadTask>& tasks) {
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
  const at::TensorOptions loss_options = z.options().dtype(loss_dtype(z.scalar_type()));
  HeadLossForward result;
  // The loss step adds the bias and turns the logits into their gradient in place.
  result.logit_grad = at::mm(z, weight.t());
  result.losses = at::empty({num_tasks}, loss_options);
  result.scale = at::empty({num_tasks}, loss_options);
  result.bad = steps.head_loss(tasks, result.logit_grad, bias, targets, result.losses, result.scale);
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> head_loss_backward(const kernels::Steps& steps,
                                                                  const at::Tensor& grad_losses, const at::Tensor& z,
                                                                  const at::Tensor& weight,
                                                                  const at::Tensor& logit_grad, const at::Tensor& scale,
                                                                  const std::vector<int64_t>& num_outputs,
                                                                  bool has_bias, bool need_z_grad) {
  const int64_t rows = z.size(0);
  const int64_t logit_cols = weight.size(0);
  at::Tensor grad_logits = cpu::scratch_matrix(0, rows, logit_cols, z.options());  // internal: scratch
  at::Tensor grad_bias = at::empty({has_bias ? logit_cols : 0}, z.options());
  // Per logit column: the upstream weight of its task times 1/count of its task.
  const at::Tensor col_scale = steps.column_scale(num_outputs, grad_losses, scale);
  steps.scale_columns(logit_grad, col_scale, grad_logits, has_bias ? grad_bias : at::Tensor());
  at::Tensor grad_weight = at::mm(grad_logits.t(), z);
  at::Tensor grad_z = need_z_grad ? at::mm(grad_logits, weight) : at::empty({0}, z.options());
  return {grad_z, grad_weight, grad_bias};
}

}  // namespace fastmtl::ops
