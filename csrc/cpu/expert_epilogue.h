// The epilogue passes of the fused experts (csrc/cpu/fused_experts.cpp): the per-layer bias and
// activation of E expert MLPs at once, reading or writing one side in a strided layout. Why
// strided: the first layer of experts sharing one input is a single GEMM whose output is
// [rows, E, cols]; the pass that has to touch every element anyway also moves it to the [E, rows,
// cols] layout of the batched GEMMs of the next layers (and back, in backward), so no copy is made.
#pragma once

#include <cstdint>

#include "common/activation.h"

namespace fastmtl::cpu {

// Element (e, i, j) of `in` is in[e * in_expert_stride + i * in_row_stride + j]; pre and out are
// contiguous [experts, rows, cols] and bias (if any) is [experts, cols]. With a = in + bias:
//   out == nullptr: pre = act(a);  out != nullptr: pre = a, out = act(a).
// `in` may be `pre` when the strides are those of the contiguous layout.
template <typename T>
void expert_bias_activation_forward(Activation act, int64_t experts, int64_t rows, int64_t cols, const T* in,
                                    int64_t in_expert_stride, int64_t in_row_stride, const T* bias, T* pre, T* out);

// delta(e, i, j) = grad[e, i, j] * act'(saved[e, i, j]) for contiguous [experts, rows, cols] grad and
// saved, written at delta[e * delta_expert_stride + i * delta_row_stride + j]; if bias_grad,
// bias_grad[e, j] = sum_i delta(e, i, j) in a fixed order (the same bits for any thread count).
// delta may alias grad when its strides are those of the contiguous layout.
template <typename T>
void expert_activation_backward(Activation act, int64_t experts, int64_t rows, int64_t cols, const T* grad,
                                const T* saved, T* delta, int64_t delta_expert_stride, int64_t delta_row_stride,
                                T* bias_grad);

}  // namespace fastmtl::cpu
