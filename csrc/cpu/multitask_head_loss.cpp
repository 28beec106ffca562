#include "cpu/multitask_head_loss.h"

#include "cpu/epilogue.h"
#include "cpu/workspace.h"

namespace fastmtl::cpu {

HeadLossForward multitask_head_loss_forward(const at::Tensor& z, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias,
                                            const at::Tensor& targets, const std::vector<HeadTask>& tasks) {
  const int64_t rows = z.size(0);
  const int64_t logit_cols = weight.size(0);
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
  HeadLossForward result;
  // The loss pass adds the bias and turns the logits into their gradient in place.
  result.logit_grad = at::mm(z, weight.t());
  std::vector<double> loss_sum(num_tasks);
  std::vector<int64_t> count(num_tasks);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "fastmtl_head_loss_forward", [&] {
    head_loss_forward<scalar_t>(tasks, rows, logit_cols, targets.size(1),
                                result.logit_grad.mutable_data_ptr<scalar_t>(),
                                bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr,
                                targets.const_data_ptr<scalar_t>(), loss_sum.data(), count.data(), &result.bad);
  });
  result.losses = at::empty({num_tasks}, z.options());
  result.scale = at::empty({num_tasks}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "fastmtl_head_loss_means", [&] {
    scalar_t* l = result.losses.mutable_data_ptr<scalar_t>();
    scalar_t* s = result.scale.mutable_data_ptr<scalar_t>();
    for (int64_t k = 0; k < num_tasks; ++k) {
      // A task with nothing labelled contributes 0 and no gradient, never 0/0.
      l[k] = static_cast<scalar_t>(count[k] > 0 ? loss_sum[k] / double(count[k]) : 0.0);
      s[k] = static_cast<scalar_t>(count[k] > 0 ? 1.0 / double(count[k]) : 0.0);
    }
  });
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multitask_head_loss_backward(
    const at::Tensor& grad_losses, const at::Tensor& z, const at::Tensor& weight,
    const at::Tensor& logit_grad, const at::Tensor& scale, const std::vector<int64_t>& num_outputs,
    bool has_bias, bool need_z_grad) {
  const int64_t rows = z.size(0);
  const int64_t logit_cols = weight.size(0);
  at::Tensor grad_logits = scratch_matrix(0, rows, logit_cols, z.options());  // internal: scratch
  at::Tensor grad_bias = has_bias ? at::empty({logit_cols}, z.options()) : at::empty({0}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "fastmtl_head_loss_backward", [&] {
    // Per logit column: upstream weight of its task times 1/count of its task.
    std::vector<scalar_t> col_scale(logit_cols);
    const scalar_t* w = grad_losses.const_data_ptr<scalar_t>();
    const scalar_t* s = scale.const_data_ptr<scalar_t>();
    int64_t col = 0;
    for (size_t k = 0; k < num_outputs.size(); ++k)
      for (int64_t j = 0; j < num_outputs[k]; ++j) col_scale[col++] = w[k] * s[k];
    scale_columns<scalar_t>(rows, logit_cols, logit_grad.const_data_ptr<scalar_t>(), col_scale.data(),
                            grad_logits.mutable_data_ptr<scalar_t>(),
                            has_bias ? grad_bias.mutable_data_ptr<scalar_t>() : nullptr);
  });
  at::Tensor grad_weight = at::mm(grad_logits.t(), z);
  at::Tensor grad_z = need_z_grad ? at::mm(grad_logits, weight) : at::empty({0}, z.options());
  return {grad_z, grad_weight, grad_bias};
}

}  // namespace fastmtl::cpu
