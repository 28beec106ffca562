// The per-task loss pass of the fused multi-task heads (CPU): one pass over the logits computes
// every task's summed loss, its count of labelled entries and dL/dlogits (before the 1/count).
// The formulas are common/loss.h's, shared with the CUDA kernel.
#pragma once

#include <cstdint>
#include <vector>

#include "common/loss.h"

namespace fastmtl::cpu {

// logits: [rows, logit_cols] GEMM output without bias; overwritten in place with the raw
// gradient dl/dlogit of each entry's own loss (0 where missing), not yet divided by the count.
// targets: [rows, target_cols]. loss_sum[t] (double) and count[t] get the per-task sums.
// Chunks of rows are reduced in a fixed order: the same input gives the same bits for any
// number of threads.
template <typename T>
void head_loss_forward(const std::vector<HeadTask>& tasks, int64_t rows, int64_t logit_cols, int64_t target_cols,
                       T* logits, const T* bias, const T* targets, double* loss_sum, int64_t* count, BadTarget* bad);

}  // namespace fastmtl::cpu
