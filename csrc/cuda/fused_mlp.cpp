// fastmtl::fused_mlp and its backward on CUDA: the shared argument checks, then per layer one
// cuBLAS GEMM (through ATen, on the current stream, outputs from the caching allocator) and one
// fused epilogue kernel (epilogue.cu). No host synchronisation: capturable in a CUDA graph.
//
// cuBLASLt epilogues: a layer's bias goes into the GEMM (at::addmm, which ATen runs as one cuBLASLt
// call with the bias epilogue), and relu with a bias is at::_addmm_activation, one cuBLASLt call
// with the bias + ReLU epilogue (ATen falls back to addmm + relu where cuBLASLt cannot). Not for
// float64: there addmm first copies the bias into the output, so the bias is added by the fused
// bias + activation kernel instead. gelu's cuBLASLt epilogue is the tanh approximation only and,
// like silu and tanh, the pre-activation it would have to return (the aux output) is not exposed
// by ATen, so those layers take the GEMM plus one activation kernel that writes both. Backward: the
// DRELU/DGELU + bias-gradient epilogues are not exposed by ATen either; the activation derivative
// and the deterministic bias gradient are one kernel per layer (epilogue.cu).
#include <torch/library.h>

#include "cuda/glue.h"
#include "ops/fused_mlp_checks.h"

