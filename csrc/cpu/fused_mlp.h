// The fused trunk on CPU: per layer one ATen GEMM (MKL/oneDNN) and one fused epilogue pass.
// Inputs are already checked and contiguous (csrc/ops/fused_mlp.cpp does that).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

#include "cpu/activation.h"

namespace fastmtl::cpu {

// Returns the trunk output and what backward needs (see SavedKind): for Post activations the
// outputs of layers 1..L-1 (the last one is the returned output), for Pre activations the
// pre-activations of layers 1..L.
std::tuple<at::Tensor, std::vector<at::Tensor>> fused_mlp_forward(
    const at::Tensor& x, const std::vector<at::Tensor>& weights,
    const std::vector<at::Tensor>& biases, Activation act);

// biases: one per layer or none. Returns dx ([0]-sized when !need_input_grad), dW for every layer,
// db for every layer (none when !has_bias).
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> fused_mlp_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const std::vector<at::Tensor>& weights,
    const at::Tensor& out, const std::vector<at::Tensor>& saved, Activation act,
    bool has_bias, bool need_input_grad);

}  // namespace fastmtl::cpu
