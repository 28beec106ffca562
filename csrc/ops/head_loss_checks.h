// Argument checks of multitask_head_loss and its backward, shared by the CPU entry points
// (csrc/ops/multitask_head_loss.cpp) and the CUDA ones (csrc/cuda/multitask_head_loss.cpp).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "ops/checks.h"
#include "ops/task_spec.h"

namespace fastmtl::ops {

// targets: packed [B, target columns] in loss_dtype(z) (z's dtype; float32 for a 16-bit z).
inline TaskLayout check_head_loss_args(const at::Tensor& z, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, const at::Tensor& targets,
                                       const std::vector<std::string>& losses, c10::ArrayRef<int64_t> num_outputs) {
  constexpr const char* op = "multitask_head_loss";
  TaskLayout layout = parse_task_layout(op, losses, num_outputs);
  check_dim(z, 2, op, "z");
  check_compute_dtype(z, op, "z");
  TORCH_CHECK_VALUE(z.size(0) >= 1,
                    "fastmtl.multitask_head_loss: argument 'z' expected a batch of at least 1 row, "
                    "got shape ",
                    shape_str(z.sizes()));
  check_dim(weight, 2, op, "weight");
  check_like(weight, z, op, "weight", "z");
  check_size(weight, 0, layout.logit_cols, op, "weight", "sum of num_outputs over tasks");
  check_size(weight, 1, z.size(1), op, "weight", "z.shape[1]");
  if (bias.has_value()) {
    check_dim(*bias, 1, op, "bias");
    check_like(*bias, z, op, "bias", "z");
    check_size(*bias, 0, layout.logit_cols, op, "bias", "sum of num_outputs over tasks");
  }
  check_dim(targets, 2, op, "targets");
  check_loss_like(targets, z, op, "targets", "z");
  check_size(targets, 0, z.size(0), op, "targets", "z.shape[0], the batch");
  check_size(targets, 1, layout.target_cols, op, "targets",
             "packed target columns: num_outputs for regression, 1 for bce and ce");
  return layout;
}

// Returns the number of logit columns (sum of num_outputs).
inline int64_t check_head_loss_backward_args(const at::Tensor& grad_losses, const at::Tensor& z,
                                             const at::Tensor& weight, const at::Tensor& logit_grad,
                                             const at::Tensor& scale, c10::ArrayRef<int64_t> num_outputs) {
  constexpr const char* op = "multitask_head_loss_backward";
  const int64_t num_tasks = static_cast<int64_t>(num_outputs.size());
  int64_t logit_cols = 0;
  TORCH_CHECK_VALUE(num_tasks >= 1, "fastmtl.", op, ": argument 'num_outputs' expected at least one task, got none");
  for (int64_t t = 0; t < num_tasks; ++t) {
    // Each entry bounds a block of logit columns the kernels index: a non-positive one would make
    // them read and write outside the logit matrix (only their sum is compared with the shapes).
    TORCH_CHECK_VALUE(num_outputs[t] >= 1, "fastmtl.", op, ": argument 'num_outputs' expected every entry >= 1, got ",
                      num_outputs[t], " at index ", t);
    logit_cols += num_outputs[t];
  }
  check_dim(grad_losses, 1, op, "grad_losses");
  check_loss_like(grad_losses, z, op, "grad_losses", "z");
  check_size(grad_losses, 0, num_tasks, op, "grad_losses", "one per task");
  check_loss_like(scale, z, op, "scale", "z");
  check_size(scale, 0, num_tasks, op, "scale", "one per task");
  check_like(weight, z, op, "weight", "z");
  check_size(weight, 0, logit_cols, op, "weight", "sum of num_outputs");
  check_like(logit_grad, z, op, "logit_grad", "z");
  TORCH_CHECK_VALUE(logit_grad.dim() == 2 && logit_grad.size(0) == z.size(0) && logit_grad.size(1) == logit_cols,
                    "fastmtl.multitask_head_loss_backward: argument 'logit_grad' expected shape [", z.size(0), ", ",
                    logit_cols, "], got ", shape_str(logit_grad.sizes()));
  return logit_cols;
}

}  // namespace fastmtl::ops
