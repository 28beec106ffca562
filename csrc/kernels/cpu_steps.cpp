// CpuSteps: the kernel interface (kernels/steps.h) on the CPU's vectorised raw-pointer loops
// (csrc/cpu/). Thin: dtype dispatch (float32, float64) and pointers; the loops own the threading.
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>

#include "cpu/dropout.h"
#include "cpu/epilogue.h"
#include "cpu/expert_epilogue.h"
#include "cpu/gated_mixture.h"
#include "cpu/head_loss.h"
#include "cpu/task_cotangents.h"
#include "kernels/steps.h"

namespace fastmtl::kernels {
namespace {

template <typename T>
T* ptr(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

template <typename T>
const T* cptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

class CpuSteps final : public Steps {
 public:
  const char* name() const override { return "cpu"; }

  void bias_activation(Activation act, const at::Tensor& pre, const at::Tensor& bias,
                       const at::Tensor& out) const override {
    AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "fastmtl_bias_activation", [&] {
      cpu::bias_activation_forward<scalar_t>(act, pre.size(0), pre.size(1), ptr<scalar_t>(pre), cptr<scalar_t>(bias),
                                             ptr<scalar_t>(out));
    });
  }

  void activation_apply(Activation act, const at::Tensor& pre, const at::Tensor& out) const override {
    AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "fastmtl_activation_apply", [&] {
      cpu::activation_apply<scalar_t>(act, pre.numel(), cptr<scalar_t>(pre), ptr<scalar_t>(out));
    });
  }

  void activation_backward(Activation act, const at::Tensor& grad, const at::Tensor& saved, const at::Tensor& delta,
                           const at::Tensor& bias_grad) const override {
    if (act == Activation::Identity) {  // delta is grad (maybe the caller's input): only the bias gradient
      if (bias_grad.defined()) bias_grad.copy_(at::sum(grad, {0}, /*keepdim=*/false, at::kDouble));
      return;
    }
    AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "fastmtl_activation_backward", [&] {
      cpu::activation_backward<scalar_t>(act, grad.size(0), grad.size(1), cptr<scalar_t>(grad), cptr<scalar_t>(saved),
                                         ptr<scalar_t>(delta), ptr<scalar_t>(bias_grad));
    });
  }

