// The dual-cone projection behind UPGrad and DualProj (Quinton & Rey, "Jacobian Descent for
// Multi-Objective Optimization", Prop. 1): the weights w with pi_J(J^T u) = J^T w solve
//     min_v  v^T H v   subject to  v >= u,
// with H the Gram matrix (normalised and regularised by the caller so that it is positive definite).
#pragma once

#include <cstdint>

namespace fastmtl::cpu::aggregation {

// Primal active-set method (the Lawson-Hanson scheme for a positive definite Hessian): starts at
// v = u, frees the bound with the most negative multiplier (H v)_i, solves the free block with a
// growing Cholesky factor and steps back to the feasible region when a free variable would cross
// its bound. Terminates in finitely many steps; the result satisfies the KKT conditions up to
// rounding: (H v)_i >= -1e-13 tr(H) max|u| on the bounds, (H v)_i = 0 on the free set.
// H: row-major [T, T]; u, v: [T].
void solve_dual_cone_qp(const double* H, const double* u, int64_t T, double* v);

}  // namespace fastmtl::cpu::aggregation
