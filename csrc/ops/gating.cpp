#include "ops/gating.h"

namespace fastmtl::ops {
namespace {

kernels::GateArgs gate_args(const at::Tensor& x, const at::Tensor& gate_weight, const at::Tensor& experts,
                            const std::vector<int64_t>& index) {
  const int64_t tasks = gate_weight.size(0), width = gate_weight.size(1), num_experts = experts.size(0);
  bool identity = width == num_experts;
  for (int64_t t = 0; identity && t < tasks; ++t)
    for (int64_t k = 0; identity && k < width; ++k) identity = index[t * width + k] == k;
  return {tasks, x.size(-2), width, experts.size(2), num_experts, &index, identity};
}

// The gates (or their gradient) as [T, B, K]: the GEMM's [B, T, K] output permuted for a shared x.
at::Tensor by_task(const at::Tensor& gates, const at::Tensor& x) {
  return x.dim() == 2 ? gates.permute({1, 0, 2}) : gates;
}

// All gate logits in one GEMM: [B, T, K] for a shared x, [T, B, K] (batched) for per-task inputs.
at::Tensor gate_logits(const at::Tensor& x, const at::Tensor& gate_weight) {
  const int64_t tasks = gate_weight.size(0), width = gate_weight.size(1), d = gate_weight.size(2);
  if (x.dim() == 2) return at::mm(x, gate_weight.view({tasks * width, d}).t()).view({x.size(0), tasks, width});
  return at::bmm(x, gate_weight.transpose(1, 2));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gated_mixture_forward(const kernels::Steps& steps, const at::Tensor& x,
                                                         const at::Tensor& gate_weight, const at::Tensor& gate_bias,
                                                         const at::Tensor& experts, const std::vector<int64_t>& index) {
  const kernels::GateArgs g = gate_args(x, gate_weight, experts, index);
  at::Tensor gates = gate_logits(x, gate_weight);
  at::Tensor mixtures = at::empty({g.tasks, g.rows, g.features}, x.options());
  steps.gated_mixture_forward(g, by_task(gates, x), gate_bias, experts, mixtures);
  return {mixtures, gates};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_mixture_backward(
    const kernels::Steps& steps, const at::Tensor& grad_mixtures, const at::Tensor& x, const at::Tensor& gate_weight,
    const at::Tensor& experts, const at::Tensor& gates, const std::vector<int64_t>& index, bool has_bias,
    bool need_x_grad) {
  const kernels::GateArgs g = gate_args(x, gate_weight, experts, index);
  const int64_t tasks = g.tasks, width = g.gate_width, d = gate_weight.size(2);
  at::Tensor grad_logits = at::empty_like(gates);
  at::Tensor grad_experts = at::empty_like(experts);
  at::Tensor grad_bias = has_bias ? at::empty({tasks, width}, x.options()) : at::empty({0}, x.options());
  steps.gated_mixture_backward(g, grad_mixtures, by_task(gates, x), experts, by_task(grad_logits, x), grad_experts,
                               has_bias ? grad_bias : at::Tensor());
  at::Tensor grad_weight, grad_x = at::empty({0}, x.options());
  if (x.dim() == 2) {
    const at::Tensor flat = grad_logits.view({g.rows, tasks * width});
    grad_weight = at::mm(flat.t(), x).view({tasks, width, d});
    if (need_x_grad) grad_x = at::mm(flat, gate_weight.view({tasks * width, d}));
  } else {
    grad_weight = at::bmm(grad_logits.transpose(1, 2), x);
    if (need_x_grad) grad_x = at::bmm(grad_logits, gate_weight);
  }
  return {grad_x, grad_weight, grad_bias, grad_experts};
}

}  // namespace fastmtl::ops
