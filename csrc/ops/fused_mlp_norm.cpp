// fastmtl::fused_mlp_norm and its backward: argument checks, then the one orchestration
// (ops/norm_trunk.cpp) with the activation steps kernels/select.h picks for the device.
#include <torch/library.h>

#include "kernels/select.h"
#include "ops/norm_trunk.h"
#include "ops/expert_checks.h"

namespace fastmtl::ops {
namespace {

NormKind check_norm(const char* op, const std::string& name) {
  if (name == "none") return NormKind::None;
  if (name == "batch") return NormKind::Batch;
  if (name == "layer") return NormKind::Layer;
  TORCH_CHECK_VALUE(false, "fastmtl.", op, ": argument 'norm' expected one of none, batch, layer, got '", name, "'");
}

// A per-layer list: empty, or one tensor per layer on x's device: [d_l] ([E, d_l] for stacked
// towers), in x's dtype, or for the normalisation's tensors (`any_float`) in any floating dtype:
// autocast keeps them float32 beside 16-bit x, and the op normalises in float32 (float64 for
// float64 x) whatever they are.
void check_layer_vectors(const char* op, const char* arg, const std::vector<at::Tensor>& list, const at::Tensor& x,
                         const std::vector<at::Tensor>& weights, bool any_float) {
  if (list.empty()) return;
  TORCH_CHECK_VALUE(list.size() == weights.size(), "fastmtl.", op, ": argument '", arg, "' expected ", weights.size(),
                    " tensors (one per layer) or none, got ", list.size());
  const bool stacked = weights[0].dim() == 3;
  for (size_t l = 0; l < list.size(); ++l) {
    const std::string name = indexed(arg, l);
    check_dim(list[l], stacked ? 2 : 1, op, name);
    if (any_float) {
      TORCH_CHECK_TYPE(list[l].is_floating_point(), "fastmtl.", op, ": argument '", name,
                       "' expected a floating dtype, got ", dtype_name(list[l].scalar_type()));
      TORCH_CHECK_VALUE(list[l].device() == x.device(), "fastmtl.", op, ": argument '", name, "' expected device ",
                        x.device(), " (the device of 'x'), got ", list[l].device());
    } else {
      check_like(list[l], x, op, name, "x");
    }
    const std::string weight = "weights[" + std::to_string(l) + "]";
    if (stacked) {
      check_size(list[l], 0, weights[l].size(0), op, name, weight + ".shape[0] (the number of towers)");
      check_size(list[l], 1, weights[l].size(1), op, name, weight + ".shape[1]");
    } else {
      check_size(list[l], 0, weights[l].size(0), op, name, weight + ".shape[0]");
    }
  }
}

// The tower's weights: 2-D [out, in] per layer (x [B, d]), or 3-D [E, out, in] per layer for E
// stacked towers (x [B, d] shared or [E, B, d]); biases checked with them in the stacked form.
void check_tower_weights(const char* op, const at::Tensor& x, const std::vector<at::Tensor>& weights,
                         const std::vector<at::Tensor>& biases) {
  if (!weights.empty() && weights[0].dim() == 3) {
    check_experts(op, x, weights, biases);
    return;
  }
  check_trunk_weights(op, x, weights);
  TORCH_CHECK_VALUE(x.size(1) >= 1, "fastmtl.", op, ": argument 'x' expected at least 1 input feature, got shape ",
                    shape_str(x.sizes()));
  check_layer_vectors(op, "biases", biases, x, weights, false);
}

// [rows, d] (or [E, rows, d] stacked): the shape of layer l's activations.
std::vector<int64_t> activation_shape(const std::vector<at::Tensor>& weights, size_t l, int64_t rows) {
  const at::Tensor& w = weights[l];
  return w.dim() == 3 ? std::vector<int64_t>{w.size(0), rows, w.size(1)} : std::vector<int64_t>{rows, w.size(0)};
}

struct Checked {
  NormTrunkConfig config;
  NormTrunkParams params;
};

Checked check_args(const char* op, const at::Tensor& x, const std::vector<at::Tensor>& weights,
                   const std::vector<at::Tensor>& biases, const std::vector<at::Tensor>& norm_weights,
                   const std::vector<at::Tensor>& norm_biases, const std::vector<at::Tensor>& running_means,
                   const std::vector<at::Tensor>& running_vars, const std::string& norm, const std::string& activation,
                   double dropout, bool training, double momentum, double eps) {
  Checked r;
  // softmax (over each row, the last layer of a gate) is accepted here only: it is not elementwise.
  const bool softmax = activation == "softmax";
  TORCH_CHECK_VALUE(softmax || parse_activation(activation, &r.config.act), "fastmtl.", op,
                    ": argument 'activation' expected one of ", activation_names(), ", softmax, got '", activation,
                    "'");
  r.config = {
      check_norm(op, norm), softmax ? Activation::Identity : r.config.act, softmax, dropout, training, momentum, eps};
  check_tower_weights(op, x, weights, biases);
  check_layer_vectors(op, "norm_weights", norm_weights, x, weights, true);
  check_layer_vectors(op, "norm_biases", norm_biases, x, weights, true);
  check_layer_vectors(op, "running_means", running_means, x, weights, true);
  check_layer_vectors(op, "running_vars", running_vars, x, weights, true);
  TORCH_CHECK_VALUE(norm_weights.size() == norm_biases.size(), "fastmtl.", op,
                    ": arguments 'norm_weights' and 'norm_biases' expected the same number of tensors (an affine "
                    "normalisation has both), got ",
                    norm_weights.size(), " and ", norm_biases.size());
  TORCH_CHECK_VALUE(running_means.size() == running_vars.size(), "fastmtl.", op,
                    ": arguments 'running_means' and 'running_vars' expected the same number of tensors, got ",
                    running_means.size(), " and ", running_vars.size());
  const NormKind kind = r.config.norm;
  TORCH_CHECK_VALUE(kind != NormKind::None || norm_weights.empty(), "fastmtl.", op,
                    ": argument 'norm_weights' expected none for norm='none', got ", norm_weights.size());
  TORCH_CHECK_VALUE(kind == NormKind::Batch || running_means.empty(), "fastmtl.", op,
                    ": argument 'running_means' expected none for norm='", norm, "' (only batch norm has them), got ",
                    running_means.size());
  TORCH_CHECK_VALUE(dropout >= 0.0 && dropout <= 1.0, "fastmtl.", op,
                    ": argument 'dropout' expected a probability in [0, 1], got ", dropout);
  TORCH_CHECK_VALUE(momentum >= 0.0 && momentum <= 1.0, "fastmtl.", op,
                    ": argument 'momentum' expected a value in [0, 1], got ", momentum);
  TORCH_CHECK_VALUE(eps > 0.0, "fastmtl.", op, ": argument 'eps' expected a value > 0, got ", eps);
  r.params = {weights, biases, norm_weights, norm_biases, running_means, running_vars};
  if (kind == NormKind::Batch && uses_batch_statistics(r.config, r.params))
    TORCH_CHECK_VALUE(x.size(-2) > 1, "fastmtl.", op,
                      ": argument 'x' expected more than 1 row for batch statistics (training batch norm), got "
                      "shape ",
                      shape_str(x.sizes()));
  return r;
}

template <kernels::Choice choice>
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> fused_mlp_norm_entry(
    const at::Tensor& x, const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& biases,
    const std::vector<at::Tensor>& norm_weights, const std::vector<at::Tensor>& norm_biases,
    const std::vector<at::Tensor>& running_means, const std::vector<at::Tensor>& running_vars, const std::string& norm,
    const std::string& activation, double dropout, bool training, double momentum, double eps) {
  constexpr const char* op = "fused_mlp_norm";
  Checked c = check_args(op, x, weights, biases, norm_weights, norm_biases, running_means, running_vars, norm,
                         activation, dropout, training, momentum, eps);
  c.params.weights = contiguous_all(weights);
  c.params.biases = contiguous_all(biases);
  const OpEntryGuard guard(x);
  return norm_trunk_forward(kernels::steps_for(op, x, choice), x.contiguous(), c.params, c.config);
}

template <kernels::Choice choice>
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>>
fused_mlp_norm_backward_entry(const at::Tensor& grad_out, const at::Tensor& x, const std::vector<at::Tensor>& weights,
                              const std::vector<at::Tensor>& biases, const std::vector<at::Tensor>& norm_weights,
                              const std::vector<at::Tensor>& norm_biases, const std::vector<at::Tensor>& running_means,
                              const std::vector<at::Tensor>& running_vars, const at::Tensor& out,
                              const std::vector<at::Tensor>& saved, const std::string& norm,
                              const std::string& activation, double dropout, bool training, double momentum, double eps,
                              bool need_input_grad) {
  constexpr const char* op = "fused_mlp_norm_backward";
  Checked c = check_args(op, x, weights, biases, norm_weights, norm_biases, running_means, running_vars, norm,
                         activation, dropout, training, momentum, eps);
  const int64_t rows = x.size(-2);
  const bool stacked = is_stacked(c.params);
  check_like(out, x, op, "out", "x");
  const std::vector<int64_t> out_shape = activation_shape(weights, weights.size() - 1, rows);
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef(out_shape), "fastmtl.", op, ": argument 'out' expected shape ",
                    shape_str(out_shape), ", got ", shape_str(out.sizes()));
  check_like(grad_out, out, op, "grad_out", "out");
  TORCH_CHECK_VALUE(grad_out.sizes() == out.sizes(), "fastmtl.", op, ": argument 'grad_out' expected shape ",
                    shape_str(out.sizes()), " (the shape of 'out'), got ", shape_str(grad_out.sizes()));
  const size_t expected = kSavedPerLayer * weights.size();
  TORCH_CHECK_VALUE(saved.size() == expected, "fastmtl.", op, ": argument 'saved' expected ", expected,
                    " tensors (as fused_mlp_norm returned them), got ", saved.size());
  for (size_t l = 0; l < weights.size(); ++l) {
    const std::vector<int64_t> activations = activation_shape(weights, l, rows);
    // Statistics: batch norm one per (tower,) feature; layer norm one per (tower,) row.
    std::vector<int64_t> stats =
        c.config.norm == NormKind::Layer ? std::vector<int64_t>{rows, 1} : std::vector<int64_t>{activations.back()};
    if (stacked) stats.insert(stats.begin(), weights[l].size(0));
    for (int64_t k = 0; k < kSavedPerLayer; ++k) {
      const at::Tensor& t = saved[kSavedPerLayer * l + k];
      const std::string name = indexed("saved", kSavedPerLayer * l + k);
      TORCH_CHECK_VALUE(t.device() == x.device(), "fastmtl.", op, ": argument '", name, "' expected device ",
                        x.device(), ", got ", t.device());
      if (t.numel() == 0) continue;
      const bool is_stats = k == 1 || k == 2;
      if (k == 0 || k == 3) check_like(t, x, op, name, "x");
      if (k == 4)
        TORCH_CHECK_TYPE(t.scalar_type() == at::kBool, "fastmtl.", op, ": argument '", name,
                         "' expected dtype torch.bool (a dropout mask), got ", dtype_name(t.scalar_type()));
      if (is_stats)
        TORCH_CHECK_TYPE(t.is_floating_point(), "fastmtl.", op, ": argument '", name,
                         "' expected a floating dtype (normalisation statistics), got ", dtype_name(t.scalar_type()));
      const std::vector<int64_t>& shape = is_stats ? stats : activations;
      TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(shape), "fastmtl.", op, ": argument '", name, "' expected shape ",
                        shape_str(shape), " or [0] (as fused_mlp_norm returned it), got ", shape_str(t.sizes()));
    }
    const bool needs_pre = c.config.norm != NormKind::None;
    TORCH_CHECK_VALUE(!needs_pre || saved[kSavedPerLayer * l].numel() > 0, "fastmtl.", op, ": argument '",
                      indexed("saved", kSavedPerLayer * l), "' expected the pre-normalisation ", shape_str(activations),
                      " (as fused_mlp_norm returned it), got [0]");
  }
  const OpEntryGuard guard(x);
  NormTrunkGrads g = norm_trunk_backward(kernels::steps_for(op, x, choice), grad_out.contiguous(), x.contiguous(),
                                         c.params, c.config, out.contiguous(), contiguous_all(saved), need_input_grad);
  return {g.input, g.weights, g.biases, g.norm_weights, g.norm_biases};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmtl, CPU, m) {
  m.impl("fused_mlp_norm", &fused_mlp_norm_entry<kernels::Choice::Auto>);
  m.impl("fused_mlp_norm_backward", &fused_mlp_norm_backward_entry<kernels::Choice::Auto>);
}

TORCH_LIBRARY_IMPL(fastmtl, CUDA, m) {
  m.impl("fused_mlp_norm", &fused_mlp_norm_entry<kernels::Choice::Auto>);
  m.impl("fused_mlp_norm_backward", &fused_mlp_norm_backward_entry<kernels::Choice::Auto>);
}

TORCH_LIBRARY_IMPL(fastmtl_portable, CompositeExplicitAutograd, m) {
  m.impl("fused_mlp_norm", &fused_mlp_norm_entry<kernels::Choice::ForcePortable>);
  m.impl("fused_mlp_norm_backward", &fused_mlp_norm_backward_entry<kernels::Choice::ForcePortable>);
}

}  // namespace fastmtl::ops
