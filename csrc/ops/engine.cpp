#include "ops/engine.h"

#include <ATen/Parallel.h>

#include "ops/trunk.h"

namespace fastmtl::ops {
namespace {

// Columns of X per materialised chunk of the T weight gradients [T*d_out, chunk]: half the batch's
// rows, so the chunk stays at half the cotangent buffer [B*T, d_out] it is computed from (the sum of
// the chunks' Grams is the layer's Gram: chunks split the parameters). At least 128 columns: narrower
// GEMMs and more [T, T] Gram updates measured 5-10% slower at issue 5's sizes (a quarter of the
// rows, 64 columns at B = 256), for 2.5 MB less peak memory.
int64_t materialise_chunk(int64_t rows, int64_t d_in) { return std::min(d_in, std::max<int64_t>(rows / 2, 128)); }

// Rows of the [B*T, d] cotangent matrix per step of the in-place propagation below: a quarter, so
// that the scratch is a quarter of the buffer while each GEMM still has >= B*T/4 rows.
int64_t propagation_chunk(int64_t total_rows) { return std::max<int64_t>(1, (total_rows + 3) / 4); }

// cotangents [R, d_out] (the first R*d_out entries of `storage`) := cotangents W, [R, d_in], written
// over the same storage (sized R * max width): one GEMM per row chunk into `scratch`, copied back.
// The copy never lands on rows still to be read: with d_in <= d_out, chunk [r0, r1) goes to
// [r0*d_in, r1*d_in), below the unread [r1*d_out, ...), so chunks go upwards; with d_in > d_out
// they go downwards, the unread [0, r0*d_out) lying below [r0*d_in, ...). This keeps the engine at
// one [B*T, d] buffer instead of two (the old and the new cotangents).
void propagate_in_place(at::Tensor& storage, int64_t total_rows, int64_t d_out, const at::Tensor& weight,
                        at::Tensor& scratch) {
  const int64_t d_in = weight.size(1);
  const int64_t chunk = propagation_chunk(total_rows);
  const at::Tensor source = storage.narrow(0, 0, total_rows * d_out).view({total_rows, d_out});
  const int64_t num_chunks = (total_rows + chunk - 1) / chunk;
  for (int64_t i = 0; i < num_chunks; ++i) {
    const int64_t c = d_in <= d_out ? i : num_chunks - 1 - i;
    const int64_t r0 = c * chunk, count = std::min(chunk, total_rows - r0);
    at::Tensor product = scratch.narrow(0, 0, count * d_in).view({count, d_in});
    at::mm_out(product, source.narrow(0, r0, count), weight);
    storage.narrow(0, r0 * d_in, count * d_in).view({count, d_in}).copy_(product);
  }
}

// Tasks per ghost chunk: K delta for a chunk of tasks is [B, chunk*d_out], at most a quarter of
// the cotangent buffer.
int64_t ghost_task_chunk(int64_t tasks) { return std::max<int64_t>(1, (tasks + 3) / 4); }

}  // namespace

double materialise_cost(int64_t tasks, int64_t rows, int64_t d_in, int64_t d_out) {
  const double params = double(d_in) * double(d_out);
  return double(tasks) * double(rows) * params + double(tasks) * double(tasks) * params;
}

double ghost_cost(int64_t tasks, int64_t rows, int64_t d_in, int64_t d_out) {
  const double b = double(rows), t = double(tasks);
  return b * b * double(d_in) + t * b * b * double(d_out) + t * t * b * double(d_out);
}

TrunkGram trunk_task_gram(const kernels::Steps& steps, const at::Tensor& x, const std::vector<at::Tensor>& weights,
                          const at::Tensor& out, const std::vector<at::Tensor>& saved, Activation act, bool has_bias,
                          const at::Tensor& head_weight, const at::Tensor& logit_grad, const at::Tensor& count_scale,
                          const at::Tensor& task_weights, const std::vector<int64_t>& num_outputs, GramPath path,
                          bool keep_jacobian) {
  const int64_t num_layers = static_cast<int64_t>(weights.size());
  const int64_t rows = x.size(0);
  const int64_t tasks = static_cast<int64_t>(num_outputs.size());
  const int64_t features = head_weight.size(1);
  const bool keep_pre = saved_kind(act) == SavedKind::Pre;
  const auto options = x.options();

  // Row b*T + t: task t's cotangent of row b of the current layer's output. One storage for every
  // layer's cotangents (sized for the widest), overwritten layer by layer.
  int64_t max_width = features;
  for (int64_t l = 1; l < num_layers; ++l) max_width = std::max(max_width, weights[l].size(1));
  at::Tensor storage = at::empty({rows * tasks * max_width}, options);

  // Each layer's Gram path, then one scratch for the largest temporary any layer needs (the
  // propagation's row chunk, a materialised chunk of the T gradients, or K delta for a task chunk).
  std::vector<GramPath> chosen(num_layers);
  int64_t scratch_size = propagation_chunk(rows * tasks) * max_width;
  for (int64_t l = 0; l < num_layers; ++l) {
    const int64_t d_out = weights[l].size(0), d_in = weights[l].size(1);
    chosen[l] = keep_jacobian ? GramPath::Materialise : path;  // the Jacobian is the materialised g_t
    if (chosen[l] == GramPath::Auto)
      chosen[l] = ghost_cost(tasks, rows, d_in, d_out) < materialise_cost(tasks, rows, d_in, d_out)
                      ? GramPath::Ghost
                      : GramPath::Materialise;
    const int64_t need = chosen[l] == GramPath::Materialise ? tasks * d_out * materialise_chunk(rows, d_in)
                                                            : rows * ghost_task_chunk(tasks) * d_out;
    scratch_size = std::max(scratch_size, need);
  }
  at::Tensor scratch = at::empty({scratch_size}, options);
  at::Tensor grad = storage.narrow(0, 0, rows * tasks * features).view({rows * tasks, features});
  steps.task_cotangents(num_outputs, logit_grad, steps.column_scale(num_outputs, task_weights, count_scale),
                        head_weight, grad);

  // Jacobian column offsets, in FusedMLP.parameters() order: every weight, then every bias.
  std::vector<int64_t> weight_offset(num_layers), bias_offset(num_layers);
  int64_t num_params = 0;
  for (int64_t l = 0; l < num_layers; ++l)
    weight_offset[l] = std::exchange(num_params, num_params + weights[l].numel());
  if (has_bias)
    for (int64_t l = 0; l < num_layers; ++l)
      bias_offset[l] = std::exchange(num_params, num_params + weights[l].size(0));

  TrunkGram result;
  result.gram = at::zeros({tasks, tasks}, options);
  result.jacobian = keep_jacobian ? at::empty({tasks, num_params}, options) : at::empty({0}, options);
  result.layer_paths = at::empty({num_layers}, at::kLong);
  int64_t* paths = result.layer_paths.mutable_data_ptr<int64_t>();

  for (int64_t l = num_layers - 1; l >= 0; --l) {
    const int64_t d_out = weights[l].size(0), d_in = weights[l].size(1);
    const at::Tensor& deriv_source = keep_pre ? saved[l] : (l + 1 == num_layers ? out : saved[l]);
    at::Tensor layer_input;
    if (l == 0) {
      layer_input = x;
    } else if (keep_pre) {
      layer_input = at::empty({rows, d_in}, options);  // act(pre-activation), recomputed as in backward
    } else {
      layer_input = saved[l - 1];
    }
    // delta = grad * act'(...) overwrites grad in place (it is this function's own buffer).
    at::Tensor bias_grad = has_bias ? at::empty({tasks, d_out}, options) : at::Tensor();
    if (l > 0 && keep_pre) steps.activation_apply(act, saved[l - 1], layer_input);
    if (act != Activation::Identity || has_bias)
      steps.activation_backward_tasks(act, grad.view({rows, tasks, d_out}), deriv_source,
                                      grad.view({rows, tasks, d_out}), has_bias ? bias_grad : at::Tensor());
    const at::Tensor& delta = grad;

    paths[l] = static_cast<int64_t>(chosen[l]);
    const at::Tensor delta_rows = delta.view({rows, tasks * d_out});
    if (chosen[l] == GramPath::Materialise) {
      // All T weight gradients of a chunk of input columns in one GEMM: [T*d_out, B] x [B, chunk],
      // row t*d_out + i of task t, i.e. [T, d_out*chunk] with task t's entries in row t.
      const int64_t chunk = materialise_chunk(rows, d_in);
      for (int64_t c0 = 0; c0 < d_in; c0 += chunk) {
        const int64_t width = std::min(chunk, d_in - c0);
        at::Tensor per_task = scratch.narrow(0, 0, tasks * d_out * width).view({tasks * d_out, width});
        at::mm_out(per_task, delta_rows.t(), layer_input.narrow(1, c0, width));
        per_task = per_task.view({tasks, d_out * width});
        result.gram.addmm_(per_task, per_task.t());
        if (keep_jacobian)
          result.jacobian.narrow(1, weight_offset[l], d_out * d_in)
              .view({tasks, d_out, d_in})
              .narrow(2, c0, width)
              .copy_(per_task.view({tasks, d_out, width}));
      }
      if (has_bias) result.gram.addmm_(bias_grad, bias_grad.t());
      if (keep_jacobian && has_bias) result.jacobian.narrow(1, bias_offset[l], d_out).copy_(bias_grad);
    } else {
      // <delta_s^T X, delta_t^T X> = <delta_s, (X X^T) delta_t>; the bias gradients sum_b delta add
      // <delta_s, 1 1^T delta_t>, hence K + 1. Per chunk of tasks c: K delta_c, then
      // G[:, c] = sum over rows b of delta_b (K delta_c)_b^T, a batch of [T, d_out] x [d_out, |c|].
      at::Tensor kernel = at::mm(layer_input, layer_input.t());
      if (has_bias) kernel.add_(1);
      const at::Tensor delta_by_row = delta.view({rows, tasks, d_out});
      const int64_t chunk = ghost_task_chunk(tasks);
      for (int64_t t0 = 0; t0 < tasks; t0 += chunk) {
        const int64_t count = std::min(chunk, tasks - t0);
        at::Tensor kernel_delta = scratch.narrow(0, 0, rows * count * d_out).view({rows, count * d_out});
        at::mm_out(kernel_delta, kernel, delta_rows.narrow(1, t0 * d_out, count * d_out));
        const at::Tensor by_row = at::bmm(delta_by_row, kernel_delta.view({rows, count, d_out}).transpose(1, 2));
        result.gram.narrow(1, t0, count).add_(by_row.sum(0));
      }
    }
    if (l > 0) {  // all tasks' cotangents of the layer's input
      propagate_in_place(storage, rows * tasks, d_out, weights[l], scratch);
      grad = storage.narrow(0, 0, rows * tasks * d_in).view({rows * tasks, d_in});
    }
  }
  // Both paths are symmetric in exact arithmetic, not in rounding; the aggregators expect symmetry.
  result.gram = (result.gram + result.gram.t()).mul_(0.5);
  return result;
}

at::Tensor representation_gram(const kernels::Steps& steps, const at::Tensor& head_weight, const at::Tensor& logit_grad,
                               const at::Tensor& count_scale, const at::Tensor& task_weights,
                               const std::vector<int64_t>& num_outputs) {
  const int64_t logit_cols = logit_grad.size(1);
  const int64_t tasks = static_cast<int64_t>(num_outputs.size());
  at::Tensor scaled = at::empty_like(logit_grad);
  steps.scale_columns(logit_grad, steps.column_scale(num_outputs, task_weights, count_scale), scaled, at::Tensor());
  // <S_s H_s, S_t H_t> summed over rows = sum over the (s, t) block of (S^T S) * (H H^T).
  const at::Tensor products = at::mm(scaled.t(), scaled).mul_(at::mm(head_weight, head_weight.t()));
  at::Tensor membership = at::zeros({tasks, logit_cols}, logit_grad.options());  // [T, C]: column j is task t's
  int64_t col = 0;
  for (int64_t t = 0; t < tasks; ++t) {
    membership[t].narrow(0, col, num_outputs[t]).fill_(1);
    col += num_outputs[t];
  }
  at::Tensor gram = at::mm(at::mm(membership, products), membership.t());
  return (gram + gram.t()).mul_(0.5);
}

WeightedBackward weighted_backward(const kernels::Steps& steps, const at::Tensor& x,
                                   const std::vector<at::Tensor>& weights, const at::Tensor& out,
                                   const std::vector<at::Tensor>& saved, Activation act, bool has_bias,
                                   const at::Tensor& head_weight, bool head_has_bias, const at::Tensor& logit_grad,
                                   const at::Tensor& count_scale, const at::Tensor& head_task_weights,
                                   const at::Tensor& trunk_task_weights, const std::vector<int64_t>& num_outputs,
                                   bool need_input_grad) {
  const int64_t logit_cols = logit_grad.size(1);
  WeightedBackward result;
  at::Tensor head_logit_grad = at::empty_like(logit_grad);
  at::Tensor trunk_logit_grad = at::empty_like(logit_grad);
  result.head_bias_grad = at::empty({head_has_bias ? logit_cols : 0}, logit_grad.options());
  steps.scale_columns(logit_grad, steps.column_scale(num_outputs, head_task_weights, count_scale), head_logit_grad,
                      head_has_bias ? result.head_bias_grad : at::Tensor());
  steps.scale_columns(logit_grad, steps.column_scale(num_outputs, trunk_task_weights, count_scale), trunk_logit_grad,
                      at::Tensor());
  result.head_weight_grad = at::mm(head_logit_grad.t(), out);
  const at::Tensor grad_out = at::mm(trunk_logit_grad, head_weight);
  std::tie(result.input_grad, result.weight_grads, result.bias_grads) =
      trunk_backward(steps, grad_out, x, weights, out, saved, act, has_bias, need_input_grad);
  return result;
}

}  // namespace fastmtl::ops
