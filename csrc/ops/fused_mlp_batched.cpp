// The batched backward of a FusedMLP: fastmtl::fused_mlp_backward at the Batched dispatch key, the
// key of torch's legacy vmap, which torch.autograd.grad(..., is_grads_batched=True) runs on (the
// batched backward of fastmtl.mtl_backward). torch's fallback refuses an op that returns tensor
// lists, so the engine used to run the fused node once per task; here the T cotangents go down the
// layers together, over ATen GEMMs:
//
//   delta_l = act'(layer l) * g_l              [T, B, out_l]  (act' from the forward's saved tensors)
//   dW_l[t] = delta_l[t]^T a_l                  [T, out_l, in_l], one batched GEMM
//   db_l[t] = sum_b delta_l[t, b]               [T, out_l]
//   g_{l-1} = delta_l W_l                        [T B, in_l] rows of one GEMM
//
// with a_l the layer's input (x, or the previous layer's output: saved for relu / tanh / identity,
// recomputed from the saved pre-activation for gelu / silu, as the op's own backward does). 16-bit
// inputs compute in float32 and round once, as the op does. Only the cotangent may be batched: the
// other arguments are the forward's saved tensors; a call with any of them batched (a vmap over the
// op's inputs) is refused, naming the argument.
#include <ATen/ATen.h>
#include <ATen/LegacyBatchedTensorImpl.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "common/activation.h"
#include "ops/fused_mlp_checks.h"

