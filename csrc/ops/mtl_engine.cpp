// The per-task engine ops of fastmtl's own model (mtl_trunk_gram, mtl_representation_gram,
// mtl_weighted_backward): argument checks and device dispatch. They take what the forward ops
// (fused_mlp, multitask_head_loss) returned, so a step runs each forward once.
#include <torch/library.h>

#include "cpu/mtl_engine.h"
#include "ops/task_spec.h"
#include "ops/trunk_checks.h"

namespace fastmtl::ops {
namespace {

cpu::GramPath check_gram_path(const char* op, const std::string& name) {
  if (name == "auto") return cpu::GramPath::Auto;
  if (name == "materialise") return cpu::GramPath::Materialise;
  if (name == "ghost") return cpu::GramPath::Ghost;
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
    check_like(*t, ref, op, name, "x");
    check_size(*t, 0, tasks, op, name, "one per task");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mtl_trunk_gram_entry(
    const at::Tensor& x, const std::vector<at::Tensor>& weights, const at::Tensor& out,
    const std::vector<at::Tensor>& saved, const std::string& activation, bool has_bias, const at::Tensor& head_weight,
    const at::Tensor& logit_grad, const at::Tensor& count_scale, const at::Tensor& task_weights,
    c10::ArrayRef<int64_t> num_outputs, const std::string& gram_path, bool keep_jacobian) {
  constexpr const char* op = "mtl_trunk_gram";
  const Activation act = check_activation(op, activation);
  const cpu::GramPath path = check_gram_path(op, gram_path);
  check_trunk_weights(op, x, weights);
  check_trunk_saved(op, act, activation, x, weights, out, saved);
  check_head_side(op, x, x.size(0), weights.back().size(0), head_weight, logit_grad, count_scale,
                  {{"task_weights", &task_weights}}, num_outputs);
  if (!x.is_cpu()) no_kernel_for_device(op, x, "x");
  cpu::TrunkGram result = cpu::trunk_task_gram(
      x.contiguous(), contiguous_all(weights), out.contiguous(), contiguous_all(saved), act, has_bias,
      head_weight.contiguous(), logit_grad.contiguous(), count_scale.contiguous(), task_weights.contiguous(),
      num_outputs.vec(), path, keep_jacobian);
  return {result.gram, result.jacobian, result.layer_paths};
}

at::Tensor mtl_representation_gram_entry(const at::Tensor& head_weight, const at::Tensor& logit_grad,
                                         const at::Tensor& count_scale, const at::Tensor& task_weights,
                                         c10::ArrayRef<int64_t> num_outputs) {
  constexpr const char* op = "mtl_representation_gram";
  check_float_dtype(logit_grad, op, "logit_grad");
  check_head_side(op, logit_grad, -1, -1, head_weight, logit_grad, count_scale, {{"task_weights", &task_weights}},
                  num_outputs);
  if (!logit_grad.is_cpu()) no_kernel_for_device(op, logit_grad, "logit_grad");
  return cpu::representation_gram(head_weight.contiguous(), logit_grad.contiguous(), count_scale.contiguous(),
                                  task_weights.contiguous(), num_outputs.vec());
}

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
  if (!x.is_cpu()) no_kernel_for_device(op, x, "x");
  cpu::WeightedBackward r = cpu::weighted_backward(
      x.contiguous(), contiguous_all(weights), out.contiguous(), contiguous_all(saved), act, has_bias,
      head_weight.contiguous(), head_has_bias, logit_grad.contiguous(), count_scale.contiguous(),
      head_task_weights.contiguous(), trunk_task_weights.contiguous(), num_outputs.vec(), need_input_grad);
  return {r.head_weight_grad, r.head_bias_grad, r.input_grad, r.weight_grads, r.bias_grads};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmtl, CPU, m) {
  m.impl("mtl_trunk_gram", &mtl_trunk_gram_entry);
  m.impl("mtl_representation_gram", &mtl_representation_gram_entry);
  m.impl("mtl_weighted_backward", &mtl_weighted_backward_entry);
}

TORCH_LIBRARY_IMPL(fastmtl, CUDA, m) {
  m.impl("mtl_trunk_gram", &mtl_trunk_gram_entry);
  m.impl("mtl_representation_gram", &mtl_representation_gram_entry);
  m.impl("mtl_weighted_backward", &mtl_weighted_backward_entry);
}

}  // namespace fastmtl::ops
