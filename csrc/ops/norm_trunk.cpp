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

// The output of layer l's activation, from what was saved: act_src itself, or act(act_src).
at::Tensor activation_output(const kernels::Steps& steps, Activation act, const at::Tensor& act_src) {
  if (reads_output(act)) return act_src;
  at::Tensor out = at::empty_like(act_src);
  steps.activation_apply(act, act_src, out);
  return out;
}

}  // namespace

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> norm_trunk_forward(const kernels::Steps& steps,
                                                                                            const at::Tensor& x,
                                                                                            const NormTrunkParams& p,
                                                                                            const NormTrunkConfig& c) {
  const size_t num_layers = p.weights.size();
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
    const at::Tensor bias = at_layer(p.biases, l);
    at::Tensor pre = bias.defined() ? at::addmm(bias, h, p.weights[l].t()) : at::mm(h, p.weights[l].t());
    at::Tensor act_in = pre, mean = no_stats(), invstd = no_stats();
    if (c.norm != NormKind::None) {
      const at::Tensor gamma = in_dtype(at_layer(p.norm_weights, l), compute);
      const at::Tensor beta = in_dtype(at_layer(p.norm_biases, l), compute);
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
        std::tie(normed, mean, invstd) =
            at::native_batch_norm(in_dtype(pre, compute), gamma, beta, mean_c, var_c, batch_stats, c.momentum, c.eps);
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
      } else {
        std::tie(normed, mean, invstd) =
            at::native_layer_norm(in_dtype(pre, compute), {pre.size(1)}, gamma, beta, c.eps);
      }
      act_in = in_dtype(normed, x.scalar_type());
      mean = in_dtype(mean, compute);
      invstd = in_dtype(invstd, compute);
    }
    at::Tensor act_out = act_in;
    if (c.softmax) {  // a row-wise reduction: ATen's kernel, in float32 for 16-bit storage
      act_out = in_dtype(at::_softmax(in_dtype(act_in, compute), 1, false), x.scalar_type());
    } else if (c.act != Activation::Identity) {
      act_out = at::empty_like(act_in);
      steps.activation_apply(c.act, act_in, act_out);
    }
    at::Tensor mask = none();
    h = act_out;
    if (dropping) {
      h = at::empty_like(act_out);
      mask = at::empty(act_out.sizes(), act_out.options().dtype(at::kBool));
      steps.dropout_forward(c.dropout, act_out, mask, h);
    }
    at::Tensor act_src = reads_output(c.act) ? act_out : act_in;
    if (top && !dropping && reads_output(c.act)) act_src = none();  // it is the output: not saved twice
    saved.insert(saved.end(), {c.norm == NormKind::None ? none() : pre, mean, invstd, act_src, mask});
  }
  new_means.insert(new_means.end(), new_vars.begin(), new_vars.end());
  return {h, saved, new_means};
}

NormTrunkGrads norm_trunk_backward(const kernels::Steps& steps, const at::Tensor& grad_out, const at::Tensor& x,
                                   const NormTrunkParams& p, const NormTrunkConfig& c, const at::Tensor& out,
                                   const std::vector<at::Tensor>& saved, bool need_input_grad) {
  const size_t num_layers = p.weights.size();
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
      steps.dropout_apply(c.dropout, mask, grad, dropped);
      grad = dropped;
    }
    at::Tensor delta = grad;
    if (c.softmax) {
      const at::Tensor& probabilities = slot(l, 3).numel() > 0 ? slot(l, 3) : out;
      delta =
          in_dtype(at::_softmax_backward_data(in_dtype(grad, compute), in_dtype(probabilities, compute), 1, compute),
                   x.scalar_type());
    } else if (c.act != Activation::Identity) {
      const at::Tensor& act_src = slot(l, 3).numel() > 0 ? slot(l, 3) : out;
      delta = at::empty_like(grad);
      steps.activation_backward(c.act, grad, act_src, delta, at::Tensor());
    }
    at::Tensor grad_pre = delta;
    if (c.norm != NormKind::None) {
      const at::Tensor gamma = at_layer(p.norm_weights, l);
      const std::array<bool, 3> mask3{true, affine, affine};
      std::tuple<at::Tensor, at::Tensor, at::Tensor> r;
      if (c.norm == NormKind::Batch) {
        r = at::native_batch_norm_backward(
            in_dtype(delta, compute), in_dtype(pre, compute), in_dtype(gamma, compute),
            in_dtype(at_layer(p.running_means, l), compute), in_dtype(at_layer(p.running_vars, l), compute),
            in_dtype(slot(l, 1), compute), in_dtype(slot(l, 2), compute), batch_stats, c.eps, mask3);
      } else {
        r = at::native_layer_norm_backward(in_dtype(delta, compute), in_dtype(pre, compute), {pre.size(1)},
                                           in_dtype(slot(l, 1), compute), in_dtype(slot(l, 2), compute),
                                           in_dtype(gamma, compute), in_dtype(at_layer(p.norm_biases, l), compute),
                                           mask3);
      }
      grad_pre = in_dtype(std::get<0>(r), x.scalar_type());
      if (affine) {
        g.norm_weights[l] = in_dtype(std::get<1>(r), gamma.scalar_type());
        g.norm_biases[l] = in_dtype(std::get<2>(r), p.norm_biases[l].scalar_type());
      }
    }
    if (!p.biases.empty()) g.biases[l] = at::sum(grad_pre, {0}, false, compute).to(x.scalar_type());
    // This layer's input: x, or the layer below's output recomputed from what it saved.
    at::Tensor layer_input = x;
    if (l > 0) {
      layer_input = activation_output(steps, c.act, slot(l - 1, 3));
      if (slot(l - 1, 4).numel() > 0) {
        at::Tensor dropped = at::empty_like(layer_input);
        steps.dropout_apply(c.dropout, slot(l - 1, 4), layer_input, dropped);
        layer_input = dropped;
      }
    }
    g.weights[l] = at::mm(grad_pre.t(), layer_input);
    if (l > 0 || need_input_grad) grad = at::mm(grad_pre, p.weights[l]);
  }
  g.input = need_input_grad ? grad : at::empty({0}, x.options());
  return g;
}

}  // namespace fastmtl::ops