namespace fastmtl::ops {
namespace {

using BackwardResult = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>;

// The physical tensor of a legacy BatchedTensor with its (single) batch dimension first, and its level.
at::Tensor physical_batch_first(const at::Tensor& t, int64_t* level) {
  const at::BatchedTensorImpl* impl = at::maybeGetBatchedImpl(t);
  TORCH_CHECK(impl != nullptr && impl->bdims().size() == 1,
              "fastmtl.fused_mlp_backward: argument 'grad_out' expected one vmap level, got nested vmaps");
  *level = impl->bdims()[0].level();
  return impl->value().movedim(impl->bdims()[0].dim(), 0);
}

at::Tensor batched_at(const at::Tensor& physical, int64_t level) {
  return at::makeBatched(physical, at::BatchDims{at::BatchDim(level, 0)});
}

at::Tensor activation_of(const at::Tensor& pre, Activation act) {
  switch (act) {
    case Activation::Gelu:
      return at::gelu(pre, "none");
    case Activation::GeluTanh:
      return at::gelu(pre, "tanh");
    case Activation::Silu:
      return at::silu(pre);
    default:
      return pre;  // not reached: the post-activation kinds save the output itself
  }
}

// act'(layer) * g for T cotangents g [T, B, n]; ``kept`` the layer's saved tensor [B, n] (its output
// for relu / tanh / identity, its pre-activation for gelu / silu).
at::Tensor through_activation(const at::Tensor& g, const at::Tensor& kept, Activation act) {
  const at::Tensor k = kept.unsqueeze(0).expand_as(g);
  switch (act) {
    case Activation::Relu:
      return at::threshold_backward(g, k, 0);
    case Activation::Tanh:
      return at::tanh_backward(g, k);
    case Activation::Identity:
      return g;
    case Activation::Gelu:
      return at::gelu_backward(g, k, "none");
    case Activation::GeluTanh:
      return at::gelu_backward(g, k, "tanh");
    case Activation::Silu:
      return at::silu_backward(g, k);
  }
  return g;
}

// Below this many tasks the op's own fused backward once per task is faster than the batched ATen
// chain (one thread, FusedMLP 64 -> [512, 256], B = 1024, T = 3: 25.8 against 29.4 ms a step of
// fastmtl.mtl_backward; at T = 8 on par; at T = 16 and 40, B = 128 / 64: 3.7 against 4.7 and
// 10.7 against 19.6 ms).
constexpr int64_t kMinBatchedTasks = 8;

// The op on each task's cotangent (the CPU / CUDA kernel: the slices are plain tensors), stacked.
BackwardResult per_task(const at::Tensor& g_physical, const at::Tensor& x, const std::vector<at::Tensor>& weights,
                        const at::Tensor& out, const std::vector<at::Tensor>& saved, const std::string& activation,
                        bool has_bias, bool need_input_grad, int64_t level) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastmtl::fused_mlp_backward", "")
          .typed<BackwardResult(const at::Tensor&, const at::Tensor&, const std::vector<at::Tensor>&, const at::Tensor&,
                                const std::vector<at::Tensor>&, const std::string&, bool, bool)>();
  std::vector<at::Tensor> grad_x;
  std::vector<std::vector<at::Tensor>> grad_weights(weights.size()), grad_biases(has_bias ? weights.size() : 0);
  for (int64_t t = 0; t < g_physical.size(0); ++t) {
    auto [gx, gw, gb] = op.call(g_physical[t], x, weights, out, saved, activation, has_bias, need_input_grad);
    if (need_input_grad) grad_x.push_back(gx);
    for (size_t l = 0; l < gw.size(); ++l) grad_weights[l].push_back(gw[l]);
    for (size_t l = 0; l < gb.size(); ++l) grad_biases[l].push_back(gb[l]);
  }
  std::vector<at::Tensor> weights_out, biases_out;
  for (auto& per : grad_weights) weights_out.push_back(batched_at(at::stack(per), level));
  for (auto& per : grad_biases) biases_out.push_back(batched_at(at::stack(per), level));
  return {need_input_grad ? batched_at(at::stack(grad_x), level) : x.new_empty({0}), weights_out, biases_out};
}

BackwardResult fused_mlp_backward_batched(const at::Tensor& grad_out, const at::Tensor& x,
                                          const std::vector<at::Tensor>& weights, const at::Tensor& out,
                                          const std::vector<at::Tensor>& saved, const std::string& activation,
                                          bool has_bias, bool need_input_grad) {
  bool others_batched = at::isBatchedTensor(x) || at::isBatchedTensor(out);
  for (const auto& w : weights) others_batched = others_batched || at::isBatchedTensor(w);
  for (const auto& s : saved) others_batched = others_batched || at::isBatchedTensor(s);
  TORCH_CHECK(!others_batched && at::isBatchedTensor(grad_out),
              "fastmtl.fused_mlp_backward: a vmap over the forward's tensors (x, weights, out, saved) is not "
              "supported; only the cotangent 'grad_out' may be batched (torch.autograd.grad with "
              "is_grads_batched=True, as fastmtl.mtl_backward does)");

  int64_t level = 0;
  const at::Tensor g_physical = physical_batch_first(grad_out, &level);  // [T, B, out_L]
  // The same checks as the op on one task's cotangent (shapes, dtypes, devices, activation).
  const Activation act = check_fused_mlp_backward_args(g_physical.select(0, 0), x, weights, out, saved, activation);
  const at::ScalarType dtype = x.scalar_type();
  const bool narrow = dtype == at::kBFloat16 || dtype == at::kHalf;
  auto wide = [&](const at::Tensor& t) { return narrow ? t.to(at::kFloat) : t; };

  const int64_t L = static_cast<int64_t>(weights.size());
  const int64_t T = g_physical.size(0);
  if (T < kMinBatchedTasks)
    return per_task(g_physical, x, weights, out, saved, activation, has_bias, need_input_grad, level);
  const bool pre_saved = saved_kind(act) == SavedKind::Pre;
  // The tensor act' reads for layer l, and the input of layer l.
  auto kept_of = [&](int64_t l) { return wide(pre_saved ? saved[l] : (l + 1 == L ? out : saved[l])); };
  auto input_of = [&](int64_t l) {
    if (l == 0) return wide(x);
    return pre_saved ? activation_of(wide(saved[l - 1]), act) : wide(saved[l - 1]);
  };

  std::vector<at::Tensor> grad_weights(L), grad_biases(has_bias ? L : 0);
  at::Tensor g = wide(g_physical);
  for (int64_t l = L - 1; l >= 0; --l) {
    const at::Tensor delta = through_activation(g, kept_of(l), act);  // [T, B, out_l]
    const at::Tensor a = input_of(l);                                 // [B, in_l]
    grad_weights[l] = at::matmul(delta.transpose(1, 2), a);           // [T, out_l, in_l]
    if (has_bias) grad_biases[l] = delta.sum(1);                      // [T, out_l]
    if (l > 0 || need_input_grad) {
      const at::Tensor w = wide(weights[l]);  // [out_l, in_l]
      g = at::matmul(delta.reshape({-1, delta.size(2)}), w).view({T, delta.size(1), w.size(1)});
    }
  }
  for (auto& t : grad_weights) t = batched_at(t.to(dtype), level);
  for (auto& t : grad_biases) t = batched_at(t.to(dtype), level);
  at::Tensor grad_x = need_input_grad ? batched_at(g.to(dtype), level) : x.new_empty({0});
  return {grad_x, grad_weights, grad_biases};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmtl, Batched, m) { m.impl("fused_mlp_backward", &fused_mlp_backward_batched); }

}  // namespace fastmtl::ops
