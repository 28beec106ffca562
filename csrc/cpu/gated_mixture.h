// The per-task softmax gates over experts and the gated mixtures (CPU). The gate logits of all
// tasks come from one GEMM (csrc/ops/gating.cpp); these passes do the rest, one row of the
// batch per step, so the softmax, the mixture and, in backward, the gate and expert gradients of a
// row are computed while its expert outputs are in cache.
//
// Layout of logits / gates / their gradient: element (t, b, k) at [t * task_stride + b * row_stride
// + k] (the GEMM's output: [B, T * K] for a gate input shared by the tasks, [T, B, K] for one
// input per task). experts: [E, B, h]; mixtures: [T, B, h]; index [T, K]: the expert each gate
// entry weighs.
#pragma once

#include <cstdint>

namespace fastmtl::cpu {

struct GateLayout {
  int64_t tasks, rows, gate_width, features;  // T, B, K, h
  int64_t task_stride, row_stride;            // of the logits / gates
};

// gates: the logits on entry (gate_bias [T, K] added if not null), the softmax over k on return.
template <typename T>
void gated_mixture_forward(const GateLayout& layout, T* gates, const T* gate_bias, const T* experts,
                           const int64_t* index, T* mixtures);

// From d mixtures: grad_logits (gates' layout), grad_experts [E, B, h] (experts no gate reads get
// zeros), grad_bias [T, K] (if not null; summed over rows in a fixed order).
template <typename T>
void gated_mixture_backward(const GateLayout& layout, int64_t num_experts, const T* grad_mixtures, const T* gates,
                            const T* experts, const int64_t* index, T* grad_logits, T* grad_experts, T* grad_bias);

}  // namespace fastmtl::cpu
