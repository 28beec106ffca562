// The per-task loss pass of the fused heads on CUDA (see kernels.h), with the same formulas as
// csrc/cpu/head_loss.cpp: stable bce with logits, log-sum-exp ce over the task's own columns,
// mse / l1 / huber (beta 1) per column, NaN / -100 missing, per-task means over labelled entries.
#include <algorithm>

#include "cuda/column_sum.cuh"
#include "cuda/kernels.h"

namespace fastmtl::cuda {
namespace {

// Rows per chunk of the loss pass: the unit of its deterministic per-task reduction.
constexpr int64_t kLossChunkRows = 32;

struct DeviceTask {
  int32_t loss;  // LossKind
  int32_t num_outputs;
  int32_t logit_offset;
  int32_t target_offset;
};

// Travels by value as a kernel argument (2 KiB, under the 4 KiB limit of every CUDA version).
struct TaskTable {
  int32_t count;
  int32_t first;  // index of task[0] among all tasks
  DeviceTask task[kMaxTasksPerLaunch];
};

// Accumulates one (row, task) pair: its loss into sum, labelled entries into count, and replaces its
// logits y by their gradient. t: the row's targets of this task; b: the task's bias or nullptr.
// Validity and formulas: common/loss.h (shared with the CPU pass). An invalid target counts as an
// entry with a NaN loss and NaN gradient.
template <typename T>
__device__ void task_row(const DeviceTask& task, T* y, const T* b, const loss_t<T>* t, double* sum, int64_t* count) {
  using C = compute_t<T>;
  const int n = task.num_outputs;
  const LossKind loss = static_cast<LossKind>(task.loss);
  if (loss == LossKind::Ce) {
    const C target = static_cast<C>(t[0]);
    if (ce_target_missing(target)) {
      for (int j = 0; j < n; ++j) y[j] = store_as<T>(C(0));
      return;
    }
    if (!ce_target_valid(target, n)) {
      for (int j = 0; j < n; ++j) y[j] = store_as<T>(C(quiet_nan()));
      *sum += quiet_nan();
      *count += 1;
      return;
    }
    const int cls = static_cast<int>(target);
    // Online log-sum-exp: running max m and sum s of exp(v - m), one read of the logits.
    C m = -INFINITY, s = C(0), v_cls = C(0);
    for (int j = 0; j < n; ++j) {
      const C v = to_compute(y[j]) + (b ? to_compute(b[j]) : C(0));
      if (j == cls) v_cls = v;
      if (v > m) {
        s = s * exp(m - v) + C(1);
        m = v;
      } else {
        s += exp(v - m);
      }
    }
    const C inv = C(1) / s;
    for (int j = 0; j < n; ++j) {
      const C v = to_compute(y[j]) + (b ? to_compute(b[j]) : C(0));
      y[j] = store_as<T>(exp(v - m) * inv - (j == cls ? C(1) : C(0)));
    }
    *sum += static_cast<double>(ce_loss(m, s, v_cls));
    *count += 1;
    return;
  }
  if (loss == LossKind::Bce) {
    const C target = static_cast<C>(t[0]);
    if (is_nan(target)) {
      y[0] = store_as<T>(C(0));
      return;
    }
    *count += 1;
    if (!bce_target_valid(target)) {
      y[0] = store_as<T>(C(quiet_nan()));
      *sum += quiet_nan();
      return;
    }
    const EntryLoss<C> e = bce_entry(to_compute(y[0]) + (b ? to_compute(b[0]) : C(0)), target);
    *sum += static_cast<double>(e.loss);
    y[0] = store_as<T>(e.grad);
    return;
  }
  for (int j = 0; j < n; ++j) {  // mse, l1, huber: every column its own entry
    const C target = static_cast<C>(t[j]);
    if (is_nan(target)) {
      y[j] = store_as<T>(C(0));
      continue;
    }
    *count += 1;
    if (!regression_target_valid(target)) {
      y[j] = store_as<T>(C(quiet_nan()));
      *sum += quiet_nan();
      continue;
    }
    const EntryLoss<C> e = regression_entry(loss, to_compute(y[j]) + (b ? to_compute(b[j]) : C(0)) - target);
    *sum += static_cast<double>(e.loss);
    y[j] = store_as<T>(e.grad);
  }
}

// Block: exactly lanes x table.count threads (thread = lane * count + task); a block walks chunks of
// kLossChunkRows rows, lane l taking rows l, l + lanes, ...; per chunk and task the lanes' sums are
// added in lane order into workspace [num_chunks, num_tasks]. Adjacent threads read adjacent tasks
// of the same row: neighbouring logits.
template <typename T>
__global__ void head_loss_kernel(TaskTable table, int64_t num_tasks, int64_t rows, int64_t logit_cols,
                                 int64_t target_cols, T* logits, const T* bias, const loss_t<T>* targets,
                                 double* workspace_sum, int64_t* workspace_count) {
  __shared__ double lane_sum[kThreads];
  __shared__ int64_t lane_count[kThreads];
  const int tasks_here = table.count;
  const int lanes = blockDim.x / tasks_here;
  const int k = threadIdx.x % tasks_here;
  const int lane = threadIdx.x / tasks_here;
  const DeviceTask task = table.task[k];
  const int64_t num_chunks = (rows + kLossChunkRows - 1) / kLossChunkRows;
  for (int64_t chunk = blockIdx.x; chunk < num_chunks; chunk += gridDim.x) {
    double sum = 0.0;
    int64_t count = 0;
    const int64_t row_end = min(rows, (chunk + 1) * kLossChunkRows);
    for (int64_t row = chunk * kLossChunkRows + lane; row < row_end; row += lanes) {
      task_row<T>(task, logits + row * logit_cols + task.logit_offset, bias ? bias + task.logit_offset : nullptr,
                  targets + row * target_cols + task.target_offset, &sum, &count);
    }
    lane_sum[threadIdx.x] = sum;
    lane_count[threadIdx.x] = count;
    __syncthreads();
    if (lane == 0) {
      double total = 0.0;
      int64_t total_count = 0;
      for (int l = 0; l < lanes; ++l) {
        total += lane_sum[l * tasks_here + k];
        total_count += lane_count[l * tasks_here + k];
      }
      workspace_sum[chunk * num_tasks + table.first + k] = total;
      workspace_count[chunk * num_tasks + table.first + k] = total_count;
    }
    __syncthreads();
  }
}

// Per task, the sum over row chunks of the loss kernel's partials: one block per task, thread i
// adding chunks i, i + kThreads, ... in order, then a fixed tree over the threads (deterministic).
template <typename L>
__global__ void head_loss_finalize_kernel(int64_t num_tasks, int64_t num_chunks, const double* workspace_sum,
                                          const int64_t* workspace_count, L* losses, L* scale) {
  __shared__ double part_sum[kThreads];
  __shared__ int64_t part_count[kThreads];
  const int64_t t = blockIdx.x;
  double total = 0.0;
  int64_t count = 0;
  for (int64_t chunk = threadIdx.x; chunk < num_chunks; chunk += blockDim.x) {
    total += workspace_sum[chunk * num_tasks + t];
    count += workspace_count[chunk * num_tasks + t];
  }
  part_sum[threadIdx.x] = total;
  part_count[threadIdx.x] = count;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) {
      part_sum[threadIdx.x] += part_sum[threadIdx.x + width];
      part_count[threadIdx.x] += part_count[threadIdx.x + width];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    // A task with nothing labelled contributes 0 and no gradient, never 0/0.
    const double sum = part_sum[0];
    const int64_t n = part_count[0];
    losses[t] = static_cast<L>(n > 0 ? sum / static_cast<double>(n) : 0.0);
    scale[t] = static_cast<L>(n > 0 ? 1.0 / static_cast<double>(n) : 0.0);
  }
}

// col_scale[c] = grad_losses[t] * scale[t] for every column c of task t: a block per task.
template <typename L>
__global__ void task_column_scale_kernel(TaskTable table, const L* grad_losses, const L* scale, L* col_scale) {
  const DeviceTask task = table.task[blockIdx.x];
  const L value = grad_losses[table.first + blockIdx.x] * scale[table.first + blockIdx.x];
  for (int j = threadIdx.x; j < task.num_outputs; j += blockDim.x) col_scale[task.logit_offset + j] = value;
}

template <typename T>
struct ScaleColumnsMap {
  const T* in;
  const loss_t<T>* col_scale;
  T* out;
  template <typename Index>
  __device__ __forceinline__ double operator()(Index k, Index col) const {
    const T v = store_as<T>(to_compute(in[k]) * static_cast<compute_t<T>>(col_scale[col]));
    out[k] = v;
    return static_cast<double>(to_compute(v));
  }
};

TaskTable make_table(const HeadTask* tasks, int64_t first, int64_t count) {
  TaskTable table{};
  table.count = static_cast<int32_t>(count);
  table.first = static_cast<int32_t>(first);
  for (int64_t k = 0; k < count; ++k) {
    const HeadTask& t = tasks[first + k];
    table.task[k] = DeviceTask{static_cast<int32_t>(t.loss), static_cast<int32_t>(t.num_outputs),
                               static_cast<int32_t>(t.logit_offset), static_cast<int32_t>(t.target_offset)};
  }
  return table;
}

}  // namespace

