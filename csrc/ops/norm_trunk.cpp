#include "ops/norm_trunk.h"

#include <array>

namespace fastmtl::ops {
namespace {

bool is_16bit(const at::Tensor& t) { return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16; }

// The dtype the normalisation computes in: float32 for 16-bit storage (one rounding), else its own.
at::ScalarType norm_dtype(const at::Tensor& x) { return is_16bit(x) ? at::kFloat : x.scalar_type(); }

at::Tensor in_dtype(const at::Tensor& t, at::ScalarType dtype) {
  return !t.defined() || t.scalar_type() == dtype ? t : t.to(dtype);
}

at::Tensor at_layer(const std::vector<at::Tensor>& list, size_t l) { return list.empty() ? at::Tensor() : list[l]; }

bool reads_output(Activation act) { return act == Activation::Identity || saved_kind(act) == SavedKind::Post; }

// The step interface takes row-major matrices: the stacked [E, B, d] as [E * B, d] (a view).
at::Tensor rows_of(const at::Tensor& t) { return t.dim() == 2 ? t : t.view({-1, t.size(-1)}); }

// The output of layer l's activation, from what was saved: act_src itself, or act(act_src).
at::Tensor activation_output(const kernels::Steps& steps, Activation act, const at::Tensor& act_src) {
  if (reads_output(act)) return act_src;
  at::Tensor out = at::empty_like(act_src);
  steps.activation_apply(act, rows_of(act_src), rows_of(out));
  return out;
}

// The stacked towers' input to a batched GEMM: x [B, d] shared by all E is broadcast (a view).
at::Tensor batched_input(const at::Tensor& h, int64_t experts) {
  return h.dim() == 2 ? h.unsqueeze(0).expand({experts, h.size(0), h.size(1)}) : h;
}

// z W^T + b: one GEMM, batched over the stacked towers.
at::Tensor layer_gemm(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias) {
  if (weight.dim() == 2) return bias.defined() ? at::addmm(bias, h, weight.t()) : at::mm(h, weight.t());
  const at::Tensor input = batched_input(h, weight.size(0));
  return bias.defined() ? at::baddbmm(bias.unsqueeze(1), input, weight.transpose(1, 2))
                        : at::bmm(input, weight.transpose(1, 2));
}

// d weight = grad_pre^T input, per tower.
at::Tensor weight_grad(const at::Tensor& grad_pre, const at::Tensor& input, const at::Tensor& weight) {
  if (weight.dim() == 2) return at::mm(grad_pre.t(), input);
  return at::bmm(grad_pre.transpose(1, 2), batched_input(input, weight.size(0)));
}

// d input = grad_pre W; a shared x [B, d] sums over the towers: one GEMM over [B, E * out].
at::Tensor input_grad(const at::Tensor& grad_pre, const at::Tensor& weight, const at::Tensor& input) {
  if (weight.dim() == 2) return at::mm(grad_pre, weight);
  if (input.dim() == 3) return at::bmm(grad_pre, weight);
  const int64_t experts = weight.size(0), rows = grad_pre.size(1), cols = weight.size(1);
  return at::mm(grad_pre.transpose(0, 1).reshape({rows, experts * cols}), weight.reshape({experts * cols, -1}));
}

// ---- the stacked towers' normalisation, [E, B, d] in the compute dtype. ATen's batch-norm kernels
// take channels at dim 1, so they run tower by tower on the contiguous [B, d] slices; the
// layer-norm kernel takes one affine vector for every row, so it normalises all towers at once and
// each tower's own affine parameters follow as one fused multiply-add.

struct StackedNorm {
  at::Tensor normed, mean, invstd;  // mean / invstd: batch [E, d], layer [E, B, 1]
};

// BatchNorm1d per (tower, feature): batch statistics (biased variance) in training, running ones
// in eval; the running statistics are updated in place (the caller passes copies).
StackedNorm stacked_batch_norm(const at::Tensor& pre, const at::Tensor& gamma, const at::Tensor& beta,
                               const at::Tensor& running_mean, const at::Tensor& running_var, bool batch_stats,
                               double momentum, double eps, at::ScalarType compute) {
  // Tower e's [B, n] slice is contiguous: ATen's batch-norm kernel on each slice (its channels-last
  // CPU path; one reduction pass and one normalising pass) writes straight into the stacked output
  // and updates row e of the running statistics in place. Reductions over dim 1 of [E, B, n] and
  // broadcast multiply-adds were 3x slower than this loop (bench_rec_towers' native variant).
  // 16-bit storage: each slice is widened to the compute dtype and the result rounded back tower by
  // tower, so the float32 temporaries are one tower's, not E towers'.
  const int64_t towers = pre.size(0), features = pre.size(2);
  const bool widen = pre.scalar_type() != compute;
  at::Tensor normed = at::empty_like(pre);
  const at::TensorOptions stats_options = pre.options().dtype(compute);
  at::Tensor mean = at::empty({towers, features}, stats_options);
  at::Tensor invstd = at::empty({towers, features}, stats_options);
  const auto row = [](const at::Tensor& t, int64_t e) { return t.defined() ? t.select(0, e) : at::Tensor(); };
  for (int64_t e = 0; e < towers; ++e) {
    at::Tensor out = widen ? at::empty(normed.select(0, e).sizes(), stats_options) : normed.select(0, e);
    // Eval: the kernel gives [0] placeholders for the saved statistics; they are not kept.
    at::Tensor save_mean = batch_stats ? mean.select(0, e) : at::empty({0}, stats_options);
    at::Tensor save_invstd = batch_stats ? invstd.select(0, e) : at::empty({0}, stats_options);
    at::native_batch_norm_out(out, save_mean, save_invstd, in_dtype(pre.select(0, e), compute), row(gamma, e),
                              row(beta, e), row(running_mean, e), row(running_var, e), batch_stats, momentum, eps);
    if (widen) normed.select(0, e).copy_(out);
  }
  return {normed, mean, invstd};
}

// LayerNorm per (tower, row) over the features, with tower e's own affine parameters.
StackedNorm stacked_layer_norm(const at::Tensor& pre, const at::Tensor& gamma, const at::Tensor& beta, double eps) {
  auto [normed, mean, invstd] = at::native_layer_norm(pre, {pre.size(-1)}, at::Tensor(), at::Tensor(), eps);
  if (gamma.defined()) normed = at::addcmul(beta.unsqueeze(1), normed, gamma.unsqueeze(1));
  return {normed, mean, invstd};
}

// (d pre, d gamma, d beta) of stacked_batch_norm: ATen's batch-norm backward tower by tower (each
// slice contiguous, widened to the compute dtype one tower at a time), from the batch statistics it
// saved or, in eval, the running ones. d pre comes back in pre's dtype, d gamma / d beta in compute.
std::array<at::Tensor, 3> stacked_batch_norm_backward(const at::Tensor& grad, const at::Tensor& pre,
                                                      const at::Tensor& gamma, const at::Tensor& running_mean,
                                                      const at::Tensor& running_var, const at::Tensor& save_mean,
                                                      const at::Tensor& save_invstd, bool batch_stats, double eps,
                                                      at::ScalarType compute) {
  const int64_t towers = pre.size(0);
  const bool affine = gamma.defined();
  const std::array<bool, 3> mask{true, affine, affine};
  const auto row = [](const at::Tensor& t, int64_t e) { return t.defined() ? t.select(0, e) : at::Tensor(); };
  at::Tensor grad_pre = at::empty_like(pre);
  at::Tensor grad_gamma = affine ? at::empty_like(gamma) : at::Tensor();
  at::Tensor grad_beta = affine ? at::empty_like(gamma) : at::Tensor();
  for (int64_t e = 0; e < towers; ++e) {
    auto [dx, dgamma, dbeta] = at::native_batch_norm_backward(
        in_dtype(grad.select(0, e), compute), in_dtype(pre.select(0, e), compute), row(gamma, e), row(running_mean, e),
        row(running_var, e), batch_stats ? save_mean.select(0, e) : at::Tensor(),
        batch_stats ? save_invstd.select(0, e) : at::Tensor(), batch_stats, eps, mask);
    grad_pre.select(0, e).copy_(dx);
    if (affine) {
      grad_gamma.select(0, e).copy_(dgamma);
      grad_beta.select(0, e).copy_(dbeta);
    }
  }
  return {grad_pre, grad_gamma, grad_beta};
}

std::array<at::Tensor, 3> stacked_layer_norm_backward(const at::Tensor& grad, const at::Tensor& pre,
                                                      const at::Tensor& gamma, const at::Tensor& mean,
                                                      const at::Tensor& invstd) {
  const at::Tensor grad_normed = gamma.defined() ? grad * gamma.unsqueeze(1) : grad;
  at::Tensor grad_pre = std::get<0>(at::native_layer_norm_backward(grad_normed, pre, {pre.size(-1)}, mean, invstd,
                                                                   at::Tensor(), at::Tensor(), {true, false, false}));
  if (!gamma.defined()) return {grad_pre, at::Tensor(), at::Tensor()};
  const at::Tensor normed = (pre - mean) * invstd;
  return {grad_pre, (grad * normed).sum({1}), grad.sum({1})};
}

// One tower, or E stacked towers layer by layer (one batched GEMM per layer).
// Where one tower's forward writes its activations (tower-major order: slices of the stacked
// buffers); an undefined tensor: the forward allocates its own.
struct LayerSlices {
  at::Tensor pre, normed, act_out, dropped, mask;
};

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> layer_major_forward(
    const kernels::Steps& steps, const at::Tensor& x, const NormTrunkParams& p, const NormTrunkConfig& c,
    const std::vector<LayerSlices>* into = nullptr) {
  const size_t num_layers = p.weights.size();
  const bool stacked = is_stacked(p);
  const at::ScalarType compute = norm_dtype(x);
  // Placeholders for what a layer does not save: a fresh [0] tensor each (returns of an op must
  // not alias one another).
  const auto none = [&] { return at::empty({0}, x.options()); };
  const auto no_stats = [&] { return at::empty({0}, x.options().dtype(compute)); };
  const bool batch_stats = uses_batch_statistics(c, p);
  const bool dropping = c.training && c.dropout > 0.0;
  const bool updates_running = c.norm == NormKind::Batch && c.training && !p.running_means.empty();
  std::vector<at::Tensor> saved, new_means, new_vars;
  saved.reserve(kSavedPerLayer * num_layers);
  at::Tensor h = x;
  for (size_t l = 0; l < num_layers; ++l) {
    const bool top = l + 1 == num_layers;
    LayerSlices dest = into != nullptr ? (*into)[l] : LayerSlices{};
    at::Tensor pre;
    if (dest.pre.defined()) {  // one tower (2-D weight) into its slice
      const at::Tensor bias = at_layer(p.biases, l);
      pre = bias.defined() ? at::addmm_out(dest.pre, bias, h, p.weights[l].t())
                           : at::mm_out(dest.pre, h, p.weights[l].t());
    } else {
      pre = layer_gemm(h, p.weights[l], at_layer(p.biases, l));
    }
    at::Tensor act_in = pre, mean = no_stats(), invstd = no_stats();
    if (c.norm != NormKind::None) {
      const at::Tensor gamma = in_dtype(at_layer(p.norm_weights, l), compute);
      const at::Tensor beta = in_dtype(at_layer(p.norm_biases, l), compute);
      // Widened to the compute dtype where a whole-tensor kernel needs it (the stacked batch norm
      // widens tower by tower).
      const bool stacked_batch = stacked && c.norm == NormKind::Batch;
      const at::Tensor pre_c = stacked_batch ? pre : in_dtype(pre, compute);
      at::Tensor normed;
      if (c.norm == NormKind::Batch) {
        // The kernel updates running statistics in place: it gets copies (the inputs stay as they
        // are), which come back as outputs in the statistics' own dtype.
        const at::Tensor running_mean = at_layer(p.running_means, l), running_var = at_layer(p.running_vars, l);
        at::Tensor mean_c = in_dtype(running_mean, compute), var_c = in_dtype(running_var, compute);
        if (updates_running) {
          if (mean_c.is_same(running_mean)) mean_c = mean_c.clone();
          if (var_c.is_same(running_var)) var_c = var_c.clone();
        }
        if (stacked) {
          StackedNorm n = stacked_batch_norm(pre, gamma, beta, mean_c, var_c, batch_stats, c.momentum, c.eps, compute);
          normed = n.normed, mean = n.mean, invstd = n.invstd;
        } else if (dest.normed.defined() && pre_c.scalar_type() == x.scalar_type()) {
          // Straight into the tower's slice (eval: [0] placeholders for the statistics, as above).
          const at::TensorOptions stats_options = pre_c.options().dtype(compute);
          mean = at::empty({batch_stats ? pre_c.size(-1) : 0}, stats_options);
          invstd = at::empty({batch_stats ? pre_c.size(-1) : 0}, stats_options);
          at::native_batch_norm_out(dest.normed, mean, invstd, pre_c, gamma, beta, mean_c, var_c, batch_stats,
                                    c.momentum, c.eps);
          normed = dest.normed;
        } else {
          std::tie(normed, mean, invstd) =
              at::native_batch_norm(pre_c, gamma, beta, mean_c, var_c, batch_stats, c.momentum, c.eps);
        }
        if (updates_running) {
          new_means.push_back(in_dtype(mean_c, running_mean.scalar_type()));
          new_vars.push_back(in_dtype(var_c, running_var.scalar_type()));
        }
        // Eval with running statistics: the backward reads those; the kernel's [0] / [d] placeholder
        // differs by device, so keep one shape.
        if (!batch_stats) {
          mean = no_stats();
          invstd = no_stats();
        }
      } else if (stacked) {
        StackedNorm n = stacked_layer_norm(pre_c, gamma, beta, c.eps);
        normed = n.normed, mean = n.mean, invstd = n.invstd;
      } else {
        std::tie(normed, mean, invstd) = at::native_layer_norm(pre_c, {pre.size(-1)}, gamma, beta, c.eps);
      }
      act_in = in_dtype(normed, x.scalar_type());
      if (dest.normed.defined() && !act_in.is_same(dest.normed)) act_in = dest.normed.copy_(act_in);
      mean = in_dtype(mean, compute);
      invstd = in_dtype(invstd, compute);
    }
    at::Tensor act_out = act_in;
    if (c.softmax) {  // a row-wise reduction: ATen's kernel, in float32 for 16-bit storage
      act_out = in_dtype(at::_softmax(in_dtype(act_in, compute), -1, false), x.scalar_type());
      if (dest.act_out.defined()) act_out = dest.act_out.copy_(act_out);
    } else if (c.act != Activation::Identity) {
      act_out = dest.act_out.defined() ? dest.act_out : at::empty_like(act_in);
      steps.activation_apply(c.act, rows_of(act_in), rows_of(act_out));
    }
    at::Tensor mask = none();
    h = act_out;
    if (dropping) {
      h = dest.dropped.defined() ? dest.dropped : at::empty_like(act_out);
      mask = dest.mask.defined() ? dest.mask : at::empty(act_out.sizes(), act_out.options().dtype(at::kBool));
      steps.dropout_forward(c.dropout, rows_of(act_out), rows_of(mask), rows_of(h));
    }
    at::Tensor act_src = reads_output(c.act) ? act_out : act_in;
    if (top && !dropping && reads_output(c.act)) act_src = none();  // it is the output: not saved twice
    saved.insert(saved.end(), {c.norm == NormKind::None ? none() : pre, mean, invstd, act_src, mask});
  }
  new_means.insert(new_means.end(), new_vars.begin(), new_vars.end());
  return {h, saved, new_means};
}

NormTrunkGrads layer_major_backward(const kernels::Steps& steps, const at::Tensor& grad_out, const at::Tensor& x,
                                    const NormTrunkParams& p, const NormTrunkConfig& c, const at::Tensor& out,
                                    const std::vector<at::Tensor>& saved, bool need_input_grad) {
  const size_t num_layers = p.weights.size();
  const bool stacked = is_stacked(p);
  const at::ScalarType compute = norm_dtype(x);
  const bool batch_stats = uses_batch_statistics(c, p);
  const bool affine = !p.norm_weights.empty();
  NormTrunkGrads g;
  g.weights.resize(num_layers);
  if (!p.biases.empty()) g.biases.resize(num_layers);
  if (affine) {
    g.norm_weights.resize(num_layers);
    g.norm_biases.resize(num_layers);
  }
  const auto slot = [&](size_t l, int64_t k) -> const at::Tensor& { return saved[kSavedPerLayer * l + k]; };

  at::Tensor grad = grad_out;  // dL / d(output of layer l), walking down
  for (size_t l = num_layers; l-- > 0;) {
    const at::Tensor& pre = slot(l, 0);
    const at::Tensor& mask = slot(l, 4);
    if (mask.numel() > 0) {
      at::Tensor dropped = at::empty_like(grad);
      steps.dropout_apply(c.dropout, rows_of(mask), rows_of(grad), rows_of(dropped));
      grad = dropped;
    }
    at::Tensor delta = grad;
    if (c.softmax) {
      const at::Tensor& probabilities = slot(l, 3).numel() > 0 ? slot(l, 3) : out;
      delta =
          in_dtype(at::_softmax_backward_data(in_dtype(grad, compute), in_dtype(probabilities, compute), -1, compute),
                   x.scalar_type());
    } else if (c.act != Activation::Identity) {
      const at::Tensor& act_src = slot(l, 3).numel() > 0 ? slot(l, 3) : out;
      delta = at::empty_like(grad);
      steps.activation_backward(c.act, rows_of(grad), rows_of(act_src), rows_of(delta), at::Tensor());
    }
    at::Tensor grad_pre = delta;
    if (c.norm != NormKind::None) {
      const at::Tensor gamma = at_layer(p.norm_weights, l);
      const bool stacked_batch = stacked && c.norm == NormKind::Batch;  // widens tower by tower itself
      const at::Tensor delta_c = stacked_batch ? delta : in_dtype(delta, compute);
      const at::Tensor pre_c = stacked_batch ? pre : in_dtype(pre, compute);
      const at::Tensor gamma_c = in_dtype(gamma, compute);
      std::array<at::Tensor, 3> r;
      if (c.norm == NormKind::Batch && stacked) {
        r = stacked_batch_norm_backward(delta_c, pre_c, gamma_c, in_dtype(at_layer(p.running_means, l), compute),
                                        in_dtype(at_layer(p.running_vars, l), compute), in_dtype(slot(l, 1), compute),
                                        in_dtype(slot(l, 2), compute), batch_stats, c.eps, compute);
      } else if (c.norm == NormKind::Batch) {
        const std::array<bool, 3> mask3{true, affine, affine};
        std::tie(r[0], r[1], r[2]) = at::native_batch_norm_backward(
            delta_c, pre_c, gamma_c, in_dtype(at_layer(p.running_means, l), compute),
            in_dtype(at_layer(p.running_vars, l), compute), in_dtype(slot(l, 1), compute),
            in_dtype(slot(l, 2), compute), batch_stats, c.eps, mask3);
      } else if (stacked) {
        r = stacked_layer_norm_backward(delta_c, pre_c, gamma_c, in_dtype(slot(l, 1), compute),
                                        in_dtype(slot(l, 2), compute));
      } else {
        const std::array<bool, 3> mask3{true, affine, affine};
        std::tie(r[0], r[1], r[2]) = at::native_layer_norm_backward(
            delta_c, pre_c, {pre.size(-1)}, in_dtype(slot(l, 1), compute), in_dtype(slot(l, 2), compute), gamma_c,
            in_dtype(at_layer(p.norm_biases, l), compute), mask3);
      }
      grad_pre = in_dtype(r[0], x.scalar_type());
      if (affine) {
        g.norm_weights[l] = in_dtype(r[1], gamma.scalar_type());
        g.norm_biases[l] = in_dtype(r[2], p.norm_biases[l].scalar_type());
      }
    }
    if (!p.biases.empty()) g.biases[l] = at::sum(grad_pre, {stacked ? 1 : 0}, false, compute).to(x.scalar_type());
    // This layer's input: x, or the layer below's output recomputed from what it saved.
    at::Tensor layer_input = x;
    if (l > 0) {
      layer_input = activation_output(steps, c.act, slot(l - 1, 3));
      if (slot(l - 1, 4).numel() > 0) {
        at::Tensor dropped = at::empty_like(layer_input);
        steps.dropout_apply(c.dropout, rows_of(slot(l - 1, 4)), rows_of(layer_input), rows_of(dropped));
        layer_input = dropped;
      }
    }
    g.weights[l] = weight_grad(grad_pre, layer_input, p.weights[l]);
    if (l > 0 || need_input_grad) grad = input_grad(grad_pre, p.weights[l], layer_input);
  }
  g.input = need_input_grad ? grad : at::empty({0}, x.options());
  return g;
}

// ---- tower-major order for stacked towers on the CPU: each tower through every layer with the
// one-tower orchestration above, writing into its slices of the stacked [E, B, n] buffers (the
// forward) and reading its slices of the saved tensors (the backward). Layer-major, each
// elementwise pass (bias, normalisation, activation, dropout) runs over all E towers' [E, B, n]
// activations, which at B = 4096 leave the cache between the batched GEMM and the passes; one
// tower's [B, n] stays in it. Measured on the 2-core CI machine (1 thread, 8 towers 128 -> 64 -> 32,
// batch norm, relu, dropout, forward + backward): B = 4096 64.9 ms layer-major, 54.0 ms
// tower-major, 49.6 ms as 8 one-tower ops; B = 512 6.92, 6.58, 6.39 ms. On CUDA the batched GEMM and
// one launch per pass are what pay, so it keeps the layer-major order.

NormTrunkParams tower_params(const NormTrunkParams& p, int64_t e) {
  const auto rows = [e](const std::vector<at::Tensor>& list) {
    std::vector<at::Tensor> out;
    out.reserve(list.size());
    for (const at::Tensor& t : list) out.push_back(t.select(0, e));
    return out;
  };
  return {rows(p.weights),     rows(p.biases),        rows(p.norm_weights),
          rows(p.norm_biases), rows(p.running_means), rows(p.running_vars)};
}

// The stacked [E, ...] of E per-tower tensors; a [0] placeholder stays [0] (every tower has one).
at::Tensor stack_towers(const std::vector<at::Tensor>& per_tower) {
  if (per_tower[0].numel() == 0 && per_tower[0].dim() == 1) return per_tower[0];
  return at::stack(per_tower);
}

at::Tensor tower_slice(const at::Tensor& t, int64_t e) { return t.numel() == 0 && t.dim() == 1 ? t : t.select(0, e); }

std::vector<at::Tensor> stack_lists(const std::vector<std::vector<at::Tensor>>& per_tower) {
  std::vector<at::Tensor> out;
  if (per_tower.empty() || per_tower[0].empty()) return out;
  for (size_t i = 0; i < per_tower[0].size(); ++i) {
    std::vector<at::Tensor> column;
    column.reserve(per_tower.size());
    for (const auto& tower : per_tower) column.push_back(tower[i]);
    out.push_back(stack_towers(column));
  }
  return out;
}

// Below ~128 rows the E times more ATen calls cost more than the cache saves (the same 8 towers:
// B = 32 0.94 ms tower-major against 0.71 ms layer-major, B = 128 1.84 against 1.98 ms).
constexpr int64_t kTowerMajorMinRows = 128;

bool tower_major(const at::Tensor& x, const NormTrunkParams& p) {
  return is_stacked(p) && x.is_cpu() && x.size(-2) >= kTowerMajorMinRows;
}

}  // namespace

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> norm_trunk_forward(const kernels::Steps& steps,
                                                                                            const at::Tensor& x,
                                                                                            const NormTrunkParams& p,
                                                                                            const NormTrunkConfig& c) {
  if (!tower_major(x, p)) return layer_major_forward(steps, x, p, c);
  const int64_t towers = p.weights[0].size(0), rows = x.size(-2);
  const size_t num_layers = p.weights.size();
  const bool dropping = c.training && c.dropout > 0.0;
  // Each layer's stacked [E, B, n] activations, written tower by tower through slices.
  std::vector<LayerSlices> stacked(num_layers);
  for (size_t l = 0; l < num_layers; ++l) {
    const std::vector<int64_t> shape{towers, rows, p.weights[l].size(1)};
    LayerSlices& b = stacked[l];
    b.pre = at::empty(shape, x.options());
    if (c.norm != NormKind::None) b.normed = at::empty(shape, x.options());
    if (c.softmax || c.act != Activation::Identity) b.act_out = at::empty(shape, x.options());
    if (dropping) {
      b.dropped = at::empty(shape, x.options());
      b.mask = at::empty(shape, x.options().dtype(at::kBool));
    }
  }
  // What the one-tower forward returned, found again among the slices it was given (it decides
  // what to save; this keeps that decision in one place): that buffer stacked, or a per-tower
  // tensor of its own (the statistics) stacked at the end, or a [0] placeholder.
  const auto buffer_of = [&](const at::Tensor& t, int64_t e) -> at::Tensor {
    if (t.numel() == 0) return at::Tensor();
    for (const LayerSlices& b : stacked)
      for (const at::Tensor* buffer : {&b.pre, &b.normed, &b.act_out, &b.dropped, &b.mask})
        if (buffer->defined() && t.data_ptr() == buffer->select(0, e).data_ptr() &&
            t.sizes() == buffer->sizes().slice(1))
          return *buffer;
    return at::Tensor();
  };
  at::Tensor output;
  std::vector<at::Tensor> saved_buffers;
  std::vector<std::vector<at::Tensor>> own(num_layers * kSavedPerLayer), stats;
  for (int64_t e = 0; e < towers; ++e) {
    std::vector<LayerSlices> slices(num_layers);
    for (size_t l = 0; l < num_layers; ++l) {
      const LayerSlices& b = stacked[l];
      const auto at_e = [e](const at::Tensor& t) { return t.defined() ? t.select(0, e) : at::Tensor(); };
      slices[l] = {at_e(b.pre), at_e(b.normed), at_e(b.act_out), at_e(b.dropped), at_e(b.mask)};
    }
    auto [h, saved, running] =
        layer_major_forward(steps, x.dim() == 3 ? x.select(0, e) : x, tower_params(p, e), c, &slices);
    if (e == 0) {
      output = buffer_of(h, 0);
      for (const at::Tensor& t : saved) saved_buffers.push_back(buffer_of(t, 0));
    }
    TORCH_INTERNAL_ASSERT(output.defined() && h.data_ptr() == output.select(0, e).data_ptr());
    for (size_t k = 0; k < saved.size(); ++k) {
      if (saved_buffers[k].defined()) {
        TORCH_INTERNAL_ASSERT(saved[k].data_ptr() == saved_buffers[k].select(0, e).data_ptr());
      } else {
        own[k].push_back(saved[k]);
      }
    }
    stats.push_back(std::move(running));
  }
  std::vector<at::Tensor> saved(saved_buffers.size());
  for (size_t k = 0; k < saved.size(); ++k)
    saved[k] = saved_buffers[k].defined() ? saved_buffers[k] : stack_towers(own[k]);
  return {output, saved, stack_lists(stats)};
}

NormTrunkGrads norm_trunk_backward(const kernels::Steps& steps, const at::Tensor& grad_out, const at::Tensor& x,
                                   const NormTrunkParams& p, const NormTrunkConfig& c, const at::Tensor& out,
                                   const std::vector<at::Tensor>& saved, bool need_input_grad) {
  if (!tower_major(x, p)) return layer_major_backward(steps, grad_out, x, p, c, out, saved, need_input_grad);
  const int64_t towers = p.weights[0].size(0);
  const bool shared_input = x.dim() == 2;
  std::vector<NormTrunkGrads> per_tower;
  per_tower.reserve(towers);
  at::Tensor input_sum;  // a shared x: the towers' input gradients summed
  std::vector<at::Tensor> inputs;
  for (int64_t e = 0; e < towers; ++e) {
    std::vector<at::Tensor> saved_e;
    saved_e.reserve(saved.size());
    for (const at::Tensor& t : saved) saved_e.push_back(tower_slice(t, e));
    NormTrunkGrads g = layer_major_backward(steps, grad_out.select(0, e), shared_input ? x : x.select(0, e),
                                            tower_params(p, e), c, out.select(0, e), saved_e, need_input_grad);
    if (need_input_grad) {
      if (!shared_input) {
        inputs.push_back(g.input);
      } else if (input_sum.defined()) {
        input_sum.add_(g.input);
      } else {
        input_sum = g.input;
      }
    }
    per_tower.push_back(std::move(g));
  }
  NormTrunkGrads g;
  const auto gather = [&](std::vector<at::Tensor> NormTrunkGrads::* field) {
    std::vector<std::vector<at::Tensor>> lists;
    lists.reserve(per_tower.size());
    for (const NormTrunkGrads& t : per_tower) lists.push_back(t.*field);
    return stack_lists(lists);
  };
  g.weights = gather(&NormTrunkGrads::weights);
  g.biases = gather(&NormTrunkGrads::biases);
  g.norm_weights = gather(&NormTrunkGrads::norm_weights);
  g.norm_biases = gather(&NormTrunkGrads::norm_biases);
  g.input = !need_input_grad ? at::empty({0}, x.options()) : shared_input ? input_sum : at::stack(inputs);
  return g;
}

}  // namespace fastmtl::ops
