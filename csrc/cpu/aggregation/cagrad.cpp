#include "cpu/aggregation/cagrad.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/aggregation/cholesky.h"
#include "cpu/aggregation/min_norm.h"

namespace fastmtl::cpu::aggregation {
namespace {

double quadratic_form(const double* G, int64_t T, const double* x, const double* y) {
  double s = 0.0;
  for (int64_t i = 0; i < T; ++i) {
    if (x[i] == 0.0) continue;
    double row = 0.0;
    for (int64_t j = 0; j < T; ++j) row += G[i * T + j] * y[j];
    s += x[i] * row;
  }
  return s;
}

// The s with s^2 |g_w(s)|^2 = phi^2 if the optimal face stays `support`, else NaN.
double face_root(const double* G, int64_t T, const std::vector<double>& b, const std::vector<int64_t>& support,
                 double phi) {
  const size_t n = support.size();
  const int64_t p0 = support[0];
  GrowingCholesky chol(static_cast<int64_t>(n));
  std::vector<double> column(n);
  auto diff = [&](int64_t i, int64_t j) { return G[i * T + j] - G[i * T + p0] - G[p0 * T + j] + G[p0 * T + p0]; };
  for (size_t k = 1; k < n; ++k) {
    for (size_t l = 1; l < k; ++l) column[l - 1] = diff(support[l], support[k]);
    if (!chol.append(column.data(), diff(support[k], support[k]), 0.0)) return std::numeric_limits<double>::quiet_NaN();
  }
  std::vector<double> beta_a(n - 1), beta_b(n - 1);
  for (size_t k = 1; k < n; ++k) {
    beta_a[k - 1] = -(G[support[k] * T + p0] - G[p0 * T + p0]);
    beta_b[k - 1] = -(b[support[k]] - b[p0]);
  }
  chol.solve(beta_a.data());
  chol.solve(beta_b.data());
  std::vector<double> w_a(T, 0.0), w_b(T, 0.0);
  w_a[p0] = 1.0;
  for (size_t k = 1; k < n; ++k) {
    w_a[support[k]] += beta_a[k - 1];
    w_a[p0] -= beta_a[k - 1];
    w_b[support[k]] += beta_b[k - 1];
    w_b[p0] -= beta_b[k - 1];
  }
  const double q_a = quadratic_form(G, T, w_a.data(), w_a.data());
  const double q_ab = quadratic_form(G, T, w_a.data(), w_b.data());
  const double q_b = quadratic_form(G, T, w_b.data(), w_b.data());
  // q_a s^2 + 2 q_ab s + (q_b - phi^2) = 0, the positive root.
  const double c0 = q_b - phi * phi;
  if (q_a > 0.0) {
    const double disc = q_ab * q_ab - q_a * c0;
    if (disc < 0.0) return std::numeric_limits<double>::quiet_NaN();
    return (-q_ab + std::sqrt(disc)) / q_a;
  }
  if (q_ab != 0.0) return -c0 / (2.0 * q_ab);
  return std::numeric_limits<double>::quiet_NaN();
}

}  // namespace

void cagrad_weights(const double* G_raw, int64_t T, double c, double norm_eps, double* out) {
  std::fill(out, out + T, 0.0);
  // The trace normalisation at every scale: by max G_ii first, then by the trace of the result (a
  // subnormal or huge trace neither under- nor overflows). Only an exactly zero Gram matrix is "all
  // gradients zero"; norm_eps applies to |g_w| on the normalised matrix below, which is scale-free.
  double largest = 0.0;
  for (int64_t i = 0; i < T; ++i) largest = std::max(largest, G_raw[i * T + i]);
  if (!(largest > 0.0)) return;
  std::vector<double> G(G_raw, G_raw + T * T);
  for (double& g : G) g /= largest;
  double trace = 0.0;
  for (int64_t i = 0; i < T; ++i) trace += G[i * T + i];
  for (double& g : G) g /= trace;

  std::vector<double> b(T, 0.0);  // b = G 1 / T = <g_i, g_0>
  double q0 = 0.0;                // |g_0|^2
  for (int64_t i = 0; i < T; ++i) {
    for (int64_t j = 0; j < T; ++j) b[i] += G[i * T + j];
    b[i] /= static_cast<double>(T);
    q0 += b[i] / static_cast<double>(T);
  }
  const double phi = c * std::sqrt(std::max(q0, 0.0));
  std::vector<double> w(T, 0.0);
  if (!(phi > 0.0)) {
    // The linear program min b^T w picks a vertex; the result is the mean unless that vertex is 0.
    const int64_t j = std::min_element(b.begin(), b.end()) - b.begin();
    if (std::sqrt(std::max(G[j * T + j], 0.0)) >= norm_eps) std::fill(out, out + T, 1.0 / static_cast<double>(T));
    return;
  }

  std::vector<double> shifted(T * T);
  std::vector<int64_t> support;
  double norm = 0.0;
  auto solve_at = [&](double s) {
    for (int64_t i = 0; i < T; ++i)
      for (int64_t j = 0; j < T; ++j) shifted[i * T + j] = G[i * T + j] + (b[i] + b[j]) / s + q0 / (s * s);
    support = min_norm_point(shifted.data(), T, w.data());
    norm = std::sqrt(std::max(quadratic_form(G.data(), T, w.data(), w.data()), 0.0));
    return s * norm - phi;
  };

  double s = std::max(c, 1e-6), lo = 0.0, hi = std::numeric_limits<double>::infinity();
  bool solved = false;
  for (int iter = 0; iter < 200; ++iter) {
    const double h = solve_at(s);
    if (std::abs(h) <= 1e-12 * phi) {
      solved = true;
      break;
    }
    if (h < 0.0)
      lo = s;
    else
      hi = s;
    const double candidate = face_root(G.data(), T, b, support, phi);
    if (std::isfinite(candidate) && candidate > lo && candidate < hi && candidate != s) {
      s = candidate;
    } else if (std::isinf(hi)) {
      s *= 4.0;
      if (s > 1e300) break;  // s |g_w(s)| stays below phi: the optimum is where g_w = 0
    } else {
      s = lo > 0.0 ? std::sqrt(lo * hi) : hi / 4.0;
    }
    if (!std::isinf(hi) && hi - lo <= 1e-15 * hi) break;
  }
  if (!solved) {
    if (std::isinf(hi)) return;  // no s reaches phi: the optimum has g_w = 0, on the Pareto front
    solve_at(hi);                // the bracket has closed to rounding level
  }
  if (!(norm >= norm_eps)) return;  // approximately on the Pareto front: zeros, as torchjd
  for (int64_t i = 0; i < T; ++i) out[i] = 1.0 / static_cast<double>(T) + (phi / norm) * w[i];
}

}  // namespace fastmtl::cpu::aggregation
