// CudaSteps: the kernel interface (kernels/steps.h) on the CUDA kernels of this directory. Thin ATen
// glue: dtype dispatch (float32, float64, float16, bfloat16), raw pointers, workspaces from the
// caching allocator, the current stream; no host synchronisation (capturable in a CUDA graph).
// Never run on a GPU yet: until a GPU run verifies them, the ops default to the portable steps on
// CUDA (kernels/select.cpp); FASTMTL_KERNELS=custom selects these.
#include <algorithm>

#include "cuda/glue.h"
#include "kernels/steps.h"

namespace fastmtl::kernels {
namespace {

using cuda::check_launch;
using cuda::current_stream;
using cuda::kernel_t;
using cuda::loss_t;

template <typename S>
const kernel_t<S>* kptr(const at::Tensor& t) {
  return t.defined() ? cuda::kernel_ptr<S>(t) : nullptr;
}

template <typename S>
kernel_t<S>* kmut(const at::Tensor& t) {
  at::Tensor alias = t;  // a handle to the same storage (kernel_mutable_ptr takes a non-const ref)
  return t.defined() ? cuda::kernel_mutable_ptr<S>(alias) : nullptr;
}

at::Tensor column_workspace(const at::Tensor& like, int64_t rows, int64_t cols) {
  return at::empty({cuda::column_sum_workspace(rows, cols)}, like.options().dtype(at::kDouble));
}

double* workspace_ptr(at::Tensor& workspace) {
  return workspace.defined() ? workspace.mutable_data_ptr<double>() : nullptr;
}

cuda::SourceType source_type(at::ScalarType t) {
  using cuda::SourceType;
  switch (t) {
    case at::kFloat:
      return SourceType::Float32;
    case at::kDouble:
      return SourceType::Float64;
    case at::kHalf:
      return SourceType::Float16;
    case at::kBFloat16:
      return SourceType::BFloat16;
    case at::kBool:
      return SourceType::Bool;
    case at::kByte:
      return SourceType::UInt8;
    case at::kChar:
      return SourceType::Int8;
    case at::kShort:
      return SourceType::Int16;
    case at::kInt:
      return SourceType::Int32;
    case at::kLong:
      return SourceType::Int64;
    default:
      TORCH_CHECK_TYPE(false, "fastmtl.pack_targets: no CUDA conversion from dtype ", t);
  }
}

class CudaSteps final : public Steps {
 public:
  const char* name() const override { return "cuda"; }

  void bias_activation(Activation act, const at::Tensor& pre, const at::Tensor& bias,
                       const at::Tensor& out) const override {
    FASTMTL_DISPATCH_CUDA_FLOATING_TYPES(pre.scalar_type(), "fastmtl_bias_activation_cuda", [&] {
      check_launch(cuda::bias_activation_forward(act, pre.size(0), pre.size(1), kmut<scalar_t>(pre),
                                                 kptr<scalar_t>(bias), kmut<scalar_t>(out), current_stream(pre)));
    });
  }

  void activation_apply(Activation act, const at::Tensor& pre, const at::Tensor& out) const override {
    FASTMTL_DISPATCH_CUDA_FLOATING_TYPES(pre.scalar_type(), "fastmtl_activation_apply_cuda", [&] {
      check_launch(
          cuda::activation_apply(act, pre.numel(), kptr<scalar_t>(pre), kmut<scalar_t>(out), current_stream(pre)));
    });
  }

  void activation_backward(Activation act, const at::Tensor& grad, const at::Tensor& saved, const at::Tensor& delta,
                           const at::Tensor& bias_grad) const override {
    at::Tensor workspace = bias_grad.defined() ? column_workspace(grad, grad.size(0), grad.size(1)) : at::Tensor();
    FASTMTL_DISPATCH_CUDA_FLOATING_TYPES(grad.scalar_type(), "fastmtl_activation_backward_cuda", [&] {
      check_launch(cuda::activation_backward(act, grad.size(0), grad.size(1), kptr<scalar_t>(grad),
                                             kptr<scalar_t>(saved), kmut<scalar_t>(delta), kmut<scalar_t>(bias_grad),
                                             workspace_ptr(workspace), current_stream(grad)));
    });
  }

  void activation_backward_tasks(Activation act, const at::Tensor& grad, const at::Tensor& saved,
                                 const at::Tensor& delta, const at::Tensor& bias_grad) const override {
    const int64_t rows = grad.size(0), tasks = grad.size(1), cols = grad.size(2);
    at::Tensor workspace = bias_grad.defined() ? column_workspace(grad, rows, tasks * cols) : at::Tensor();
    FASTMTL_DISPATCH_CUDA_FLOATING_TYPES(grad.scalar_type(), "fastmtl_activation_backward_tasks_cuda", [&] {
      check_launch(cuda::activation_backward_tasks(act, rows, tasks, cols, kptr<scalar_t>(grad), kptr<scalar_t>(saved),
                                                   kmut<scalar_t>(delta), kmut<scalar_t>(bias_grad),
                                                   workspace_ptr(workspace), current_stream(grad)));
    });
  }

