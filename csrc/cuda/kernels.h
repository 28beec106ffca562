// Launchers of the CUDA kernels of the fused hard-sharing ops: templates over raw device pointers,
// sizes and a stream, no ATen (the glue beside this file checks arguments, allocates from the
// caching allocator and calls these). Every launcher only enqueues work on `stream` (no host
// synchronisation, no allocation: CUDA-graph capturable) and returns cudaGetLastError().
//
// T is float, double, __half or __nv_bfloat16. Elementwise math runs in compute_t<T> (float for
// the 16-bit types), column sums and per-task loss sums in double over a fixed order of chunks:
// the same input gives the same bits on every run (no floating-point atomics).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/activation.h"
#include "common/loss.h"

namespace fastmtl::cuda {

// float for the 16-bit storage types, T itself otherwise: the type the kernels compute in, and the
// dtype of per-task losses, 1/count scales, task weights and packed targets for inputs of type T
// (a class index above 256 is not exact in bfloat16).
template <typename T>
struct WideTypeOf {
  using type = T;
};
template <>
struct WideTypeOf<__half> {
  using type = float;
};
template <>
struct WideTypeOf<__nv_bfloat16> {
  using type = float;
};
template <typename T>
using loss_t = typename WideTypeOf<T>::type;

// Applies M to every storage type the kernels are instantiated for.
#define FASTMTL_FOR_EACH_KERNEL_TYPE(M) M(float) M(double) M(__half) M(__nv_bfloat16)

// Tasks per launch of the engine's cotangent kernel (their column ranges travel by value).
constexpr int kMaxTasksPerLaunchColumns = 256;

// ---- trunk epilogues (one pass over a GEMM output [rows, cols], row-major)

// pre += bias (if bias); out == nullptr: pre = act(pre) in place; else out = act(pre) and pre keeps
// the pre-activation (as csrc/cpu/epilogue.h).
template <typename T>
cudaError_t bias_activation_forward(Activation act, int64_t rows, int64_t cols, T* pre, const T* bias, T* out,
                                    cudaStream_t stream);

// out = act(pre) over n values (recomputes a layer input in backward).
template <typename T>
cudaError_t activation_apply(Activation act, int64_t n, const T* pre, T* out, cudaStream_t stream);

// Doubles of workspace the deterministic column sums below need for a [rows, cols] input.
int64_t column_sum_workspace(int64_t rows, int64_t cols);

// delta = grad * act'(saved) (delta may alias grad; for identity delta must equal grad and is not
// written) and, if bias_grad, bias_grad[j] = sum_i delta[i, j] through `workspace`.
template <typename T>
cudaError_t activation_backward(Activation act, int64_t rows, int64_t cols, const T* grad, const T* saved, T* delta,
                                T* bias_grad, double* workspace, cudaStream_t stream);

// The same for `tasks` cotangents per row (the per-task engine): grad, delta [rows, tasks, cols],
// saved [rows, cols]; bias_grad [tasks, cols] through column_sum_workspace(rows, tasks * cols).
template <typename T>
cudaError_t activation_backward_tasks(Activation act, int64_t rows, int64_t tasks, int64_t cols, const T* grad,
                                      const T* saved, T* delta, T* bias_grad, double* workspace, cudaStream_t stream);

// out = in * col_scale per column and, if col_sum, its column sums (workspace as above). out may be in.
template <typename T>
cudaError_t scale_columns(int64_t rows, int64_t cols, const T* in, const loss_t<T>* col_scale, T* out, T* col_sum,
                          double* workspace, cudaStream_t stream);

// ---- per-task engine

// Column ranges of the tasks, by value in the kernel arguments (as the loss kernel's task table).
struct TaskColumns {
  int32_t count;
  int32_t first;  // index of entry 0 among all tasks
  int32_t offset[kMaxTasksPerLaunchColumns];
  int32_t width[kMaxTasksPerLaunchColumns];
};

// out[b, t, :] = sum over task t's columns j of logit_grad[b, j] col_scale[j] head[j, :], for the
// tasks [first, first + count) of `columns`; out is [rows, num_tasks, features].
template <typename T>
cudaError_t task_cotangents(const TaskColumns& columns, int64_t num_tasks, int64_t rows, int64_t logit_cols,
                            int64_t features, const T* logit_grad, const loss_t<T>* col_scale, const T* head, T* out,
                            cudaStream_t stream);

// ---- experts: [E, B, cols] stacks

// pre[e, i, j] = in[e * in_expert_stride + i * in_row_stride + j] + bias[e, j]; out == nullptr:
// pre = act(that) in place; else out = act(pre). in may be pre.
template <typename T>
cudaError_t expert_bias_activation(Activation act, int64_t experts, int64_t rows, int64_t cols, const T* in,
                                   int64_t in_expert_stride, int64_t in_row_stride, const T* bias, T* pre, T* out,
                                   cudaStream_t stream);

// delta[e * delta_expert_stride + i * delta_row_stride + j] = grad[e, i, j] * act'(saved[e, i, j]);
// bias_grad [E, cols] (if not null) = sum over rows, through column_sum_workspace(rows, E * cols).
template <typename T>
cudaError_t expert_activation_backward(Activation act, int64_t experts, int64_t rows, int64_t cols, const T* grad,
                                       const T* saved, T* delta, int64_t delta_expert_stride, int64_t delta_row_stride,
                                       T* bias_grad, double* workspace, cudaStream_t stream);

// ---- gated mixture

// The gate index by value: expert[t * K + k] for every gate entry (more entries: the portable steps).
constexpr int kMaxGateEntries = 1024;
struct GateTable {
  int32_t tasks, gate_width, num_experts;
  int64_t task_stride, row_stride;  // of the gates / gate logits ([T, B, K] view)
  int16_t expert[kMaxGateEntries];
};

// gates: logits (+ gate_bias [T, K]) on entry, softmax over k on return; mixtures [T, B, h].
template <typename T>
cudaError_t gated_mixture_forward(const GateTable& table, int64_t rows, int64_t features, T* gates, const T* gate_bias,
                                  const T* experts, T* mixtures, cudaStream_t stream);

// grad_logits (the gates' layout), grad_experts [E, B, h], grad_bias [T, K] if not null (through
// column_sum_workspace(rows, T * K)).
template <typename T>
cudaError_t gated_mixture_backward(const GateTable& table, int64_t rows, int64_t features, const T* grad_mixtures,
                                   const T* gates, const T* experts, T* grad_logits, T* grad_experts, T* grad_bias,
                                   double* workspace, cudaStream_t stream);

// ---- heads and losses

// Tasks handled by one launch: the task table travels by value as a kernel argument (no host to
// device copy, so nothing to synchronise and nothing that breaks graph capture); more tasks take
// more launches.
constexpr int kMaxTasksPerLaunch = 128;

// Workspace of head_loss_forward: doubles and int64 counts, this many of each.
int64_t head_loss_workspace(int64_t rows, int64_t num_tasks);

// logits [rows, logit_cols] (the GEMM output without bias) become, in place, each entry's raw
// dl/dlogit (0 where missing, not yet divided by the count); targets [rows, target_cols] in
// loss_t<T>. losses[t] = mean over labelled entries (0 if none), scale[t] = 1/count (0 if none).
// An invalid target (bce outside [0, 1] and not NaN, ce not an index in range or -100, regression +-inf) makes its
// task's loss and that entry's gradient NaN: the CPU op raises instead, which would need a host
// synchronisation here.
template <typename T>
cudaError_t head_loss_forward(const HeadTask* tasks, int64_t num_tasks, int64_t rows, int64_t logit_cols,
                              int64_t target_cols, T* logits, const T* bias, const loss_t<T>* targets,
                              loss_t<T>* losses, loss_t<T>* scale, double* workspace_sum, int64_t* workspace_count,
                              cudaStream_t stream);

// grad_logits = logit_grad * (grad_losses[t] * scale[t]) over each task's columns and, if
// grad_bias, its column sums (through `workspace`, column_sum_workspace(rows, logit_cols) doubles).
// col_scale: logit_cols values of scratch.
template <typename T>
cudaError_t head_loss_backward_scale(const HeadTask* tasks, int64_t num_tasks, int64_t rows, int64_t logit_cols,
                                     const T* logit_grad, const loss_t<T>* grad_losses, const loss_t<T>* scale,
                                     loss_t<T>* col_scale, T* grad_logits, T* grad_bias, double* workspace,
                                     cudaStream_t stream);

// ---- target packing

enum class SourceType : int32_t { Float32, Float64, Float16, BFloat16, Bool, UInt8, Int8, Int16, Int32, Int64 };

struct PackSource {
  const void* data;
  int64_t row_stride;     // elements
  int64_t column_stride;  // elements (0 for a 1-D target)
  int64_t out_offset;     // first packed column
  int32_t width;          // packed columns
  SourceType type;
};

constexpr int kMaxSourcesPerLaunch = 64;

// out[i, s.out_offset + j] = Out(source s at row i, column j), for every source. Out: float, double.
template <typename Out>
cudaError_t pack_targets(const PackSource* sources, int64_t num_sources, int64_t rows, int64_t out_cols, Out* out,
                         cudaStream_t stream);

}  // namespace fastmtl::cuda
