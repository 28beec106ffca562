// The aggregation ops: Gram matrices [N, T, T] -> task weights. Argument checks, the batch loop
// (parallel over the N matrices, or over the N*K projections of UPGrad) and the solvers of
// csrc/cpu/aggregation/. All solve in double precision; outputs have the Gram's dtype and device.
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <type_traits>
#include <vector>
#include <torch/library.h>

#include "cpu/aggregation/cagrad.h"
#include "cpu/aggregation/dual_cone.h"
#include "cpu/aggregation/min_norm.h"
#include "cpu/aggregation/power_system.h"
#include "cpu/aggregation/spectral.h"
#include "cpu/aggregation/surgery.h"
#include "ops/aggregation_unbatched.h"
#include "ops/gram.h"

namespace fastmtl::ops {
namespace {

using namespace fastmtl::cpu::aggregation;

// The smallest regularisation of the dual-cone QP (on the trace-normalised Gram matrix, eigenvalues in
// [0, 1]): Cholesky stays exact to ~1e-5 of its pivots, and the update conflicts with no task by more
// than 1e-11 of tr(G).
constexpr double kMinDualConeReg = 1e-11;

// How many T x T problems one thread should take at least: waking the other threads costs tens of
// microseconds, more than a whole small problem (~T^3 flops), so small batches run on one thread.
int64_t problems_per_thread(int64_t T) {
  constexpr int64_t kFlopsWorthAThread = 200000;
  return std::max<int64_t>(1, kFlopsWorthAThread / std::max<int64_t>(T * T * T, 1));
}

// Runs fn(n, gram_n, out_n) for every matrix of the batch, in parallel where that pays.
template <typename Fn>
at::Tensor per_matrix(const at::Tensor& g, Fn fn) {
  const int64_t N = g.size(0), T = g.size(1);
  at::Tensor out = at::zeros({N, T}, g.options());
  const double* gp = g.const_data_ptr<double>();
  double* op = out.mutable_data_ptr<double>();
  at::parallel_for(0, N, problems_per_thread(T), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) fn(n, gp + n * T * T, op + n * T);
  });
  return out;
}

void check_nonnegative(const char* op, const char* arg, double value) {
  TORCH_CHECK_VALUE(value >= 0.0 && std::isfinite(value), "fastmtl.", op, ": argument '", arg,
                    "' expected a finite value >= 0, got ", value);
}

// torchjd's normalisation, in place on the checked copy: H = G / tr(G) (0 when tr(G) = 0 or tr(G) <
// norm_eps) + reg I, scale-invariant at every scale (divided by max G_ii first, then by the trace of
// the result, so that neither a subnormal nor a huge trace over- or underflows). reg = reg_eps, raised
// to kMinDualConeReg: with reg_eps = 0 a rank-deficient H has no Cholesky factor and the active-set
// solver could not tell a conflicting point from the projection.
void normalise_dual_cone_matrix(double* G, int64_t T, double norm_eps, double reg) {
  double largest = 0.0, trace = 0.0;
  for (int64_t i = 0; i < T; ++i) {
    largest = std::max(largest, G[i * T + i]);
    trace += G[i * T + i];
  }
  if (largest > 0.0 && trace >= norm_eps) {
    // Multiplications by the reciprocals (a division costs several multiplications), unless the
    // reciprocal of a subnormal largest entry overflows.
    const double inverse_largest = 1.0 / largest;
    if (std::isfinite(inverse_largest)) {
      // One pass, with the rounding of the two divisions' passes: (G * 1/largest) * 1/trace'.
      double normalised_trace = 0.0;
      for (int64_t i = 0; i < T; ++i) normalised_trace += G[i * T + i] * inverse_largest;
      const double inverse_trace = 1.0 / normalised_trace;  // normalised_trace is in [1, T]
      for (int64_t k = 0; k < T * T; ++k) G[k] = (G[k] * inverse_largest) * inverse_trace;
    } else {
      for (int64_t k = 0; k < T * T; ++k) G[k] /= largest;
      double normalised_trace = 0.0;
      for (int64_t i = 0; i < T; ++i) normalised_trace += G[i * T + i];
      for (int64_t k = 0; k < T * T; ++k) G[k] /= normalised_trace;
    }
  } else {
    std::fill(G, G + T * T, 0.0);
  }
  for (int64_t i = 0; i < T; ++i) G[i * T + i] += reg;
}

