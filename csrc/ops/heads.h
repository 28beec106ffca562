// The orchestration of all task heads and losses, written once for every device: one GEMM for
// every head's logits, the loss step (kernels/steps.h) that turns them into dL/dlogits in place,
// and a backward of one column-scaling step plus two GEMMs. Inputs are checked and contiguous
// (ops/multitask_head_loss.cpp).
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "common/loss.h"
#include "kernels/steps.h"

namespace fastmtl::ops {

struct HeadLossForward {
  at::Tensor losses;      // [T] (loss dtype): mean loss over each task's labelled entries, 0 if none
  at::Tensor logit_grad;  // [B, C]: d(entry loss)/d(logit), not yet divided by the count
  at::Tensor scale;       // [T] (loss dtype): 1/count, 0 for a task with nothing labelled
  BadTarget bad;          // first invalid target where the device reports it (the caller raises)
};

HeadLossForward head_loss_forward(const kernels::Steps& steps, const at::Tensor& z, const at::Tensor& weight,
                                  const at::Tensor& bias, const at::Tensor& targets,
                                  const std::vector<HeadTask>& tasks);

// dz = G W, dW = G^T z, db = colsum(G), with G = logit_grad * (grad_losses[t] * scale[t]) per
// task's columns. dz is [0]-sized when !need_z_grad, db when !has_bias.
std::tuple<at::Tensor, at::Tensor, at::Tensor> head_loss_backward(const kernels::Steps& steps,
                                                                  const at::Tensor& grad_losses, const at::Tensor& z,
                                                                  const at::Tensor& weight,
                                                                  const at::Tensor& logit_grad, const at::Tensor& scale,
                                                                  const std::vector<int64_t>& num_outputs,
                                                                  bool has_bias, bool need_z_grad);

}  // namespace fastmtl::ops
