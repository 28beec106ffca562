// The fused trunk's orchestration, written once for every device: per layer one ATen GEMM (MKL /
// oneDNN on CPU, cuBLAS on CUDA, shapes only on meta) and one epilogue step through the kernel
// interface (kernels/steps.h). Inputs are checked and contiguous (ops/fused_mlp.cpp).
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "common/activation.h"
#include "kernels/steps.h"

namespace fastmtl::ops {

// Returns the trunk output and what backward needs (see SavedKind): for Post activations the
// outputs of layers 1..L-1 (the last one is the returned output), for Pre activations the
// pre-activations of layers 1..L.
std::tuple<at::Tensor, std::vector<at::Tensor>> trunk_forward(const kernels::Steps& steps, const at::Tensor& x,
                                                              const std::vector<at::Tensor>& weights,
                                                              const std::vector<at::Tensor>& biases, Activation act);

// Returns dx ([0]-sized when !need_input_grad), dW for every layer, db for every layer (none when
// !has_bias).
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> trunk_backward(
    const kernels::Steps& steps, const at::Tensor& grad_out, const at::Tensor& x,
    const std::vector<at::Tensor>& weights, const at::Tensor& out, const std::vector<at::Tensor>& saved, Activation act,
    bool has_bias, bool need_input_grad);

}  // namespace fastmtl::ops
