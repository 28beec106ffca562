// The orchestration of E expert MLPs (fused_experts), written once for every device: per layer one
// GEMM over all experts (a single at::mm for the first layer when the experts share their input,
// at::bmm otherwise) and one bias + activation step (kernels/steps.h). Inputs are checked and
// contiguous (ops/experts.cpp).
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "common/activation.h"
#include "kernels/steps.h"

namespace fastmtl::ops {

// x: [B, d0] (one input for all experts) or [E, B, d0] (one per expert); weights[l]: [E, out_l,
// in_l]; biases: [E, out_l] per layer, or none. Returns the outputs [E, B, out_L] and what
// backward needs, as trunk_forward: for Post activations the outputs of layers 1..L-1, for Pre
// activations the pre-activations of layers 1..L, each [E, B, out_l].
std::tuple<at::Tensor, std::vector<at::Tensor>> experts_forward(const kernels::Steps& steps, const at::Tensor& x,
                                                                const std::vector<at::Tensor>& weights,
                                                                const std::vector<at::Tensor>& biases, Activation act);

// Returns dx (x's shape, [0]-sized when !need_input_grad; for a shared x the sum over experts),
// dW per layer, db per layer (none when !has_bias).
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> experts_backward(
    const kernels::Steps& steps, const at::Tensor& grad_out, const at::Tensor& x,
    const std::vector<at::Tensor>& weights, const at::Tensor& out, const std::vector<at::Tensor>& saved, Activation act,
    bool has_bias, bool need_input_grad);

}  // namespace fastmtl::ops