  at::Tensor column_scale(const std::vector<int64_t>& num_outputs, const at::Tensor& task_scale,
                          const at::Tensor& count_scale) const override {
    // A handful of tiny ATen ops on the device (no host data involved): the portable step is the kernel.
    return portable_steps().column_scale(num_outputs, task_scale, count_scale);
  }

  void scale_columns(const at::Tensor& in, const at::Tensor& col_scale, const at::Tensor& out,
                     const at::Tensor& col_sum) const override {
    at::Tensor workspace = col_sum.defined() ? column_workspace(in, in.size(0), in.size(1)) : at::Tensor();
    FASTMTL_DISPATCH_CUDA_FLOATING_TYPES(in.scalar_type(), "fastmtl_scale_columns_cuda", [&] {
      using L = loss_t<kernel_t<scalar_t>>;
      check_launch(cuda::scale_columns(in.size(0), in.size(1), kptr<scalar_t>(in), col_scale.const_data_ptr<L>(),
                                       kmut<scalar_t>(out), kmut<scalar_t>(col_sum), workspace_ptr(workspace),
                                       current_stream(in)));
    });
  }

  BadTarget head_loss(const std::vector<HeadTask>& tasks, const at::Tensor& logits, const at::Tensor& bias,
                      const at::Tensor& targets, const at::Tensor& losses, const at::Tensor& scale) const override {
    const int64_t num_tasks = static_cast<int64_t>(tasks.size());
    const int64_t workspace = cuda::head_loss_workspace(logits.size(0), num_tasks);
    at::Tensor workspace_sum = at::empty({workspace}, logits.options().dtype(at::kDouble));
    at::Tensor workspace_count = at::empty({workspace}, logits.options().dtype(at::kLong));
    FASTMTL_DISPATCH_CUDA_FLOATING_TYPES(logits.scalar_type(), "fastmtl_head_loss_cuda", [&] {
      using L = loss_t<kernel_t<scalar_t>>;
      check_launch(cuda::head_loss_forward(tasks.data(), num_tasks, logits.size(0), logits.size(1), targets.size(1),
                                           kmut<scalar_t>(logits), kptr<scalar_t>(bias), targets.const_data_ptr<L>(),
                                           losses.mutable_data_ptr<L>(), scale.mutable_data_ptr<L>(),
                                           workspace_sum.mutable_data_ptr<double>(),
                                           workspace_count.mutable_data_ptr<int64_t>(), current_stream(logits)));
    });
    return BadTarget{};  // invalid targets made their task's loss NaN (no host synchronisation)
  }

  void pack_targets(const std::vector<at::Tensor>& targets, const std::vector<HeadTask>& tasks,
                    const at::Tensor& out) const override {
    std::vector<cuda::PackSource> sources;
    sources.reserve(targets.size());
    for (size_t t = 0; t < targets.size(); ++t) {
      const at::Tensor& target = targets[t];
      sources.push_back(cuda::PackSource{
          target.const_data_ptr(), target.stride(0), target.dim() == 2 ? target.stride(1) : 0, tasks[t].target_offset,
          static_cast<int32_t>(target_width(tasks[t].loss, tasks[t].num_outputs)), source_type(target.scalar_type())});
    }
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "fastmtl_pack_targets_cuda", [&] {
      check_launch(cuda::pack_targets<scalar_t>(sources.data(), static_cast<int64_t>(sources.size()), out.size(0),
                                                out.size(1), out.mutable_data_ptr<scalar_t>(), current_stream(out)));
    });
  }

  void task_cotangents(const std::vector<int64_t>& num_outputs, const at::Tensor& logit_grad,
                       const at::Tensor& col_scale, const at::Tensor& head, const at::Tensor& out) const override {
    const int64_t num_tasks = static_cast<int64_t>(num_outputs.size());
    int64_t offset = 0;
    for (int64_t first = 0; first < num_tasks; first += cuda::kMaxTasksPerLaunchColumns) {
      cuda::TaskColumns columns{};
      columns.count = static_cast<int32_t>(std::min<int64_t>(cuda::kMaxTasksPerLaunchColumns, num_tasks - first));
      columns.first = static_cast<int32_t>(first);
      for (int32_t k = 0; k < columns.count; ++k) {
        columns.offset[k] = static_cast<int32_t>(offset);
        columns.width[k] = static_cast<int32_t>(num_outputs[first + k]);
        offset += num_outputs[first + k];
      }
      FASTMTL_DISPATCH_CUDA_FLOATING_TYPES(logit_grad.scalar_type(), "fastmtl_task_cotangents_cuda", [&] {
        using L = loss_t<kernel_t<scalar_t>>;
        check_launch(cuda::task_cotangents(columns, num_tasks, logit_grad.size(0), logit_grad.size(1), head.size(1),
                                           kptr<scalar_t>(logit_grad), col_scale.const_data_ptr<L>(),
                                           kptr<scalar_t>(head), kmut<scalar_t>(out), current_stream(out)));
      });
    }
  }

