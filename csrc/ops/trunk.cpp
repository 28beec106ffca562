#include "ops/trunk.h"

#include "cpu/workspace.h"

namespace fastmtl::ops {

// One GEMM then one bias + activation pass per layer. (On CUDA, cuBLASLt's bias / ReLU epilogues
// could fold the pass into the GEMM for float32 relu layers; kept as a separate step so that every
// device runs the same orchestration and the same rounding of the pre-activation.)
std::tuple<at::Tensor, std::vector<at::Tensor>> trunk_forward(const kernels::Steps& steps, const at::Tensor& x,
                                                              const std::vector<at::Tensor>& weights,
                                                              const std::vector<at::Tensor>& biases, Activation act) {
  const int64_t num_layers = static_cast<int64_t>(weights.size());
  const bool keep_pre = saved_kind(act) == SavedKind::Pre;
  std::vector<at::Tensor> saved;
  saved.reserve(num_layers);
  at::Tensor h = x;
  for (int64_t l = 0; l < num_layers; ++l) {
    at::Tensor pre = at::mm(h, weights[l].t());
    const at::Tensor bias = biases.empty() ? at::Tensor() : biases[l];
    if (keep_pre) {
      at::Tensor out = at::empty_like(pre);
      steps.bias_activation(act, pre, bias, out);
      saved.push_back(pre);
      h = out;
    } else {
      if (bias.defined() || act != Activation::Identity) steps.bias_activation(act, pre, bias, at::Tensor());
      if (l + 1 < num_layers) saved.push_back(pre);
      h = pre;
    }
  }
  return {h, saved};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> trunk_backward(
    const kernels::Steps& steps, const at::Tensor& grad_out, const at::Tensor& x,
    const std::vector<at::Tensor>& weights, const at::Tensor& out, const std::vector<at::Tensor>& saved, Activation act,
    bool has_bias, bool need_input_grad) {
  const int64_t num_layers = static_cast<int64_t>(weights.size());
  const int64_t rows = x.size(0);
  const bool keep_pre = saved_kind(act) == SavedKind::Pre;
  std::vector<at::Tensor> grad_weights(num_layers);
  std::vector<at::Tensor> grad_biases(has_bias ? num_layers : 0);

  at::Tensor grad = grad_out;  // dL/d(output of layer l), walking down
  for (int64_t l = num_layers - 1; l >= 0; --l) {
    const int64_t cols = weights[l].size(0);
    const bool top = l + 1 == num_layers;
    // What act' reads: the pre-activation, or this layer's output.
    const at::Tensor& deriv_source = keep_pre ? saved[l] : (top ? out : saved[l]);
    // This layer's input: x, the previous layer's output, or act(previous pre-activation).
    at::Tensor layer_input;
    if (l == 0) {
      layer_input = x;
    } else if (keep_pre) {
      layer_input = cpu::scratch_matrix(3, rows, saved[l - 1].size(1), x.options());
      steps.activation_apply(act, saved[l - 1], layer_input);
    } else {
      layer_input = saved[l - 1];
    }
    // Identity leaves the gradient as it is (delta is grad, never written). Otherwise the top
    // layer's delta goes to scratch (grad_out is an input: never written); below, delta overwrites
    // the gradient buffer in place, itself scratch.
    at::Tensor delta = (act == Activation::Identity || !top) ? grad : cpu::scratch_matrix(0, rows, cols, x.options());
    if (has_bias) grad_biases[l] = at::empty({cols}, x.options());
    if (act != Activation::Identity || has_bias)
      steps.activation_backward(act, grad, deriv_source, delta, has_bias ? grad_biases[l] : at::Tensor());
    grad_weights[l] = at::mm(delta.t(), layer_input);
    if (l > 0) {
      // Alternate between two scratch slots: the next layer's gradient must not overwrite delta.
      at::Tensor next_grad = cpu::scratch_matrix(1 + (l % 2), rows, weights[l].size(1), x.options());
      at::mm_out(next_grad, delta, weights[l]);
      grad = next_grad;
    } else if (need_input_grad) {
      grad = at::mm(delta, weights[l]);  // dx is an output: fresh memory
    }
  }
  at::Tensor grad_input = need_input_grad ? grad : at::empty({0}, x.options());
  return {grad_input, grad_weights, grad_biases};
}

}  // namespace fastmtl::ops
