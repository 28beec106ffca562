// Device-side helpers of the kernels: the compute type of each storage type and conversions,
// launch shapes. Included by the .cu files only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda/kernels.h"

namespace fastmtl::cuda {

// Elementwise math of storage type T runs in this type (kernels.h: float for the 16-bit types).
template <typename T>
using compute_t = typename WideTypeOf<T>::type;

__device__ __forceinline__ float to_compute(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_compute(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_compute(float v) { return v; }
__device__ __forceinline__ double to_compute(double v) { return v; }

// Rounds a compute value to storage type T (round to nearest even).
template <typename T>
struct Store {
  template <typename C>
  __device__ __forceinline__ static T from(C v) {
    return static_cast<T>(v);
  }
};
template <>
struct Store<__half> {
  __device__ __forceinline__ static __half from(float v) { return __float2half_rn(v); }
  __device__ __forceinline__ static __half from(double v) { return __double2half(v); }
};
template <>
struct Store<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
  __device__ __forceinline__ static __nv_bfloat16 from(double v) { return __double2bfloat16(v); }
};

template <typename T, typename C>
__device__ __forceinline__ T store_as(C v) {
  return Store<T>::from(v);
}

__device__ __forceinline__ double quiet_nan() { return __longlong_as_double(0x7ff8000000000000LL); }

constexpr int kThreads = 256;
// Grid-stride loops: enough blocks to fill any current GPU several times over, never more than the
// work needs.
constexpr int64_t kMaxBlocks = 8192;

inline unsigned int blocks_for(int64_t n, int threads = kThreads) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, kMaxBlocks)));
}

}  // namespace fastmtl::cuda
