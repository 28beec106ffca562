// Fused elementwise passes that run over a GEMM's output (CPU). Raw pointers, row-major, no ATen
// tensors: the callers own allocation and checking. Threads: at::parallel_for.
#pragma once

#include <cstdint>

#include "common/activation.h"

namespace fastmtl::cpu {

// One pass over a layer's GEMM output `pre` [rows, cols]: pre += bias (if bias), then
//   out == nullptr: pre = act(pre) in place (activations whose backward needs the output);
//   out != nullptr: out = act(pre), pre keeps the pre-activation (activations whose backward needs it).
template <typename T>
void bias_activation_forward(Activation act, int64_t rows, int64_t cols, T* pre, const T* bias, T* out);

// out = act(pre), elementwise over n values (recomputes a layer input in backward).
template <typename T>
void activation_apply(Activation act, int64_t n, const T* pre, T* out);

// One pass: delta = grad * act'(saved) and, if bias_grad, bias_grad[j] = sum_i delta[i, j]
// (accumulated in double over fixed chunks of rows, then chunks in order: the same bits for any
// number of threads). delta may alias grad.
template <typename T>
void activation_backward(Activation act, int64_t rows, int64_t cols, const T* grad, const T* saved, T* delta,
                         T* bias_grad);

// The same for `tasks` cotangents stacked per row (the per-task backward of one layer: every task's
// cotangent meets the same activation derivative): grad and delta are [rows, tasks, cols], saved is
// [rows, cols], and, if bias_grad, bias_grad[t, j] = sum_i delta[i, t, j] (same deterministic order).
template <typename T>
void activation_backward_tasks(Activation act, int64_t rows, int64_t tasks, int64_t cols, const T* grad, const T* saved,
                               T* delta, T* bias_grad);

// One pass: out[i, j] = in[i, j] * col_scale[j] and, if col_sum, col_sum[j] = sum_i out[i, j]
// (same deterministic order as above). out may alias in.
template <typename T>
void scale_columns(int64_t rows, int64_t cols, const T* in, const T* col_scale, T* out, T* col_sum);

}  // namespace fastmtl::cpu
