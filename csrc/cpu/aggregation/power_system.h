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

// The share of x^T (G + d I) x = sum_t x_t^(1-p) (at the solution of the shifted system) that the shift
// holds, d |x|^2 = sum_t x_t^(1-p) - x^T G x, over the tasks with x_t > 0 (zero-gradient tasks have
// weight 0); 0 when no task has weight. Near 1 where no x solves G x = x^(-p) (some convex combination
// of the gradients is zero, and the weights grow as d shrinks); at rounding level otherwise (measured:
// below 0.02, mostly 1e-13 to 1e-5, in float32 and float64).
double power_system_shift_share(const double* G, int64_t T, double p, const double* x);

}  // namespace fastmtl::cpu::aggregation