void normalise_for_dual_cone(at::Tensor& H, double norm_eps, double reg_eps) {
  const int64_t N = H.size(0), T = H.size(1);
  const double reg = std::max(reg_eps, kMinDualConeReg);
  double* hp = H.mutable_data_ptr<double>();
  for (int64_t n = 0; n < N; ++n) normalise_dual_cone_matrix(hp + n * T * T, T, norm_eps, reg);
}

// The weights out [N, T] (zeroed by the caller) of N normalised matrices H [N, T, T] with preferences
// pref [N, T]: UPGrad (each) sums the T projections of pref_k e_k, DualProj projects pref itself.
void dual_cone_weights_of(const double* hp, const double* pp, int64_t N, int64_t T, bool each, double* op) {
  if (each) {
    std::vector<double> projections(N * T * T);
    at::parallel_for(0, N * T, problems_per_thread(T), [&](int64_t begin, int64_t end) {
      std::vector<double> u(T, 0.0);
      for (int64_t q = begin; q < end; ++q) {
        const int64_t n = q / T, k = q % T;
        std::fill(u.begin(), u.end(), 0.0);
        u[k] = pp[n * T + k];
        solve_dual_cone_qp(hp + n * T * T, u.data(), T, projections.data() + q * T);
      }
    });
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < T; ++k)
        for (int64_t i = 0; i < T; ++i) op[n * T + i] += projections[(n * T + k) * T + i];
  } else {
    at::parallel_for(0, N, problems_per_thread(T), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) solve_dual_cone_qp(hp + n * T * T, pp + n * T, T, op + n * T);
    });
  }
}

at::Tensor dual_cone_projection_entry(const at::Tensor& gram, const at::Tensor& u, double norm_eps, double reg_eps) {
  constexpr const char* kOp = "dual_cone_projection";
  at::Tensor H = checked_gram(kOp, gram);
  const int64_t N = H.size(0), T = H.size(1);
  TORCH_CHECK_VALUE(u.dim() == 3 && u.size(0) == N && u.size(2) == T,
                    "fastmtl.dual_cone_projection: argument 'u' "
                    "expected shape [N, K, T] = [",
                    N, ", K, ", T, "] (N and T of 'gram'), got ", shape_str(u.sizes()));
  check_nonnegative(kOp, "norm_eps", norm_eps);
  check_nonnegative(kOp, "reg_eps", reg_eps);
  const int64_t K = u.size(1);
  at::Tensor uu = checked_copy(kOp, u, "u");
  normalise_for_dual_cone(H, norm_eps, reg_eps);
  const double* hp = H.const_data_ptr<double>();
  at::Tensor out = at::empty({N, K, T}, H.options());
  const double* up = uu.const_data_ptr<double>();
  double* op = out.mutable_data_ptr<double>();
  at::parallel_for(0, N * K, problems_per_thread(T), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) solve_dual_cone_qp(hp + (p / K) * T * T, up + p * T, T, op + p * T);
  });
  return out.to(gram.device(), u.scalar_type());
}

