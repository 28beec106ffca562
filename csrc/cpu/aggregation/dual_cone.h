// The dual-cone projection behind UPGrad and DualProj (Quinton & Rey, "Jacobian Descent for
// Multi-Objective Optimization", Prop. 1): the weights w with pi_J(J^T u) = J^T w solve
//     min_v  v^T H v   subject to  v >= u,
// with H the Gram matrix (normalised and regularised by the caller so that it is positive definite).
#pragma once

#include <cstdint>

namespace fastmtl::cpu::aggregation {

// Block principal pivoting (Judice & Pires 1994) on the complementarity conditions v >= u,
// lambda = H v >= 0, lambda_i (v_i - u_i) = 0: guess the free set F (v_i > u_i), solve
// H_FF v_F = -H_FA u_A by Cholesky, and move every variable whose sign condition fails to the other
// side; if a round does not reduce the number of failures three times, move one at a time (Murty's
// least-index rule, which terminates for positive definite H). It starts from the bounds that
// (H u)_i < 0 says to free. The result satisfies the conditions up to
// rounding: v_F >= u_F, lambda_A >= -1e-13 tr(H) max|u|.
// H: row-major [T, T]; u, v: [T].
void solve_dual_cone_qp(const double* H, const double* u, int64_t T, double* v);

}  // namespace fastmtl::cpu::aggregation
