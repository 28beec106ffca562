// Activation functions of the fused trunk and their derivatives. The activation is a template
// parameter so each epilogue loop is compiled once per activation with no branch inside it, and the
// compiler can vectorise the simple ones (relu, identity, tanh's derivative).
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

// The elementwise functions below are shared by the CPU loops (csrc/cpu/) and the CUDA kernels
// (csrc/cuda/), so both devices compute exactly the same formulas (common/host_device.h).
#include "common/host_device.h"

namespace fastmtl {

enum class Activation : int64_t { Relu, Gelu, GeluTanh, Silu, Tanh, Identity };

// Which tensor the backward of an activation needs from the forward:
//  - Post: the output y (relu: y > 0, tanh: 1 - y^2, identity: nothing), which is also the next
//    layer's input, so nothing extra is stored;
//  - Pre: the pre-activation a (gelu, silu); the next layer's input act(a) is recomputed in
//    backward instead of being stored as well.
enum class SavedKind { Post, Pre };

FASTMTL_HOST_DEVICE constexpr SavedKind saved_kind(Activation act) {
  return (act == Activation::Gelu || act == Activation::GeluTanh || act == Activation::Silu) ? SavedKind::Pre
                                                                                             : SavedKind::Post;
}

// Returns false for an unknown name (the caller reports it with the valid names).
bool parse_activation(const std::string& name, Activation* out);
const char* activation_names();  // "relu, gelu, gelu_tanh, silu, tanh, identity"

template <Activation A>
using ActivationTag = std::integral_constant<Activation, A>;

// Calls f(ActivationTag<A>{}) with the runtime activation turned into a compile-time one.
template <typename F>
decltype(auto) dispatch_activation(Activation act, F&& f) {
  switch (act) {
    case Activation::Relu:
      return f(ActivationTag<Activation::Relu>{});
    case Activation::Gelu:
      return f(ActivationTag<Activation::Gelu>{});
    case Activation::GeluTanh:
      return f(ActivationTag<Activation::GeluTanh>{});
    case Activation::Silu:
      return f(ActivationTag<Activation::Silu>{});
    case Activation::Tanh:
      return f(ActivationTag<Activation::Tanh>{});
    case Activation::Identity:
    default:
      return f(ActivationTag<Activation::Identity>{});
  }
}

constexpr double kSqrtHalf = 0.70710678118654752440;     // 1/sqrt(2)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;   // 1/sqrt(2*pi)
constexpr double kSqrt2OverPi = 0.79788456080286535588;  // sqrt(2/pi)
constexpr double kGeluTanhCoef = 0.044715;

template <Activation A, typename T>
FASTMTL_HOST_DEVICE inline T act_forward(T a) {
  if constexpr (A == Activation::Relu) {
    return a > T(0) ? a : T(0);
  } else if constexpr (A == Activation::Gelu) {
    return T(0.5) * a * (T(1) + std::erf(a * T(kSqrtHalf)));
  } else if constexpr (A == Activation::GeluTanh) {
    const T u = T(kSqrt2OverPi) * (a + T(kGeluTanhCoef) * a * a * a);
    return T(0.5) * a * (T(1) + std::tanh(u));
  } else if constexpr (A == Activation::Silu) {
    return a / (T(1) + std::exp(-a));
  } else if constexpr (A == Activation::Tanh) {
    return std::tanh(a);
  } else {
    return a;
  }
}

// d act / d a of the smooth activations, given what saved_kind(A) says the forward kept: the
// output y (tanh) or the pre-activation a (gelu, silu). relu and identity need no derivative:
// act_backward below handles them directly.
template <Activation A, typename T>
FASTMTL_HOST_DEVICE inline T act_derivative(T saved) {
  static_assert(A != Activation::Relu && A != Activation::Identity, "handled by act_backward");
  if constexpr (A == Activation::Tanh) {
    return T(1) - saved * saved;
  } else if constexpr (A == Activation::Gelu) {
    const T a = saved;
    const T cdf = T(0.5) * (T(1) + std::erf(a * T(kSqrtHalf)));
    const T pdf = std::exp(T(-0.5) * a * a) * T(kInvSqrt2Pi);
    return cdf + a * pdf;
  } else if constexpr (A == Activation::GeluTanh) {
    const T a = saved;
    const T th = std::tanh(T(kSqrt2OverPi) * (a + T(kGeluTanhCoef) * a * a * a));
    return T(0.5) * (T(1) + th) +
           T(0.5) * a * (T(1) - th * th) * T(kSqrt2OverPi) * (T(1) + T(3 * kGeluTanhCoef) * a * a);
  } else {  // Silu
    const T s = T(1) / (T(1) + std::exp(-saved));
    return s * (T(1) + saved * (T(1) - s));
  }
}

// grad * act'(saved): the backward of one element. For relu a select (as threshold_backward),
// which compiles to a vector blend; written as grad * mask, the compiler emitted a branch that
// mispredicts on half of the (random) mask and a scalar loop, 15x slower.
template <Activation A, typename T>
FASTMTL_HOST_DEVICE inline T act_backward(T grad, T saved) {
  if constexpr (A == Activation::Relu) {
    return saved > T(0) ? grad : T(0);
  } else if constexpr (A == Activation::Identity) {
    return grad;
  } else {
    return grad * act_derivative<A>(saved);
  }
}

}  // namespace fastmtl