  void expert_bias_activation(Activation act, const at::Tensor& in, const at::Tensor& bias, const at::Tensor& pre,
                              const at::Tensor& out) const override {
    FASTMTL_DISPATCH_CUDA_FLOATING_TYPES(pre.scalar_type(), "fastmtl_expert_bias_activation_cuda", [&] {
      check_launch(cuda::expert_bias_activation(act, pre.size(0), pre.size(1), pre.size(2), kptr<scalar_t>(in),
                                                in.stride(0), in.stride(1), kptr<scalar_t>(bias), kmut<scalar_t>(pre),
                                                kmut<scalar_t>(out), current_stream(pre)));
    });
  }

  void expert_activation_backward(Activation act, const at::Tensor& grad, const at::Tensor& saved,
                                  const at::Tensor& delta, const at::Tensor& bias_grad) const override {
    const int64_t experts = grad.size(0), rows = grad.size(1), cols = grad.size(2);
    at::Tensor workspace = bias_grad.defined() ? column_workspace(grad, rows, experts * cols) : at::Tensor();
    FASTMTL_DISPATCH_CUDA_FLOATING_TYPES(grad.scalar_type(), "fastmtl_expert_activation_backward_cuda", [&] {
      check_launch(cuda::expert_activation_backward(
          act, experts, rows, cols, kptr<scalar_t>(grad), kptr<scalar_t>(saved), kmut<scalar_t>(delta), delta.stride(0),
          delta.stride(1), kmut<scalar_t>(bias_grad), workspace_ptr(workspace), current_stream(grad)));
    });
  }

  void gated_mixture_forward(const GateArgs& g, const at::Tensor& gates, const at::Tensor& gate_bias,
                             const at::Tensor& experts, const at::Tensor& mixtures) const override {
    if (g.tasks * g.gate_width > cuda::kMaxGateEntries || g.num_experts > INT16_MAX)
      return portable_steps().gated_mixture_forward(g, gates, gate_bias, experts, mixtures);
    const cuda::GateTable table = make_table(g, gates);
    FASTMTL_DISPATCH_CUDA_FLOATING_TYPES(gates.scalar_type(), "fastmtl_gated_mixture_cuda", [&] {
      check_launch(cuda::gated_mixture_forward(table, g.rows, g.features, kmut<scalar_t>(gates),
                                               kptr<scalar_t>(gate_bias), kptr<scalar_t>(experts),
                                               kmut<scalar_t>(mixtures), current_stream(gates)));
    });
  }

  // Dropout: ATen's native_dropout kernels (the CUDA generator's Philox stream), as the portable steps.
  void dropout_forward(double p, const at::Tensor& in, const at::Tensor& keep, const at::Tensor& out) const override {
    portable_steps().dropout_forward(p, in, keep, out);
  }

  void dropout_apply(double p, const at::Tensor& keep, const at::Tensor& in, const at::Tensor& out) const override {
    portable_steps().dropout_apply(p, keep, in, out);
  }

  void gated_mixture_backward(const GateArgs& g, const at::Tensor& grad_mixtures, const at::Tensor& gates,
                              const at::Tensor& experts, const at::Tensor& grad_logits, const at::Tensor& grad_experts,
                              const at::Tensor& grad_bias) const override {
    if (g.tasks * g.gate_width > cuda::kMaxGateEntries || g.num_experts > INT16_MAX)
      return portable_steps().gated_mixture_backward(g, grad_mixtures, gates, experts, grad_logits, grad_experts,
                                                     grad_bias);
    TORCH_INTERNAL_ASSERT(grad_logits.stride(0) == gates.stride(0) && grad_logits.stride(1) == gates.stride(1));
    const cuda::GateTable table = make_table(g, gates);
    at::Tensor workspace = grad_bias.defined() ? column_workspace(gates, g.rows, g.tasks * g.gate_width) : at::Tensor();
    FASTMTL_DISPATCH_CUDA_FLOATING_TYPES(gates.scalar_type(), "fastmtl_gated_mixture_backward_cuda", [&] {
      check_launch(cuda::gated_mixture_backward(
          table, g.rows, g.features, kptr<scalar_t>(grad_mixtures), kptr<scalar_t>(gates), kptr<scalar_t>(experts),
          kmut<scalar_t>(grad_logits), kmut<scalar_t>(grad_experts), kmut<scalar_t>(grad_bias),
          workspace_ptr(workspace), current_stream(gates)));
    });
  }

 private:
  static cuda::GateTable make_table(const GateArgs& g, const at::Tensor& gates) {
    cuda::GateTable table{};
    table.tasks = static_cast<int32_t>(g.tasks);
    table.gate_width = static_cast<int32_t>(g.gate_width);
    table.num_experts = static_cast<int32_t>(g.num_experts);
    table.task_stride = gates.stride(0);
    table.row_stride = gates.stride(1);
    for (int64_t i = 0; i < g.tasks * g.gate_width; ++i) table.expert[i] = static_cast<int16_t>((*g.index)[i]);
    return table;
  }
};

}  // namespace

const Steps& cuda_steps() {
  static const CudaSteps steps;
  return steps;
}

}  // namespace fastmtl::kernels
