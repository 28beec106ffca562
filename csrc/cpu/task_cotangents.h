// Every task's cotangent of the trunk output (the per-task engine, CPU): out[b, t, :] = sum over
// task t's logit columns j of logit_grad[b, j] * col_scale[j] * head[j, :]. B*C*d multiply-adds
// (one GEMM over all [B*T, C] would cost T times more, almost all of it on zeros).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fastmtl::cpu {

template <typename T>
void task_cotangents(const std::vector<int64_t>& num_outputs, int64_t rows, int64_t logit_cols, int64_t features,
                     const T* logit_grad, const T* col_scale, const T* head, T* out) {
  const int64_t tasks = static_cast<int64_t>(num_outputs.size());
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, logit_cols * features));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t b = r0; b < r1; ++b) {
      int64_t col = 0;
      for (int64_t t = 0; t < tasks; ++t) {
        T* o = out + (b * tasks + t) * features;
        std::fill(o, o + features, T(0));
        for (int64_t j = col; j < col + num_outputs[t]; ++j) {
          const T s = logit_grad[b * logit_cols + j] * col_scale[j];
          if (s == T(0)) continue;  // missing labels: nothing to add
          const T* h = head + j * features;
#pragma omp simd
          for (int64_t k = 0; k < features; ++k) o[k] += s * h[k];
        }
        col += num_outputs[t];
      }
    }
  });
}

}  // namespace fastmtl::cpu