  void activation_backward_tasks(Activation act, const at::Tensor& grad, const at::Tensor& saved,
                                 const at::Tensor& delta, const at::Tensor& bias_grad) const override {
    AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "fastmtl_activation_backward_tasks", [&] {
      cpu::activation_backward_tasks<scalar_t>(act, grad.size(0), grad.size(1), grad.size(2), cptr<scalar_t>(grad),
                                               cptr<scalar_t>(saved), ptr<scalar_t>(delta), ptr<scalar_t>(bias_grad));
    });
  }

  void dropout_forward(double p, const at::Tensor& in, const at::Tensor& keep, const at::Tensor& out) const override {
    const uint64_t seed = cpu::dropout_seed();
    AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "fastmtl_dropout_forward", [&] {
      cpu::dropout_forward<scalar_t>(p, seed, in.numel(), cptr<scalar_t>(in), keep.mutable_data_ptr<bool>(),
                                     ptr<scalar_t>(out));
    });
  }

  void dropout_apply(double p, const at::Tensor& keep, const at::Tensor& in, const at::Tensor& out) const override {
    AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "fastmtl_dropout_apply", [&] {
      cpu::dropout_apply<scalar_t>(p, in.numel(), keep.const_data_ptr<bool>(), cptr<scalar_t>(in), ptr<scalar_t>(out));
    });
  }

  at::Tensor column_scale(const std::vector<int64_t>& num_outputs, const at::Tensor& task_scale,
                          const at::Tensor& count_scale) const override {
    int64_t cols = 0;
    for (int64_t n : num_outputs) cols += n;
    at::Tensor scale = at::empty({cols}, count_scale.options());
    AT_DISPATCH_FLOATING_TYPES(count_scale.scalar_type(), "fastmtl_column_scale", [&] {
      const scalar_t* w = task_scale.const_data_ptr<scalar_t>();
      const scalar_t* s = count_scale.const_data_ptr<scalar_t>();
      scalar_t* out = scale.mutable_data_ptr<scalar_t>();
      for (size_t t = 0; t < num_outputs.size(); ++t) out = std::fill_n(out, num_outputs[t], w[t] * s[t]);
    });
    return scale;
  }

  void scale_columns(const at::Tensor& in, const at::Tensor& col_scale, const at::Tensor& out,
                     const at::Tensor& col_sum) const override {
    AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "fastmtl_scale_columns", [&] {
      cpu::scale_columns<scalar_t>(in.size(0), in.size(1), cptr<scalar_t>(in), cptr<scalar_t>(col_scale),
                                   ptr<scalar_t>(out), ptr<scalar_t>(col_sum));
    });
  }

  BadTarget head_loss(const std::vector<HeadTask>& tasks, const at::Tensor& logits, const at::Tensor& bias,
                      const at::Tensor& targets, const at::Tensor& losses, const at::Tensor& scale) const override {
    const int64_t num_tasks = static_cast<int64_t>(tasks.size());
    std::vector<double> loss_sum(num_tasks);
    std::vector<int64_t> count(num_tasks);
    BadTarget bad;
    AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "fastmtl_head_loss", [&] {
      cpu::head_loss_forward<scalar_t>(tasks, logits.size(0), logits.size(1), targets.size(1), ptr<scalar_t>(logits),
                                       cptr<scalar_t>(bias), cptr<scalar_t>(targets), loss_sum.data(), count.data(),
                                       &bad);
      scalar_t* l = ptr<scalar_t>(losses);
      scalar_t* s = ptr<scalar_t>(scale);
      for (int64_t k = 0; k < num_tasks; ++k) {
        // A task with nothing labelled contributes 0 and no gradient, never 0/0.
        l[k] = static_cast<scalar_t>(count[k] > 0 ? loss_sum[k] / double(count[k]) : 0.0);
        s[k] = static_cast<scalar_t>(count[k] > 0 ? 1.0 / double(count[k]) : 0.0);
      }
    });
    return bad;
  }

  void pack_targets(const std::vector<at::Tensor>& targets, const std::vector<HeadTask>& tasks,
                    const at::Tensor& out) const override {
    const int64_t rows = out.size(0), out_cols = out.size(1);
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "fastmtl_pack_targets_out", [&] {
      using Out = scalar_t;
      Out* dst_all = out.mutable_data_ptr<Out>();
      for (size_t t = 0; t < targets.size(); ++t) {
        const at::Tensor& src = targets[t];
        const int64_t width = target_width(tasks[t].loss, tasks[t].num_outputs);
        const int64_t s0 = src.stride(0), s1 = src.dim() == 2 ? src.stride(1) : 0;
        Out* dst = dst_all + tasks[t].target_offset;
        AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, src.scalar_type(), "fastmtl_pack_targets_in",
                                   [&] {
                                     const scalar_t* p = src.const_data_ptr<scalar_t>();
                                     for (int64_t i = 0; i < rows; ++i)
                                       for (int64_t j = 0; j < width; ++j)
                                         dst[i * out_cols + j] = static_cast<Out>(p[i * s0 + j * s1]);
                                   });
      }
    });
  }

  void task_cotangents(const std::vector<int64_t>& num_outputs, const at::Tensor& logit_grad,
                       const at::Tensor& col_scale, const at::Tensor& head, const at::Tensor& out) const override {
    AT_DISPATCH_FLOATING_TYPES(logit_grad.scalar_type(), "fastmtl_task_cotangents", [&] {
      cpu::task_cotangents<scalar_t>(num_outputs, logit_grad.size(0), logit_grad.size(1), head.size(1),
                                     cptr<scalar_t>(logit_grad), cptr<scalar_t>(col_scale), cptr<scalar_t>(head),
                                     ptr<scalar_t>(out));
    });
  }

  void expert_bias_activation(Activation act, const at::Tensor& in, const at::Tensor& bias, const at::Tensor& pre,
                              const at::Tensor& out) const override {
    AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "fastmtl_expert_bias_activation", [&] {
      cpu::expert_bias_activation_forward<scalar_t>(act, pre.size(0), pre.size(1), pre.size(2), cptr<scalar_t>(in),
                                                    in.stride(0), in.stride(1), cptr<scalar_t>(bias),
                                                    ptr<scalar_t>(pre), ptr<scalar_t>(out));
    });
  }

  void expert_activation_backward(Activation act, const at::Tensor& grad, const at::Tensor& saved,
                                  const at::Tensor& delta, const at::Tensor& bias_grad) const override {
    AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "fastmtl_expert_activation_backward", [&] {
      cpu::expert_activation_backward<scalar_t>(act, grad.size(0), grad.size(1), grad.size(2), cptr<scalar_t>(grad),
                                                cptr<scalar_t>(saved), ptr<scalar_t>(delta), delta.stride(0),
                                                delta.stride(1), ptr<scalar_t>(bias_grad));
    });
  }

  void gated_mixture_forward(const GateArgs& g, const at::Tensor& gates, const at::Tensor& gate_bias,
                             const at::Tensor& experts, const at::Tensor& mixtures) const override {
    const cpu::GateLayout layout{g.tasks, g.rows, g.gate_width, g.features, gates.stride(0), gates.stride(1)};
    AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "fastmtl_gated_mixture", [&] {
      cpu::gated_mixture_forward<scalar_t>(layout, ptr<scalar_t>(gates), cptr<scalar_t>(gate_bias),
                                           cptr<scalar_t>(experts), g.index->data(), ptr<scalar_t>(mixtures));
    });
  }

  void gated_mixture_backward(const GateArgs& g, const at::Tensor& grad_mixtures, const at::Tensor& gates,
                              const at::Tensor& experts, const at::Tensor& grad_logits, const at::Tensor& grad_experts,
                              const at::Tensor& grad_bias) const override {
    const cpu::GateLayout layout{g.tasks, g.rows, g.gate_width, g.features, gates.stride(0), gates.stride(1)};
    TORCH_INTERNAL_ASSERT(grad_logits.stride(0) == gates.stride(0) && grad_logits.stride(1) == gates.stride(1));
    AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "fastmtl_gated_mixture_backward", [&] {
      cpu::gated_mixture_backward<scalar_t>(layout, g.num_experts, cptr<scalar_t>(grad_mixtures), cptr<scalar_t>(gates),
                                            cptr<scalar_t>(experts), g.index->data(), ptr<scalar_t>(grad_logits),
                                            ptr<scalar_t>(grad_experts), ptr<scalar_t>(grad_bias));
    });
  }
};

}  // namespace

const Steps& cpu_steps() {
  static const CpuSteps steps;
  return steps;
}

}  // namespace fastmtl::kernels