// UPGrad (each = true: the sum of the projections of pref_t e_t, t = 1..T) and DualProj (each = false:
// the projection of pref) as weights, in one call: the lean path of an unbatched [T, T] Gram matrix
// (no [N, K, T] right-hand sides to build, no sum or reshape in Python). gram [T, T] or [N, T, T], pref
// [T] or [N, T]; the weights have gram's shape without its last dimension, dtype and device.
at::Tensor dual_cone_weights_entry(const at::Tensor& gram, const at::Tensor& pref, double norm_eps, double reg_eps,
                                   bool each) {
  constexpr const char* kOp = "dual_cone_weights";
  const bool single = gram.dim() == 2;
  TORCH_CHECK_VALUE(pref.dim() == gram.dim() - 1, "fastmtl.dual_cone_weights: argument 'pref' expected ",
                    single ? "[T]" : "[N, T]", " for 'gram' of shape ", shape_str(gram.sizes()), ", got ",
                    shape_str(pref.sizes()));
  at::Tensor H = checked_gram(kOp, single ? gram.unsqueeze(0) : gram);
  const int64_t N = H.size(0), T = H.size(1);
  at::Tensor p = checked_batch_vectors(kOp, single ? pref.unsqueeze(0) : pref, "pref", H, 1);
  check_nonnegative(kOp, "norm_eps", norm_eps);
  check_nonnegative(kOp, "reg_eps", reg_eps);
  normalise_for_dual_cone(H, norm_eps, reg_eps);
  at::Tensor out = at::zeros({N, T}, H.options());
  dual_cone_weights_of(H.const_data_ptr<double>(), p.const_data_ptr<double>(), N, T, each,
                       out.mutable_data_ptr<double>());
  return like_gram(single ? out.squeeze(0) : out, gram);
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
  return like_gram(
      per_matrix(g, [=](int64_t, const double* G, double* out) { cagrad_weights(G, T, c, norm_eps, out); }), gram);
}

// Returns (weights, relative residuals [N], shift shares [N], both in double): a residual above 1e-9
// means Newton's method did not converge for that matrix (its weights are the last iterate); a shift
// share above 1/2 means no x solves G x = x^(-p) and the positive-definite shift alone holds the weights
// finite (Pareto-stationary gradients). fastmtl.ops.power_system_weights turns both into warnings.
// Never silently stopping anywhere.
std::tuple<at::Tensor, at::Tensor, at::Tensor> power_system_weights_entry(const at::Tensor& gram, double exponent) {
  at::Tensor g = checked_gram("power_system_weights", gram);
  TORCH_CHECK_VALUE(exponent > 0.0 && std::isfinite(exponent),
                    "fastmtl.power_system_weights: argument 'exponent' "
                    "expected a finite value > 0, got ",
                    exponent);
  const int64_t N = g.size(0), T = g.size(1);
  const double rounding = input_epsilon(gram) / 2.0;
  at::Tensor residuals = at::zeros({N}, g.options());
  at::Tensor shift_shares = at::zeros({N}, g.options());
  double* rp = residuals.mutable_data_ptr<double>();
  double* sp = shift_shares.mutable_data_ptr<double>();
  at::Tensor weights = per_matrix(g, [&](int64_t n, const double* G, double* out) {
    solve_power_system(G, T, exponent, rounding, out, rp + n);
    sp[n] = power_system_shift_share(G, T, exponent, out);
  });
  return {like_gram(weights, gram), residuals.to(gram.device()), shift_shares.to(gram.device())};
}

// Checks that every row of `order` [N, T, width] lists distinct tasks (and never `i` itself when
// the row of task i excludes it).
at::Tensor checked_order(const char* op, const at::Tensor& order, int64_t N, int64_t T, int64_t width,
                         bool excludes_self) {
  TORCH_CHECK_VALUE(order.dim() == 3 && order.size(0) == N && order.size(1) == T && order.size(2) == width, "fastmtl.",
                    op, ": argument 'order' expected shape [", N, ", ", T, ", ", width, "], got ",
                    shape_str(order.sizes()));
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
      TORCH_CHECK_VALUE(ok, "fastmtl.", op, ": argument 'order' expected each row to list distinct tasks in [0, ", T,
                        ")", excludes_self ? " other than the row's own task" : "", ", got ", j, " in row ", row % T,
                        " of matrix ", row / T);
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
      per_matrix(g, [=](int64_t n, const double* G, double* out) { pcgrad_weights(G, T, op + n * T * T, out); }), gram);
}

