#include "ops/expert_stack.h"

#include "cpu/workspace.h"

namespace fastmtl::ops {
namespace {

// Scratch slots (cpu/workspace.h): 0 the top layer's delta and the first layer's strided delta,
// 1 and 2 the cotangents walking down, 3 a recomputed layer input, 4 the first layer's GEMM output.
constexpr size_t kSlotDelta = 0, kSlotGradA = 1, kSlotInput = 3, kSlotFirstGemm = 4;

// The first layer of experts sharing x is one GEMM x [B, d0] x W0^T [d0, E * out0]: E times wider
// than each expert's, so the GEMM runs at full width instead of E narrow ones. Its output
// [B, E * cols] is read by the epilogue as the strided view [E, B, cols] (strides cols, E * cols, 1).
bool shared_first_layer(const at::Tensor& x, int64_t l) { return l == 0 && x.dim() == 2; }

at::Tensor expert_view(const at::Tensor& by_row, int64_t experts, int64_t rows, int64_t cols) {
  return by_row.view({rows, experts, cols}).permute({1, 0, 2});
}

}  // namespace

std::tuple<at::Tensor, std::vector<at::Tensor>> experts_forward(const kernels::Steps& steps, const at::Tensor& x,
                                                                const std::vector<at::Tensor>& weights,
                                                                const std::vector<at::Tensor>& biases, Activation act) {
  const int64_t num_layers = static_cast<int64_t>(weights.size());
  const int64_t experts = weights[0].size(0);
  const int64_t rows = x.size(-2);
  const bool keep_pre = saved_kind(act) == SavedKind::Pre;
  std::vector<at::Tensor> saved;
  saved.reserve(num_layers);
  at::Tensor h = x;
  for (int64_t l = 0; l < num_layers; ++l) {
    const int64_t cols = weights[l].size(1);
    const bool strided = shared_first_layer(x, l);
    at::Tensor gemm;  // [E, B, cols], a strided view for the shared first layer
    if (strided) {
      at::Tensor by_row = cpu::scratch_matrix(kSlotFirstGemm, rows, experts * cols, x.options());
      at::mm_out(by_row, x, weights[0].view({experts * cols, weights[0].size(2)}).t());
      gemm = expert_view(by_row, experts, rows, cols);
    } else {
      gemm = at::bmm(h, weights[l].transpose(1, 2));
    }
    const bool has_bias = !biases.empty();
    at::Tensor pre = strided ? at::empty({experts, rows, cols}, x.options()) : gemm;
    at::Tensor out = keep_pre ? at::empty({experts, rows, cols}, x.options()) : pre;
    // Nothing to do only for identity without bias on the contiguous layout.
    if (strided || has_bias || act != Activation::Identity || keep_pre)
      steps.expert_bias_activation(act, gemm, has_bias ? biases[l] : at::Tensor(), pre, keep_pre ? out : at::Tensor());
    if (keep_pre || l + 1 < num_layers) saved.push_back(pre);
    h = out;
  }
  return {h, saved};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> experts_backward(
    const kernels::Steps& steps, const at::Tensor& grad_out, const at::Tensor& x,
    const std::vector<at::Tensor>& weights, const at::Tensor& out, const std::vector<at::Tensor>& saved, Activation act,
    bool has_bias, bool need_input_grad) {
  const int64_t num_layers = static_cast<int64_t>(weights.size());
  const int64_t experts = weights[0].size(0);
  const int64_t rows = x.size(-2);
  const bool keep_pre = saved_kind(act) == SavedKind::Pre;
  std::vector<at::Tensor> grad_weights(num_layers);
  std::vector<at::Tensor> grad_biases(has_bias ? num_layers : 0);
  at::Tensor grad_input = at::empty({0}, x.options());

  at::Tensor grad = grad_out;  // dL/d(output of layer l) [E, B, cols], walking down
  for (int64_t l = num_layers - 1; l >= 0; --l) {
    const int64_t cols = weights[l].size(1);
    const int64_t fan_in = weights[l].size(2);
    const bool strided = shared_first_layer(x, l);
    const at::Tensor& deriv_source = keep_pre ? saved[l] : (l + 1 == num_layers ? out : saved[l]);
    at::Tensor layer_input;
    if (l == 0) {
      layer_input = x;
    } else if (keep_pre) {
      layer_input = cpu::scratch_matrix(kSlotInput, experts * rows, fan_in, x.options()).view({experts, rows, fan_in});
      steps.activation_apply(act, saved[l - 1], layer_input);
    } else {
      layer_input = saved[l - 1];
    }
    // delta: [B, E * cols] for the shared first layer (so one GEMM gives dW0 and dx; the step
    // writes it through the strided view), else [E, B, cols]: scratch for the top layer (grad_out
    // is an input: never written), else in place.
    at::Tensor delta_by_row, delta;
    if (strided) {
      delta_by_row = cpu::scratch_matrix(kSlotDelta, rows, experts * cols, x.options());
      delta = expert_view(delta_by_row, experts, rows, cols);
    } else if (act == Activation::Identity && !has_bias) {
      delta = grad;
    } else if (l + 1 == num_layers) {
      delta = cpu::scratch_matrix(kSlotDelta, experts * rows, cols, x.options()).view({experts, rows, cols});
    } else {
      delta = grad;
    }
    if (has_bias) grad_biases[l] = at::empty({experts, cols}, x.options());
    if (strided || has_bias || act != Activation::Identity)
      steps.expert_activation_backward(act, grad, deriv_source, delta, has_bias ? grad_biases[l] : at::Tensor());
    if (strided) {
      // delta [B, E * cols]: dW0 [E * cols, d0] = delta^T x; dx = delta W0 sums over the experts.
      grad_weights[0] = at::mm(delta_by_row.t(), x).view({experts, cols, fan_in});
      if (need_input_grad) grad_input = at::mm(delta_by_row, weights[0].view({experts * cols, fan_in}));
    } else {
      grad_weights[l] = at::bmm(delta.transpose(1, 2), layer_input);
      if (l > 0) {
        // Alternate between two scratch slots: the next cotangent must not overwrite delta.
        at::Tensor next_grad = cpu::scratch_matrix(kSlotGradA + (l % 2), experts * rows, fan_in, x.options())
                                   .view({experts, rows, fan_in});
        at::bmm_out(next_grad, delta, weights[l]);
        grad = next_grad;
      } else if (need_input_grad) {
        grad_input = at::bmm(delta, weights[0]);  // an output: fresh memory
      }
    }
  }
  return {grad_input, grad_weights, grad_biases};
}

}  // namespace fastmtl::ops
