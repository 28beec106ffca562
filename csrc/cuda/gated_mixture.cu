// The gates' softmax and the mixtures of gated_mixture on CUDA (see kernels.h), and their backward.
// The gate index travels by value (GateTable). Per (task, row) one thread runs the softmax over the
// K gate logits in the compute type; the mixtures and the expert gradients are one thread per
// output element, each a fixed-order sum over the gate entries: no atomics, deterministic bits.
#include "cuda/column_sum.cuh"
#include "cuda/kernels.h"

namespace fastmtl::cuda {
namespace {

template <typename T>
__device__ __forceinline__ int64_t gate_at(const GateTable& g, int64_t t, int64_t b) {
  return t * g.task_stride + b * g.row_stride;
}

template <typename T>
__global__ void gate_softmax_kernel(GateTable g, int64_t rows, T* gates, const T* gate_bias) {
  using C = compute_t<T>;
  const int64_t n = rows * g.tasks;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = k / rows, b = k % rows;
    T* p = gates + gate_at<T>(g, t, b);
    const T* bias = gate_bias ? gate_bias + t * g.gate_width : nullptr;
    C top = -INFINITY;
    for (int j = 0; j < g.gate_width; ++j) top = fmax(top, to_compute(p[j]) + (bias ? to_compute(bias[j]) : C(0)));
    C total = C(0);
    for (int j = 0; j < g.gate_width; ++j) total += exp(to_compute(p[j]) + (bias ? to_compute(bias[j]) : C(0)) - top);
    const C inv = C(1) / total;
    for (int j = 0; j < g.gate_width; ++j)
      p[j] = store_as<T>(exp(to_compute(p[j]) + (bias ? to_compute(bias[j]) : C(0)) - top) * inv);
  }
}

// mixtures[t, b, f] = sum_k gates[t, b, k] experts[index[t, k], b, f].
template <typename T>
__global__ void mixture_kernel(GateTable g, int64_t rows, int64_t features, const T* gates, const T* experts,
                               T* mixtures) {
  using C = compute_t<T>;
  const int64_t n = g.tasks * rows * features;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t f = k % features, b = (k / features) % rows, t = k / (features * rows);
    const T* p = gates + gate_at<T>(g, t, b);
    C sum = C(0);
    for (int j = 0; j < g.gate_width; ++j) {
      const int64_t e = g.expert[t * g.gate_width + j];
      sum += to_compute(p[j]) * to_compute(experts[(e * rows + b) * features + f]);
    }
    mixtures[k] = store_as<T>(sum);
  }
}

// d logit[t, b, k] = p_k (dot_k - sum_j p_j dot_j), dot_k = <d mixture[t, b], experts[index[t, k], b]>.
template <typename T>
__global__ void gate_logit_grad_kernel(GateTable g, int64_t rows, int64_t features, const T* grad_mixtures,
                                       const T* gates, const T* experts, T* grad_logits) {
  using C = compute_t<T>;
  const int64_t n = rows * g.tasks;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = k / rows, b = k % rows;
    const T* p = gates + gate_at<T>(g, t, b);
    T* dl = grad_logits + gate_at<T>(g, t, b);
    const T* dm = grad_mixtures + (t * rows + b) * features;
    auto dot = [&](int j) {
      const T* ex = experts + (static_cast<int64_t>(g.expert[t * g.gate_width + j]) * rows + b) * features;
      C s = C(0);
      for (int64_t f = 0; f < features; ++f) s += to_compute(dm[f]) * to_compute(ex[f]);
      return s;
    };
    C weighted = C(0);
    for (int j = 0; j < g.gate_width; ++j) weighted += to_compute(p[j]) * dot(j);
    for (int j = 0; j < g.gate_width; ++j) dl[j] = store_as<T>(to_compute(p[j]) * (dot(j) - weighted));
  }
}

// grad_experts[e, b, f] = sum over gate entries (t, k) weighing e of gates[t, b, k] dm[t, b, f].
template <typename T>
__global__ void expert_grad_kernel(GateTable g, int64_t rows, int64_t features, const T* grad_mixtures, const T* gates,
                                   T* grad_experts) {
  using C = compute_t<T>;
  const int64_t n = g.num_experts * rows * features;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t f = k % features, b = (k / features) % rows, e = k / (features * rows);
    C sum = C(0);
    for (int64_t t = 0; t < g.tasks; ++t)
      for (int j = 0; j < g.gate_width; ++j)
        if (g.expert[t * g.gate_width + j] == e)
          sum += to_compute(gates[gate_at<T>(g, t, b) + j]) * to_compute(grad_mixtures[(t * rows + b) * features + f]);
    grad_experts[k] = store_as<T>(sum);
  }
}

// Reads grad_logits (t, b, k) as the [B, T * K] matrix whose column sums are the bias gradients.
template <typename T>
struct GateLogitColumns {
  GateTable g;  // by value: the map is a kernel argument too
  const T* grad_logits;
  int64_t tasks_width;
  template <typename Index>
  __device__ __forceinline__ double operator()(Index k64, Index c64) const {
    const int64_t c = static_cast<int64_t>(c64);
    const int64_t b = (static_cast<int64_t>(k64) - c) / tasks_width;
    const int64_t t = c / g.gate_width, j = c % g.gate_width;
    return static_cast<double>(to_compute(grad_logits[gate_at<T>(g, t, b) + j]));
  }
};

}  // namespace

template <typename T>
cudaError_t gated_mixture_forward(const GateTable& table, int64_t rows, int64_t features, T* gates, const T* gate_bias,
                                  const T* experts, T* mixtures, cudaStream_t stream) {
  gate_softmax_kernel<T><<<blocks_for(rows * table.tasks), kThreads, 0, stream>>>(table, rows, gates, gate_bias);
  mixture_kernel<T><<<blocks_for(table.tasks * rows * features), kThreads, 0, stream>>>(table, rows, features, gates,
                                                                                        experts, mixtures);
  return cudaGetLastError();
}

template <typename T>
cudaError_t gated_mixture_backward(const GateTable& table, int64_t rows, int64_t features, const T* grad_mixtures,
                                   const T* gates, const T* experts, T* grad_logits, T* grad_experts, T* grad_bias,
                                   double* workspace, cudaStream_t stream) {
  gate_logit_grad_kernel<T><<<blocks_for(rows * table.tasks), kThreads, 0, stream>>>(
      table, rows, features, grad_mixtures, gates, experts, grad_logits);
  expert_grad_kernel<T><<<blocks_for(table.num_experts * rows * features), kThreads, 0, stream>>>(
      table, rows, features, grad_mixtures, gates, grad_experts);
  if (grad_bias) {
    const int64_t cols = static_cast<int64_t>(table.tasks) * table.gate_width;
    return map_with_column_sum(rows, cols, GateLogitColumns<T>{table, grad_logits, cols}, grad_bias, workspace, stream);
  }
  return cudaGetLastError();
}

#define FASTMTL_INSTANTIATE(T)                                                                                         \
  template cudaError_t gated_mixture_forward<T>(const GateTable&, int64_t, int64_t, T*, const T*, const T*, T*,        \
                                                cudaStream_t);                                                         \
  template cudaError_t gated_mixture_backward<T>(const GateTable&, int64_t, int64_t, const T*, const T*, const T*, T*, \
                                                 T*, T*, double*, cudaStream_t);
FASTMTL_FOR_EACH_KERNEL_TYPE(FASTMTL_INSTANTIATE)
#undef FASTMTL_INSTANTIATE

}  // namespace fastmtl::cuda
