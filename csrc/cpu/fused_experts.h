// E expert MLPs on CPU: per layer one GEMM over all experts (a single at::mm for the first layer
// when the experts share their input, at::bmm otherwise) and one fused bias + activation pass.
// Inputs are already checked and contiguous (csrc/ops/experts.cpp does that).
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "cpu/activation.h"

namespace fastmtl::cpu {

// x: [B, d0] (one input for all experts) or [E, B, d0] (one per expert); weights[l]: [E, out_l,
// in_l]; biases: [E, out_l] per layer, or none. Returns the outputs [E, B, out_L] and what
// backward needs, as fused_mlp_forward: for Post activations the outputs of layers 1..L-1, for Pre
// activations the pre-activations of layers 1..L, each [E, B, out_l].
std::tuple<at::Tensor, std::vector<at::Tensor>> fused_experts_forward(
    const at::Tensor& x, const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& biases,
    Activation act);

// Returns dx (x's shape, [0]-sized when !need_input_grad; for a shared x the sum over experts),
// dW per layer, db per layer (none when !has_bias).
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> fused_experts_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const std::vector<at::Tensor>& weights, const at::Tensor& out,
    const std::vector<at::Tensor>& saved, Activation act, bool has_bias, bool need_input_grad);

}  // namespace fastmtl::cpu
