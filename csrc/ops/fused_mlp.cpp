// fastmtl::fused_mlp and its backward: argument checks and device dispatch.
#include <torch/library.h>

#include "cpu/fused_mlp.h"
#include "ops/checks.h"

namespace fastmtl::ops {
namespace {

constexpr const char* kOp = "fused_mlp";

Activation check_activation(const std::string& name) {
  Activation act;
  TORCH_CHECK_VALUE(parse_activation(name, &act), "fastmtl.fused_mlp: argument 'activation' expected one of ",
                    activation_names(), ", got '", name, "'");
  return act;
}

// Checks x, weights and biases against each other (shapes chain layer to layer).
void check_trunk(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                 const std::vector<at::Tensor>& biases) {
  check_dim(x, 2, kOp, "x");
  check_float_dtype(x, kOp, "x");
  TORCH_CHECK_VALUE(x.size(0) >= 1, "fastmtl.fused_mlp: argument 'x' expected a batch of at least 1 row, got shape ",
                    shape_str(x.sizes()));
  TORCH_CHECK_VALUE(!weights.empty(), "fastmtl.fused_mlp: argument 'weights' expected at least one layer, got 0");
  TORCH_CHECK_VALUE(biases.empty() || biases.size() == weights.size(), "fastmtl.fused_mlp: argument 'biases' "
                    "expected ", weights.size(), " tensors (one per layer) or none, got ", biases.size());
  int64_t in_features = x.size(1);
  for (size_t l = 0; l < weights.size(); ++l) {
    const std::string name = indexed("weights", l);
    check_dim(weights[l], 2, kOp, name);
    check_like(weights[l], x, kOp, name, "x");
    TORCH_CHECK_VALUE(weights[l].size(0) >= 1, "fastmtl.fused_mlp: argument '", name,
                      "' expected at least 1 output feature, got shape ", shape_str(weights[l].sizes()));
    check_size(weights[l], 1, in_features, kOp, name,
               l == 0 ? std::string("x.shape[1]") : "weights[" + std::to_string(l - 1) + "].shape[0]");
    in_features = weights[l].size(0);
    if (!biases.empty()) {
      const std::string bname = indexed("biases", l);
      check_dim(biases[l], 1, kOp, bname);
      check_like(biases[l], x, kOp, bname, "x");
      check_size(biases[l], 0, in_features, kOp, bname, name + ".shape[0]");
    }
  }
}

std::vector<at::Tensor> contiguous_all(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> fused_mlp_entry(
    const at::Tensor& x, const std::vector<at::Tensor>& weights,
    const std::vector<at::Tensor>& biases, const std::string& activation) {
  const Activation act = check_activation(activation);
  check_trunk(x, weights, biases);
  if (!x.is_cpu()) no_kernel_for_device(kOp, x, "x");
  return cpu::fused_mlp_forward(x.contiguous(), contiguous_all(weights), contiguous_all(biases), act);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> fused_mlp_backward_entry(
    const at::Tensor& grad_out, const at::Tensor& x, const std::vector<at::Tensor>& weights,
    const at::Tensor& out, const std::vector<at::Tensor>& saved, const std::string& activation,
    bool has_bias, bool need_input_grad) {
  constexpr const char* op = "fused_mlp_backward";
  const Activation act = check_activation(activation);
  TORCH_CHECK_VALUE(!weights.empty(), "fastmtl.fused_mlp_backward: argument 'weights' expected at least one layer, got 0");
  const size_t expected_saved = saved_kind(act) == SavedKind::Pre ? weights.size() : weights.size() - 1;
  TORCH_CHECK_VALUE(saved.size() == expected_saved, "fastmtl.fused_mlp_backward: argument 'saved' expected ",
                    expected_saved, " tensors for activation '", activation, "', got ", saved.size());
  check_like(grad_out, out, op, "grad_out", "out");
  TORCH_CHECK_VALUE(grad_out.sizes() == out.sizes(), "fastmtl.fused_mlp_backward: argument 'grad_out' expected shape ",
                    shape_str(out.sizes()), " (the shape of 'out'), got ", shape_str(grad_out.sizes()));
  if (!x.is_cpu()) no_kernel_for_device(op, x, "x");
  return cpu::fused_mlp_backward(grad_out.contiguous(), x.contiguous(), contiguous_all(weights), out.contiguous(),
                                 contiguous_all(saved), act, has_bias,
                                 need_input_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmtl, CPU, m) {
  m.impl("fused_mlp", &fused_mlp_entry);
  m.impl("fused_mlp_backward", &fused_mlp_backward_entry);
}

TORCH_LIBRARY_IMPL(fastmtl, CUDA, m) {
  m.impl("fused_mlp", &fused_mlp_entry);
  m.impl("fused_mlp_backward", &fused_mlp_backward_entry);
}

}  // namespace fastmtl::ops
