#include "cpu/gated_mixture.h"

#include <cmath>

#include "cpu/epilogue_loops.h"
#include "cpu/isa.h"

namespace fastmtl::cpu {
namespace {

// Row b of the forward: every task's softmax over its gate logits (in place), then its mixture.
template <typename T>
FASTMTL_ALWAYS_INLINE void forward_row(const GateLayout& g, int64_t b, T* gates, const T* gate_bias, const T* experts,
                                       const int64_t* index, T* mixtures) {
  const int64_t h = g.features, K = g.gate_width;
  for (int64_t t = 0; t < g.tasks; ++t) {
    T* p = gates + t * g.task_stride + b * g.row_stride;
    // Softmax, max-shifted so large logits do not overflow.
    T top = -INFINITY;
    for (int64_t k = 0; k < K; ++k) {
      if (gate_bias) p[k] += gate_bias[t * K + k];
      top = std::max(top, p[k]);
    }
    T total = 0;
    for (int64_t k = 0; k < K; ++k) {
      p[k] = std::exp(p[k] - top);
      total += p[k];
    }
    const T inv = T(1) / total;
    for (int64_t k = 0; k < K; ++k) p[k] *= inv;
    T* m = mixtures + (t * g.rows + b) * h;
    for (int64_t k = 0; k < K; ++k) {
      const T* ex = experts + (index[t * K + k] * g.rows + b) * h;
      const T w = p[k];
      if (k == 0) {
#pragma omp simd
        for (int64_t j = 0; j < h; ++j) m[j] = w * ex[j];
      } else {
#pragma omp simd
        for (int64_t j = 0; j < h; ++j) m[j] += w * ex[j];
      }
    }
  }
}

// Row b of the backward. Row b writes only row b of grad_experts: rows run in parallel, no races.
template <typename T>
FASTMTL_ALWAYS_INLINE void backward_row(const GateLayout& g, int64_t b, int64_t num_experts, const T* grad_mixtures,
                                        const T* gates, const T* experts, const int64_t* index, T* grad_logits,
                                        T* grad_experts, double* part) {
  const int64_t h = g.features, K = g.gate_width;
  for (int64_t e = 0; e < num_experts; ++e) {
    T* ge = grad_experts + (e * g.rows + b) * h;
    for (int64_t j = 0; j < h; ++j) ge[j] = T(0);
  }
  for (int64_t t = 0; t < g.tasks; ++t) {
    const T* p = gates + t * g.task_stride + b * g.row_stride;
    T* dl = grad_logits + t * g.task_stride + b * g.row_stride;
    const T* dm = grad_mixtures + (t * g.rows + b) * h;
    T weighted = 0;  // sum_k p_k dp_k
    for (int64_t k = 0; k < K; ++k) {
      const int64_t e = index[t * K + k];
      const T* ex = experts + (e * g.rows + b) * h;
      T dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j < h; ++j) dot += dm[j] * ex[j];
      dl[k] = dot;  // d mixture / d gate_k, turned into the logit gradient below
      weighted += p[k] * dot;
      T* ge = grad_experts + (e * g.rows + b) * h;
      const T w = p[k];
#pragma omp simd
      for (int64_t j = 0; j < h; ++j) ge[j] += w * dm[j];
    }
    for (int64_t k = 0; k < K; ++k) {
      dl[k] = p[k] * (dl[k] - weighted);
      if (part) part[t * K + k] += static_cast<double>(dl[k]);
    }
  }
}

// The same rows compiled for AVX2 + FMA and for the baseline ISA (cpu/isa.h).
template <typename T>
FASTMTL_TARGET_AVX2 void forward_rows_avx2(const GateLayout& g, int64_t r0, int64_t r1, T* gates, const T* gate_bias,
                                           const T* experts, const int64_t* index, T* mixtures) {
  for (int64_t b = r0; b < r1; ++b) forward_row(g, b, gates, gate_bias, experts, index, mixtures);
}

template <typename T>
void forward_rows_baseline(const GateLayout& g, int64_t r0, int64_t r1, T* gates, const T* gate_bias, const T* experts,
                           const int64_t* index, T* mixtures) {
  for (int64_t b = r0; b < r1; ++b) forward_row(g, b, gates, gate_bias, experts, index, mixtures);
}

template <typename T>
FASTMTL_TARGET_AVX2 void backward_row_avx2(const GateLayout& g, int64_t b, int64_t num_experts, const T* grad_mixtures,
                                           const T* gates, const T* experts, const int64_t* index, T* grad_logits,
                                           T* grad_experts, double* part) {
  backward_row(g, b, num_experts, grad_mixtures, gates, experts, index, grad_logits, grad_experts, part);
}

template <typename T>
void backward_row_baseline(const GateLayout& g, int64_t b, int64_t num_experts, const T* grad_mixtures, const T* gates,
                           const T* experts, const int64_t* index, T* grad_logits, T* grad_experts, double* part) {
  backward_row(g, b, num_experts, grad_mixtures, gates, experts, index, grad_logits, grad_experts, part);
}

}  // namespace

template <typename T>
void gated_mixture_forward(const GateLayout& g, T* gates, const T* gate_bias, const T* experts, const int64_t* index,
                           T* mixtures) {
  const bool avx2 = cpu_has_avx2_fma();
  detail::for_row_blocks(g.rows, g.tasks * (g.gate_width + 1) * g.features, [&](int64_t r0, int64_t r1) {
    if (avx2) {
      forward_rows_avx2(g, r0, r1, gates, gate_bias, experts, index, mixtures);
    } else {
      forward_rows_baseline(g, r0, r1, gates, gate_bias, experts, index, mixtures);
    }
  });
}

template <typename T>
void gated_mixture_backward(const GateLayout& g, int64_t num_experts, const T* grad_mixtures, const T* gates,
                            const T* experts, const int64_t* index, T* grad_logits, T* grad_experts, T* grad_bias) {
  const bool avx2 = cpu_has_avx2_fma();
  auto row = [&](int64_t b, double* part) {
    if (avx2) {
      backward_row_avx2(g, b, num_experts, grad_mixtures, gates, experts, index, grad_logits, grad_experts, part);
    } else {
      backward_row_baseline(g, b, num_experts, grad_mixtures, gates, experts, index, grad_logits, grad_experts, part);
    }
  };
  if (grad_bias) {
    detail::rows_with_column_sum(g.rows, g.tasks * g.gate_width, grad_bias, row);
  } else {
    detail::for_row_blocks(g.rows, g.tasks * (g.gate_width + num_experts) * g.features, [&](int64_t r0, int64_t r1) {
      for (int64_t b = r0; b < r1; ++b) row(b, nullptr);
    });
  }
}

#define FASTMTL_INSTANTIATE(T)                                                                                      \
  template void gated_mixture_forward<T>(const GateLayout&, T*, const T*, const T*, const int64_t*, T*);            \
  template void gated_mixture_backward<T>(const GateLayout&, int64_t, const T*, const T*, const T*, const int64_t*, \
                                          T*, T*, T*);
FASTMTL_INSTANTIATE(float)
FASTMTL_INSTANTIATE(double)
#undef FASTMTL_INSTANTIATE

}  // namespace fastmtl::cpu
