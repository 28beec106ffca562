// The aggregation ops: Gram matrices [N, T, T] -> task weights. Argument checks, the batch loop
// (parallel over the N matrices, or over the N*K projections of UPGrad) and the solvers of
// csrc/cpu/aggregation/. All solve in double precision; outputs have the Gram's dtype and device.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/aggregation/cagrad.h"
#include "cpu/aggregation/dual_cone.h"
#include "cpu/aggregation/min_norm.h"
#include "cpu/aggregation/power_system.h"
#include "cpu/aggregation/spectral.h"
#include "cpu/aggregation/surgery.h"
#include "ops/gram.h"

namespace fastmtl::ops {
namespace {

using namespace fastmtl::cpu::aggregation;

// Runs fn(n, gram_n, out_n) for every matrix of the batch in parallel.
template <typename Fn>
at::Tensor per_matrix(const at::Tensor& g, Fn fn) {
  const int64_t N = g.size(0), T = g.size(1);
  at::Tensor out = at::zeros({N, T}, g.options());
  const double* gp = g.const_data_ptr<double>();
  double* op = out.mutable_data_ptr<double>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) fn(n, gp + n * T * T, op + n * T);
  });
  return out;
}

void check_nonnegative(const char* op, const char* arg, double value) {
  TORCH_CHECK_VALUE(value >= 0.0 && std::isfinite(value), "fastmtl.", op, ": argument '", arg,
                    "' expected a finite value >= 0, got ", value);
}

at::Tensor dual_cone_projection_entry(const at::Tensor& gram, const at::Tensor& u, double norm_eps, double reg_eps) {
  constexpr const char* kOp = "dual_cone_projection";
  at::Tensor g = checked_gram(kOp, gram);
  const int64_t N = g.size(0), T = g.size(1);
  TORCH_CHECK_VALUE(u.dim() == 3 && u.size(0) == N && u.size(2) == T, "fastmtl.dual_cone_projection: argument 'u' "
                    "expected shape [N, K, T] = [", N, ", K, ", T, "] (N and T of 'gram'), got ", shape_str(u.sizes()));
  check_float_dtype(u, kOp, "u");
  TORCH_CHECK_VALUE(at::isfinite(u).all().item<bool>(), "fastmtl.dual_cone_projection: argument 'u' expected "
                    "finite values, got NaN or infinity");
  check_nonnegative(kOp, "norm_eps", norm_eps);
  check_nonnegative(kOp, "reg_eps", reg_eps);
  // torchjd's normalisation: H = G / tr(G) (0 when tr(G) < norm_eps) + reg_eps I, positive definite
  // for reg_eps > 0 and scale-invariant.
  at::Tensor trace = g.diagonal(0, 1, 2).sum(-1, true).unsqueeze(-1);
  at::Tensor H = at::where(trace < norm_eps, at::zeros_like(g), g / trace) +
                 reg_eps * at::eye(T, g.options()).unsqueeze(0);
  H = H.contiguous();
  at::Tensor uu = u.to(at::kCPU, at::kDouble).contiguous();
  const int64_t K = uu.size(1);
  at::Tensor out = at::empty({N, K, T}, g.options());
  const double* hp = H.const_data_ptr<double>();
  const double* up = uu.const_data_ptr<double>();
  double* op = out.mutable_data_ptr<double>();
  at::parallel_for(0, N * K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) solve_dual_cone_qp(hp + (p / K) * T * T, up + p * T, T, op + p * T);
  });
  return out.to(gram.device(), u.scalar_type());
}

at::Tensor min_norm_weights_entry(const at::Tensor& gram) {
  at::Tensor g = checked_gram("min_norm_weights", gram);
  const int64_t T = g.size(1);
  return like_gram(per_matrix(g, [T](int64_t, const double* G, double* out) { min_norm_point(G, T, out); }), gram);
}

at::Tensor cagrad_weights_entry(const at::Tensor& gram, double c, double norm_eps) {
  at::Tensor g = checked_gram("cagrad_weights", gram);
  check_nonnegative("cagrad_weights", "c", c);
  check_nonnegative("cagrad_weights", "norm_eps", norm_eps);
  const int64_t T = g.size(1);
  return like_gram(per_matrix(g, [=](int64_t, const double* G, double* out) { cagrad_weights(G, T, c, norm_eps, out); }),
                   gram);
}