namespace fastmtl::cuda {
namespace {

using ops::contiguous_all;

std::tuple<at::Tensor, std::vector<at::Tensor>> forward(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                                                        const std::vector<at::Tensor>& biases, Activation act) {
  const int64_t num_layers = static_cast<int64_t>(weights.size());
  const int64_t rows = x.size(0);
  const bool keep_pre = saved_kind(act) == SavedKind::Pre;
  const cudaStream_t stream = current_stream(x);
  std::vector<at::Tensor> saved;
  saved.reserve(num_layers);
  at::Tensor h = x;
  for (int64_t l = 0; l < num_layers; ++l) {
    const int64_t cols = weights[l].size(0);
    const at::Tensor* bias = biases.empty() ? nullptr : &biases[l];
    const bool last = l + 1 == num_layers;
    const bool bias_in_gemm = bias && x.scalar_type() != at::kDouble;
    if (bias_in_gemm && (act == Activation::Relu || act == Activation::Identity)) {
      at::Tensor y = act == Activation::Relu ? at::_addmm_activation(*bias, h, weights[l].t())
                                             : at::addmm(*bias, h, weights[l].t());
      if (!last) saved.push_back(y);
      h = y;
      continue;
    }
    at::Tensor pre = bias_in_gemm ? at::addmm(*bias, h, weights[l].t()) : at::mm(h, weights[l].t());
    if (bias_in_gemm) bias = nullptr;  // already added
    FASTMTL_DISPATCH_CUDA_FLOATING_TYPES(x.scalar_type(), "fastmtl_fused_mlp_forward_cuda", [&] {
      using K = kernel_t<scalar_t>;
      const K* b = bias ? kernel_ptr<scalar_t>(*bias) : nullptr;
      if (keep_pre) {
        at::Tensor out = at::empty_like(pre);
        check_launch(bias_activation_forward<K>(act, rows, cols, kernel_mutable_ptr<scalar_t>(pre), b,
                                                kernel_mutable_ptr<scalar_t>(out), stream));
        saved.push_back(pre);
        h = out;
      } else {
        if (b || act != Activation::Identity)
          check_launch(bias_activation_forward<K>(act, rows, cols, kernel_mutable_ptr<scalar_t>(pre), b, nullptr, stream));
        if (!last) saved.push_back(pre);
        h = pre;
      }
    });
  }
  return {h, saved};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> backward(
    const at::Tensor& grad_out, const at::Tensor& x, const std::vector<at::Tensor>& weights, const at::Tensor& out,
    const std::vector<at::Tensor>& saved, Activation act, bool has_bias, bool need_input_grad) {
  const int64_t num_layers = static_cast<int64_t>(weights.size());
  const int64_t rows = x.size(0);
  const bool keep_pre = saved_kind(act) == SavedKind::Pre;
  const cudaStream_t stream = current_stream(x);
  std::vector<at::Tensor> grad_weights(num_layers);
  std::vector<at::Tensor> grad_biases(has_bias ? num_layers : 0);

  at::Tensor grad = grad_out;  // dL/d(output of layer l), walking down
  for (int64_t l = num_layers - 1; l >= 0; --l) {
    const int64_t cols = weights[l].size(0);
    const bool top = l + 1 == num_layers;
    // What act' reads: the pre-activation, or this layer's output.
    const at::Tensor& deriv_source = keep_pre ? saved[l] : (top ? out : saved[l]);
    // Identity leaves the gradient as it is. Otherwise the top layer's delta is fresh memory
    // (grad_out is an input, never written); below, delta overwrites the gradient, our own buffer.
    at::Tensor delta = (act == Activation::Identity || !top) ? grad : at::empty_like(grad);
    at::Tensor layer_input = l == 0 ? x : (keep_pre ? at::empty_like(saved[l - 1]) : saved[l - 1]);
    if (has_bias) grad_biases[l] = at::empty({cols}, x.options());
    FASTMTL_DISPATCH_CUDA_FLOATING_TYPES(x.scalar_type(), "fastmtl_fused_mlp_backward_cuda", [&] {
      using K = kernel_t<scalar_t>;
      if (l > 0 && keep_pre) {
        check_launch(activation_apply<K>(act, saved[l - 1].numel(), kernel_ptr<scalar_t>(saved[l - 1]),
                                         kernel_mutable_ptr<scalar_t>(layer_input), stream));
      }
      if (act == Activation::Identity && !has_bias) return;
      at::Tensor workspace;
      if (has_bias) workspace = at::empty({column_sum_workspace(rows, cols)}, x.options().dtype(at::kDouble));
      check_launch(activation_backward<K>(act, rows, cols, kernel_ptr<scalar_t>(grad), kernel_ptr<scalar_t>(deriv_source),
                                          kernel_mutable_ptr<scalar_t>(delta),
                                          has_bias ? kernel_mutable_ptr<scalar_t>(grad_biases[l]) : nullptr,
                                          has_bias ? workspace.mutable_data_ptr<double>() : nullptr, stream));
    });
    grad_weights[l] = at::mm(delta.t(), layer_input);
    if (l > 0 || need_input_grad) grad = at::mm(delta, weights[l]);
  }
  at::Tensor grad_input = need_input_grad ? grad : at::empty({0}, x.options());
  return {grad_input, grad_weights, grad_biases};
}

std::tuple<at::Tensor, std::vector<at::Tensor>> fused_mlp_entry(const at::Tensor& x,
                                                                const std::vector<at::Tensor>& weights,
                                                                const std::vector<at::Tensor>& biases,
                                                                const std::string& activation) {
  const Activation act = ops::check_fused_mlp_args(x, weights, biases, activation);
  const c10::cuda::CUDAGuard device_guard(x.device());
  return forward(x.contiguous(), contiguous_all(weights), contiguous_all(biases), act);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> fused_mlp_backward_entry(
    const at::Tensor& grad_out, const at::Tensor& x, const std::vector<at::Tensor>& weights, const at::Tensor& out,
    const std::vector<at::Tensor>& saved, const std::string& activation, bool has_bias, bool need_input_grad) {
  const Activation act = ops::check_fused_mlp_backward_args(grad_out, x, weights, out, saved, activation);
  const c10::cuda::CUDAGuard device_guard(x.device());
  return backward(grad_out.contiguous(), x.contiguous(), contiguous_all(weights), out.contiguous(),
                  contiguous_all(saved), act, has_bias, need_input_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmtl, CUDA, m) {
  m.impl("fused_mlp", &fused_mlp_entry);
  m.impl("fused_mlp_backward", &fused_mlp_backward_entry);
}

}  // namespace fastmtl::cuda
