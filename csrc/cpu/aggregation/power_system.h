// The system G x = x^(-p) (elementwise, x > 0) behind Nash-MTL (Navon et al. 2022: p = 1, the Nash
// bargaining solution G a = 1/a) and FairGrad (Ban & Ji 2024: alpha-fairness, p = 1/alpha).
#pragma once

#include <cstdint>

namespace fastmtl::cpu::aggregation {

// x is the unique minimiser of the strictly convex F(x) = x^T G x / 2 + sum_i phi(x_i) with
// phi'(x) = -x^(-p) (phi = -log for p = 1), found by damped Newton steps (Cholesky of
// G + diag(p x^(-p-1)), backtracking that keeps x > 0 and decreases F). Stops when every
// |(G x)_i - x_i^(-p)| <= 1e-14 x_i^(-p) (or no further decrease at rounding level), which takes about 10 steps from x_i = G_ii^(-1/(1+p)).
// Tasks with a zero gradient (G_ii <= 1e-14 max G) get weight 0: no finite weight balances them.
// G gets 1e-14 max G_ii on its diagonal so that F stays bounded below when some convex combination
// of gradients is zero (then no exact solution exists and the weights become large, not infinite).
// G: row-major [T, T]; x: [T].
void solve_power_system(const double* G, int64_t T, double p, double* x);

}  // namespace fastmtl::cpu::aggregation
