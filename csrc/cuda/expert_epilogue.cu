// The expert stacks' strided epilogues on CUDA (see kernels.h): bias + activation over [E, B, cols]
// read from the shared first layer's [B, E * cols] GEMM output, and the activation derivative
// written back into that layout, with the bias gradients [E, cols] as deterministic column sums of
// the [B, E * cols] view (rows are the batch, columns every expert's features).
#include "cuda/column_sum.cuh"
#include "cuda/kernels.h"

namespace fastmtl::cuda {
namespace {

// Element k of the contiguous [E, B, cols] pre: expert e, row i, column j. As the trunk's epilogue,
// the pre-activation is rounded to T before the activation reads it.
template <Activation A, typename T>
struct ExpertBiasActivationMap {
  const T* in;
  int64_t in_expert_stride, in_row_stride;
  const T* bias;
  T* pre;
  T* out;
  int64_t rows, cols;
  template <typename Index>
  __device__ __forceinline__ double operator()(Index k64, Index) const {
    const int64_t k = static_cast<int64_t>(k64);
    const int64_t j = k % cols, i = (k / cols) % rows, e = k / (cols * rows);
    compute_t<T> a = to_compute(in[e * in_expert_stride + i * in_row_stride + j]);
    if (bias) a += to_compute(bias[e * cols + j]);
    const T a_stored = store_as<T>(a);
    const T y = store_as<T>(act_forward<A>(to_compute(a_stored)));
    if (out) {
      pre[k] = a_stored;
      out[k] = y;
    } else {
      pre[k] = y;
    }
    return 0.0;
  }
};

// Element (i, c) of the [B, E * cols] view: expert e = c / cols, column j = c % cols.
template <Activation A, typename T>
struct ExpertActivationBackwardMap {
  const T* grad;
  const T* saved;
  T* delta;
  int64_t delta_expert_stride, delta_row_stride;
  int64_t rows, cols, experts_cols;
  template <typename Index>
  __device__ __forceinline__ double operator()(Index k64, Index c64) const {
    const int64_t c = static_cast<int64_t>(c64);
    const int64_t i = (static_cast<int64_t>(k64) - c) / experts_cols;
    const int64_t e = c / cols, j = c % cols;
    const int64_t src = (e * rows + i) * cols + j;
    const T d = store_as<T>(act_backward<A>(to_compute(grad[src]), to_compute(saved[src])));
    delta[e * delta_expert_stride + i * delta_row_stride + j] = d;
    return static_cast<double>(to_compute(d));
  }
};

}  // namespace

template <typename T>
cudaError_t expert_bias_activation(Activation act, int64_t experts, int64_t rows, int64_t cols, const T* in,
                                   int64_t in_expert_stride, int64_t in_row_stride, const T* bias, T* pre, T* out,
                                   cudaStream_t stream) {
  return dispatch_activation(act, [&](auto tag) {
    constexpr Activation A = decltype(tag)::value;
    const ExpertBiasActivationMap<A, T> map{in, in_expert_stride, in_row_stride, bias, pre, out, rows, cols};
    return map_elements(experts * rows, cols, map, stream);
  });
}

template <typename T>
cudaError_t expert_activation_backward(Activation act, int64_t experts, int64_t rows, int64_t cols, const T* grad,
                                       const T* saved, T* delta, int64_t delta_expert_stride, int64_t delta_row_stride,
                                       T* bias_grad, double* workspace, cudaStream_t stream) {
  return dispatch_activation(act, [&](auto tag) {
    constexpr Activation A = decltype(tag)::value;
    const ExpertActivationBackwardMap<A, T> map{grad, saved, delta,         delta_expert_stride, delta_row_stride,
                                                rows, cols,  experts * cols};
    if (bias_grad) return map_with_column_sum(rows, experts * cols, map, bias_grad, workspace, stream);
    return map_elements(rows, experts * cols, map, stream);
  });
}

#define FASTMTL_INSTANTIATE(T)                                                                                      \
  template cudaError_t expert_bias_activation<T>(Activation, int64_t, int64_t, int64_t, const T*, int64_t, int64_t, \
                                                 const T*, T*, T*, cudaStream_t);                                   \
  template cudaError_t expert_activation_backward<T>(Activation, int64_t, int64_t, int64_t, const T*, const T*, T*, \
                                                     int64_t, int64_t, T*, double*, cudaStream_t);
FASTMTL_FOR_EACH_KERNEL_TYPE(FASTMTL_INSTANTIATE)
#undef FASTMTL_INSTANTIATE

}  // namespace fastmtl::cuda