at::Tensor power_system_weights_entry(const at::Tensor& gram, double exponent) {
  at::Tensor g = checked_gram("power_system_weights", gram);
  TORCH_CHECK_VALUE(exponent > 0.0 && std::isfinite(exponent), "fastmtl.power_system_weights: argument 'exponent' "
                    "expected a finite value > 0, got ", exponent);
  const int64_t T = g.size(1);
  return like_gram(
      per_matrix(g, [=](int64_t, const double* G, double* out) { solve_power_system(G, T, exponent, out); }), gram);
}

// Checks that every row of `order` [N, T, width] lists distinct tasks (and never `i` itself when
// the row of task i excludes it).
at::Tensor checked_order(const char* op, const at::Tensor& order, int64_t N, int64_t T, int64_t width,
                         bool excludes_self) {
  TORCH_CHECK_VALUE(order.dim() == 3 && order.size(0) == N && order.size(1) == T && order.size(2) == width,
                    "fastmtl.", op, ": argument 'order' expected shape [", N, ", ", T, ", ", width,
                    "], got ", shape_str(order.sizes()));
  TORCH_CHECK_TYPE(order.scalar_type() == at::kLong, "fastmtl.", op,
                   ": argument 'order' expected dtype torch.int64, got ", dtype_name(order.scalar_type()));
  at::Tensor o = order.to(at::kCPU).contiguous();
  const int64_t* p = o.const_data_ptr<int64_t>();
  std::vector<char> seen(T);
  for (int64_t row = 0; row < N * T; ++row) {
    std::fill(seen.begin(), seen.end(), 0);
    for (int64_t k = 0; k < width; ++k) {
      const int64_t j = p[row * width + k];
      const bool ok = j >= 0 && j < T && !seen[j] && !(excludes_self && j == row % T);
      TORCH_CHECK_VALUE(ok, "fastmtl.", op, ": argument 'order' expected each row to list distinct tasks in [0, ",
                        T, ")", excludes_self ? " other than the row's own task" : "", ", got ", j,
                        " in row ", row % T, " of matrix ", row / T);
      seen[j] = 1;
    }
  }
  return o;
}

at::Tensor pcgrad_weights_entry(const at::Tensor& gram, const at::Tensor& order) {
  at::Tensor g = checked_gram("pcgrad_weights", gram);
  const int64_t N = g.size(0), T = g.size(1);
  at::Tensor o = checked_order("pcgrad_weights", order, N, T, T, false);
  const int64_t* op = o.const_data_ptr<int64_t>();
  return like_gram(
      per_matrix(g, [=](int64_t n, const double* G, double* out) { pcgrad_weights(G, T, op + n * T * T, out); }),
      gram);
}

std::tuple<at::Tensor, at::Tensor> gradvac_weights_entry(const at::Tensor& gram, const at::Tensor& order,
                                                         const at::Tensor& targets, double beta, double eps) {
  constexpr const char* kOp = "gradvac_weights";
  at::Tensor g = checked_gram(kOp, gram);
  const int64_t N = g.size(0), T = g.size(1);
  at::Tensor o = checked_order(kOp, order, N, T, T - 1, true);
  check_batch_vectors(kOp, targets, "targets", g, 2);
  TORCH_CHECK_VALUE(beta >= 0.0 && beta <= 1.0, "fastmtl.gradvac_weights: argument 'beta' expected a value in "
                    "[0, 1], got ", beta);
  check_nonnegative(kOp, "eps", eps);
  at::Tensor new_targets = targets.to(at::kCPU, at::kDouble).clone().contiguous();
  const int64_t* op = o.const_data_ptr<int64_t>();
  double* tp = new_targets.mutable_data_ptr<double>();
  at::Tensor weights = per_matrix(g, [=](int64_t n, const double* G, double* out) {
    gradvac_weights(G, T, op + n * T * (T - 1), beta, eps, tp + n * T * T, out);
  });
  return {like_gram(weights, gram), new_targets.to(targets.device(), targets.scalar_type())};
}

AlignedScale parse_scale(const std::string& name) {
  if (name == "min") return AlignedScale::Min;
  if (name == "median") return AlignedScale::Median;
  TORCH_CHECK_VALUE(name == "rmse", "fastmtl.aligned_mtl_weights: argument 'scale_mode' expected one of "
                    "'min', 'median', 'rmse', got '", name, "'");
  return AlignedScale::Rmse;
}

