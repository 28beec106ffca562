#include "cpu/epilogue.h"

#include "cpu/epilogue_loops.h"

namespace fastmtl::cpu {
using detail::for_row_blocks;
using detail::grain_for;
using detail::kMinElementsPerThread;
using detail::rows_with_column_sum;

template <typename T>
void bias_activation_forward(Activation act, int64_t rows, int64_t cols, T* pre, const T* bias, T* out) {
  dispatch_activation(act, [&](auto tag) {
    constexpr Activation A = decltype(tag)::value;
    for_row_blocks(rows, cols, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        T* p = pre + i * cols;
        T* o = out ? out + i * cols : p;
        if (bias) {
#pragma omp simd
          for (int64_t j = 0; j < cols; ++j) {
            const T a = p[j] + bias[j];
            p[j] = a;
            o[j] = act_forward<A>(a);
          }
        } else {
#pragma omp simd
          for (int64_t j = 0; j < cols; ++j) o[j] = act_forward<A>(p[j]);
        }
      }
    });
  });
}

template <typename T>
void activation_apply(Activation act, int64_t n, const T* pre, T* out) {
  dispatch_activation(act, [&](auto tag) {
    constexpr Activation A = decltype(tag)::value;
    at::parallel_for(0, n, kMinElementsPerThread, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) out[k] = act_forward<A>(pre[k]);
    });
  });
}

template <typename T>
void activation_backward(Activation act, int64_t rows, int64_t cols, const T* grad, const T* saved, T* delta,
                         T* bias_grad) {
  dispatch_activation(act, [&](auto tag) {
    constexpr Activation A = decltype(tag)::value;
    if (!bias_grad) {
      for_row_blocks(rows, cols, [&](int64_t r0, int64_t r1) {
#pragma omp simd
        for (int64_t k = r0 * cols; k < r1 * cols; ++k) delta[k] = act_backward<A>(grad[k], saved[k]);
      });
      return;
    }
    rows_with_column_sum(rows, cols, bias_grad, [&](int64_t i, double* part) {
      const T* g = grad + i * cols;
      const T* s = saved + i * cols;
      T* d = delta + i * cols;
      // Two loops, each a plain vectorisable map: fused into one, the compiler keeps it scalar
      // (mixed float/double), and relu's data-dependent branch then mispredicts half the time.
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) d[j] = act_backward<A>(g[j], s[j]);
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) part[j] += static_cast<double>(d[j]);
    });
  });
}

template <typename T>
void activation_backward_tasks(Activation act, int64_t rows, int64_t tasks, int64_t cols, const T* grad, const T* saved,
                               T* delta, T* bias_grad) {
  dispatch_activation(act, [&](auto tag) {
    constexpr Activation A = decltype(tag)::value;
    auto row_map = [&](int64_t i) {
      const T* s = saved + i * cols;
      for (int64_t t = 0; t < tasks; ++t) {
        const T* g = grad + (i * tasks + t) * cols;
        T* d = delta + (i * tasks + t) * cols;
#pragma omp simd
        for (int64_t j = 0; j < cols; ++j) d[j] = act_backward<A>(g[j], s[j]);
      }
    };
    if (!bias_grad) {
      for_row_blocks(rows, tasks * cols, [&](int64_t r0, int64_t r1) {
        for (int64_t i = r0; i < r1; ++i) row_map(i);
      });
      return;
    }
    // Row i's tasks * cols deltas are contiguous: their column sums are bias_grad [tasks, cols].
    rows_with_column_sum(rows, tasks * cols, bias_grad, [&](int64_t i, double* part) {
      row_map(i);
      const T* d = delta + i * tasks * cols;
#pragma omp simd
      for (int64_t k = 0; k < tasks * cols; ++k) part[k] += static_cast<double>(d[k]);
    });
  });
}

template <typename T>
void scale_columns(int64_t rows, int64_t cols, const T* in, const T* col_scale, T* out, T* col_sum) {
  if (!col_sum) {
    for_row_blocks(rows, cols, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
#pragma omp simd
        for (int64_t j = 0; j < cols; ++j) out[i * cols + j] = in[i * cols + j] * col_scale[j];
      }
    });
    return;
  }
  rows_with_column_sum(rows, cols, col_sum, [&](int64_t i, double* part) {
    const T* x = in + i * cols;
    T* y = out + i * cols;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) y[j] = x[j] * col_scale[j];
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) part[j] += static_cast<double>(y[j]);
  });
}

#define FASTMTL_INSTANTIATE(T)                                                                                   \
  template void bias_activation_forward<T>(Activation, int64_t, int64_t, T*, const T*, T*);                      \
  template void activation_apply<T>(Activation, int64_t, const T*, T*);                                          \
  template void activation_backward<T>(Activation, int64_t, int64_t, const T*, const T*, T*, T*);                \
  template void activation_backward_tasks<T>(Activation, int64_t, int64_t, int64_t, const T*, const T*, T*, T*); \
  template void scale_columns<T>(int64_t, int64_t, const T*, const T*, T*, T*);
FASTMTL_INSTANTIATE(float)
FASTMTL_INSTANTIATE(double)
#undef FASTMTL_INSTANTIATE

}  // namespace fastmtl::cpu
