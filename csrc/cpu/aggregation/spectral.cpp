#include "cpu/aggregation/spectral.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace fastmtl::cpu::aggregation {
namespace {

// x = A^+ b for the symmetric A = V diag(lambda) V^T, dropping eigenvalues within the cut-off.
void pseudo_solve(const double* eigenvalues, const double* V, int64_t T, double rank_eps, const double* b, double* x) {
  double largest = 0.0;
  for (int64_t k = 0; k < T; ++k) largest = std::max(largest, std::abs(eigenvalues[k]));
  const double cutoff = rank_eps * static_cast<double>(T) * largest;
  std::fill(x, x + T, 0.0);
  for (int64_t k = 0; k < T; ++k) {
    if (!(std::abs(eigenvalues[k]) > cutoff)) continue;
    double projection = 0.0;
    for (int64_t i = 0; i < T; ++i) projection += V[i * T + k] * b[i];
    projection /= eigenvalues[k];
    for (int64_t i = 0; i < T; ++i) x[i] += projection * V[i * T + k];
  }
}

}  // namespace

void aligned_mtl_weights(const double* eigenvalues, const double* V, int64_t T, const double* pref,
                         AlignedScale scale_mode, double rank_eps, double* out) {
  const double largest = *std::max_element(eigenvalues, eigenvalues + T);
  const double cutoff = largest * static_cast<double>(T) * rank_eps;
  std::vector<int64_t> kept;  // descending eigenvalue order
  for (int64_t k = T - 1; k >= 0; --k)
    if (eigenvalues[k] > cutoff) kept.push_back(k);
  const int64_t rank = static_cast<int64_t>(kept.size());
  if (rank == 0) {
    std::copy(pref, pref + T, out);
    return;
  }
  double scale = 0.0;
  if (scale_mode == AlignedScale::Min) {
    scale = eigenvalues[kept.back()];
  } else if (scale_mode == AlignedScale::Median) {
    scale = eigenvalues[kept[rank - 1 - (rank - 1) / 2]];  // torch.median: the lower middle value
  } else {
    for (int64_t k : kept) scale += eigenvalues[k];
    scale /= static_cast<double>(rank);
  }
  const double root_scale = std::sqrt(scale);
  std::fill(out, out + T, 0.0);
  for (int64_t k : kept) {
    double projection = 0.0;
    for (int64_t i = 0; i < T; ++i) projection += V[i * T + k] * pref[i];
    projection *= root_scale / std::sqrt(eigenvalues[k]);
    for (int64_t i = 0; i < T; ++i) out[i] += projection * V[i * T + k];
  }
}

void imtlg_weights(const double* G, const double* eigenvalues, const double* V, int64_t T, double rank_eps,
                   double* out) {
  std::vector<double> norms(T), v(T);
  for (int64_t i = 0; i < T; ++i) norms[i] = std::sqrt(std::max(G[i * T + i], 0.0));
  pseudo_solve(eigenvalues, V, T, rank_eps, norms.data(), v.data());
  double total = 0.0, magnitude = 0.0;
  for (int64_t i = 0; i < T; ++i) {
    total += v[i];
    magnitude += std::abs(v[i]);
  }
  if (!(std::abs(total) > 1e-12 * magnitude)) {
    std::fill(out, out + T, 0.0);
    return;
  }
  for (int64_t i = 0; i < T; ++i) out[i] = v[i] / total;
}

void config_cosines(const double* G, int64_t T, double* cosines, double* inverse_norms) {
  for (int64_t i = 0; i < T; ++i) {
    const double d = G[i * T + i];
    inverse_norms[i] = d > 0.0 ? 1.0 / std::sqrt(d) : 0.0;
  }
  for (int64_t i = 0; i < T; ++i)
    for (int64_t j = 0; j < T; ++j) cosines[i * T + j] = G[i * T + j] * inverse_norms[i] * inverse_norms[j];
}

void config_weights(const double* inverse_norms, const double* G, const double* eigenvalues, const double* V, int64_t T,
                    const double* pref, double rank_eps, double* out) {
  std::vector<double> gamma(T), c_gamma(T, 0.0);
  pseudo_solve(eigenvalues, V, T, rank_eps, pref, gamma.data());
  // C gamma = D^-1 G D^-1 gamma, and |u|^2 = gamma^T C gamma.
  double norm_sq = 0.0, length = 0.0;
  for (int64_t i = 0; i < T; ++i) {
    for (int64_t j = 0; j < T; ++j) c_gamma[i] += G[i * T + j] * inverse_norms[j] * gamma[j];
    c_gamma[i] *= inverse_norms[i];
    norm_sq += gamma[i] * c_gamma[i];
    const double norm_i = inverse_norms[i] > 0.0 ? 1.0 / inverse_norms[i] : 0.0;
    length += norm_i * c_gamma[i];  // sum_i <g_i, u> = sum_i |g_i| (C gamma)_i
  }
  const double clamped = std::max(std::sqrt(std::max(norm_sq, 0.0)), 1e-12);
  const double factor = length / (clamped * clamped);
  for (int64_t i = 0; i < T; ++i) out[i] = inverse_norms[i] * gamma[i] * factor;
}

}  // namespace fastmtl::cpu::aggregation
