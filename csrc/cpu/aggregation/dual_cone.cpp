#include "cpu/aggregation/dual_cone.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/aggregation/cholesky.h"

namespace fastmtl::cpu::aggregation {
namespace {

// Solves H_FF z_F = -H_{F,A} u_A for the free set F (A: the variables held at their bounds).
void solve_free_block(const double* H, const double* u, int64_t T, const std::vector<int64_t>& free_set,
                      const std::vector<char>& is_free, const GrowingCholesky& chol, std::vector<double>& z) {
  const int64_t n = static_cast<int64_t>(free_set.size());
  z.assign(n, 0.0);
  for (int64_t k = 0; k < n; ++k) {
    const double* row = H + free_set[k] * T;
    double s = 0.0;
    for (int64_t i = 0; i < T; ++i)
      if (!is_free[i]) s -= row[i] * u[i];
    z[k] = s;
  }
  chol.solve(z.data());
}

void refactor(const double* H, int64_t T, const std::vector<int64_t>& free_set, GrowingCholesky& chol,
              std::vector<double>& column) {
  chol.clear();
  for (size_t k = 0; k < free_set.size(); ++k) {
    for (size_t j = 0; j < k; ++j) column[j] = H[free_set[j] * T + free_set[k]];
    chol.append(column.data(), H[free_set[k] * T + free_set[k]], 0.0);
  }
}

}  // namespace

void solve_dual_cone_qp(const double* H, const double* u, int64_t T, double* v) {
  std::copy(u, u + T, v);
  double trace = 0.0, u_max = 0.0;
  for (int64_t i = 0; i < T; ++i) {
    trace += H[i * T + i];
    u_max = std::max(u_max, std::abs(u[i]));
  }
  const double tolerance = 1e-13 * trace * u_max;

  GrowingCholesky chol(T);
  std::vector<int64_t> free_set;
  std::vector<char> is_free(T, 0);
  std::vector<double> gradient(T), z, column(T);
  // Each outer step frees one bound; steps back only re-bind variables, so 3T + 10 is generous.
  for (int64_t outer = 0; outer < 3 * T + 10; ++outer) {
    for (int64_t i = 0; i < T; ++i) {
      double s = 0.0;
      for (int64_t k = 0; k < T; ++k) s += H[i * T + k] * v[k];
      gradient[i] = s;
    }
    int64_t entering = -1;
    double most_negative = -tolerance;
    for (int64_t i = 0; i < T; ++i)
      if (!is_free[i] && gradient[i] < most_negative) {
        most_negative = gradient[i];
        entering = i;
      }
    if (entering < 0) return;  // every bound's multiplier is non-negative: optimal

    for (size_t k = 0; k < free_set.size(); ++k) column[k] = H[free_set[k] * T + entering];
    if (!chol.append(column.data(), H[entering * T + entering], 0.0)) return;
    free_set.push_back(entering);
    is_free[entering] = 1;

    for (int64_t inner = 0; inner <= T; ++inner) {
      solve_free_block(H, u, T, free_set, is_free, chol, z);
      double step = 1.0;
      int64_t blocking = -1;
      for (size_t k = 0; k < free_set.size(); ++k) {
        const int64_t i = free_set[k];
        if (z[k] <= u[i]) {
          const double ratio = (v[i] - u[i]) / (v[i] - z[k]);
          if (ratio < step) {
            step = ratio;
            blocking = static_cast<int64_t>(k);
          }
        }
      }
      if (blocking < 0) {  // the free block's solution is feasible: take it
        for (size_t k = 0; k < free_set.size(); ++k) v[free_set[k]] = z[k];
        break;
      }
      if (free_set[blocking] == entering && step <= 0.0) {
        // The entering bound cannot move (its multiplier was negative only by rounding): optimal.
        is_free[entering] = 0;
        free_set.pop_back();
        return;
      }
      for (size_t k = 0; k < free_set.size(); ++k) v[free_set[k]] += step * (z[k] - v[free_set[k]]);
      // Bind the blocking variable and any other that reached its bound, then refactor.
      std::vector<int64_t> kept;
      for (size_t k = 0; k < free_set.size(); ++k) {
        const int64_t i = free_set[k];
        if (static_cast<int64_t>(k) == blocking || v[i] <= u[i]) {
          v[i] = u[i];
          is_free[i] = 0;
        } else {
          kept.push_back(i);
        }
      }
      free_set.swap(kept);
      refactor(H, T, free_set, chol, column);
    }
  }
}

}  // namespace fastmtl::cpu::aggregation