std::tuple<at::Tensor, at::Tensor> gradvac_weights_entry(const at::Tensor& gram, const at::Tensor& order,
                                                         const at::Tensor& targets, double beta, double eps) {
  constexpr const char* kOp = "gradvac_weights";
  at::Tensor g = checked_gram(kOp, gram);
  const int64_t N = g.size(0), T = g.size(1);
  at::Tensor o = checked_order(kOp, order, N, T, T - 1, true);
  at::Tensor new_targets = checked_batch_vectors(kOp, targets, "targets", g, 2);
  TORCH_CHECK_VALUE(beta >= 0.0 && beta <= 1.0,
                    "fastmtl.gradvac_weights: argument 'beta' expected a value in "
                    "[0, 1], got ",
                    beta);
  check_nonnegative(kOp, "eps", eps);
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
  TORCH_CHECK_VALUE(name == "rmse",
                    "fastmtl.aligned_mtl_weights: argument 'scale_mode' expected one of "
                    "'min', 'median', 'rmse', got '",
                    name, "'");
  return AlignedScale::Rmse;
}

at::Tensor aligned_mtl_weights_entry(const at::Tensor& gram, const at::Tensor& pref, const std::string& scale_mode) {
  constexpr const char* kOp = "aligned_mtl_weights";
  at::Tensor g = checked_gram(kOp, gram);
  at::Tensor p = checked_batch_vectors(kOp, pref, "pref", g, 1);
  const AlignedScale scale = parse_scale(scale_mode);
  const int64_t T = g.size(1);
  auto [eigenvalues, eigenvectors] = at::linalg_eigh(g, "U");
  eigenvalues = eigenvalues.contiguous();
  eigenvectors = eigenvectors.contiguous();
  const double* lp = eigenvalues.const_data_ptr<double>();
  const double* vp = eigenvectors.const_data_ptr<double>();
  const double* pp = p.const_data_ptr<double>();
  const double eps = input_epsilon(gram);
  return like_gram(per_matrix(g,
                              [=](int64_t n, const double*, double* out) {
                                aligned_mtl_weights(lp + n * T, vp + n * T * T, T, pp + n * T, scale, eps, out);
                              }),
                   gram);
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
  return like_gram(per_matrix(g, [=](int64_t n, const double* G,
                                     double* out) { imtlg_weights(G, lp + n * T, vp + n * T * T, T, eps, out); }),
                   gram);
}

at::Tensor config_weights_entry(const at::Tensor& gram, const at::Tensor& pref) {
  constexpr const char* kOp = "config_weights";
  at::Tensor g = checked_gram(kOp, gram);
  at::Tensor p = checked_batch_vectors(kOp, pref, "pref", g, 1);
  const int64_t N = g.size(0), T = g.size(1);
  at::Tensor cosines = at::empty_like(g);
  at::Tensor inverse_norms = at::empty({N, T}, g.options());
  for (int64_t n = 0; n < N; ++n)
    config_cosines(g.const_data_ptr<double>() + n * T * T, T, cosines.mutable_data_ptr<double>() + n * T * T,
                   inverse_norms.mutable_data_ptr<double>() + n * T);
  auto [eigenvalues, eigenvectors] = at::linalg_eigh(cosines);
  eigenvalues = eigenvalues.contiguous();
  eigenvectors = eigenvectors.contiguous();
  const double* lp = eigenvalues.const_data_ptr<double>();
  const double* vp = eigenvectors.const_data_ptr<double>();
  const double* ip = inverse_norms.const_data_ptr<double>();
  const double* pp = p.const_data_ptr<double>();
  const double eps = input_epsilon(gram);
  return like_gram(per_matrix(g,
                              [=](int64_t n, const double* G, double* out) {
                                config_weights(ip + n * T, G, lp + n * T, vp + n * T * T, T, pp + n * T, eps, out);
                              }),
                   gram);
}

// Row-major double copy of a [rows, cols] CPU tensor of any strides (float32 or float64).
void copy_to_doubles(const at::Tensor& t, double* out) {
  const int64_t rows = t.dim() == 2 ? t.size(0) : 1, cols = t.size(-1);
  const int64_t row_stride = t.dim() == 2 ? t.stride(0) : 0, col_stride = t.stride(-1);
  auto copy = [&](const auto* p) {
    if (t.is_contiguous()) return std::copy(p, p + rows * cols, out), void();  // vectorised: the usual case
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) out[i * cols + j] = static_cast<double>(p[i * row_stride + j * col_stride]);
  };
  if (t.scalar_type() == at::kDouble)
    copy(t.const_data_ptr<double>());
  else
    copy(t.const_data_ptr<float>());
}

}  // namespace

