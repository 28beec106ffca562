#include "cpu/expert_epilogue.h"

#include "cpu/epilogue_loops.h"

namespace fastmtl::cpu {

template <typename T>
void expert_bias_activation_forward(Activation act, int64_t experts, int64_t rows, int64_t cols, const T* in,
                                    int64_t in_expert_stride, int64_t in_row_stride, const T* bias, T* pre, T* out) {
  dispatch_activation(act, [&](auto tag) {
    constexpr Activation A = decltype(tag)::value;
    // Parallel over rows, all experts of a row in one task: the strided side is then read (or
    // written) in whole contiguous rows of the single GEMM's [rows, E * cols] output.
    detail::for_row_blocks(rows, experts * cols, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        for (int64_t e = 0; e < experts; ++e) {
          const T* a_in = in + e * in_expert_stride + i * in_row_stride;
          T* p = pre + (e * rows + i) * cols;
          if (out) {
            T* o = out + (e * rows + i) * cols;
            if (bias) {
              const T* b = bias + e * cols;
#pragma omp simd
              for (int64_t j = 0; j < cols; ++j) {
                const T a = a_in[j] + b[j];
                p[j] = a;
                o[j] = act_forward<A>(a);
              }
            } else {
#pragma omp simd
              for (int64_t j = 0; j < cols; ++j) {
                const T a = a_in[j];
                p[j] = a;
                o[j] = act_forward<A>(a);
              }
            }
          } else if (bias) {
            const T* b = bias + e * cols;
#pragma omp simd
            for (int64_t j = 0; j < cols; ++j) p[j] = act_forward<A>(a_in[j] + b[j]);
          } else {
#pragma omp simd
            for (int64_t j = 0; j < cols; ++j) p[j] = act_forward<A>(a_in[j]);
          }
        }
      }
    });
  });
}

template <typename T>
void expert_activation_backward(Activation act, int64_t experts, int64_t rows, int64_t cols, const T* grad,
                                const T* saved, T* delta, int64_t delta_expert_stride, int64_t delta_row_stride,
                                T* bias_grad) {
  dispatch_activation(act, [&](auto tag) {
    constexpr Activation A = decltype(tag)::value;
    auto expert_row = [&](int64_t e, int64_t i) {
      const T* g = grad + (e * rows + i) * cols;
      const T* s = saved + (e * rows + i) * cols;
      T* d = delta + e * delta_expert_stride + i * delta_row_stride;
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) d[j] = act_backward<A>(g[j], s[j]);
      return d;
    };
    if (!bias_grad) {
      detail::for_row_blocks(rows, experts * cols, [&](int64_t r0, int64_t r1) {
        for (int64_t i = r0; i < r1; ++i)
          for (int64_t e = 0; e < experts; ++e) expert_row(e, i);
      });
      return;
    }
    // bias_grad [experts, cols] is the column sum of the rows' [experts * cols] deltas.
    detail::rows_with_column_sum(rows, experts * cols, bias_grad, [&](int64_t i, double* part) {
      for (int64_t e = 0; e < experts; ++e) {
        const T* d = expert_row(e, i);
        double* pe = part + e * cols;
#pragma omp simd
        for (int64_t j = 0; j < cols; ++j) pe[j] += static_cast<double>(d[j]);
      }
    });
  });
}

#define FASTMTL_INSTANTIATE(T)                                                                                 \
  template void expert_bias_activation_forward<T>(Activation, int64_t, int64_t, int64_t, const T*, int64_t,   \
                                                  int64_t, const T*, T*, T*);                                 \
  template void expert_activation_backward<T>(Activation, int64_t, int64_t, int64_t, const T*, const T*, T*, \
                                              int64_t, int64_t, T*);
FASTMTL_INSTANTIATE(float)
FASTMTL_INSTANTIATE(double)
#undef FASTMTL_INSTANTIATE

}  // namespace fastmtl::cpu
