// Gradient surgery written on the Gram matrix: each modified gradient is kept as coefficients over
// the original ones (g_i^PC = sum_k C_ik g_k), so every inner product is a row of C times G and the
// result is the weight vector sum_i C_i. O(T^3) instead of O(T^2 P).
#pragma once

#include <cstdint>

namespace fastmtl::cpu::aggregation {

// PCGrad (Yu et al. 2020, Algorithm 1): for every task i, visit the tasks j in order[i] (a
// permutation of all T tasks; i itself is skipped) and project g_i^PC off g_j when they conflict.
// G: [T, T]; order: [T, T]; out: [T]. Tasks with a zero gradient are never projected on.
void pcgrad_weights(const double* G, int64_t T, const int64_t* order, double* out);

// GradVac (Wang et al. 2021): like PCGrad, but moves g_i^PC towards the EMA target cosine
// targets[i, j] instead of to orthogonality, and updates the targets (in place) with rate beta.
// order: [T, T - 1], the other tasks of each i in visiting order. Same arithmetic as torchjd 0.18.
void gradvac_weights(const double* G, int64_t T, const int64_t* order, double beta, double eps, double* targets,
                     double* out);

}  // namespace fastmtl::cpu::aggregation
