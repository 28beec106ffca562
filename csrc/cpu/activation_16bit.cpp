#include "cpu/activation_16bit.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu/epilogue_loops.h"

namespace fastmtl::cpu {
using detail::kMinElementsPerThread;

template <typename S>
void activation_apply_16bit(Activation act, int64_t n, const S* pre, S* out) {
  dispatch_activation(act, [&](auto tag) {
    constexpr Activation A = decltype(tag)::value;
    at::parallel_for(0, n, kMinElementsPerThread, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) out[k] = static_cast<S>(act_forward<A>(static_cast<float>(pre[k])));
    });
  });
}

template <typename S>
void activation_backward_16bit(Activation act, int64_t n, const S* grad, const S* saved, S* delta) {
  dispatch_activation(act, [&](auto tag) {
    constexpr Activation A = decltype(tag)::value;
    at::parallel_for(0, n, kMinElementsPerThread, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k)
        delta[k] = static_cast<S>(act_backward<A>(static_cast<float>(grad[k]), static_cast<float>(saved[k])));
    });
  });
}

#define FASTMTL_INSTANTIATE(S)                                                \
  template void activation_apply_16bit<S>(Activation, int64_t, const S*, S*); \
  template void activation_backward_16bit<S>(Activation, int64_t, const S*, const S*, S*);
FASTMTL_INSTANTIATE(c10::BFloat16)
FASTMTL_INSTANTIATE(c10::Half)
#undef FASTMTL_INSTANTIATE

}  // namespace fastmtl::cpu
