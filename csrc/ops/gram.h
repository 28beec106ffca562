// Argument checks and layout for the aggregation ops: every op takes a batch of Gram matrices
// [N, T, T] and solves in double precision on the CPU (T x T problems are too small and too
// sequential for a GPU; a CUDA Gram matrix is copied over and the weights copied back).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>

#include "ops/checks.h"

namespace fastmtl::ops {

// A Gram matrix computed in float32 is symmetric to about 1e-7 of its largest entry.
inline double gram_symmetry_tolerance(at::ScalarType dtype) { return dtype == at::kFloat ? 1e-4 : 1e-8; }

namespace detail {

// The loops of check_and_symmetrise_gram, apart from its error messages and not inlined into it: a
// value that a message takes by reference lives in memory, and a loop carrying it would store and
// reload it every iteration (measured: the checks cost twice the T = 40 solve that way).
struct GramScan {
  double largest;
  bool all_finite;
};

// Four independent accumulators: one chain of max over T^2 entries waits on each max in turn.
C10_NOINLINE inline GramScan scan_gram(const double* G, int64_t count) {
  double largest[4] = {0.0, 0.0, 0.0, 0.0}, zero_if_finite[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t k = 0;
  for (; k + 4 <= count; k += 4)
    for (int lane = 0; lane < 4; ++lane) {
      largest[lane] = std::max(largest[lane], std::abs(G[k + lane]));
      zero_if_finite[lane] += G[k + lane] * 0.0;  // NaN for an infinite or NaN entry, else 0
    }
  for (; k < count; ++k) {
    largest[0] = std::max(largest[0], std::abs(G[k]));
    zero_if_finite[0] += G[k] * 0.0;
  }
  const double zero = (zero_if_finite[0] + zero_if_finite[1]) + (zero_if_finite[2] + zero_if_finite[3]);
  return {std::max(std::max(largest[0], largest[1]), std::max(largest[2], largest[3])), zero == 0.0};
}

// Makes G exactly symmetric ((G + G^T) / 2); returns max |G - G^T| and the lowest diagonal entry.
C10_NOINLINE inline std::pair<double, double> symmetrise_gram(double* G, int64_t T) {
  double asymmetry = 0.0, lowest_diagonal = 0.0;
  for (int64_t i = 0; i < T; ++i) {
    lowest_diagonal = std::min(lowest_diagonal, G[i * T + i]);
    for (int64_t j = i + 1; j < T; ++j) {
      asymmetry = std::max(asymmetry, std::abs(G[i * T + j] - G[j * T + i]));
      const double mean = 0.5 * (G[i * T + j] + G[j * T + i]);
      G[i * T + j] = G[j * T + i] = mean;
    }
  }
  return {asymmetry, lowest_diagonal};
}

}  // namespace detail

// Checks matrix n of a batch, G [T, T] (a private row-major double copy): finite, symmetric to
// relative_tolerance of its largest entry, non-negative diagonal; then makes it exactly symmetric
// ((G + G^T) / 2) so that the solvers can rely on that.
inline void check_and_symmetrise_gram(const char* op, double* G, int64_t T, int64_t n, double relative_tolerance) {
  const detail::GramScan scan = detail::scan_gram(G, T * T);
  for (int64_t k = 0; !scan.all_finite && k < T * T; ++k)
    TORCH_CHECK_VALUE(std::isfinite(G[k]), "fastmtl.", op, ": argument 'gram' expected finite values, got ", G[k],
                      " at [", n, ", ", k / T, ", ", k % T, "]");
  const double largest = scan.largest;
  const auto [asymmetry, lowest_diagonal] = detail::symmetrise_gram(G, T);
  TORCH_CHECK_VALUE(asymmetry <= relative_tolerance * largest, "fastmtl.", op,
                    ": argument 'gram' expected symmetric matrices (G[s, t] = <g_s, g_t> = G[t, s]), got "
                    "max |G - G^T| = ",
                    asymmetry, " with max |G| = ", largest, " in matrix ", n);
  TORCH_CHECK_VALUE(lowest_diagonal >= -relative_tolerance * largest, "fastmtl.", op,
                    ": argument 'gram' expected a non-negative diagonal (squared gradient norms), got ",
                    lowest_diagonal, " in matrix ", n);
}

// Checks shape, dtype, finiteness and symmetry and returns the Gram matrices as a contiguous double
// CPU copy, symmetrised ((G + G^T) / 2) so that the solvers can rely on exact symmetry. One pass
// over the copy: these ops run once per training step on tiny matrices, where a chain of ATen
// reductions (isfinite, abs, max, item, ...) would cost more than the solve.
inline at::Tensor checked_gram(const char* op, const at::Tensor& gram) {
  TORCH_CHECK_VALUE(gram.dim() == 3 && gram.size(1) == gram.size(2) && gram.size(1) >= 1, "fastmtl.", op,
                    ": argument 'gram' expected a batch of square Gram matrices [N, T, T] with T >= 1, got shape ",
                    shape_str(gram.sizes()));
  check_float_dtype(gram, op, "gram");
  at::Tensor g = gram.to(at::kCPU, at::kDouble, /*non_blocking=*/false, /*copy=*/true).contiguous();
  const int64_t N = g.size(0), T = g.size(1);
  double* p = g.mutable_data_ptr<double>();
  const double relative_tolerance = gram_symmetry_tolerance(gram.scalar_type());
  for (int64_t n = 0; n < N; ++n) check_and_symmetrise_gram(op, p + n * T * T, T, n, relative_tolerance);
  return g;
}

// Machine epsilon of the dtype the Gram matrix arrived in: the rank cut-off of the spectral methods
// (noise in a float32 Gram matrix is ~1e-7 of its scale, not ~1e-16).
inline double input_epsilon(const at::Tensor& gram) {
  return gram.scalar_type() == at::kFloat ? 1.1920928955078125e-07 : 2.220446049250313e-16;
}

// The result in the dtype and on the device of the Gram matrix.
inline at::Tensor like_gram(const at::Tensor& result, const at::Tensor& gram) {
  return result.to(gram.device(), gram.scalar_type());
}

// A floating argument as a finite, contiguous double CPU copy.
inline at::Tensor checked_copy(const char* op, const at::Tensor& t, const char* arg) {
  check_float_dtype(t, op, arg);
  at::Tensor c = t.to(at::kCPU, at::kDouble, /*non_blocking=*/false, /*copy=*/true).contiguous();
  const double* p = c.const_data_ptr<double>();
  for (int64_t k = 0; k < c.numel(); ++k)
    TORCH_CHECK_VALUE(std::isfinite(p[k]), "fastmtl.", op, ": argument '", arg, "' expected finite values, got ", p[k]);
  return c;
}

// A per-matrix argument of shape [N] + [T] * inner_dims as a checked, contiguous double CPU copy.
inline at::Tensor checked_batch_vectors(const char* op, const at::Tensor& t, const char* arg, const at::Tensor& gram,
                                        int64_t inner_dims) {
  const int64_t N = gram.size(0), T = gram.size(1);
  bool ok = t.dim() == 1 + inner_dims && t.size(0) == N;
  for (int64_t d = 1; ok && d <= inner_dims; ++d) ok = t.size(d) == T;
  std::string expected = "[" + std::to_string(N);
  for (int64_t d = 0; d < inner_dims; ++d) expected += ", " + std::to_string(T);
  TORCH_CHECK_VALUE(ok, "fastmtl.", op, ": argument '", arg, "' expected shape ", expected,
                    "] (N and T of 'gram'), got ", shape_str(t.sizes()));
  return checked_copy(op, t, arg);
}

}  // namespace fastmtl::ops
