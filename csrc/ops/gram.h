// Argument checks and layout for the aggregation ops: every op takes a batch of Gram matrices
// [N, T, T] and solves in double precision on the CPU (T x T problems are too small and too
// sequential for a GPU; a CUDA Gram matrix is copied over and the weights copied back).
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "ops/checks.h"

namespace fastmtl::ops {

// Checks shape, dtype, finiteness and symmetry and returns the Gram matrices as contiguous double
// CPU tensors, symmetrised ((G + G^T) / 2) so that the solvers can rely on exact symmetry.
inline at::Tensor checked_gram(const char* op, const at::Tensor& gram) {
  TORCH_CHECK_VALUE(gram.dim() == 3 && gram.size(1) == gram.size(2) && gram.size(1) >= 1, "fastmtl.", op,
                    ": argument 'gram' expected a batch of square Gram matrices [N, T, T] with T >= 1, got shape ",
                    shape_str(gram.sizes()));
  check_float_dtype(gram, op, "gram");
  at::Tensor g = gram.to(at::kCPU, at::kDouble).contiguous();
  if (g.numel() == 0) return g;
  TORCH_CHECK_VALUE(at::isfinite(g).all().item<bool>(), "fastmtl.", op,
                    ": argument 'gram' expected finite values, got NaN or infinity");
  const double largest = g.abs().max().item<double>();
  // A Gram matrix computed in float32 is symmetric to about 1e-7 of its largest entry.
  const double tolerance = (gram.scalar_type() == at::kFloat ? 1e-4 : 1e-8) * largest;
  const double asymmetry = (g - g.transpose(1, 2)).abs().max().item<double>();
  TORCH_CHECK_VALUE(asymmetry <= tolerance, "fastmtl.", op,
                    ": argument 'gram' expected symmetric matrices (G[s, t] = <g_s, g_t> = G[t, s]), got "
                    "max |G - G^T| = ", asymmetry, " with max |G| = ", largest);
  const double most_negative_diagonal = g.diagonal(0, 1, 2).min().item<double>();
  TORCH_CHECK_VALUE(most_negative_diagonal >= -tolerance, "fastmtl.", op,
                    ": argument 'gram' expected a non-negative diagonal (squared gradient norms), got ",
                    most_negative_diagonal);
  return ((g + g.transpose(1, 2)) * 0.5).contiguous();
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

inline void check_batch_vectors(const char* op, const at::Tensor& t, const char* arg, const at::Tensor& gram,
                                int64_t inner_dims) {
  const int64_t N = gram.size(0), T = gram.size(1);
  bool ok = t.dim() == 1 + inner_dims && t.size(0) == N;
  for (int64_t d = 1; ok && d <= inner_dims; ++d) ok = t.size(d) == T;
  std::string expected = "[" + std::to_string(N);
  for (int64_t d = 0; d < inner_dims; ++d) expected += ", " + std::to_string(T);
  TORCH_CHECK_VALUE(ok, "fastmtl.", op, ": argument '", arg, "' expected shape ", expected,
                    "] (N and T of 'gram'), got ", shape_str(t.sizes()));
  check_float_dtype(t, op, arg);
  TORCH_CHECK_VALUE(at::isfinite(t).all().item<bool>(), "fastmtl.", op, ": argument '", arg,
                    "' expected finite values, got NaN or infinity");
}

}  // namespace fastmtl::ops
