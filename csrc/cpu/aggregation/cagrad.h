// CAGrad's weights (Liu et al. 2021, "Conflict-Averse Gradient Descent for Multi-task Learning"),
// from the Gram matrix alone, in the formulation torchjd uses: with G normalised by its trace,
// b = G 1/T and phi = c sqrt(1^T G 1)/T, solve
//     w* = argmin_{w in simplex}  b^T w + phi sqrt(w^T G w),
// and return 1/T + (phi / |g_w*|) w*, or zeros when |g_w*| < norm_eps (on the Pareto front).
#pragma once

#include <cstdint>

namespace fastmtl::cpu::aggregation {

// Solved exactly through its parametric form: for s > 0, w(s) = argmin_simplex b^T w + s/2 w^T G w
// is the minimum-norm point of the gradients shifted by g_0 / s (Wolfe's algorithm on a shifted
// Gram matrix), and w* = w(s*) with s* |g_w(s*)| = phi. s |g_w(s)| is non-decreasing; on a fixed face
// of the simplex w(s) = w_a + w_b / s with g_wa orthogonal to g_wb, so s^2 |g_w(s)|^2 is a quadratic
// in s whose root gives s* in one step once the face is right. A bracket with bisection guards the
// face-by-face steps. Result to rounding level: |s |g_w| - phi| <= 1e-12 phi.
// G: row-major [T, T] (not normalised); out: [T].
void cagrad_weights(const double* G, int64_t T, double c, double norm_eps, double* out);

}  // namespace fastmtl::cpu::aggregation
