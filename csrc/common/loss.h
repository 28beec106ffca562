// The losses of the fused heads, device-neutral: the task layout (which logit and packed-target
// columns a task owns), and for every loss the validity of a target, the per-entry loss value and
// its gradient with respect to the logit. The CPU loss pass (cpu/head_loss.cpp) and the CUDA loss
// kernel (cuda/head_loss.cu) both call these, so each formula exists once; the portable steps
// (kernels/portable_steps.cpp) write the same formulas with ATen ops and are tested against both.
//
// Target contract (one for every device):
//  - regression (mse, l1, huber): a finite value; NaN = missing.
//  - bce: a probability in [0, 1] (soft labels, as torch's BCE-with-logits accepts); NaN = missing.
//  - ce: a class index in [0, num_outputs); -100 = missing (as F.cross_entropy's ignore_index).
// Anything else is invalid: the CPU op raises ValueError naming the task; on CUDA (where checking
// would need a host synchronisation) that task's loss is NaN.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "common/host_device.h"

namespace fastmtl {

enum class LossKind : int64_t { Mse, L1, Huber, Bce, Ce };

bool parse_loss(const std::string& name, LossKind* out);
const char* loss_names();  // "mse, l1, huber, bce, ce"
// What a valid target of this loss is, for error messages.
const char* expected_target(LossKind loss);

// Columns a task occupies in the packed targets: n for regression, 1 for bce (probability) and ce (index).
FASTMTL_HOST_DEVICE constexpr int64_t target_width(LossKind loss, int64_t num_outputs) {
  return (loss == LossKind::Bce || loss == LossKind::Ce) ? 1 : num_outputs;
}

struct HeadTask {
  LossKind loss;
  int64_t num_outputs;    // logit columns
  int64_t logit_offset;   // first logit column
  int64_t target_offset;  // first packed-target column
};

// The first invalid target found (lowest row, then lowest task); row < 0 when all are valid.
struct BadTarget {
  int64_t row = -1;
  int64_t task = -1;
  int64_t column = -1;
  double value = 0.0;
};

constexpr double kIgnoreIndex = -100.0;

// ---- validity of one target value (C: the compute type, float or double)

template <typename C>
FASTMTL_HOST_DEVICE inline bool is_nan(C v) {
  return v != v;
}

// Finite: v - v is 0 for a finite v and NaN for +-inf and NaN.
template <typename C>
FASTMTL_HOST_DEVICE inline bool is_finite(C v) {
  return (v - v) == C(0);
}

template <typename C>
FASTMTL_HOST_DEVICE inline bool regression_target_valid(C t) {
  return is_finite(t);
}

template <typename C>
FASTMTL_HOST_DEVICE inline bool bce_target_valid(C t) {
  return t >= C(0) && t <= C(1);
}

template <typename C>
FASTMTL_HOST_DEVICE inline bool ce_target_missing(C t) {
  return static_cast<double>(t) == kIgnoreIndex;
}

template <typename C>
FASTMTL_HOST_DEVICE inline bool ce_target_valid(C t, int64_t num_classes) {
  return t >= C(0) && t < C(num_classes) && std::floor(t) == t;
}

// ---- per-entry loss and d loss / d logit

template <typename C>
struct EntryLoss {
  C loss;
  C grad;
};

template <typename C>
FASTMTL_HOST_DEVICE inline C sign_of(C d) {
  return C((d > C(0)) - (d < C(0)));
}

// mse, l1, huber (smooth L1, beta 1) of d = logit - target.
template <typename C>
FASTMTL_HOST_DEVICE inline EntryLoss<C> regression_entry(LossKind loss, C d) {
  if (loss == LossKind::Mse) return {d * d, C(2) * d};
  const C ad = std::fabs(d);
  if (loss == LossKind::L1) return {ad, sign_of(d)};
  if (ad < C(1)) return {C(0.5) * d * d, d};
  return {ad - C(0.5), sign_of(d)};
}

// log1p(e) for e in [0, 1], as log(1 + e) corrected for the rounding of 1 + e (Goldberg's trick:
// accurate to a few ulp). glibc's log1pf costs several logf, and this is the loss pass's hot spot.
template <typename C>
FASTMTL_HOST_DEVICE inline C log1p_unit(C e) {
  const C u = C(1) + e;
  return u == C(1) ? e : std::log(u) * (e / (u - C(1)));
}

// Binary cross-entropy with logits x and a target probability t, stable for any logit:
// max(x, 0) - x t + log1p(exp(-|x|)); gradient sigmoid(x) - t (sigmoid without overflow).
template <typename C>
FASTMTL_HOST_DEVICE inline EntryLoss<C> bce_entry(C x, C t) {
  const C e = std::exp(-std::fabs(x));
  const C loss = (x > C(0) ? x : C(0)) - x * t + log1p_unit(e);
  const C sig = (x >= C(0) ? C(1) : e) / (C(1) + e);
  return {loss, sig - t};
}

// Softmax cross-entropy of one row from its log-sum-exp pieces: max m, s = sum exp(v - m), the
// target class's logit v_cls. The gradient of entry j is exp(v_j - m) / s - [j == cls].
template <typename C>
FASTMTL_HOST_DEVICE inline C ce_loss(C m, C s, C v_cls) {
  return m + std::log(s) - v_cls;
}

}  // namespace fastmtl
