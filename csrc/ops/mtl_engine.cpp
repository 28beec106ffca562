// The per-task engine ops of fastmtl's own model (mtl_trunk_gram, mtl_representation_gram,
// mtl_weighted_backward): argument checks, then the one orchestration of each (ops/engine.cpp)
// with the steps kernels/select.h picks for the device. They take what the forward ops
// (fused_mlp, multitask_head_loss) returned, so a step runs each forward once.
//
// 16-bit inputs (CUDA): the engine computes in float32 (a Gram matrix of bfloat16 gradients summed
// in bfloat16 would lose the digits the aggregators need): its inputs are widened once here, the
// Gram matrix and Jacobian come back in float32 and the gradients in their parameters' dtype.
#include <torch/library.h>

#include "kernels/select.h"
#include "ops/engine.h"
#include "ops/task_spec.h"
#include "ops/trunk_checks.h"

namespace fastmtl::ops {
namespace {

// Contiguous, and float32 for 16-bit storage (see the top of this file).
at::Tensor engine_input(const at::Tensor& t) {
  return is_16bit_float(t.scalar_type()) ? t.to(at::kFloat).contiguous() : t.contiguous();
}

std::vector<at::Tensor> engine_inputs(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(engine_input(t));
  return out;
}

GramPath check_gram_path(const char* op, const std::string& name) {
  if (name == "auto") return GramPath::Auto;
  if (name == "materialise") return GramPath::Materialise;
  if (name == "ghost") return GramPath::Ghost;
  TORCH_CHECK_VALUE(false, "fastmtl.", op, ": argument 'gram_path' expected one of auto, materialise, ghost, got '",
                    name, "'");
}

// The head side: head_weight [C, d] with C = sum of num_outputs and d the trunk's output width,
// logit_grad [B, C], and per-task vectors [T].
void check_head_side(const char* op, const at::Tensor& ref, int64_t rows, int64_t features,
                     const at::Tensor& head_weight, const at::Tensor& logit_grad, const at::Tensor& count_scale,
                     const std::vector<std::pair<const char*, const at::Tensor*>>& task_vectors,
                     c10::ArrayRef<int64_t> num_outputs) {
  TORCH_CHECK_VALUE(!num_outputs.empty(), "fastmtl.", op, ": argument 'num_outputs' expected at least one task, got 0");
  int64_t logit_cols = 0;
  for (size_t t = 0; t < num_outputs.size(); ++t) {
    TORCH_CHECK_VALUE(num_outputs[t] >= 1, "fastmtl.", op, ": argument 'num_outputs[", t, "]' expected >= 1, got ",
                      num_outputs[t]);
    logit_cols += num_outputs[t];
  }
  const int64_t tasks = static_cast<int64_t>(num_outputs.size());
  check_dim(head_weight, 2, op, "head_weight");
  check_like(head_weight, ref, op, "head_weight", "x");
  check_size(head_weight, 0, logit_cols, op, "head_weight", "sum of num_outputs");
  if (features >= 0) check_size(head_weight, 1, features, op, "head_weight", "the trunk's output width");
  check_dim(logit_grad, 2, op, "logit_grad");
  check_like(logit_grad, ref, op, "logit_grad", "x");
  if (rows >= 0) check_size(logit_grad, 0, rows, op, "logit_grad", "the batch");
  check_size(logit_grad, 1, logit_cols, op, "logit_grad", "sum of num_outputs");
  std::vector<std::pair<const char*, const at::Tensor*>> vectors{{"count_scale", &count_scale}};
  vectors.insert(vectors.end(), task_vectors.begin(), task_vectors.end());
  for (const auto& [name, t] : vectors) {
    check_dim(*t, 1, op, name);
    check_loss_like(*t, ref, op, name, "x");
    check_size(*t, 0, tasks, op, name, "one per task");
  }
}

template <kernels::Choice choice>
std::tuple<at::Tensor, at::Tensor, at::Tensor> mtl_trunk_gram_entry(
    const at::Tensor& x, const std::vector<at::Tensor>& weights, const at::Tensor& out,
    const std::vector<at::Tensor>& saved, const std::string& activation, bool has_bias, const at::Tensor& head_weight,
    const at::Tensor& logit_grad, const at::Tensor& count_scale, const at::Tensor& task_weights,
    c10::ArrayRef<int64_t> num_outputs, const std::string& gram_path, bool keep_jacobian) {
  constexpr const char* op = "mtl_trunk_gram";
  const Activation act = check_activation(op, activation);
  const GramPath path = check_gram_path(op, gram_path);
  check_trunk_weights(op, x, weights);
  check_trunk_saved(op, act, activation, x, weights, out, saved);
  check_head_side(op, x, x.size(0), weights.back().size(0), head_weight, logit_grad, count_scale,
                  {{"task_weights", &task_weights}}, num_outputs);
  const OpEntryGuard guard(x);
  TrunkGram result =
      trunk_task_gram(kernels::steps_for(op, x, choice), engine_input(x), engine_inputs(weights), engine_input(out),
                      engine_inputs(saved), act, has_bias, engine_input(head_weight), engine_input(logit_grad),
                      engine_input(count_scale), engine_input(task_weights), num_outputs.vec(), path, keep_jacobian);
  return {result.gram, result.jacobian, result.layer_paths};
}

template <kernels::Choice choice>
at::Tensor mtl_representation_gram_entry(const at::Tensor& head_weight, const at::Tensor& logit_grad,
                                         const at::Tensor& count_scale, const at::Tensor& task_weights,
                                         c10::ArrayRef<int64_t> num_outputs) {
  constexpr const char* op = "mtl_representation_gram";
  check_compute_dtype(logit_grad, op, "logit_grad");
  check_head_side(op, logit_grad, -1, -1, head_weight, logit_grad, count_scale, {{"task_weights", &task_weights}},
                  num_outputs);
  const OpEntryGuard guard(logit_grad);
  return representation_gram(kernels::steps_for(op, logit_grad, choice), engine_input(head_weight),
                             engine_input(logit_grad), engine_input(count_scale), engine_input(task_weights),
                             num_outputs.vec());
}

template <kernels::Choice choice>
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>
mtl_weighted_backward_entry(const at::Tensor& x, const std::vector<at::Tensor>& weights, const at::Tensor& out,
                            const std::vector<at::Tensor>& saved, const std::string& activation, bool has_bias,
                            const at::Tensor& head_weight, bool head_has_bias, const at::Tensor& logit_grad,
                            const at::Tensor& count_scale, const at::Tensor& head_task_weights,
                            const at::Tensor& trunk_task_weights, c10::ArrayRef<int64_t> num_outputs,
                            bool need_input_grad) {
  constexpr const char* op = "mtl_weighted_backward";
  const Activation act = check_activation(op, activation);
  check_trunk_weights(op, x, weights);
  check_trunk_saved(op, act, activation, x, weights, out, saved);
  check_head_side(op, x, x.size(0), weights.back().size(0), head_weight, logit_grad, count_scale,
                  {{"head_task_weights", &head_task_weights}, {"trunk_task_weights", &trunk_task_weights}},
                  num_outputs);
  const OpEntryGuard guard(x);
  WeightedBackward r =
      weighted_backward(kernels::steps_for(op, x, choice), engine_input(x), engine_inputs(weights), engine_input(out),
                        engine_inputs(saved), act, has_bias, engine_input(head_weight), head_has_bias,
                        engine_input(logit_grad), engine_input(count_scale), engine_input(head_task_weights),
                        engine_input(trunk_task_weights), num_outputs.vec(), need_input_grad);
  // Gradients in their parameters' dtype (a no-op unless the inputs were 16-bit).
  const at::ScalarType dtype = x.scalar_type();
  for (auto& g : r.weight_grads) g = g.to(dtype);
  for (auto& g : r.bias_grads) g = g.to(dtype);
  return {r.head_weight_grad.to(dtype), r.head_bias_grad.to(dtype), r.input_grad.to(dtype), r.weight_grads,
          r.bias_grads};
}

}  // namespace

#define FASTMTL_REGISTER_ENGINE_OPS(m, CHOICE)                               \
  m.impl("mtl_trunk_gram", &mtl_trunk_gram_entry<CHOICE>);                   \
  m.impl("mtl_representation_gram", &mtl_representation_gram_entry<CHOICE>); \
  m.impl("mtl_weighted_backward", &mtl_weighted_backward_entry<CHOICE>);

TORCH_LIBRARY_IMPL(fastmtl, CPU, m){FASTMTL_REGISTER_ENGINE_OPS(m, kernels::Choice::Auto)} TORCH_LIBRARY_IMPL(fastmtl,
                                                                                                              CUDA, m){
    FASTMTL_REGISTER_ENGINE_OPS(m, kernels::Choice::Auto)} TORCH_LIBRARY_IMPL(fastmtl_portable,
                                                                              CompositeExplicitAutograd, m) {
  FASTMTL_REGISTER_ENGINE_OPS(m, kernels::Choice::ForcePortable)
}
#undef FASTMTL_REGISTER_ENGINE_OPS

}  // namespace fastmtl::ops