at::Tensor aligned_mtl_weights_entry(const at::Tensor& gram, const at::Tensor& pref, const std::string& scale_mode) {
  constexpr const char* kOp = "aligned_mtl_weights";
  at::Tensor g = checked_gram(kOp, gram);
  check_batch_vectors(kOp, pref, "pref", g, 1);
  const AlignedScale scale = parse_scale(scale_mode);
  const int64_t T = g.size(1);
  auto [eigenvalues, eigenvectors] = at::linalg_eigh(g, "U");
  eigenvalues = eigenvalues.contiguous();
  eigenvectors = eigenvectors.contiguous();
  at::Tensor p = pref.to(at::kCPU, at::kDouble).contiguous();
  const double* lp = eigenvalues.const_data_ptr<double>();
  const double* vp = eigenvectors.const_data_ptr<double>();
  const double* pp = p.const_data_ptr<double>();
  const double eps = input_epsilon(gram);
  return like_gram(per_matrix(g, [=](int64_t n, const double*, double* out) {
                     aligned_mtl_weights(lp + n * T, vp + n * T * T, T, pp + n * T, scale, eps, out);
                   }), gram);
}

at::Tensor imtlg_weights_entry(const at::Tensor& gram) {
  at::Tensor g = checked_gram("imtlg_weights", gram);
  const int64_t T = g.size(1);
  auto [eigenvalues, eigenvectors] = at::linalg_eigh(g);
  eigenvalues = eigenvalues.contiguous();
  eigenvectors = eigenvectors.contiguous();
  const double* lp = eigenvalues.const_data_ptr<double>();
  const double* vp = eigenvectors.const_data_ptr<double>();
  const double eps = input_epsilon(gram);
  return like_gram(per_matrix(g, [=](int64_t n, const double* G, double* out) {
                     imtlg_weights(G, lp + n * T, vp + n * T * T, T, eps, out);
                   }), gram);
}

at::Tensor config_weights_entry(const at::Tensor& gram, const at::Tensor& pref) {
  constexpr const char* kOp = "config_weights";
  at::Tensor g = checked_gram(kOp, gram);
  check_batch_vectors(kOp, pref, "pref", g, 1);
  const int64_t N = g.size(0), T = g.size(1);
  at::Tensor cosines = at::empty_like(g);
  at::Tensor inverse_norms = at::empty({N, T}, g.options());
  for (int64_t n = 0; n < N; ++n)
    config_cosines(g.const_data_ptr<double>() + n * T * T, T, cosines.mutable_data_ptr<double>() + n * T * T,
                   inverse_norms.mutable_data_ptr<double>() + n * T);
  auto [eigenvalues, eigenvectors] = at::linalg_eigh(cosines);
  eigenvalues = eigenvalues.contiguous();
  eigenvectors = eigenvectors.contiguous();
  at::Tensor p = pref.to(at::kCPU, at::kDouble).contiguous();
  const double* lp = eigenvalues.const_data_ptr<double>();
  const double* vp = eigenvectors.const_data_ptr<double>();
  const double* ip = inverse_norms.const_data_ptr<double>();
  const double* pp = p.const_data_ptr<double>();
  const double eps = input_epsilon(gram);
  return like_gram(per_matrix(g, [=](int64_t n, const double* G, double* out) {
                     config_weights(ip + n * T, G, lp + n * T, vp + n * T * T, T, pp + n * T, eps, out);
                   }), gram);
}

}  // namespace

// The solvers run on the CPU whatever the device of the Gram matrix, so both keys get the same entries.
#define FASTMTL_REGISTER_AGGREGATION_OPS(m)                          \
  m.impl("dual_cone_projection", &dual_cone_projection_entry);       \
  m.impl("min_norm_weights", &min_norm_weights_entry);               \
  m.impl("cagrad_weights", &cagrad_weights_entry);                   \
  m.impl("power_system_weights", &power_system_weights_entry);       \
  m.impl("pcgrad_weights", &pcgrad_weights_entry);                   \
  m.impl("gradvac_weights", &gradvac_weights_entry);                 \
  m.impl("aligned_mtl_weights", &aligned_mtl_weights_entry);         \
  m.impl("imtlg_weights", &imtlg_weights_entry);                     \
  m.impl("config_weights", &config_weights_entry);

TORCH_LIBRARY_IMPL(fastmtl, CPU, m) { FASTMTL_REGISTER_AGGREGATION_OPS(m) }
TORCH_LIBRARY_IMPL(fastmtl, CUDA, m) { FASTMTL_REGISTER_AGGREGATION_OPS(m) }

}  // namespace fastmtl::ops
