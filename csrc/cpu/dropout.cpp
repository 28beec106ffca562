#include "cpu/dropout.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <mutex>
#include <type_traits>

namespace fastmtl::cpu {
namespace {

constexpr int64_t kGrain = 1 << 14;

double keep_scale(double p) { return p >= 1.0 ? 0.0 : 1.0 / (1.0 - p); }

}  // namespace

uint64_t dropout_seed() {
  auto* gen = at::check_generator<at::CPUGeneratorImpl>(at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return gen->random64();
}

// 16-bit storage: the product in float32, rounded once.
template <typename T>
using math_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
void dropout_forward(double p, uint64_t seed, int64_t n, const T* in, bool* keep, T* out) {
  // Dropped when the 32-bit draw is below p * 2^32 (a 64-bit threshold: p = 1 drops everything).
  const uint64_t threshold = static_cast<uint64_t>(p * 4294967296.0);
  const math_t<T> scale = static_cast<math_t<T>>(keep_scale(p));
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const bool kept = dropout_draw(seed, static_cast<uint64_t>(i)) >= threshold;
      keep[i] = kept;
      out[i] = kept ? static_cast<T>(static_cast<math_t<T>>(in[i]) * scale) : T(0);
    }
  });
}

template <typename T>
void dropout_apply(double p, int64_t n, const bool* keep, const T* in, T* out) {
  const math_t<T> scale = static_cast<math_t<T>>(keep_scale(p));
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      out[i] = keep[i] ? static_cast<T>(static_cast<math_t<T>>(in[i]) * scale) : T(0);
  });
}

template void dropout_forward<float>(double, uint64_t, int64_t, const float*, bool*, float*);
template void dropout_forward<double>(double, uint64_t, int64_t, const double*, bool*, double*);
template void dropout_apply<float>(double, int64_t, const bool*, const float*, float*);
template void dropout_apply<double>(double, int64_t, const bool*, const double*, double*);
template void dropout_forward<c10::Half>(double, uint64_t, int64_t, const c10::Half*, bool*, c10::Half*);
template void dropout_forward<c10::BFloat16>(double, uint64_t, int64_t, const c10::BFloat16*, bool*, c10::BFloat16*);
template void dropout_apply<c10::Half>(double, int64_t, const bool*, const c10::Half*, c10::Half*);
template void dropout_apply<c10::BFloat16>(double, int64_t, const bool*, const c10::BFloat16*, c10::BFloat16*);

}  // namespace fastmtl::cpu