at::Tensor dual_cone_weights_unbatched(const at::Tensor& gram, const at::Tensor& pref, double norm_eps, double reg_eps,
                                       bool each) {
  constexpr const char* kOp = "dual_cone_weights";
  TORCH_CHECK_VALUE(gram.dim() == 2 && gram.size(0) == gram.size(1) && gram.size(0) >= 1, "fastmtl.", kOp,
                    ": argument 'gram' expected a square Gram matrix [T, T] with T >= 1, got shape ",
                    shape_str(gram.sizes()));
  TORCH_CHECK(gram.is_cpu(), "fastmtl.", kOp, ": the unbatched path takes CPU tensors, got ", gram.device());
  check_float_dtype(gram, kOp, "gram");
  check_nonnegative(kOp, "norm_eps", norm_eps);
  check_nonnegative(kOp, "reg_eps", reg_eps);
  const int64_t T = gram.size(0);
  // This thread's scratch, reused from call to call (T^2 + 2T doubles): no allocations but the result.
  thread_local std::vector<double> scratch;
  scratch.resize(T * T + 2 * T);
  double* const H = scratch.data();
  double* const p = H + T * T;
  double* const weights = p + T;
  copy_to_doubles(gram, H);
  check_and_symmetrise_gram(kOp, H, T, 0, gram_symmetry_tolerance(gram.scalar_type()));
  std::fill(p, p + T, 1.0 / static_cast<double>(T));
  if (pref.defined()) {
    TORCH_CHECK_VALUE(pref.dim() == 1 && pref.size(0) == T && pref.is_cpu(), "fastmtl.", kOp,
                      ": argument 'pref' expected a CPU tensor of shape [", T, "] (T of 'gram'), got shape ",
                      shape_str(pref.sizes()), " on ", pref.device());
    check_float_dtype(pref, kOp, "pref");
    copy_to_doubles(pref, p);
    for (int64_t k = 0; k < T; ++k)
      TORCH_CHECK_VALUE(std::isfinite(p[k]), "fastmtl.", kOp, ": argument 'pref' expected finite values, got ", p[k]);
  }
  normalise_dual_cone_matrix(H, T, norm_eps, std::max(reg_eps, kMinDualConeReg));
  std::fill(weights, weights + T, 0.0);
  dual_cone_weights_of(H, p, 1, T, each, weights);
  // Straight to the CPU allocator: at::empty's trip through the dispatcher is a visible share here.
  at::Tensor out = at::detail::empty_cpu({T}, gram.scalar_type(), /*pin_memory=*/false, std::nullopt);
  if (out.scalar_type() == at::kDouble)
    std::copy(weights, weights + T, out.mutable_data_ptr<double>());
  else
    std::transform(weights, weights + T, out.mutable_data_ptr<float>(), [](double w) { return static_cast<float>(w); });
  return out;
}

// Autograd: aggregation weights are constants of the update, so these ops have no derivative. Rather
// than a backward that fails later (or the fallback's warning), a Gram matrix that requires grad is
// refused up front with a message that says to detach it; the classes of fastmtl.aggregation do.
void refuse_grad(const char* op, const at::Tensor& t) {
  TORCH_CHECK(!t.requires_grad(), "fastmtl.", op, " is not differentiable: aggregation weights are constants of ",
              "the update. Detach the Gram matrix (and other inputs) first; the classes of fastmtl.aggregation do.");
}

// Checks the tensor arguments, then calls the op again below autograd, through the dispatcher (so that
// Python modes and tracing see the op itself, not the ATen calls inside its kernel).
template <typename Sig, typename... Args>
auto below_autograd(const c10::TypedOperatorHandle<Sig>& op, const char* name, const Args&... args) {
  (
      (void)[&] {
        if constexpr (std::is_same_v<std::decay_t<Args>, at::Tensor>) refuse_grad(name, args);
      }(),
      ...);
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(args...);
}

template <typename Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using GramOnly = at::Tensor(const at::Tensor&);

