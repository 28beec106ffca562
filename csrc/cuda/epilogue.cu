// The trunk's fused elementwise passes over a GEMM output (see kernels.h). The activation formulas
// are csrc/cpu/activation.h's, compiled for the device: CPU and CUDA compute the same functions.
#include "cuda/column_sum.cuh"
#include "cuda/kernels.h"

namespace fastmtl::cuda {
namespace {

// The pre-activation is rounded to T before the activation reads it, so the forward output is
// act(saved pre-activation), exactly what backward recomputes.
template <Activation A, typename T>
struct BiasActivationMap {
  T* pre;
  const T* bias;
  T* out;
  template <typename Index>
  __device__ __forceinline__ double operator()(Index k, Index col) const {
    compute_t<T> a = to_compute(pre[k]);
    if (bias) a += to_compute(bias[col]);
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

template <Activation A, typename T>
struct ActivationMap {
  const T* pre;
  T* out;
  template <typename Index>
  __device__ __forceinline__ double operator()(Index k, Index) const {
    out[k] = store_as<T>(act_forward<A>(to_compute(pre[k])));
    return 0.0;
  }
};

template <Activation A, typename T>
struct ActivationBackwardMap {
  const T* grad;
  const T* saved;
  T* delta;
  template <typename Index>
  __device__ __forceinline__ double operator()(Index k, Index) const {
    if constexpr (A == Activation::Identity) {
      return static_cast<double>(to_compute(grad[k]));  // delta is grad: nothing to write
    } else {
      const T d = store_as<T>(act_backward<A>(to_compute(grad[k]), to_compute(saved[k])));
      delta[k] = d;
      return static_cast<double>(to_compute(d));
    }
  }
};

}  // namespace

int64_t column_sum_workspace(int64_t rows, int64_t cols) { return column_sum_chunks(rows) * cols; }

template <typename T>
cudaError_t bias_activation_forward(Activation act, int64_t rows, int64_t cols, T* pre, const T* bias, T* out,
                                    cudaStream_t stream) {
  return dispatch_activation(act, [&](auto tag) {
    constexpr Activation A = decltype(tag)::value;
    return map_elements(rows, cols, BiasActivationMap<A, T>{pre, bias, out}, stream);
  });
}

template <typename T>
cudaError_t activation_apply(Activation act, int64_t n, const T* pre, T* out, cudaStream_t stream) {
  return dispatch_activation(act, [&](auto tag) {
    constexpr Activation A = decltype(tag)::value;
    return map_elements(1, n, ActivationMap<A, T>{pre, out}, stream);
  });
}

template <typename T>
cudaError_t activation_backward(Activation act, int64_t rows, int64_t cols, const T* grad, const T* saved, T* delta,
                                T* bias_grad, double* workspace, cudaStream_t stream) {
  return dispatch_activation(act, [&](auto tag) {
    constexpr Activation A = decltype(tag)::value;
    const ActivationBackwardMap<A, T> map{grad, saved, delta};
    if (bias_grad) return map_with_column_sum(rows, cols, map, bias_grad, workspace, stream);
    if (A == Activation::Identity) return cudaGetLastError();
    return map_elements(rows, cols, map, stream);
  });
}

#define FASTMTL_INSTANTIATE(T)                                                                                   \
  template cudaError_t bias_activation_forward<T>(Activation, int64_t, int64_t, T*, const T*, T*, cudaStream_t); \
  template cudaError_t activation_apply<T>(Activation, int64_t, const T*, T*, cudaStream_t);                     \
  template cudaError_t activation_backward<T>(Activation, int64_t, int64_t, const T*, const T*, T*, T*, double*, \
                                              cudaStream_t);
FASTMTL_FOR_EACH_KERNEL_TYPE(FASTMTL_INSTANTIATE)
#undef FASTMTL_INSTANTIATE

}  // namespace fastmtl::cuda
