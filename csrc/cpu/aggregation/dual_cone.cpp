#include "cpu/aggregation/dual_cone.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/aggregation/cholesky.h"
#include "cpu/aggregation/dense.h"

namespace fastmtl::cpu::aggregation {
namespace {

// The working state of one problem. u is sparse in UPGrad (one entry per projection), so sums over
// the bound variables run over the bound entries with u_i != 0 only.
struct PivotingState {
  const double* H;
  const double* u;
  int64_t T;
  std::vector<char> is_free;
  std::vector<int64_t> free_set, bound_nonzero;
  std::vector<double> free_values;
  DenseCholesky chol;

  PivotingState(const double* h, const double* lower, int64_t t) : H(h), u(lower), T(t), is_free(t, 0), chol(t) {}

  // v_F solving H_FF v_F = -H_FA u_A; false if H_FF is not numerically positive definite.
  bool solve_free_block() {
    free_set.clear();
    bound_nonzero.clear();
    for (int64_t i = 0; i < T; ++i) {
      if (is_free[i])
        free_set.push_back(i);
      else if (u[i] != 0.0)
        bound_nonzero.push_back(i);
    }
    const size_t n = free_set.size();
    double* block = chol.matrix(static_cast<int64_t>(n));
    for (size_t k = 0; k < n; ++k) {
      const double* row = H + free_set[k] * T;
      for (size_t j = k; j < n; ++j) block[k * n + j] = row[free_set[j]];
    }
    if (!chol.factor()) return false;
    free_values.assign(n, 0.0);
    for (size_t k = 0; k < n; ++k) {
      const double* row = H + free_set[k] * T;
      double s = 0.0;
      for (int64_t i : bound_nonzero) s -= row[i] * u[i];
      free_values[k] = s;
    }
    chol.solve(free_values.data());
    return true;
  }

  // (H v)_i for a bound variable i.
  double multiplier(int64_t i) const {
    const double* row = H + i * T;
    double s = 0.0;
    for (size_t k = 0; k < free_set.size(); ++k) s += row[free_set[k]] * free_values[k];
    for (int64_t j : bound_nonzero) s += row[j] * u[j];
    return s;
  }
};

}  // namespace

void solve_dual_cone_qp(const double* H, const double* u, int64_t T, double* v) {
  double trace = 0.0, u_max = 0.0;
  for (int64_t i = 0; i < T; ++i) {
    trace += H[i * T + i];
    u_max = std::max(u_max, std::abs(u[i]));
  }
  const double tolerance = 1e-13 * trace * std::max(u_max, 1e-300);

  PivotingState state(H, u, T);
  // Start from the bounds that (H u)_i < 0 says to free: about 3 rounds at T = 40, fewer than warm
  // starts from a neighbouring problem's free set needed (measured).
  for (int64_t i = 0; i < T; ++i) state.is_free[i] = dot(H + i * T, u, T) < -tolerance;

  std::vector<char> wrong(T);
  int64_t fewest_failures = T + 1, rounds_without_progress = 0;
  for (int64_t round = 0; round < 10 * T + 20; ++round) {
    if (!state.solve_free_block()) break;
    // A free variable below its bound, or a bound whose multiplier is negative, is on the wrong side.
    int64_t failures = 0, first_failure = -1;
    size_t k = 0;
    for (int64_t i = 0; i < T; ++i) {
      wrong[i] = state.is_free[i] ? state.free_values[k++] < u[i] - tolerance : state.multiplier(i) < -tolerance;
      if (wrong[i]) {
        ++failures;
        if (first_failure < 0) first_failure = i;
      }
    }
    if (failures == 0) {
      std::copy(u, u + T, v);
      for (size_t f = 0; f < state.free_set.size(); ++f)
        v[state.free_set[f]] = std::max(state.free_values[f], u[state.free_set[f]]);  // rounding below the bound
      return;
    }
    if (failures < fewest_failures) {
      fewest_failures = failures;
      rounds_without_progress = 0;
    } else {
      ++rounds_without_progress;
    }
    if (rounds_without_progress < 3) {
      for (int64_t i = 0; i < T; ++i)
        if (wrong[i]) state.is_free[i] = !state.is_free[i];
    } else {
      state.is_free[first_failure] = !state.is_free[first_failure];  // Murty's rule: finite for H > 0
    }
  }
  // Not reached for positive definite H; keep a feasible point (the bounds) rather than an infeasible one.
  std::copy(u, u + T, v);
  for (size_t f = 0; f < state.free_set.size() && f < state.free_values.size(); ++f)
    v[state.free_set[f]] = std::max(state.free_values[f], u[state.free_set[f]]);
}

}  // namespace fastmtl::cpu::aggregation
