#include "cpu/fused_mlp.h"

#include "cpu/epilogue.h"
#include "cpu/workspace.h"

namespace fastmtl::cpu {

std::tuple<at::Tensor, std::vector<at::Tensor>> fused_mlp_forward(
    const at::Tensor& x, const std::vector<at::Tensor>& weights,
    const std::vector<at::Tensor>& biases, Activation act) {
  const int64_t num_layers = static_cast<int64_t>(weights.size());
  const int64_t rows = x.size(0);
  const bool keep_pre = saved_kind(act) == SavedKind::Pre;
  std::vector<at::Tensor> saved;
  saved.reserve(num_layers);
  at::Tensor h = x;
  for (int64_t l = 0; l < num_layers; ++l) {
    const int64_t cols = weights[l].size(0);
    at::Tensor pre = at::mm(h, weights[l].t());
    const at::Tensor* bias = biases.empty() ? nullptr : &biases[l];
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmtl_fused_mlp_forward", [&] {
      const scalar_t* b = bias ? bias->const_data_ptr<scalar_t>() : nullptr;
      if (keep_pre) {
        at::Tensor out = at::empty_like(pre);
        bias_activation_forward<scalar_t>(act, rows, cols, pre.mutable_data_ptr<scalar_t>(), b,
                                          out.mutable_data_ptr<scalar_t>());
        saved.push_back(pre);
        h = out;
      } else {
        if (b || act != Activation::Identity)
          bias_activation_forward<scalar_t>(act, rows, cols, pre.mutable_data_ptr<scalar_t>(), b, nullptr);
        if (l + 1 < num_layers) saved.push_back(pre);
        h = pre;
      }
    });
  }
  return {h, saved};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> fused_mlp_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const std::vector<at::Tensor>& weights,
    const at::Tensor& out, const std::vector<at::Tensor>& saved, Activation act,
    bool has_bias, bool need_input_grad) {
  const int64_t num_layers = static_cast<int64_t>(weights.size());
  const int64_t rows = x.size(0);
  const bool keep_pre = saved_kind(act) == SavedKind::Pre;
  std::vector<at::Tensor> grad_weights(num_layers);
  std::vector<at::Tensor> grad_biases(has_bias ? num_layers : 0);

  at::Tensor grad = grad_out;  // dL/d(output of layer l), walking down
  for (int64_t l = num_layers - 1; l >= 0; --l) {
    const int64_t cols = weights[l].size(0);
    // What act' reads: the pre-activation, or this layer's output.
    const at::Tensor& deriv_source = keep_pre ? saved[l] : (l + 1 == num_layers ? out : saved[l]);
    // This layer's input: x, the previous layer's output, or act(previous pre-activation).
    at::Tensor layer_input;
    if (l == 0) {
      layer_input = x;
    } else if (keep_pre) {
      layer_input = scratch_matrix(3, rows, saved[l - 1].size(1), x.options());
    } else {
      layer_input = saved[l - 1];
    }
    // The top layer's delta goes to scratch (grad_out is an input: never written); below, delta
    // overwrites the gradient buffer in place, itself scratch.
    at::Tensor delta = (l + 1 == num_layers) ? scratch_matrix(0, rows, cols, x.options()) : grad;
    if (has_bias) grad_biases[l] = at::empty({cols}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastmtl_fused_mlp_backward", [&] {
      if (l > 0 && keep_pre) {
        activation_apply<scalar_t>(act, saved[l - 1].numel(), saved[l - 1].const_data_ptr<scalar_t>(),
                                   layer_input.mutable_data_ptr<scalar_t>());
      }
      if (act == Activation::Identity && !has_bias) {
        delta = grad;
      } else {
        activation_backward<scalar_t>(
            act, rows, cols, grad.const_data_ptr<scalar_t>(), deriv_source.const_data_ptr<scalar_t>(),
            delta.mutable_data_ptr<scalar_t>(),
            has_bias ? grad_biases[l].mutable_data_ptr<scalar_t>() : nullptr);
      }
    });
    grad_weights[l] = at::mm(delta.t(), layer_input);
    if (l > 0) {
      // Alternate between two scratch slots: the next layer's gradient must not overwrite delta.
      at::Tensor next_grad = scratch_matrix(1 + (l % 2), rows, weights[l].size(1), x.options());
      at::mm_out(next_grad, delta, weights[l]);
      grad = next_grad;
    } else if (need_input_grad) {
      grad = at::mm(delta, weights[l]);  // dx is an output: fresh memory
    }
  }
  at::Tensor grad_input = need_input_grad ? grad : at::empty({0}, x.options());
  return {grad_input, grad_weights, grad_biases};
}

}  // namespace fastmtl::cpu
