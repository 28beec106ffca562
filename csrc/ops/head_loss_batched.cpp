// The batched backward of the fused heads: multitask_head_loss_backward at the Batched key of
// torch's legacy vmap (ops/legacy_batched.h). fastmtl.mtl_backward's batched backward starts at the
// losses with N cotangents w_n [T] (one-hot rows for the per-task gradients); torch's fallback ran
// the op once per row and stacked the results. Here, with G_n = logit_grad * (w_n[t] * scale[t]) on
// task t's columns ([N, B, C], in z's dtype as the op rounds it):
//   dz_n = G_n W        one GEMM with N * B rows
//   dW_n = G_n^T z      one GEMM over (N, C) x B
//   db_n = colsum(G_n)
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/head_loss_checks.h"
#include "ops/legacy_batched.h"

namespace fastmtl::ops {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> multitask_head_loss_backward_batched(
    const at::Tensor& grad_losses, const at::Tensor& z, const at::Tensor& weight, const at::Tensor& logit_grad,
    const at::Tensor& scale, c10::ArrayRef<int64_t> num_outputs, bool has_bias, bool need_z_grad) {
  constexpr const char* op = "multitask_head_loss_backward";
  check_only_cotangent_batched(any_batched({&z, &weight, &logit_grad, &scale}), grad_losses, op, "grad_losses",
                               "z, weight, logit_grad, scale");
  int64_t level = 0;
  const at::Tensor w_physical = physical_batch_first(grad_losses, &level, op, "grad_losses");  // [N, T]
  check_some_cotangents(w_physical, op, "grad_losses");
  check_head_loss_backward_args(w_physical.select(0, 0), z, weight, logit_grad, scale, num_outputs);
  // Each logit column's task, to spread the per-task scales over the columns.
  std::vector<int64_t> column_task;
  for (size_t t = 0; t < num_outputs.size(); ++t) column_task.insert(column_task.end(), num_outputs[t], t);
  const at::Tensor columns = at::tensor(column_task, at::TensorOptions().dtype(at::kLong)).to(z.device());
  const at::Tensor task_scale = w_physical.to(scale.scalar_type()) * scale.unsqueeze(0);  // [N, T]
  const at::Tensor col_scale = task_scale.index_select(1, columns);                       // [N, C]
  const at::Tensor G =
      (logit_grad.to(col_scale.scalar_type()).unsqueeze(0) * col_scale.unsqueeze(1)).to(z.scalar_type());  // [N, B, C]
  const at::Tensor grad_weight = at::einsum("nbc,bd->ncd", {G, z});
  const at::Tensor grad_z = need_z_grad ? batched_at(at::matmul(G, weight), level) : z.new_empty({0});
  const at::Tensor grad_bias = has_bias ? batched_at(G.sum(1), level) : z.new_empty({0});
  return {grad_z, batched_at(grad_weight, level), grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmtl, Batched, m) {
  m.impl("multitask_head_loss_backward", &multitask_head_loss_backward_batched);
}

}  // namespace fastmtl::ops
