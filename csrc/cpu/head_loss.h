// The per-task loss pass of the fused multi-task heads (CPU): one pass over the logits computes
// every task's summed loss, its count of labelled entries and dL/dlogits (before the 1/count).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fastmtl {

enum class LossKind : int64_t { Mse, L1, Huber, Bce, Ce };

bool parse_loss(const std::string& name, LossKind* out);
const char* loss_names();  // "mse, l1, huber, bce, ce"

// Columns a task occupies in the packed targets: n for regression, 1 for bce (0/1) and ce (index).
inline int64_t target_width(LossKind loss, int64_t num_outputs) {
  return (loss == LossKind::Bce || loss == LossKind::Ce) ? 1 : num_outputs;
}

struct HeadTask {
  LossKind loss;
  int64_t num_outputs;    // logit columns
  int64_t logit_offset;   // first logit column
  int64_t target_offset;  // first packed-target column
};

// The first invalid target found (lowest row, then lowest task); row < 0 when all are valid.
struct BadTarget {
  int64_t row = -1;
  int64_t task = -1;
  int64_t column = -1;
  double value = 0.0;
};

namespace cpu {

// logits: [rows, logit_cols] GEMM output without bias; overwritten in place with the raw
// gradient dl/dlogit of each entry's own loss (0 where missing), not yet divided by the count.
// targets: [rows, target_cols]. loss_sum[t] (double) and count[t] get the per-task sums.
// Chunks of rows are reduced in a fixed order: the same input gives the same bits for any
// number of threads.
template <typename T>
void head_loss_forward(const std::vector<HeadTask>& tasks, int64_t rows, int64_t logit_cols,
                       int64_t target_cols, T* logits, const T* bias, const T* targets,
                       double* loss_sum, int64_t* count, BadTarget* bad);

}  // namespace cpu
}  // namespace fastmtl
