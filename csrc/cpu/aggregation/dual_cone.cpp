#include "cpu/aggregation/dual_cone.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/aggregation/cholesky.h"
#include "cpu/aggregation/dense.h"

namespace fastmtl::cpu::aggregation {
namespace {

// The working state of one problem. Both sums over the bound set A go through H u, computed once:
// (H_FA u_A)_k = (H u)_k - (H_FF u_F)_k and (H v)_i = (H u)_i + (H_iF (v_F - u_F)), so a round costs
// O(T |F|) instead of O(T^2) (the free set is usually a small part of T). H is symmetric, so H u is
// the sum of the rows of the nonzero u_j (one row for UPGrad's projections of pref_k e_k).
struct PivotingState {
  const double* H = nullptr;
  const double* u = nullptr;
  int64_t T = 0;
  std::vector<char> is_free;
  std::vector<int64_t> free_set, free_nonzero;
  std::vector<double> H_u, free_values, free_steps;
  DenseCholesky chol;

  std::vector<char> wrong;

  // Starts problem (h, lower) of size t, reusing the storage of the last one.
  void reset(const double* h, const double* lower, int64_t t) {
    H = h;
    u = lower;
    T = t;
    is_free.assign(t, 0);
    wrong.assign(t, 0);
    H_u.assign(t, 0.0);
    for (int64_t j = 0; j < T; ++j) {
      if (u[j] == 0.0) continue;
      const double* row = H + j * T;
      for (int64_t i = 0; i < T; ++i) H_u[i] += row[i] * u[j];
    }
  }

  // v_F solving H_FF v_F = -H_FA u_A; false if H_FF is not numerically positive definite.
  bool solve_free_block() {
    free_set.clear();
    for (int64_t i = 0; i < T; ++i)
      if (is_free[i]) free_set.push_back(i);
    const size_t n = free_set.size();
    double* block = chol.matrix(static_cast<int64_t>(n));
    for (size_t k = 0; k < n; ++k) {
      const double* row = H + free_set[k] * T;
      for (size_t j = k; j < n; ++j) block[k * n + j] = row[free_set[j]];
    }
    if (!chol.factor()) return false;
    free_nonzero.clear();  // the free j with u_j != 0: all of F for DualProj, at most one for UPGrad
    for (int64_t j : free_set)
      if (u[j] != 0.0) free_nonzero.push_back(j);
    free_values.resize(n);
    for (size_t k = 0; k < n; ++k) {
      const double* row = H + free_set[k] * T;
      double free_part = 0.0;
      for (int64_t j : free_nonzero) free_part += row[j] * u[j];
      free_values[k] = free_part - H_u[free_set[k]];
    }
    chol.solve(free_values.data());
    free_steps.resize(n);
    for (size_t k = 0; k < n; ++k) free_steps[k] = free_values[k] - u[free_set[k]];
    return true;
  }

  // (H v)_i for a bound variable i.
  double multiplier(int64_t i) const {
    const double* row = H + i * T;
    double s = H_u[i];
    for (size_t k = 0; k < free_set.size(); ++k) s += row[free_set[k]] * free_steps[k];
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

  // One state per thread, reused: a problem of T = 40 took 8 allocations of a few hundred bytes,
  // a visible share of its 2 us. Above kReusedStateMaxTasks a problem gets its own (the T x T Cholesky
  // storage would otherwise stay allocated for the thread's lifetime).
  constexpr int64_t kReusedStateMaxTasks = 256;
  thread_local PivotingState reused;
  PivotingState own;
  PivotingState& state = T <= kReusedStateMaxTasks ? reused : own;
  state.reset(H, u, T);
  // Start from the bounds that (H u)_i < 0 says to free: about 3 rounds at T = 40, fewer than warm
  // starts from a neighbouring problem's free set needed (measured).
  for (int64_t i = 0; i < T; ++i) state.is_free[i] = state.H_u[i] < -tolerance;

  std::vector<char>& wrong = state.wrong;
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
