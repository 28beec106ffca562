// Methods that are closed-form functions of an eigendecomposition: Aligned-MTL, IMTL-G and ConFIG.
// The caller decomposes (LAPACK through ATen, batched); these loops build the weights from
// eigenvalues (ascending) and eigenvectors (row-major [T, T], column k = eigenvector k).
// Eigenvalues at or below rank_eps * T * max|lambda| count as zero, rank_eps being the machine
// epsilon of the dtype the Gram matrix arrived in (torchjd's and torch.linalg.pinv's cut-off).
#pragma once

#include <cstdint>

namespace fastmtl::cpu::aggregation {

enum class AlignedScale { Min, Median, Rmse };

// Aligned-MTL (Senushkin et al. 2023): weights = sqrt(scale) V_r diag(lambda_r^-1/2) V_r^T pref,
// i.e. the update is the preference-weighted sum of the Gram's singular directions all rescaled
// to the same length. scale: the smallest, (lower) median or mean kept eigenvalue. Rank 0: pref.
void aligned_mtl_weights(const double* eigenvalues, const double* eigenvectors, int64_t T, const double* pref,
                         AlignedScale scale, double rank_eps, double* out);

// IMTL-G (Liu et al. 2021), in the form that allows dependent gradients (Quinton & Rey 2024):
// v = G^+ d with d_i = |g_i|, weights = v / sum(v), zeros when sum(v) vanishes relative to sum|v|.
void imtlg_weights(const double* G, const double* eigenvalues, const double* eigenvectors, int64_t T, double rank_eps,
                   double* out);

// The cosine matrix C = D^-1 G D^-1 (D = diag|g_i|; rows of zero gradients stay zero) that ConFIG
// decomposes, and D^-1 (0 for a zero gradient).
void config_cosines(const double* G, int64_t T, double* cosines, double* inverse_norms);

// ConFIG (Liu et al. 2024, eq. 2): the direction u with unit_i . u = pref_i, i.e.
// u = U^+ pref = U^T C^+ pref for the unit gradients U, scaled to length sum_i <g_i, u/|u|>.
// From C = U U^T: weights = D^-1 gamma * (sum_i |g_i| (C gamma)_i) / max(|u|, 1e-12)^2, gamma = C^+ pref.
void config_weights(const double* inverse_norms, const double* G, const double* eigenvalues, const double* eigenvectors,
                    int64_t T, const double* pref, double rank_eps, double* out);

}  // namespace fastmtl::cpu::aggregation
