// fastmtl::multitask_head_loss and its backward on CUDA: the shared argument checks, one cuBLAS
// GEMM for all heads' logits, the loss kernel (head_loss.cu) over them, and a backward of one
// scaling kernel plus two GEMMs. Everything on the current stream, outputs and workspaces from the
// caching allocator, no host synchronisation: an invalid target value therefore cannot raise here
// as it does on CPU; it makes its task's loss NaN instead (see kernels.h).
#include <torch/library.h>

#include "cuda/glue.h"
#include "ops/head_loss_checks.h"

namespace fastmtl::cuda {
namespace {

constexpr const char* kOp = "multitask_head_loss";

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& z, const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias, const at::Tensor& targets,
                                                       const std::vector<HeadTask>& tasks) {
  const int64_t rows = z.size(0);
  const int64_t logit_cols = weight.size(0);
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
  const at::TensorOptions loss_options = z.options().dtype(ops::loss_dtype(z.scalar_type()));
  // The loss kernel adds the bias and turns the logits into their gradient in place.
  at::Tensor logit_grad = at::mm(z, weight.t());
  at::Tensor losses = at::empty({num_tasks}, loss_options);
  at::Tensor scale = at::empty({num_tasks}, loss_options);
  const int64_t workspace = head_loss_workspace(rows, num_tasks);
  at::Tensor workspace_sum = at::empty({workspace}, z.options().dtype(at::kDouble));
  at::Tensor workspace_count = at::empty({workspace}, z.options().dtype(at::kLong));
  FASTMTL_DISPATCH_CUDA_FLOATING_TYPES(z.scalar_type(), "fastmtl_head_loss_forward_cuda", [&] {
    using K = kernel_t<scalar_t>;
    using L = loss_t<K>;
    check_launch(head_loss_forward<K>(
        tasks.data(), num_tasks, rows, logit_cols, targets.size(1), kernel_mutable_ptr<scalar_t>(logit_grad),
        bias.has_value() ? kernel_ptr<scalar_t>(*bias) : nullptr, targets.const_data_ptr<L>(),
        losses.mutable_data_ptr<L>(), scale.mutable_data_ptr<L>(), workspace_sum.mutable_data_ptr<double>(),
        workspace_count.mutable_data_ptr<int64_t>(), current_stream(z)));
  });
  return {losses, logit_grad, scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_losses, const at::Tensor& z,
                                                        const at::Tensor& weight, const at::Tensor& logit_grad,
                                                        const at::Tensor& scale, c10::ArrayRef<int64_t> num_outputs,
                                                        bool has_bias, bool need_z_grad) {
  const int64_t rows = z.size(0);
  const int64_t logit_cols = weight.size(0);
  std::vector<HeadTask> tasks;  // only the column ranges matter here
  tasks.reserve(num_outputs.size());
  int64_t offset = 0;
  for (int64_t n : num_outputs) {
    tasks.push_back(HeadTask{LossKind::Mse, n, offset, 0});
    offset += n;
  }
  at::Tensor grad_logits = at::empty_like(logit_grad);
  at::Tensor col_scale = at::empty({logit_cols}, grad_losses.options());
  at::Tensor grad_bias = at::empty({has_bias ? logit_cols : 0}, z.options());
  at::Tensor workspace;
  if (has_bias) workspace = at::empty({column_sum_workspace(rows, logit_cols)}, z.options().dtype(at::kDouble));
  FASTMTL_DISPATCH_CUDA_FLOATING_TYPES(z.scalar_type(), "fastmtl_head_loss_backward_cuda", [&] {
    using K = kernel_t<scalar_t>;
    using L = loss_t<K>;
    check_launch(head_loss_backward_scale<K>(
        tasks.data(), static_cast<int64_t>(tasks.size()), rows, logit_cols, kernel_ptr<scalar_t>(logit_grad),
        grad_losses.const_data_ptr<L>(), scale.const_data_ptr<L>(), col_scale.mutable_data_ptr<L>(),
        kernel_mutable_ptr<scalar_t>(grad_logits), has_bias ? kernel_mutable_ptr<scalar_t>(grad_bias) : nullptr,
        has_bias ? workspace.mutable_data_ptr<double>() : nullptr, current_stream(z)));
  });
  at::Tensor grad_weight = at::mm(grad_logits.t(), z);
  at::Tensor grad_z = need_z_grad ? at::mm(grad_logits, weight) : at::empty({0}, z.options());
  return {grad_z, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multitask_head_loss_entry(
    const at::Tensor& z, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& targets,
    const std::vector<std::string>& losses, c10::ArrayRef<int64_t> num_outputs) {
  const ops::TaskLayout layout = ops::check_head_loss_args(z, weight, bias, targets, losses, num_outputs);
  check_fits_int32(layout.logit_cols, kOp, "the sum of num_outputs");
  check_fits_int32(layout.target_cols, kOp, "the number of packed target columns");
  const c10::cuda::CUDAGuard device_guard(z.device());
  std::optional<at::Tensor> bias_c;
  if (bias.has_value()) bias_c = bias->contiguous();
  return forward(z.contiguous(), weight.contiguous(), bias_c, targets.contiguous(), layout.tasks);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multitask_head_loss_backward_entry(
    const at::Tensor& grad_losses, const at::Tensor& z, const at::Tensor& weight, const at::Tensor& logit_grad,
    const at::Tensor& scale, c10::ArrayRef<int64_t> num_outputs, bool has_bias, bool need_z_grad) {
  const int64_t logit_cols = ops::check_head_loss_backward_args(grad_losses, z, weight, logit_grad, scale, num_outputs);
  check_fits_int32(logit_cols, "multitask_head_loss_backward", "the sum of num_outputs");
  const c10::cuda::CUDAGuard device_guard(z.device());
  return backward(grad_losses.contiguous(), z.contiguous(), weight.contiguous(), logit_grad.contiguous(),
                  scale.contiguous(), num_outputs, has_bias, need_z_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmtl, CUDA, m) {
  m.impl("multitask_head_loss", &multitask_head_loss_entry);
  m.impl("multitask_head_loss_backward", &multitask_head_loss_backward_entry);
}

}  // namespace fastmtl::cuda
