#include "cpu/aggregation/min_norm.h"

#include <algorithm>
#include <cmath>

#include "cpu/aggregation/cholesky.h"

namespace fastmtl::cpu::aggregation {
namespace {

// The corral in the basis of differences to its first member p_0: the affine minimiser of
// |p_0 + sum_k beta_k (p_k - p_0)| solves M beta = -m with M_kl = <p_k - p_0, p_l - p_0> and
// m_k = <p_k - p_0, p_0>. M is positive definite exactly when the corral is affinely independent.
struct Corral {
  const double* G;
  int64_t T;
  std::vector<int64_t> members;
  std::vector<double> weights;
  GrowingCholesky chol;

  Corral(const double* gram, int64_t t) : G(gram), T(t), chol(t) {}

  double difference_gram(int64_t i, int64_t j) const {
    const int64_t b = members[0];
    return G[i * T + j] - G[i * T + b] - G[b * T + j] + G[b * T + b];
  }

  bool append_to_factor(int64_t j, double min_pivot, std::vector<double>& column) {
    for (size_t k = 1; k < members.size(); ++k) column[k - 1] = difference_gram(members[k], j);
    return chol.append(column.data(), difference_gram(j, j), min_pivot);
  }

  void refactor(std::vector<double>& column) {
    chol.clear();
    for (size_t k = 1; k < members.size(); ++k) {
      for (size_t l = 1; l < k; ++l) column[l - 1] = difference_gram(members[l], members[k]);
      chol.append(column.data(), difference_gram(members[k], members[k]), 0.0);
    }
  }

  // Weights of the affine minimum-norm point of the corral.
  void affine_minimiser(std::vector<double>& alpha) const {
    const size_t n = members.size();
    const int64_t b = members[0];
    alpha.assign(n, 0.0);
    for (size_t k = 1; k < n; ++k) alpha[k] = -(G[members[k] * T + b] - G[b * T + b]);
    chol.solve(alpha.data() + 1);
    double rest = 1.0;
    for (size_t k = 1; k < n; ++k) rest -= alpha[k];
    alpha[0] = rest;
  }
};

}  // namespace

std::vector<int64_t> min_norm_point(const double* G, int64_t T, double* weights) {
  std::fill(weights, weights + T, 0.0);
  int64_t start = 0;
  double max_diag = 0.0;
  for (int64_t i = 0; i < T; ++i) {
    max_diag = std::max(max_diag, G[i * T + i]);
    if (G[i * T + i] < G[start * T + start]) start = i;
  }
  Corral corral(G, T);
  corral.members.push_back(start);
  corral.weights.push_back(1.0);
  if (T == 1 || !(max_diag > 0.0)) {
    weights[start] = 1.0;
    return corral.members;
  }
  const double tolerance = 1e-12 * max_diag;
  const double min_pivot = 1e-16 * max_diag;
  std::vector<double> scores(T), column(T), alpha;
  std::vector<char> in_corral(T, 0);
  in_corral[start] = 1;

  for (int64_t major = 0; major < 10 * T + 10; ++major) {
    // scores_j = <x, g_j> with x the current point.
    std::fill(scores.begin(), scores.end(), 0.0);
    for (size_t k = 0; k < corral.members.size(); ++k) {
      const double* row = G + corral.members[k] * T;
      const double w = corral.weights[k];
      for (int64_t j = 0; j < T; ++j) scores[j] += w * row[j];
    }
    double norm_sq = 0.0;
    for (size_t k = 0; k < corral.members.size(); ++k) norm_sq += corral.weights[k] * scores[corral.members[k]];
    const int64_t entering = std::min_element(scores.begin(), scores.end()) - scores.begin();
    if (scores[entering] >= norm_sq - tolerance || in_corral[entering]) break;
    if (!corral.append_to_factor(entering, min_pivot, column)) break;
    corral.members.push_back(entering);
    corral.weights.push_back(0.0);
    in_corral[entering] = 1;

    for (int64_t minor = 0; minor <= T; ++minor) {
      corral.affine_minimiser(alpha);
      double step = 1.0;
      int64_t leaving = -1;
      for (size_t k = 0; k < alpha.size(); ++k)
        if (alpha[k] <= 0.0) {
          const double lambda = corral.weights[k];
          const double ratio = lambda / (lambda - alpha[k]);
          if (ratio < step) {
            step = ratio;
            leaving = static_cast<int64_t>(k);
          }
        }
      if (leaving < 0) {
        corral.weights = alpha;
        break;
      }
      // Move towards the affine minimiser until a weight reaches zero, drop the points at zero.
      std::vector<int64_t> members;
      std::vector<double> kept_weights;
      double total = 0.0;
      for (size_t k = 0; k < alpha.size(); ++k) {
        const double w = corral.weights[k] + step * (alpha[k] - corral.weights[k]);
        if (static_cast<int64_t>(k) == leaving || w <= 0.0) {
          in_corral[corral.members[k]] = 0;
        } else {
          members.push_back(corral.members[k]);
          kept_weights.push_back(w);
          total += w;
        }
      }
      for (double& w : kept_weights) w /= total;
      corral.members.swap(members);
      corral.weights.swap(kept_weights);
      corral.refactor(column);
    }
  }
  for (size_t k = 0; k < corral.members.size(); ++k) weights[corral.members[k]] = corral.weights[k];
  return corral.members;
}

}  // namespace fastmtl::cpu::aggregation
