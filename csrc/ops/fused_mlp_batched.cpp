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
#include <torch/library.h>

#include "common/activation.h"
#include "ops/fused_mlp_checks.h"
#include "ops/legacy_batched.h"
#include "ops/per_task_batched.h"

namespace fastmtl::ops {
namespace {

// Below this many tasks the op's own fused backward once per task is faster than the batched ATen
// chain (one thread, FusedMLP 64 -> [512, 256], B = 1024, T = 3: 25.8 against 29.4 ms a step of
// fastmtl.mtl_backward; at T = 8 on par; at T = 16 and 40, B = 128 / 64: 3.7 against 4.7 and
// 10.7 against 19.6 ms).
constexpr int64_t kMinBatchedTasks = 8;

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> fused_mlp_backward_batched(
    const at::Tensor& grad_out, const at::Tensor& x, const std::vector<at::Tensor>& weights, const at::Tensor& out,
    const std::vector<at::Tensor>& saved, const std::string& activation, bool has_bias, bool need_input_grad) {
  check_only_cotangent_batched(any_batched({&x, &out}, {&weights, &saved}), grad_out, "fused_mlp_backward", "grad_out",
                               "x, weights, out, saved");

  int64_t level = 0;
  const at::Tensor g_physical =
      physical_batch_first(grad_out, &level, "fused_mlp_backward", "grad_out");  // [T, B, out]
  check_some_cotangents(g_physical, "fused_mlp_backward", "grad_out");
  // The same checks as the op on one task's cotangent (shapes, dtypes, devices, activation).
  const Activation act = check_fused_mlp_backward_args(g_physical.select(0, 0), x, weights, out, saved, activation);
  const at::ScalarType dtype = x.scalar_type();

  const int64_t L = static_cast<int64_t>(weights.size());
  const int64_t T = g_physical.size(0);
  if (T < kMinBatchedTasks) {  // the fused backward on each task's cotangent
    static const c10::OperatorHandle op =
        c10::Dispatcher::singleton().findSchemaOrThrow("fastmtl::fused_mlp_backward", "");
    torch::jit::Stack stack{grad_out, x, weights, out, saved, activation, has_bias, need_input_grad};
    kernel_per_task(op, &stack);
    return {stack[0].toTensor(), stack[1].toTensorVector(), stack[2].toTensorVector()};
  }
  const bool pre_saved = saved_kind(act) == SavedKind::Pre;
  // The tensor act' reads for layer l, and the input of layer l.
  auto kept_of = [&](int64_t l) { return widened(pre_saved ? saved[l] : (l + 1 == L ? out : saved[l])); };
  auto input_of = [&](int64_t l) {
    if (l == 0) return widened(x);
    return pre_saved ? activation_of(widened(saved[l - 1]), act) : widened(saved[l - 1]);
  };

  std::vector<at::Tensor> grad_weights(L), grad_biases(has_bias ? L : 0);
  at::Tensor g = widened(g_physical);
  for (int64_t l = L - 1; l >= 0; --l) {
    const at::Tensor delta = through_activation(g, kept_of(l), act);  // [T, B, out_l]
    const at::Tensor a = input_of(l);                                 // [B, in_l]
    grad_weights[l] = at::matmul(delta.transpose(1, 2), a);           // [T, out_l, in_l]
    if (has_bias) grad_biases[l] = delta.sum(1);                      // [T, out_l]
    if (l > 0 || need_input_grad) {
      const at::Tensor w = widened(weights[l]);  // [out_l, in_l]
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
