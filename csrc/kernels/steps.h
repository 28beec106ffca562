// The per-device kernel interface: every elementwise / reduction step of every fastmtl op, on
// tensors, behind one abstract class with three implementations:
//   - CpuSteps (kernels/cpu_steps.cpp): the vectorised raw-pointer loops of csrc/cpu/;
//   - CudaSteps (cuda/cuda_steps.cpp): the __global__ templates of csrc/cuda/ on the current stream;
//   - PortableSteps (kernels/portable_steps.cpp): the same steps written with ATen ops, for any
//     device (CPU, CUDA, meta, ...).
// The ops' orchestrations (csrc/ops/*_orchestration / engine) are written once over ATen GEMMs and
// call these steps; kernels/select.h decides, per op and device, which implementation runs.
//
// Conventions: an undefined at::Tensor means "none" for optional arguments; every tensor is on one
// device, contiguous unless a comment says "view" (then the last dimension has stride 1). For
// 16-bit storage types the steps compute in float32 and round once (CudaSteps, PortableSteps;
// CpuSteps is float32 / float64 only, and select.cpp sends 16-bit CPU tensors to PortableSteps).
// Reductions (bias gradients, per-task losses) are deterministic: a fixed summation order, no
// atomics. No step synchronises with the host except CPU ones (where that is free).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "common/activation.h"
#include "common/loss.h"

namespace fastmtl::kernels {

// The gates of gated_mixture: gates / logits as a [T, B, K] view (for a gate input shared by the
// tasks that is a permuted view of the GEMM's [B, T, K] output), experts [E, B, h], mixtures
// [T, B, h], index [T * K] (host): the expert each gate entry weighs.
struct GateArgs {
  int64_t tasks, rows, gate_width, features, num_experts;
  const std::vector<int64_t>* index;
  // True when every task's gate covers all experts in order (index[t * K + k] = k, K = E).
  bool identity_index;
};

class Steps {
 public:
  virtual ~Steps() = default;
  virtual const char* name() const = 0;

  // ---- trunk epilogues over a GEMM output [rows, cols]
  // pre += bias (if defined); then out undefined: pre = act(pre) in place; else out = act(pre) and
  // pre keeps the pre-activation.
  virtual void bias_activation(Activation act, const at::Tensor& pre, const at::Tensor& bias,
                               const at::Tensor& out) const = 0;
  // out = act(pre), elementwise (recomputes a layer input in backward).
  virtual void activation_apply(Activation act, const at::Tensor& pre, const at::Tensor& out) const = 0;
  // delta = grad * act'(saved) (delta may be grad itself; for identity delta must be grad and is not
  // written) and, if bias_grad is defined, bias_grad[j] = sum_i delta[i, j].
  virtual void activation_backward(Activation act, const at::Tensor& grad, const at::Tensor& saved,
                                   const at::Tensor& delta, const at::Tensor& bias_grad) const = 0;
  // The same for T cotangents per row: grad, delta [rows, T, cols], saved [rows, cols], bias_grad [T, cols].
  virtual void activation_backward_tasks(Activation act, const at::Tensor& grad, const at::Tensor& saved,
                                         const at::Tensor& delta, const at::Tensor& bias_grad) const = 0;

  // ---- dropout (fused_mlp_norm's towers)
  // Training dropout: out = in * keep / (1 - p) (0 for p = 1) and keep (bool, in's shape) the kept
  // entries, drawn from torch's default generator of the device (CPU: one 64-bit seed from it, then
  // a counter-based hash per entry, so the mask is the same for any thread count; elsewhere ATen's
  // native_dropout). in and out are contiguous and distinct.
  virtual void dropout_forward(double p, const at::Tensor& in, const at::Tensor& keep, const at::Tensor& out) const = 0;
  // out = in * keep / (1 - p): dropout's backward, and the recompute of a layer's output.
  virtual void dropout_apply(double p, const at::Tensor& keep, const at::Tensor& in, const at::Tensor& out) const = 0;

