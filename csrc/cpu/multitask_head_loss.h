// All task heads and losses on CPU: one GEMM for every head's logits, one loss pass that also
// writes dL/dlogits, and a backward of one scaling pass plus two GEMMs.
// Inputs are already checked and contiguous (csrc/ops/multitask_head_loss.cpp does that).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

#include "cpu/head_loss.h"

namespace fastmtl::cpu {

struct HeadLossForward {
  at::Tensor losses;      // [T]: mean loss over each task's labelled entries, 0 if none
  at::Tensor logit_grad;  // [B, C]: d(entry loss)/d(logit), not yet divided by the count
  at::Tensor scale;       // [T]: 1/count, 0 for a task with nothing labelled
  BadTarget bad;          // first invalid target, if any (the caller raises)
};

HeadLossForward multitask_head_loss_forward(const at::Tensor& z, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias,
                                            const at::Tensor& targets, const std::vector<HeadTask>& tasks);

// dz = G W, dW = G^T z, db = colsum(G), with G = logit_grad * (grad_losses[t] * scale[t]) per
// task's columns. dz is [0]-sized when !need_z_grad, db when !has_bias.
std::tuple<at::Tensor, at::Tensor, at::Tensor> multitask_head_loss_backward(
    const at::Tensor& grad_losses, const at::Tensor& z, const at::Tensor& weight,
    const at::Tensor& logit_grad, const at::Tensor& scale, const std::vector<int64_t>& num_outputs,
    bool has_bias, bool need_z_grad);

}  // namespace fastmtl::cpu
