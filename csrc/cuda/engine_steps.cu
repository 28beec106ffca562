// The per-task engine's elementwise / reduction steps on CUDA (see kernels.h): the activation
// derivative shared by T cotangents per row (with deterministic bias-gradient column sums), and
// every task's cotangent of the trunk output from its logit gradients.
#include <algorithm>

#include "cuda/column_sum.cuh"
#include "cuda/kernels.h"

namespace fastmtl::cuda {
namespace {

// Element k of the [rows, tasks * cols] view of delta: row k / (tasks * cols), its column col;
// the activation's saved value is saved[row, col % cols] (every task meets the same derivative).
template <Activation A, typename T>
struct TaskActivationBackwardMap {
  const T* grad;
  const T* saved;
  T* delta;
  int64_t tasks_cols, cols;
  template <typename Index>
  __device__ __forceinline__ double operator()(Index k, Index col) const {
    if constexpr (A == Activation::Identity) {
      return static_cast<double>(to_compute(grad[k]));  // delta is grad: nothing to write
    } else {
      const int64_t row = (static_cast<int64_t>(k) - static_cast<int64_t>(col)) / tasks_cols;
      const T s = saved[row * cols + static_cast<int64_t>(col) % cols];
      const T d = store_as<T>(act_backward<A>(to_compute(grad[k]), to_compute(s)));
      delta[k] = d;
      return static_cast<double>(to_compute(d));
    }
  }
};

// Thread per output element (b, t, f) of the tasks in this launch: a dot product over the task's
// own logit columns (a handful), so the [B * T, C] x [C, d] GEMM's zeros are never touched.
template <typename T>
__global__ void task_cotangents_kernel(TaskColumns columns, int64_t num_tasks, int64_t rows, int64_t logit_cols,
                                       int64_t features, const T* logit_grad, const loss_t<T>* col_scale, const T* head,
                                       T* out) {
  using C = compute_t<T>;
  const int64_t n = rows * columns.count * features;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t f = k % features;
    const int64_t t = (k / features) % columns.count;
    const int64_t b = k / (features * columns.count);
    const int64_t offset = columns.offset[t];
    C sum = C(0);
    for (int32_t j = 0; j < columns.width[t]; ++j) {
      const int64_t col = offset + j;
      sum += to_compute(logit_grad[b * logit_cols + col]) * static_cast<C>(col_scale[col]) *
             to_compute(head[col * features + f]);
    }
    out[(b * num_tasks + columns.first + t) * features + f] = store_as<T>(sum);
  }
}

}  // namespace

template <typename T>
cudaError_t activation_backward_tasks(Activation act, int64_t rows, int64_t tasks, int64_t cols, const T* grad,
                                      const T* saved, T* delta, T* bias_grad, double* workspace, cudaStream_t stream) {
  return dispatch_activation(act, [&](auto tag) {
    constexpr Activation A = decltype(tag)::value;
    const TaskActivationBackwardMap<A, T> map{grad, saved, delta, tasks * cols, cols};
    if (bias_grad) return map_with_column_sum(rows, tasks * cols, map, bias_grad, workspace, stream);
    if (A == Activation::Identity) return cudaGetLastError();
    return map_elements(rows, tasks * cols, map, stream);
  });
}

template <typename T>
cudaError_t task_cotangents(const TaskColumns& columns, int64_t num_tasks, int64_t rows, int64_t logit_cols,
                            int64_t features, const T* logit_grad, const loss_t<T>* col_scale, const T* head, T* out,
                            cudaStream_t stream) {
  const int64_t n = rows * columns.count * features;
  if (n == 0) return cudaGetLastError();
  task_cotangents_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(columns, num_tasks, rows, logit_cols, features,
                                                                    logit_grad, col_scale, head, out);
  return cudaGetLastError();
}

#define FASTMTL_INSTANTIATE(T)                                                                                         \
  template cudaError_t activation_backward_tasks<T>(Activation, int64_t, int64_t, int64_t, const T*, const T*, T*, T*, \
                                                    double*, cudaStream_t);                                            \
  template cudaError_t task_cotangents<T>(const TaskColumns&, int64_t, int64_t, int64_t, int64_t, const T*,            \
                                          const loss_t<T>*, const T*, T*, cudaStream_t);
FASTMTL_FOR_EACH_KERNEL_TYPE(FASTMTL_INSTANTIATE)
#undef FASTMTL_INSTANTIATE

}  // namespace fastmtl::cuda
