// fastmtl::fused_mlp and its backward: argument checks (ops/fused_mlp_checks.h), then the one
// orchestration (ops/trunk.cpp) with the steps kernels/select.h picks for the device.
#include <torch/library.h>

#include "kernels/select.h"
#include "ops/fused_mlp_checks.h"
#include "ops/trunk.h"

namespace fastmtl::ops {
namespace {

template <kernels::Choice choice>
std::tuple<at::Tensor, std::vector<at::Tensor>> fused_mlp_entry(const at::Tensor& x,
                                                                const std::vector<at::Tensor>& weights,
                                                                const std::vector<at::Tensor>& biases,
                                                                const std::string& activation) {
  const Activation act = check_fused_mlp_args(x, weights, biases, activation);
  const OpEntryGuard guard(x);
  return trunk_forward(kernels::steps_for("fused_mlp", x, choice), x.contiguous(), contiguous_all(weights),
                       contiguous_all(biases), act);
}

template <kernels::Choice choice>
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> fused_mlp_backward_entry(
    const at::Tensor& grad_out, const at::Tensor& x, const std::vector<at::Tensor>& weights, const at::Tensor& out,
    const std::vector<at::Tensor>& saved, const std::string& activation, bool has_bias, bool need_input_grad) {
  const Activation act = check_fused_mlp_backward_args(grad_out, x, weights, out, saved, activation);
  const OpEntryGuard guard(x);
  return trunk_backward(kernels::steps_for("fused_mlp_backward", x, choice), grad_out.contiguous(), x.contiguous(),
                        contiguous_all(weights), out.contiguous(), contiguous_all(saved), act, has_bias,
                        need_input_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmtl, CPU, m) {
  m.impl("fused_mlp", &fused_mlp_entry<kernels::Choice::Auto>);
  m.impl("fused_mlp_backward", &fused_mlp_backward_entry<kernels::Choice::Auto>);
}

TORCH_LIBRARY_IMPL(fastmtl, CUDA, m) {
  m.impl("fused_mlp", &fused_mlp_entry<kernels::Choice::Auto>);
  m.impl("fused_mlp_backward", &fused_mlp_backward_entry<kernels::Choice::Auto>);
}

TORCH_LIBRARY_IMPL(fastmtl_portable, CompositeExplicitAutograd, m) {
  m.impl("fused_mlp", &fused_mlp_entry<kernels::Choice::ForcePortable>);
  m.impl("fused_mlp_backward", &fused_mlp_backward_entry<kernels::Choice::ForcePortable>);
}

}  // namespace fastmtl::ops
