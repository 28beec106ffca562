// fastmtl::fused_mlp and its backward on CPU: argument checks (ops/fused_mlp_checks.h, shared with
// the CUDA entry points in csrc/cuda/) and the CPU kernels.
#include <torch/library.h>

#include "cpu/fused_mlp.h"
#include "ops/fused_mlp_checks.h"

namespace fastmtl::ops {
namespace {

std::tuple<at::Tensor, std::vector<at::Tensor>> fused_mlp_entry(
    const at::Tensor& x, const std::vector<at::Tensor>& weights,
    const std::vector<at::Tensor>& biases, const std::string& activation) {
  const Activation act = check_fused_mlp_args(x, weights, biases, activation);
  if (!x.is_cpu()) no_kernel_for_device("fused_mlp", x, "x");
  return cpu::fused_mlp_forward(x.contiguous(), contiguous_all(weights), contiguous_all(biases), act);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> fused_mlp_backward_entry(
    const at::Tensor& grad_out, const at::Tensor& x, const std::vector<at::Tensor>& weights,
    const at::Tensor& out, const std::vector<at::Tensor>& saved, const std::string& activation,
    bool has_bias, bool need_input_grad) {
  const Activation act = check_fused_mlp_backward_args(grad_out, x, weights, out, saved, activation);
  if (!x.is_cpu()) no_kernel_for_device("fused_mlp_backward", x, "x");
  return cpu::fused_mlp_backward(grad_out.contiguous(), x.contiguous(), contiguous_all(weights), out.contiguous(),
                                 contiguous_all(saved), act, has_bias,
                                 need_input_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmtl, CPU, m) {
  m.impl("fused_mlp", &fused_mlp_entry);
  m.impl("fused_mlp_backward", &fused_mlp_backward_entry);
}

#if !FASTMTL_WITH_CUDA
// A build without CUDA kernels still checks CUDA tensors, then says it has no kernel for them.
TORCH_LIBRARY_IMPL(fastmtl, CUDA, m) {
  m.impl("fused_mlp", &fused_mlp_entry);
  m.impl("fused_mlp_backward", &fused_mlp_backward_entry);
}
#endif

}  // namespace fastmtl::ops
