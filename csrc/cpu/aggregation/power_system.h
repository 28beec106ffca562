// The system G x = x^(-p) (elementwise, x > 0) behind Nash-MTL (Navon et al. 2022: p = 1, the Nash
// bargaining solution G a = 1/a) and FairGrad (Ban & Ji 2024: alpha-fairness, p = 1/alpha).
#pragma once

#include <cstdint>

namespace fastmtl::cpu::aggregation {

// x is the unique minimiser of the strictly convex F(x) = x^T G x / 2 + sum_i phi(x_i) with
// phi'(x) = -x^(-p) (phi = -log for p = 1), found by damped Newton steps (Cholesky of
// G + diag(p x^(-p-1)), backtracking that keeps x > 0 and decreases F). Stops when every
// |(G x)_i - x_i^(-p)| <= 1e-14 x_i^(-p) (or no further decrease at rounding level), which takes about 10 steps from
// x_i = G_ii^(-1/(1+p)). Tasks with a zero gradient (G_ii <= 1e-14 max G) get weight 0: no finite weight balances them.
// G is made positive definite before solving: the smallest shift d >= max(1e-14, T * rounding) * max G_ii
// (rounding: the unit roundoff of the dtype the Gram matrix was computed in) with H + d/2 I
// Cholesky-factorable goes on its diagonal, so that F is bounded below when some convex combination
// of gradients is zero (then no exact solution exists and the weights become large, not infinite),
// also when rounding has made such a Gram matrix slightly indefinite.
// Returns whether Newton's method converged (every relative residual |(G x)_i - x_i^(-p)| / (sum_j
// |G_ij x_j| + x_i^(-p)) <= 1e-9); the largest one goes to *relative_residual.
// G: row-major [T, T]; x: [T].
bool solve_power_system(const double* G, int64_t T, double p, double rounding, double* x, double* relative_residual);

}  // namespace fastmtl::cpu::aggregation
