#include "cpu/aggregation/power_system.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/aggregation/cholesky.h"

namespace fastmtl::cpu::aggregation {
namespace {

struct PowerObjective {
  const std::vector<double>& H;
  int64_t n;
  double p;

  double phi(double x) const { return p == 1.0 ? -std::log(x) : std::pow(x, 1.0 - p) / (p - 1.0); }

  double value(const std::vector<double>& x) const {
    double f = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      double row = 0.0;
      for (int64_t j = 0; j < n; ++j) row += H[i * n + j] * x[j];
      f += 0.5 * x[i] * row + phi(x[i]);
    }
    return f;
  }
};

// The smallest shift d (from d0 = max(1e-14, T * rounding) * max G_ii, growing 4x) for which
// H + (d / 2) I has a Cholesky factor: then H + d I is positive definite with room to spare, even
// when rounding has made the Gram matrix of a stationary Jacobian slightly indefinite (a float32 Gram
// carries eigenvalues down to about -T * 1.2e-7 * max G_ii), and F has a minimum.
double positive_definite_shift(std::vector<double>& H, int64_t n, double d0) {
  std::vector<double> column(n);
  GrowingCholesky chol(n);
  double shift = d0;
  for (int attempt = 0; attempt < 200; ++attempt, shift *= 4.0) {
    chol.clear();
    bool ok = true;
    for (int64_t a = 0; a < n && ok; ++a) {
      for (int64_t c = 0; c < a; ++c) column[c] = H[c * n + a];
      ok = chol.append(column.data(), H[a * n + a] + 0.5 * shift, 0.0);
    }
    if (ok) break;
  }
  for (int64_t a = 0; a < n; ++a) H[a * n + a] += shift;
  return shift;
}

}  // namespace

bool solve_power_system(const double* G, int64_t T, double p, double rounding, double* x_out,
                        double* relative_residual) {
  std::fill(x_out, x_out + T, 0.0);
  *relative_residual = 0.0;
  double max_diag = 0.0;
  for (int64_t i = 0; i < T; ++i) max_diag = std::max(max_diag, G[i * T + i]);
  if (!(max_diag > 0.0)) return true;
  std::vector<int64_t> active;
  for (int64_t i = 0; i < T; ++i)
    if (G[i * T + i] > 1e-14 * max_diag) active.push_back(i);
  const int64_t n = static_cast<int64_t>(active.size());
  std::vector<double> H(n * n);
  for (int64_t a = 0; a < n; ++a)
    for (int64_t c = 0; c < n; ++c) H[a * n + c] = G[active[a] * T + active[c]];
  positive_definite_shift(H, n, std::max(1e-14, static_cast<double>(T) * rounding) * max_diag);

  const PowerObjective objective{H, n, p};
  std::vector<double> x(n), residual(n), step(n), trial(n), column(n);
  for (int64_t a = 0; a < n; ++a) x[a] = std::pow(H[a * n + a], -1.0 / (1.0 + p));
  GrowingCholesky chol(n);
  double f = objective.value(x);
  for (int iter = 0; iter < 200; ++iter) {
    bool converged = true;
    for (int64_t a = 0; a < n; ++a) {
      double row = 0.0;
      for (int64_t c = 0; c < n; ++c) row += H[a * n + c] * x[c];
      const double target = std::pow(x[a], -p);
      residual[a] = row - target;
      if (std::abs(residual[a]) > 1e-14 * target) converged = false;
    }
    if (converged) break;
    chol.clear();
    for (int64_t a = 0; a < n; ++a) {
      for (int64_t c = 0; c < a; ++c) column[c] = H[c * n + a];
      chol.append(column.data(), H[a * n + a] + p * std::pow(x[a], -p - 1.0), 0.0);
    }
    for (int64_t a = 0; a < n; ++a) step[a] = -residual[a];
    chol.solve(step.data());
    double slope = 0.0;  // directional derivative of F along the step (negative)
    for (int64_t a = 0; a < n; ++a) slope += residual[a] * step[a];
    double t = 1.0;
    for (int64_t a = 0; a < n; ++a)
      if (step[a] < 0.0) t = std::min(t, -0.99 * x[a] / step[a]);
    // Inside the quadratic-convergence region (Newton decrement^2 = -slope < 1/16, the classical
    // bound for self-concordant F such as Nash-MTL's) take the full step: near the solution the
    // decrease of F is below its rounding and a line search on F would stall.
    if (t == 1.0 && -slope < 0.0625) {
      for (int64_t a = 0; a < n; ++a) x[a] += step[a];
      f = objective.value(x);
      continue;
    }
    bool decreased = false;
    for (int backtrack = 0; backtrack < 60 && !decreased; ++backtrack) {
      for (int64_t a = 0; a < n; ++a) trial[a] = x[a] + t * step[a];
      const double f_trial = objective.value(trial);
      if (f_trial <= f + 0.25 * t * slope) {
        decreased = true;
        f = f_trial;
      } else {
        t *= 0.5;
      }
    }
    if (!decreased) break;  // no decrease left at rounding level
    x.swap(trial);
  }
  // Converged means the system holds to rounding level: each |(H x)_a - x_a^(-p)| against the size
  // of the terms it cancels. A stalled line search or the iteration limit elsewhere is reported.
  double worst = 0.0;
  for (int64_t a = 0; a < n; ++a) {
    double row = 0.0, magnitude = 0.0;
    for (int64_t c = 0; c < n; ++c) {
      row += H[a * n + c] * x[c];
      magnitude += std::abs(H[a * n + c] * x[c]);
    }
    const double target = std::pow(x[a], -p);
    const double r = std::abs(row - target) / (magnitude + target);
    worst = std::isfinite(r) ? std::max(worst, r) : std::numeric_limits<double>::infinity();
  }
  *relative_residual = worst;
  for (int64_t a = 0; a < n; ++a) x_out[active[a]] = x[a];
  return worst <= 1e-9;
}

double power_system_shift_share(const double* G, int64_t T, double p, const double* x) {
  double quadratic = 0.0, powered = 0.0;
  for (int64_t i = 0; i < T; ++i) {
    if (!(x[i] > 0.0)) continue;
    powered += std::pow(x[i], 1.0 - p);
    double row = 0.0;
    for (int64_t j = 0; j < T; ++j)
      if (x[j] > 0.0) row += G[i * T + j] * x[j];
    quadratic += x[i] * row;
  }
  return powered > 0.0 ? 1.0 - quadratic / powered : 0.0;
}

}  // namespace fastmtl::cpu::aggregation