int64_t head_loss_workspace(int64_t rows, int64_t num_tasks) {
  return ((rows + kLossChunkRows - 1) / kLossChunkRows) * num_tasks;
}

template <typename T>
cudaError_t head_loss_forward(const HeadTask* tasks, int64_t num_tasks, int64_t rows, int64_t logit_cols,
                              int64_t target_cols, T* logits, const T* bias, const loss_t<T>* targets,
                              loss_t<T>* losses, loss_t<T>* scale, double* workspace_sum, int64_t* workspace_count,
                              cudaStream_t stream) {
  const int64_t num_chunks = (rows + kLossChunkRows - 1) / kLossChunkRows;
  const unsigned int grid = static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(num_chunks, 1), kMaxBlocks));
  for (int64_t first = 0; first < num_tasks; first += kMaxTasksPerLaunch) {
    const int64_t count = std::min<int64_t>(kMaxTasksPerLaunch, num_tasks - first);
    const int lanes = static_cast<int>(std::min<int64_t>(kThreads / count, kLossChunkRows));
    head_loss_kernel<T><<<grid, static_cast<unsigned int>(lanes * count), 0, stream>>>(
        make_table(tasks, first, count), num_tasks, rows, logit_cols, target_cols, logits, bias, targets, workspace_sum,
        workspace_count);
  }
  head_loss_finalize_kernel<loss_t<T>><<<static_cast<unsigned int>(num_tasks), kThreads, 0, stream>>>(
      num_tasks, num_chunks, workspace_sum, workspace_count, losses, scale);
  return cudaGetLastError();
}

