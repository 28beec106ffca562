// The minimum-norm point of the convex hull of the task gradients, from their Gram matrix alone:
// MGDA's weights (Desideri 2012; Sener & Koltun 2018), and the inner solver of CAGrad.
#pragma once

#include <cstdint>
#include <vector>

namespace fastmtl::cpu::aggregation {

// Wolfe's algorithm (Wolfe 1976, "Finding the nearest point in a polytope"): keeps a corral of
// affinely independent points whose affine minimum-norm point has positive weights, adds the
// point most opposed to the current one, and steps back when a weight would turn negative. Exact
// in finitely many steps; the stopping test <x, g_j> >= |x|^2 - 1e-12 max_t G_tt bounds the error of
// the point by 1e-6 of the largest gradient norm, and in practice stops at rounding level. Works
// for singular G (duplicated tasks, zero gradients, rank < T), where the weights need not be
// unique: it returns a minimiser supported on affinely independent gradients.
// G: row-major [T, T]; weights: [T] on the simplex. Returns the support (the final corral).
std::vector<int64_t> min_norm_point(const double* G, int64_t T, double* weights);

}  // namespace fastmtl::cpu::aggregation
