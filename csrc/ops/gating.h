// The orchestration of gated_mixture, written once for every device: all tasks' gate logits in one
// GEMM (at::mm for a gate input shared by the tasks, at::bmm for one input per task), then the
// softmax + mixture step (kernels/steps.h); backward: one step for the gate-logit and expert
// gradients, then the GEMMs of the gate weights and input. Inputs are checked and contiguous
// (ops/experts.cpp).
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "kernels/steps.h"

namespace fastmtl::ops {

// x: [B, d] or [T, B, d]; gate_weight [T, K, d]; gate_bias [T, K] or undefined; experts [E, B, h];
// index [T * K]. Returns (mixtures [T, B, h], gates: [B, T, K] or [T, B, K] as x).
std::tuple<at::Tensor, at::Tensor> gated_mixture_forward(const kernels::Steps& steps, const at::Tensor& x,
                                                         const at::Tensor& gate_weight, const at::Tensor& gate_bias,
                                                         const at::Tensor& experts, const std::vector<int64_t>& index);

// Returns (dx or [0], d gate_weight, d gate_bias or [0], d experts).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_mixture_backward(
    const kernels::Steps& steps, const at::Tensor& grad_mixtures, const at::Tensor& x, const at::Tensor& gate_weight,
    const at::Tensor& experts, const at::Tensor& gates, const std::vector<int64_t>& index, bool has_bias,
    bool need_x_grad);

}  // namespace fastmtl::ops
