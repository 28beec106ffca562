// The loop skeletons of the epilogue passes (csrc/cpu/epilogue.cpp, csrc/cpu/expert_epilogue.cpp):
// row blocks over at::parallel_for, and column sums in a fixed order whatever the thread count.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fastmtl::cpu::detail {

// Below this many elements per thread, waking the thread pool costs more than it saves.
constexpr int64_t kMinElementsPerThread = 16384;
// Rows per partial sum of a column reduction. Fixed, so the summation order (rows within a chunk,
// then chunks in order) and hence the bits of the result never depend on the number of threads.
constexpr int64_t kRowsPerChunk = 64;

inline int64_t grain_for(int64_t inner) {
  return std::max<int64_t>(1, kMinElementsPerThread / std::max<int64_t>(inner, 1));
}

template <typename F>
void for_row_blocks(int64_t rows, int64_t cols, F&& body) {
  at::parallel_for(0, rows, grain_for(cols), [&](int64_t r0, int64_t r1) { body(r0, r1); });
}

// Runs row_body(i, partial) for every row, where partial (cols doubles) belongs to the row's chunk,
// in parallel over chunks; then col_sum[j] = sum over chunks of partial[j], in chunk order.
// Rows are walked contiguously, so the per-row loops vectorise.
template <typename T, typename RowBody>
void rows_with_column_sum(int64_t rows, int64_t cols, T* col_sum, RowBody&& row_body) {
  const int64_t num_chunks = (rows + kRowsPerChunk - 1) / kRowsPerChunk;
  std::vector<double> partial(num_chunks * cols, 0.0);
  at::parallel_for(0, num_chunks, grain_for(kRowsPerChunk * cols), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double* part = partial.data() + c * cols;
      const int64_t r_end = std::min(rows, (c + 1) * kRowsPerChunk);
      for (int64_t i = c * kRowsPerChunk; i < r_end; ++i) row_body(i, part);
    }
  });
  for (int64_t j = 0; j < cols; ++j) {
    double total = 0.0;
    for (int64_t c = 0; c < num_chunks; ++c) total += partial[c * cols + j];
    col_sum[j] = static_cast<T>(total);
  }
}

}  // namespace fastmtl::cpu::detail
