#include "cpu/head_loss.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace fastmtl {
namespace cpu {
namespace {

constexpr int64_t kRowsPerChunk = 32;  // fixed, so the reduction order never depends on threads

// One row of one regression task (mse / l1 / huber with beta 1): each column is its own entry.
template <typename T>
inline void regression_row(LossKind loss, int64_t n, T* y, const T* bias, const T* t, double* sum, int64_t* cnt,
                           bool* bad, int64_t* bad_col, double* bad_val) {
  for (int64_t j = 0; j < n; ++j) {
    const T target = t[j];
    if (is_nan(target)) {
      y[j] = T(0);
      continue;
    }
    if (!regression_target_valid(target)) {
      if (!*bad) {
        *bad_col = j;
        *bad_val = double(target);
      }  // report the first invalid column
      *bad = true;
      y[j] = T(0);
      continue;
    }
    const EntryLoss<T> e = regression_entry(loss, y[j] + (bias ? bias[j] : T(0)) - target);
    *sum += double(e.loss);
    *cnt += 1;
    y[j] = e.grad;
  }
}

// Binary cross-entropy with logits against a target probability (soft labels allowed).
template <typename T>
inline void bce_row(T* y, const T* bias, T target, double* sum, int64_t* cnt, bool* bad, double* bad_val) {
  if (is_nan(target)) {
    y[0] = T(0);
    return;
  }
  if (!bce_target_valid(target)) {
    *bad = true;
    *bad_val = double(target);
    y[0] = T(0);
    return;
  }
  const EntryLoss<T> e = bce_entry(y[0] + (bias ? bias[0] : T(0)), target);
  *sum += double(e.loss);
  *cnt += 1;
  y[0] = e.grad;
}

// Softmax cross-entropy over the task's own n columns, log-sum-exp stable; -100 = missing row.
template <typename T>
inline void ce_row(int64_t n, T* y, const T* bias, T target, double* sum, int64_t* cnt, bool* bad, double* bad_val) {
  if (ce_target_missing(target)) {
    std::fill(y, y + n, T(0));
    return;
  }
  if (!ce_target_valid(target, n)) {
    *bad = true;
    *bad_val = double(target);
    std::fill(y, y + n, T(0));
    return;
  }
  const int64_t cls = static_cast<int64_t>(target);
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    y[j] += bias ? bias[j] : T(0);
    m = std::max(m, y[j]);
  }
  const T y_cls = y[cls];
  T s = T(0);
  for (int64_t j = 0; j < n; ++j) {
    y[j] = std::exp(y[j] - m);
    s += y[j];
  }
  const T inv = T(1) / s;
  for (int64_t j = 0; j < n; ++j) y[j] *= inv;
  y[cls] -= T(1);
  *sum += double(ce_loss(m, s, y_cls));
  *cnt += 1;
}

}  // namespace

template <typename T>
void head_loss_forward(const std::vector<HeadTask>& tasks, int64_t rows, int64_t logit_cols, int64_t target_cols,
                       T* logits, const T* bias, const T* targets, double* loss_sum, int64_t* count, BadTarget* bad) {
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
  const int64_t num_chunks = (rows + kRowsPerChunk - 1) / kRowsPerChunk;
  std::vector<double> chunk_sum(num_chunks * num_tasks, 0.0);
  std::vector<int64_t> chunk_count(num_chunks * num_tasks, 0);
  std::vector<BadTarget> chunk_bad(num_chunks);

  // Work per logit is an exp/log or two, ~10x an epilogue element: go parallel at ~2K logits a thread.
  const int64_t work_per_chunk = kRowsPerChunk * std::max<int64_t>(logit_cols, 1);
  const int64_t grain = std::max<int64_t>(1, 2048 / work_per_chunk);
  at::parallel_for(0, num_chunks, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double* sum = chunk_sum.data() + c * num_tasks;
      int64_t* cnt = chunk_count.data() + c * num_tasks;
      BadTarget& first_bad = chunk_bad[c];
      const int64_t r_end = std::min(rows, (c + 1) * kRowsPerChunk);
      for (int64_t i = c * kRowsPerChunk; i < r_end; ++i) {
        T* y_row = logits + i * logit_cols;
        const T* t_row = targets + i * target_cols;
        for (int64_t k = 0; k < num_tasks; ++k) {
          const HeadTask& task = tasks[k];
          T* y = y_row + task.logit_offset;
          const T* b = bias ? bias + task.logit_offset : nullptr;
          const T* t = t_row + task.target_offset;
          bool is_bad = false;
          int64_t bad_col = 0;
          double bad_val = 0.0;
          switch (task.loss) {
            case LossKind::Bce:
              bce_row(y, b, t[0], &sum[k], &cnt[k], &is_bad, &bad_val);
              break;
            case LossKind::Ce:
              ce_row(task.num_outputs, y, b, t[0], &sum[k], &cnt[k], &is_bad, &bad_val);
              break;
            default:
              regression_row(task.loss, task.num_outputs, y, b, t, &sum[k], &cnt[k], &is_bad, &bad_col, &bad_val);
          }
          if (is_bad && first_bad.row < 0) first_bad = BadTarget{i, k, task.target_offset + bad_col, bad_val};
        }
      }
    }
  });

  for (int64_t k = 0; k < num_tasks; ++k) {
    loss_sum[k] = 0.0;
    count[k] = 0;
  }
  *bad = BadTarget{};
  for (int64_t c = 0; c < num_chunks; ++c) {
    for (int64_t k = 0; k < num_tasks; ++k) {
      loss_sum[k] += chunk_sum[c * num_tasks + k];
      count[k] += chunk_count[c * num_tasks + k];
    }
    if (bad->row < 0 && chunk_bad[c].row >= 0) *bad = chunk_bad[c];
  }
}

template void head_loss_forward<float>(const std::vector<HeadTask>&, int64_t, int64_t, int64_t, float*, const float*,
                                       const float*, double*, int64_t*, BadTarget*);
template void head_loss_forward<double>(const std::vector<HeadTask>&, int64_t, int64_t, int64_t, double*, const double*,
                                        const double*, double*, int64_t*, BadTarget*);

}  // namespace cpu
}  // namespace fastmtl