template <typename T>
cudaError_t head_loss_backward_scale(const HeadTask* tasks, int64_t num_tasks, int64_t rows, int64_t logit_cols,
                                     const T* logit_grad, const loss_t<T>* grad_losses, const loss_t<T>* scale,
                                     loss_t<T>* col_scale, T* grad_logits, T* grad_bias, double* workspace,
                                     cudaStream_t stream) {
  for (int64_t first = 0; first < num_tasks; first += kMaxTasksPerLaunch) {
    const int64_t count = std::min<int64_t>(kMaxTasksPerLaunch, num_tasks - first);
    task_column_scale_kernel<loss_t<T>><<<static_cast<unsigned int>(count), 128, 0, stream>>>(
        make_table(tasks, first, count), grad_losses, scale, col_scale);
  }
  const ScaleColumnsMap<T> map{logit_grad, col_scale, grad_logits};
  if (grad_bias) return map_with_column_sum(rows, logit_cols, map, grad_bias, workspace, stream);
  return map_elements(rows, logit_cols, map, stream);
}

template <typename T>
cudaError_t scale_columns(int64_t rows, int64_t cols, const T* in, const loss_t<T>* col_scale, T* out, T* col_sum,
                          double* workspace, cudaStream_t stream) {
  const ScaleColumnsMap<T> map{in, col_scale, out};
  if (col_sum) return map_with_column_sum(rows, cols, map, col_sum, workspace, stream);
  return map_elements(rows, cols, map, stream);
}

#define FASTMTL_INSTANTIATE(T)                                                                                        \
  template cudaError_t scale_columns<T>(int64_t, int64_t, const T*, const loss_t<T>*, T*, T*, double*, cudaStream_t); \
  template cudaError_t head_loss_forward<T>(const HeadTask*, int64_t, int64_t, int64_t, int64_t, T*, const T*,        \
                                            const loss_t<T>*, loss_t<T>*, loss_t<T>*, double*, int64_t*,              \
                                            cudaStream_t);                                                            \
  template cudaError_t head_loss_backward_scale<T>(const HeadTask*, int64_t, int64_t, int64_t, const T*,              \
                                                   const loss_t<T>*, const loss_t<T>*, loss_t<T>*, T*, T*, double*,   \
                                                   cudaStream_t);
FASTMTL_FOR_EACH_KERNEL_TYPE(FASTMTL_INSTANTIATE)
#undef FASTMTL_INSTANTIATE

}  // namespace fastmtl::cuda
