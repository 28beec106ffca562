#include "cpu/aggregation/surgery.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace fastmtl::cpu::aggregation {

void pcgrad_weights(const double* G, int64_t T, const int64_t* order, double* out) {
  std::fill(out, out + T, 0.0);
  std::vector<double> coeff(T);
  for (int64_t i = 0; i < T; ++i) {
    std::fill(coeff.begin(), coeff.end(), 0.0);
    coeff[i] = 1.0;
    for (int64_t k = 0; k < T; ++k) {
      const int64_t j = order[i * T + k];
      if (j == i || !(G[j * T + j] > 0.0)) continue;
      double inner = 0.0;  // <g_i^PC, g_j>
      for (int64_t m = 0; m < T; ++m) inner += G[j * T + m] * coeff[m];
      if (inner < 0.0) coeff[j] -= inner / G[j * T + j];
    }
    for (int64_t m = 0; m < T; ++m) out[m] += coeff[m];
  }
}

void gradvac_weights(const double* G, int64_t T, const int64_t* order, double beta, double eps, double* targets,
                     double* out) {
  std::vector<double> C(T * T, 0.0), cG(T);
  for (int64_t i = 0; i < T; ++i) C[i * T + i] = 1.0;
  for (int64_t i = 0; i < T; ++i) {
    double* ci = C.data() + i * T;
    for (int64_t j = 0; j < T; ++j) {
      double s = 0.0;
      for (int64_t m = 0; m < T; ++m) s += ci[m] * G[m * T + j];
      cG[j] = s;  // <g_i^PC, g_j>
    }
    for (int64_t k = 0; k + 1 < T; ++k) {
      const int64_t j = order[i * (T - 1) + k];
      double norm_i_sq = 0.0;
      for (int64_t m = 0; m < T; ++m) norm_i_sq += cG[m] * ci[m];
      const double norm_i = std::sqrt(std::max(norm_i_sq, 0.0));
      const double norm_j = std::sqrt(std::max(G[j * T + j], 0.0));
      // With eps = 0 a zero (or fully cancelled) gradient would give 0/0: its cosine counts as 0 and
      // a correction with a zero denominator is skipped, instead of spreading NaN into the weights.
      const double denominator = norm_i * norm_j + eps;
      const double cosine = denominator > 0.0 ? cG[j] / denominator : 0.0;
      const double target = targets[i * T + j];
      if (cosine < target) {
        const double sin_now = std::sqrt(std::max(1.0 - cosine * cosine, 0.0));
        const double sin_target = std::sqrt(std::max(1.0 - target * target, 0.0));
        const double correction_denominator = norm_j * sin_target + eps;
        if (correction_denominator > 0.0) {
          const double w = norm_i * (target * sin_now - cosine * sin_target) / correction_denominator;
          ci[j] += w;
          for (int64_t m = 0; m < T; ++m) cG[m] += w * G[j * T + m];
        }
      }
      targets[i * T + j] = (1.0 - beta) * target + beta * cosine;
    }
  }
  std::fill(out, out + T, 0.0);
  for (int64_t i = 0; i < T; ++i)
    for (int64_t m = 0; m < T; ++m) out[m] += C[i * T + m];
}

}  // namespace fastmtl::cpu::aggregation
