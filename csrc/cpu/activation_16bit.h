// Activations of 16-bit (bfloat16 / float16) storage on the CPU in one pass: each element widened
// to float32, the activation (or its derivative) computed there, rounded once on the store. The
// portable steps did the same math in three passes over the tensor (widen into a float32 copy,
// compute into another, round back), with two float32 temporaries of its size.
#pragma once

#include <cstdint>

#include "common/activation.h"

namespace fastmtl::cpu {

// out = act(pre) over n elements. S: c10::BFloat16 or c10::Half.
template <typename S>
void activation_apply_16bit(Activation act, int64_t n, const S* pre, S* out);

// delta = grad * act'(saved) over n elements (saved: what saved_kind(act) says the forward kept).
template <typename S>
void activation_backward_16bit(Activation act, int64_t n, const S* grad, const S* saved, S* delta);

}  // namespace fastmtl::cpu
