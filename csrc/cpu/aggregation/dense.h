// Small dense kernels for the T x T solvers. The matrices are tiny (T <= a few hundred), so what
// matters is latency, not bandwidth: a plain `s += a[k] * b[k]` loop is one long chain of dependent
// additions (the compiler may not reorder floating-point sums), four accumulators run four chains
// at once.
#pragma once

#include <cstdint>

namespace fastmtl::cpu::aggregation {

inline double dot(const double* a, const double* b, int64_t n) {
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) {
    s0 += a[k] * b[k];
    s1 += a[k + 1] * b[k + 1];
    s2 += a[k + 2] * b[k + 2];
    s3 += a[k + 3] * b[k + 3];
  }
  for (; k < n; ++k) s0 += a[k] * b[k];
  return (s0 + s1) + (s2 + s3);
}

}  // namespace fastmtl::cpu::aggregation
