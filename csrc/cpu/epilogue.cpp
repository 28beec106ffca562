#include "cpu/epilogue.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace fastmtl::cpu {
namespace {

// Below this many elements per thread, waking the thread pool costs more than it saves.
constexpr int64_t kMinElementsPerThread = 16384;

int64_t grain_for(int64_t inner) { return std::max<int64_t>(1, kMinElementsPerThread / std::max<int64_t>(inner, 1)); }

// Visits column blocks [c0, c1) in parallel; each block is owned by one thread and walked row by
// row, so per-column reductions are sequential in row order.
template <typename F>
void for_column_blocks(int64_t rows, int64_t cols, F&& body) {
  at::parallel_for(0, cols, grain_for(rows), [&](int64_t c0, int64_t c1) { body(c0, c1); });
}

template <typename F>
void for_row_blocks(int64_t rows, int64_t cols, F&& body) {
  at::parallel_for(0, rows, grain_for(cols), [&](int64_t r0, int64_t r1) { body(r0, r1); });
}

}  // namespace

template <typename T>
void bias_activation_forward(Activation act, int64_t rows, int64_t cols, T* pre, const T* bias, T* out) {
  dispatch_activation(act, [&](auto tag) {
    constexpr Activation A = decltype(tag)::value;
    for_row_blocks(rows, cols, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        T* p = pre + i * cols;
        T* o = out ? out + i * cols : p;
        if (bias) {
          for (int64_t j = 0; j < cols; ++j) {
            const T a = p[j] + bias[j];
            p[j] = a;
            o[j] = act_forward<A>(a);
          }
        } else {
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
void activation_backward(Activation act, int64_t rows, int64_t cols, const T* grad, const T* saved,
                         T* delta, T* bias_grad) {
  dispatch_activation(act, [&](auto tag) {
    constexpr Activation A = decltype(tag)::value;
    if (!bias_grad) {
      for_row_blocks(rows, cols, [&](int64_t r0, int64_t r1) {
        for (int64_t k = r0 * cols; k < r1 * cols; ++k) delta[k] = grad[k] * act_derivative<A>(saved[k]);
      });
      return;
    }
    for_column_blocks(rows, cols, [&](int64_t c0, int64_t c1) {
      std::vector<double> acc(c1 - c0, 0.0);
      double* accp = acc.data();
      for (int64_t i = 0; i < rows; ++i) {
        const T* g = grad + i * cols + c0;
        const T* s = saved + i * cols + c0;
        T* d = delta + i * cols + c0;
        for (int64_t j = 0; j < c1 - c0; ++j) {
          const T v = g[j] * act_derivative<A>(s[j]);
          d[j] = v;
          accp[j] += static_cast<double>(v);
        }
      }
      for (int64_t j = c0; j < c1; ++j) bias_grad[j] = static_cast<T>(acc[j - c0]);
    });
  });
}

template <typename T>
void scale_columns(int64_t rows, int64_t cols, const T* in, const T* col_scale, T* out, T* col_sum) {
  if (!col_sum) {
    for_row_blocks(rows, cols, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i)
        for (int64_t j = 0; j < cols; ++j) out[i * cols + j] = in[i * cols + j] * col_scale[j];
    });
    return;
  }
  for_column_blocks(rows, cols, [&](int64_t c0, int64_t c1) {
    std::vector<double> acc(c1 - c0, 0.0);
    double* accp = acc.data();
    const T* sc = col_scale + c0;
    for (int64_t i = 0; i < rows; ++i) {
      const T* x = in + i * cols + c0;
      T* y = out + i * cols + c0;
      for (int64_t j = 0; j < c1 - c0; ++j) {
        const T v = x[j] * sc[j];
        y[j] = v;
        accp[j] += static_cast<double>(v);
      }
    }
    for (int64_t j = c0; j < c1; ++j) col_sum[j] = static_cast<T>(acc[j - c0]);
  });
}

#define FASTMTL_INSTANTIATE(T)                                                                    \
  template void bias_activation_forward<T>(Activation, int64_t, int64_t, T*, const T*, T*);       \
  template void activation_apply<T>(Activation, int64_t, const T*, T*);                          \
  template void activation_backward<T>(Activation, int64_t, int64_t, const T*, const T*, T*, T*); \
  template void scale_columns<T>(int64_t, int64_t, const T*, const T*, T*, T*);
FASTMTL_INSTANTIATE(float)
FASTMTL_INSTANTIATE(double)
#undef FASTMTL_INSTANTIATE

}  // namespace fastmtl::cpu