  // ---- heads
  // Per logit column of task t: task_scale[t] * count_scale[t] ([C], the dtype of count_scale).
  virtual at::Tensor column_scale(const std::vector<int64_t>& num_outputs, const at::Tensor& task_scale,
                                  const at::Tensor& count_scale) const = 0;
  // out = in * col_scale (per column) and, if col_sum is defined, col_sum[j] = sum_i out[i, j].
  // out may be in itself.
  virtual void scale_columns(const at::Tensor& in, const at::Tensor& col_scale, const at::Tensor& out,
                             const at::Tensor& col_sum) const = 0;
  // The loss pass: logits [B, C] (GEMM output without bias) become, in place, each entry's raw
  // d loss / d logit (0 where missing); losses[t] = mean over labelled entries (0 if none),
  // scale[t] = 1/count (0 if none); both [T] in loss dtype. Returns the first invalid target on
  // devices where that costs no host synchronisation (CPU); elsewhere row < 0 and the invalid
  // task's loss is NaN.
  virtual BadTarget head_loss(const std::vector<HeadTask>& tasks, const at::Tensor& logits, const at::Tensor& bias,
                              const at::Tensor& targets, const at::Tensor& losses, const at::Tensor& scale) const = 0;
  // out [B, sum of widths] (float32 / float64) = every task's targets converted, at its offset.
  virtual void pack_targets(const std::vector<at::Tensor>& targets, const std::vector<HeadTask>& tasks,
                            const at::Tensor& out) const = 0;

  // ---- per-task engine
  // out [B * T, d], row b * T + t = sum over task t's columns j of logit_grad[b, j] col_scale[j] head[j, :].
  virtual void task_cotangents(const std::vector<int64_t>& num_outputs, const at::Tensor& logit_grad,
                               const at::Tensor& col_scale, const at::Tensor& head, const at::Tensor& out) const = 0;

  // ---- experts: [E, B, cols] stacks
  // pre = in + bias[e] (in: a view, e.g. the strided [B, E * cols] output of one shared GEMM, which
  // may also be pre itself); out undefined: pre = act(pre); else out = act(pre).
  virtual void expert_bias_activation(Activation act, const at::Tensor& in, const at::Tensor& bias,
                                      const at::Tensor& pre, const at::Tensor& out) const = 0;
  // delta (a view, e.g. strided [B, E * cols]) = grad * act'(saved); bias_grad [E, cols] = sum over rows.
  // delta may be grad itself when it has grad's (contiguous) layout.
  virtual void expert_activation_backward(Activation act, const at::Tensor& grad, const at::Tensor& saved,
                                          const at::Tensor& delta, const at::Tensor& bias_grad) const = 0;

  // ---- gated mixture
  // gates: the logits on entry (+ gate_bias [T, K] if defined), the softmax over k on return;
  // mixtures[t, b] = sum_k gates[t, b, k] experts[index[t, k], b].
  virtual void gated_mixture_forward(const GateArgs& g, const at::Tensor& gates, const at::Tensor& gate_bias,
                                     const at::Tensor& experts, const at::Tensor& mixtures) const = 0;
  // From d mixtures: grad_logits (gates' [T, B, K] view layout), grad_experts [E, B, h] (zeros for
  // experts no gate reads), grad_bias [T, K] if defined (summed over rows).
  virtual void gated_mixture_backward(const GateArgs& g, const at::Tensor& grad_mixtures, const at::Tensor& gates,
                                      const at::Tensor& experts, const at::Tensor& grad_logits,
                                      const at::Tensor& grad_experts, const at::Tensor& grad_bias) const = 0;
};

const Steps& cpu_steps();
const Steps& portable_steps();
const Steps& cpu_16bit_steps();  // 16-bit CPU tensors: portable, but for the CPU's dropout loop
#if FASTMTL_WITH_CUDA
const Steps& cuda_steps();
#endif

}  // namespace fastmtl::kernels