TORCH_LIBRARY_IMPL(fastmtl, Autograd, m) {
  m.impl("dual_cone_projection", [](const at::Tensor& g, const at::Tensor& u, double a, double b) {
    static auto op =
        handle<at::Tensor(const at::Tensor&, const at::Tensor&, double, double)>("fastmtl::dual_cone_projection");
    return below_autograd(op, "dual_cone_projection", g, u, a, b);
  });
  m.impl("dual_cone_weights", [](const at::Tensor& g, const at::Tensor& p, double a, double b, bool each) {
    static auto op =
        handle<at::Tensor(const at::Tensor&, const at::Tensor&, double, double, bool)>("fastmtl::dual_cone_weights");
    return below_autograd(op, "dual_cone_weights", g, p, a, b, each);
  });
  m.impl("min_norm_weights", [](const at::Tensor& g) {
    static auto op = handle<GramOnly>("fastmtl::min_norm_weights");
    return below_autograd(op, "min_norm_weights", g);
  });
  m.impl("cagrad_weights", [](const at::Tensor& g, double c, double e) {
    static auto op = handle<at::Tensor(const at::Tensor&, double, double)>("fastmtl::cagrad_weights");
    return below_autograd(op, "cagrad_weights", g, c, e);
  });
  m.impl("power_system_weights", [](const at::Tensor& g, double e) {
    static auto op = handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, double)>(
        "fastmtl::power_system_weights");
    return below_autograd(op, "power_system_weights", g, e);
  });
  m.impl("pcgrad_weights", [](const at::Tensor& g, const at::Tensor& o) {
    static auto op = handle<at::Tensor(const at::Tensor&, const at::Tensor&)>("fastmtl::pcgrad_weights");
    return below_autograd(op, "pcgrad_weights", g, o);
  });
  m.impl("gradvac_weights", [](const at::Tensor& g, const at::Tensor& o, const at::Tensor& t, double b, double e) {
    static auto op = handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                               double, double)>("fastmtl::gradvac_weights");
    return below_autograd(op, "gradvac_weights", g, o, t, b, e);
  });
  m.impl("aligned_mtl_weights", [](const at::Tensor& g, const at::Tensor& p, const std::string& s) {
    static auto op =
        handle<at::Tensor(const at::Tensor&, const at::Tensor&, const std::string&)>("fastmtl::aligned_mtl_weights");
    return below_autograd(op, "aligned_mtl_weights", g, p, s);
  });
  m.impl("imtlg_weights", [](const at::Tensor& g) {
    static auto op = handle<GramOnly>("fastmtl::imtlg_weights");
    return below_autograd(op, "imtlg_weights", g);
  });
  m.impl("config_weights", [](const at::Tensor& g, const at::Tensor& p) {
    static auto op = handle<at::Tensor(const at::Tensor&, const at::Tensor&)>("fastmtl::config_weights");
    return below_autograd(op, "config_weights", g, p);
  });
}

// The solvers run on the CPU whatever the device of the Gram matrix, so both keys get the same entries.
#define FASTMTL_REGISTER_AGGREGATION_OPS(m)                    \
  m.impl("dual_cone_projection", &dual_cone_projection_entry); \
  m.impl("dual_cone_weights", &dual_cone_weights_entry);       \
  m.impl("min_norm_weights", &min_norm_weights_entry);         \
  m.impl("cagrad_weights", &cagrad_weights_entry);             \
  m.impl("power_system_weights", &power_system_weights_entry); \
  m.impl("pcgrad_weights", &pcgrad_weights_entry);             \
  m.impl("gradvac_weights", &gradvac_weights_entry);           \
  m.impl("aligned_mtl_weights", &aligned_mtl_weights_entry);   \
  m.impl("imtlg_weights", &imtlg_weights_entry);               \
  m.impl("config_weights", &config_weights_entry);

TORCH_LIBRARY_IMPL(fastmtl, CPU, m){FASTMTL_REGISTER_AGGREGATION_OPS(m)} TORCH_LIBRARY_IMPL(fastmtl, CUDA, m) {
  FASTMTL_REGISTER_AGGREGATION_OPS(m)
}

}  // namespace fastmtl::ops
