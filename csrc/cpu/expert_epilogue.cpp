#include "cpu/expert_epilogue.h"

#include "cpu/epilogue_loops.h"
#include "cpu/isa.h"

namespace fastmtl::cpu {
namespace {

// The arguments of one pass, so the row functions below stay short.
template <typename T>
struct ForwardPass {
  int64_t experts, rows, cols;
  const T* in;
  int64_t in_expert_stride, in_row_stride;
  const T* bias;
  T* pre;
  T* out;
};

template <typename T>
struct BackwardPass {
  int64_t experts, rows, cols;
  const T* grad;
  const T* saved;
  T* delta;
  int64_t delta_expert_stride, delta_row_stride;
};

// Row i of every expert. All experts of a row in one step: the strided side is then read (or
// written) in whole contiguous rows of the single GEMM's [rows, E * cols] output.
template <Activation A, typename T>
FASTMTL_ALWAYS_INLINE void forward_row(const ForwardPass<T>& f, int64_t i) {
  const int64_t cols = f.cols;
  for (int64_t e = 0; e < f.experts; ++e) {
    const T* a_in = f.in + e * f.in_expert_stride + i * f.in_row_stride;
    T* p = f.pre + (e * f.rows + i) * cols;
    const T* b = f.bias ? f.bias + e * cols : nullptr;
    if (f.out) {
      T* o = f.out + (e * f.rows + i) * cols;
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) {
        const T a = b ? a_in[j] + b[j] : a_in[j];
        p[j] = a;
        o[j] = act_forward<A>(a);
      }
    } else if (b) {
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) p[j] = act_forward<A>(a_in[j] + b[j]);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) p[j] = act_forward<A>(a_in[j]);
    }
  }
}

// Row i of every expert's delta; adds it to part[e * cols + j] when part is given.
template <Activation A, typename T>
FASTMTL_ALWAYS_INLINE void backward_row(const BackwardPass<T>& f, int64_t i, double* part) {
  const int64_t cols = f.cols;
  for (int64_t e = 0; e < f.experts; ++e) {
    const T* g = f.grad + (e * f.rows + i) * cols;
    const T* s = f.saved + (e * f.rows + i) * cols;
    T* d = f.delta + e * f.delta_expert_stride + i * f.delta_row_stride;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) d[j] = act_backward<A>(g[j], s[j]);
    if (part) {
      double* pe = part + e * cols;
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) pe[j] += static_cast<double>(d[j]);
    }
  }
}

// Each row function compiled for AVX2 + FMA and for the baseline ISA (cpu/isa.h).
template <Activation A, typename T>
FASTMTL_TARGET_AVX2 void forward_rows_avx2(const ForwardPass<T>& f, int64_t r0, int64_t r1) {
  for (int64_t i = r0; i < r1; ++i) forward_row<A>(f, i);
}

template <Activation A, typename T>
void forward_rows_baseline(const ForwardPass<T>& f, int64_t r0, int64_t r1) {
  for (int64_t i = r0; i < r1; ++i) forward_row<A>(f, i);
}

template <Activation A, typename T>
FASTMTL_TARGET_AVX2 void backward_rows_avx2(const BackwardPass<T>& f, int64_t r0, int64_t r1, double* part) {
  for (int64_t i = r0; i < r1; ++i) backward_row<A>(f, i, part);
}

template <Activation A, typename T>
void backward_rows_baseline(const BackwardPass<T>& f, int64_t r0, int64_t r1, double* part) {
  for (int64_t i = r0; i < r1; ++i) backward_row<A>(f, i, part);
}

}  // namespace

template <typename T>
void expert_bias_activation_forward(Activation act, int64_t experts, int64_t rows, int64_t cols, const T* in,
                                    int64_t in_expert_stride, int64_t in_row_stride, const T* bias, T* pre, T* out) {
  const ForwardPass<T> pass{experts, rows, cols, in, in_expert_stride, in_row_stride, bias, pre, out};
  const bool avx2 = cpu_has_avx2_fma();
  dispatch_activation(act, [&](auto tag) {
    constexpr Activation A = decltype(tag)::value;
    detail::for_row_blocks(rows, experts * cols, [&](int64_t r0, int64_t r1) {
      if (avx2) {
        forward_rows_avx2<A>(pass, r0, r1);
      } else {
        forward_rows_baseline<A>(pass, r0, r1);
      }
    });
  });
}

template <typename T>
void expert_activation_backward(Activation act, int64_t experts, int64_t rows, int64_t cols, const T* grad,
                                const T* saved, T* delta, int64_t delta_expert_stride, int64_t delta_row_stride,
                                T* bias_grad) {
  const BackwardPass<T> pass{experts, rows, cols, grad, saved, delta, delta_expert_stride, delta_row_stride};
  const bool avx2 = cpu_has_avx2_fma();
  dispatch_activation(act, [&](auto tag) {
    constexpr Activation A = decltype(tag)::value;
    auto run = [&](int64_t r0, int64_t r1, double* part) {
      if (avx2) {
        backward_rows_avx2<A>(pass, r0, r1, part);
      } else {
        backward_rows_baseline<A>(pass, r0, r1, part);
      }
    };
    if (!bias_grad) {
      detail::for_row_blocks(rows, experts * cols, [&](int64_t r0, int64_t r1) { run(r0, r1, nullptr); });
      return;
    }
    // bias_grad [experts, cols] is the column sum of the rows' [experts * cols] deltas.
    detail::rows_with_column_sum(rows, experts * cols, bias_grad,
                                 [&](int64_t i, double* part) { run(i, i + 1, part); });
  });
}

#define FASTMTL_INSTANTIATE(T)                                                                                        \
  template void expert_bias_activation_forward<T>(Activation, int64_t, int64_t, int64_t, const T*, int64_t, int64_t,  \
                                                  const T*, T*, T*);                                                  \
  template void expert_activation_backward<T>(Activation, int64_t, int64_t, int64_t, const T*, const T*, T*, int64_t, \
                                              int64_t, T*);
FASTMTL_INSTANTIATE(float)
FASTMTL_INSTANTIATE(double)
#undef FASTMTL_INSTANTIATE

}  // namespace fastmtl::cpu
