// What the ATen glue of the CUDA ops (the .cpp files beside this one) shares: the kernels' storage
// type for each ATen scalar type, the current stream, launch errors turned into exceptions.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/kernels.h"

namespace fastmtl::cuda {

template <typename S>
struct KernelTypeOf {
  using type = S;
};
template <>
struct KernelTypeOf<at::Half> {
  using type = __half;
};
template <>
struct KernelTypeOf<at::BFloat16> {
  using type = __nv_bfloat16;
};
// at::Half / at::BFloat16 have the layout of __half / __nv_bfloat16 (one 16-bit value).
template <typename S>
using kernel_t = typename KernelTypeOf<S>::type;
static_assert(sizeof(at::Half) == sizeof(__half) && sizeof(at::BFloat16) == sizeof(__nv_bfloat16));

template <typename S>
const kernel_t<S>* kernel_ptr(const at::Tensor& t) {
  return reinterpret_cast<const kernel_t<S>*>(t.const_data_ptr<S>());
}

template <typename S>
kernel_t<S>* kernel_mutable_ptr(at::Tensor& t) {
  return reinterpret_cast<kernel_t<S>*>(t.mutable_data_ptr<S>());
}

inline cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

inline void check_launch(cudaError_t err) { C10_CUDA_CHECK(err); }

}  // namespace fastmtl::cuda

#define FASTMTL_DISPATCH_CUDA_FLOATING_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)
