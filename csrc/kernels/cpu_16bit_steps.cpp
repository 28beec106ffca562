// The steps of 16-bit (float16 / bfloat16) tensors on the CPU: the portable ATen steps (float32
// math, one rounding: the vectorised CPU loops are float32 / float64 only), except dropout, whose
// CPU loop handles 16-bit storage itself (ATen's CPU bernoulli_ draws serially, the largest cost
// of a tower's step), and the activations, one widening pass each (cpu/activation_16bit.h).
// kernels/select.cpp picks these for 16-bit CPU tensors.
#include <ATen/Dispatch.h>

#include "cpu/activation_16bit.h"
#include "cpu/dropout.h"
#include "kernels/steps.h"

namespace fastmtl::kernels {
namespace {

bool is_16bit(const at::Tensor& t) { return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16; }

class Cpu16BitSteps final : public Steps {
 public:
  const char* name() const override { return "cpu-16bit"; }

  void dropout_forward(double p, const at::Tensor& in, const at::Tensor& keep, const at::Tensor& out) const override {
    const uint64_t seed = cpu::dropout_seed();
    AT_DISPATCH_REDUCED_FLOATING_TYPES(in.scalar_type(), "fastmtl_dropout_forward_16bit", [&] {
      cpu::dropout_forward<scalar_t>(p, seed, in.numel(), in.const_data_ptr<scalar_t>(), keep.mutable_data_ptr<bool>(),
                                     out.mutable_data_ptr<scalar_t>());
    });
  }

  void dropout_apply(double p, const at::Tensor& keep, const at::Tensor& in, const at::Tensor& out) const override {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(in.scalar_type(), "fastmtl_dropout_apply_16bit", [&] {
      cpu::dropout_apply<scalar_t>(p, in.numel(), keep.const_data_ptr<bool>(), in.const_data_ptr<scalar_t>(),
                                   out.mutable_data_ptr<scalar_t>());
    });
  }

  // Everything else: the portable steps.
  void bias_activation(Activation act, const at::Tensor& pre, const at::Tensor& bias,
                       const at::Tensor& out) const override {
    portable_steps().bias_activation(act, pre, bias, out);
  }
  // The activations: one pass each (cpu/activation_16bit.h), float32 math and one rounding as the
  // portable steps, without their float32 temporaries. With a bias gradient to sum, the portable step.
  void activation_apply(Activation act, const at::Tensor& pre, const at::Tensor& out) const override {
    if (!is_16bit(pre) || out.scalar_type() != pre.scalar_type()) {  // (float32 work of a 16-bit op)
      portable_steps().activation_apply(act, pre, out);
      return;
    }
    AT_DISPATCH_REDUCED_FLOATING_TYPES(pre.scalar_type(), "fastmtl_activation_apply_16bit", [&] {
      cpu::activation_apply_16bit<scalar_t>(act, pre.numel(), pre.const_data_ptr<scalar_t>(),
                                            out.mutable_data_ptr<scalar_t>());
    });
  }
  void activation_backward(Activation act, const at::Tensor& grad, const at::Tensor& saved, const at::Tensor& delta,
                           const at::Tensor& bias_grad) const override {
    const bool same_16bit =
        is_16bit(grad) && saved.scalar_type() == grad.scalar_type() && delta.scalar_type() == grad.scalar_type();
    if (bias_grad.defined() || act == Activation::Identity || !same_16bit) {
      portable_steps().activation_backward(act, grad, saved, delta, bias_grad);
      return;
    }
    AT_DISPATCH_REDUCED_FLOATING_TYPES(grad.scalar_type(), "fastmtl_activation_backward_16bit", [&] {
      cpu::activation_backward_16bit<scalar_t>(act, grad.numel(), grad.const_data_ptr<scalar_t>(),
                                               saved.const_data_ptr<scalar_t>(), delta.mutable_data_ptr<scalar_t>());
    });
  }
  void activation_backward_tasks(Activation act, const at::Tensor& grad, const at::Tensor& saved,
                                 const at::Tensor& delta, const at::Tensor& bias_grad) const override {
    portable_steps().activation_backward_tasks(act, grad, saved, delta, bias_grad);
  }
  at::Tensor column_scale(const std::vector<int64_t>& num_outputs, const at::Tensor& task_scale,
                          const at::Tensor& count_scale) const override {
    return portable_steps().column_scale(num_outputs, task_scale, count_scale);
  }
  void scale_columns(const at::Tensor& in, const at::Tensor& col_scale, const at::Tensor& out,
                     const at::Tensor& col_sum) const override {
    portable_steps().scale_columns(in, col_scale, out, col_sum);
  }
  BadTarget head_loss(const std::vector<HeadTask>& tasks, const at::Tensor& logits, const at::Tensor& bias,
                      const at::Tensor& targets, const at::Tensor& losses, const at::Tensor& scale) const override {
    return portable_steps().head_loss(tasks, logits, bias, targets, losses, scale);
  }
  void pack_targets(const std::vector<at::Tensor>& targets, const std::vector<HeadTask>& tasks,
                    const at::Tensor& out) const override {
    portable_steps().pack_targets(targets, tasks, out);
  }
  void task_cotangents(const std::vector<int64_t>& num_outputs, const at::Tensor& logit_grad,
                       const at::Tensor& col_scale, const at::Tensor& head, const at::Tensor& out) const override {
    portable_steps().task_cotangents(num_outputs, logit_grad, col_scale, head, out);
  }
  void expert_bias_activation(Activation act, const at::Tensor& in, const at::Tensor& bias, const at::Tensor& pre,
                              const at::Tensor& out) const override {
    portable_steps().expert_bias_activation(act, in, bias, pre, out);
  }
  void expert_activation_backward(Activation act, const at::Tensor& grad, const at::Tensor& saved,
                                  const at::Tensor& delta, const at::Tensor& bias_grad) const override {
    portable_steps().expert_activation_backward(act, grad, saved, delta, bias_grad);
  }
  void gated_mixture_forward(const GateArgs& g, const at::Tensor& gates, const at::Tensor& gate_bias,
                             const at::Tensor& experts, const at::Tensor& mixtures) const override {
    portable_steps().gated_mixture_forward(g, gates, gate_bias, experts, mixtures);
  }
  void gated_mixture_backward(const GateArgs& g, const at::Tensor& grad_mixtures, const at::Tensor& gates,
                              const at::Tensor& experts, const at::Tensor& grad_logits, const at::Tensor& grad_experts,
                              const at::Tensor& grad_bias) const override {
    portable_steps().gated_mixture_backward(g, grad_mixtures, gates, experts, grad_logits, grad_experts, grad_bias);
  }
};

}  // namespace

const Steps& cpu_16bit_steps() {
  static const Cpu16BitSteps steps;
  return steps;
}

}  // namespace fastmtl::kernels
