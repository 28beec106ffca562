// PortableSteps: every step of the kernel interface (kernels/steps.h) written with ATen ops, so it
// runs on any device ATen supports: the CPU (where the test suite checks it against the reference
// and against the custom CPU loops, FASTMTL_KERNELS=portable), CUDA (the default there until a GPU
// run has verified the custom kernels), and meta (shapes only: the proof that the orchestrations
// make no data-dependent host synchronisation). The formulas are those of common/activation.h and
// common/loss.h, written as tensor expressions.
//
// Rules kept here: no .item() / data_ptr, no host-side branch on tensor values (except the CPU-only
// search for the first invalid target, which the CPU op reports as an error), 16-bit storage
// computed in float32 and rounded once, reductions through ATen sums (deterministic) in float64.
// Host-known layout (which expert a gate entry weighs) travels as a small host-to-device copy.
#include <limits>

#include "kernels/steps.h"

namespace fastmtl::kernels {
namespace {

bool is_16bit(const at::Tensor& t) { return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16; }

// The tensor in its compute dtype: float32 for 16-bit storage, itself otherwise.
at::Tensor wide(const at::Tensor& t) { return is_16bit(t) ? t.to(at::kFloat) : t; }

at::Tensor act_forward(Activation act, const at::Tensor& a) {
  switch (act) {
    case Activation::Relu:
      return at::clamp_min(a, 0);
    case Activation::Gelu:
      return at::gelu(a);
    case Activation::GeluTanh:
      return at::gelu(a, "tanh");
    case Activation::Silu:
      return at::silu(a);
    case Activation::Tanh:
      return at::tanh(a);
    case Activation::Identity:
    default:
      return a;
  }
}

// grad * act'(saved), saved as saved_kind(act) says (the output for relu / tanh, else the
// pre-activation); common/activation.h's act_backward as tensor expressions.
at::Tensor act_backward(Activation act, const at::Tensor& grad, const at::Tensor& saved) {
  switch (act) {
    case Activation::Relu:  // grad where saved > 0, else 0: ATen's own relu-backward kernel (one pass)
      return at::threshold_backward(grad, saved, 0);
    case Activation::Tanh:
      return grad * (1 - saved * saved);
    case Activation::Gelu: {
      const at::Tensor cdf = 0.5 * (1 + at::erf(saved * kSqrtHalf));
      const at::Tensor pdf = at::exp(-0.5 * saved * saved) * kInvSqrt2Pi;
      return grad * (cdf + saved * pdf);
    }
    case Activation::GeluTanh: {
      const at::Tensor th = at::tanh(kSqrt2OverPi * (saved + kGeluTanhCoef * saved * saved * saved));
      return grad *
             (0.5 * (1 + th) + 0.5 * saved * (1 - th * th) * kSqrt2OverPi * (1 + 3 * kGeluTanhCoef * saved * saved));
    }
    case Activation::Silu: {
      const at::Tensor s = at::sigmoid(saved);
      return grad * (s * (1 + saved * (1 - s)));
    }
    case Activation::Identity:
    default:
      return grad;
  }
}

// Sum over `dim` in float64 (the custom kernels' accumulator), stored into out.
void sum_into(const at::Tensor& values, int64_t dim, const at::Tensor& out) {
  out.copy_(at::sum(wide(values), {dim}, /*keepdim=*/false, at::kDouble));
}

at::Tensor nan_like(const at::Tensor& t) { return at::full({}, std::numeric_limits<double>::quiet_NaN(), t.options()); }

// The one-hot [T, K, E] matrix of the gate index: M[t, k, e] = 1 where gate entry (t, k) weighs
// expert e. Built on the host (the index is host data) and copied to the device once per call.
at::Tensor gate_membership(const GateArgs& g, const at::TensorOptions& options) {
  at::Tensor m = at::zeros({g.tasks, g.gate_width, g.num_experts}, at::TensorOptions().dtype(at::kDouble));
  auto acc = m.accessor<double, 3>();
  for (int64_t t = 0; t < g.tasks; ++t)
    for (int64_t k = 0; k < g.gate_width; ++k) acc[t][k][(*g.index)[t * g.gate_width + k]] = 1.0;
  return m.to(options);
}

class PortableSteps final : public Steps {
 public:
  const char* name() const override { return "portable"; }

  void bias_activation(Activation act, const at::Tensor& pre, const at::Tensor& bias,
                       const at::Tensor& out) const override {
    if (bias.defined()) pre.add_(bias);  // 16-bit: float math, one rounding (as the kernels)
    (out.defined() ? out : pre).copy_(act_forward(act, wide(pre)));
  }

  void activation_apply(Activation act, const at::Tensor& pre, const at::Tensor& out) const override {
    out.copy_(act_forward(act, wide(pre)));
  }

  void activation_backward(Activation act, const at::Tensor& grad, const at::Tensor& saved, const at::Tensor& delta,
                           const at::Tensor& bias_grad) const override {
    if (act != Activation::Identity) delta.copy_(act_backward(act, wide(grad), wide(saved)));
    if (bias_grad.defined()) sum_into(act == Activation::Identity ? grad : delta, 0, bias_grad);
  }

  void activation_backward_tasks(Activation act, const at::Tensor& grad, const at::Tensor& saved,
                                 const at::Tensor& delta, const at::Tensor& bias_grad) const override {
    if (act != Activation::Identity) delta.copy_(act_backward(act, wide(grad), wide(saved).unsqueeze(1)));
    if (bias_grad.defined()) sum_into(act == Activation::Identity ? grad : delta, 0, bias_grad);
  }

  at::Tensor column_scale(const std::vector<int64_t>& num_outputs, const at::Tensor& task_scale,
                          const at::Tensor& count_scale) const override {
    const at::Tensor per_task = task_scale.to(count_scale.scalar_type()) * count_scale;
    bool one_column_each = true;
    for (int64_t n : num_outputs) one_column_each = one_column_each && n == 1;
    if (one_column_each) return per_task;
    std::vector<at::Tensor> parts;
    parts.reserve(num_outputs.size());
    for (size_t t = 0; t < num_outputs.size(); ++t)
      parts.push_back(per_task.narrow(0, static_cast<int64_t>(t), 1).expand({num_outputs[t]}));
    return at::cat(parts);
  }

  void scale_columns(const at::Tensor& in, const at::Tensor& col_scale, const at::Tensor& out,
                     const at::Tensor& col_sum) const override {
    out.copy_(wide(in) * col_scale);
    if (col_sum.defined()) sum_into(out, 0, col_sum);
  }

  BadTarget head_loss(const std::vector<HeadTask>& tasks, const at::Tensor& logits, const at::Tensor& bias,
                      const at::Tensor& targets, const at::Tensor& losses, const at::Tensor& scale) const override {
    const int64_t num_tasks = static_cast<int64_t>(tasks.size());
    const at::ScalarType compute = wide(logits.narrow(1, 0, 0)).scalar_type();
    const bool report = logits.is_cpu();  // only there is looking at the values free
    std::vector<at::Tensor> sums, counts, bad_masks;
    for (int64_t k = 0; k < num_tasks; ++k) {
      const HeadTask& task = tasks[k];
      const int64_t n = task.num_outputs;
      const at::Tensor y = logits.narrow(1, task.logit_offset, n);
      at::Tensor v = wide(y);
      if (bias.defined()) v = v + wide(bias.narrow(0, task.logit_offset, n));
      const at::Tensor t = targets.narrow(1, task.target_offset, target_width(task.loss, n)).to(compute);
      at::Tensor missing, valid, entry_loss, grad;
      if (task.loss == LossKind::Ce) {
        missing = t.eq(kIgnoreIndex);
        valid = t.ge(0).logical_and_(t.lt(static_cast<double>(n))).logical_and_(at::floor(t).eq(t));
        const at::Tensor cls = at::where(valid, t, at::zeros({}, t.options())).to(at::kLong);
        const at::Tensor lse = at::logsumexp(v, {1}, /*keepdim=*/true);
        entry_loss = lse - v.gather(1, cls);
        const at::Tensor one_hot = at::arange(n, cls.options()).eq(cls).to(compute);
        grad = at::exp(v - lse) - one_hot;
      } else if (task.loss == LossKind::Bce) {
        missing = at::isnan(t);
        valid = t.ge(0).logical_and_(t.le(1));
        const at::Tensor p = at::where(valid, t, at::zeros({}, t.options()));
        entry_loss = at::clamp_min(v, 0) - v * p + at::log1p(at::exp(-at::abs(v)));
        grad = at::sigmoid(v) - p;
      } else {
        missing = at::isnan(t);
        valid = at::isfinite(t);
        const at::Tensor d = v - at::where(valid, t, at::zeros({}, t.options()));
        if (task.loss == LossKind::Mse) {
          entry_loss = d * d;
          grad = 2 * d;
        } else if (task.loss == LossKind::L1) {
          entry_loss = at::abs(d);
          grad = at::sign(d);
        } else {  // huber, beta 1
          const at::Tensor ad = at::abs(d);
          const at::Tensor small = ad.lt(1);
          entry_loss = at::where(small, 0.5 * d * d, ad - 0.5);
          grad = at::where(small, d, at::sign(d));
        }
      }
      // Missing: no loss, no gradient, not counted. Invalid: counted, NaN loss and gradient.
      const at::Tensor bad = valid.logical_not().logical_and_(missing.logical_not());
      const at::Tensor zero = at::zeros({}, v.options());
      const at::Tensor masked = at::where(bad, nan_like(v), zero);
      y.copy_(at::where(valid, grad, masked));
      sums.push_back(at::sum(at::where(valid, entry_loss, masked), at::kDouble));
      counts.push_back(at::sum(missing.logical_not(), at::kDouble));
      if (report) bad_masks.push_back(bad);
    }
    const at::Tensor total = at::stack(sums), count = at::stack(counts);
    const at::Tensor labelled = count.gt(0);
    const at::Tensor zero = at::zeros({}, total.options());
    losses.copy_(at::where(labelled, total / count, zero));
    scale.copy_(at::where(labelled, count.reciprocal(), zero));
    BadTarget first;
    if (!report) return first;
    for (int64_t k = 0; k < num_tasks; ++k) {
      const at::Tensor& bad = bad_masks[k];
      if (!bad.any().item<bool>()) continue;
      const int64_t row = at::argmax(bad.any(1).to(at::kInt)).item<int64_t>();
      if (first.row >= 0 && row >= first.row) continue;
      const int64_t col = tasks[k].target_offset + at::argmax(bad[row].to(at::kInt)).item<int64_t>();
      first = BadTarget{row, k, col, targets[row][col].item<double>()};
    }
    return first;
  }

  void pack_targets(const std::vector<at::Tensor>& targets, const std::vector<HeadTask>& tasks,
                    const at::Tensor& out) const override {
    for (size_t t = 0; t < targets.size(); ++t) {
      const int64_t width = target_width(tasks[t].loss, tasks[t].num_outputs);
      const at::Tensor& src = targets[t];
      out.narrow(1, tasks[t].target_offset, width).copy_(src.dim() == 1 ? src.unsqueeze(1) : src);
    }
  }

  void task_cotangents(const std::vector<int64_t>& num_outputs, const at::Tensor& logit_grad,
                       const at::Tensor& col_scale, const at::Tensor& head, const at::Tensor& out) const override {
    const int64_t rows = logit_grad.size(0), tasks = static_cast<int64_t>(num_outputs.size());
    const at::Tensor by_task = out.view({rows, tasks, head.size(1)});
    const at::Tensor scaled = (wide(logit_grad) * col_scale).to(head.scalar_type());
    int64_t col = 0;
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t n = num_outputs[t];
      by_task.select(1, t).copy_(at::mm(scaled.narrow(1, col, n), head.narrow(0, col, n)));
      col += n;
    }
  }

  void expert_bias_activation(Activation act, const at::Tensor& in, const at::Tensor& bias, const at::Tensor& pre,
                              const at::Tensor& out) const override {
    at::Tensor a = bias.defined() ? (wide(in) + wide(bias).unsqueeze(1)).to(pre.scalar_type()) : in;
    if (out.defined()) {
      pre.copy_(a);
      out.copy_(act_forward(act, wide(pre)));
    } else {
      pre.copy_(act_forward(act, wide(a)));
    }
  }

  void expert_activation_backward(Activation act, const at::Tensor& grad, const at::Tensor& saved,
                                  const at::Tensor& delta, const at::Tensor& bias_grad) const override {
    delta.copy_(act_backward(act, wide(grad), wide(saved)));
    if (bias_grad.defined()) sum_into(delta, 1, bias_grad);
  }

  void gated_mixture_forward(const GateArgs& g, const at::Tensor& gates, const at::Tensor& gate_bias,
                             const at::Tensor& experts, const at::Tensor& mixtures) const override {
    at::Tensor logits = wide(gates);
    if (gate_bias.defined()) logits = logits + wide(gate_bias).unsqueeze(1);
    gates.copy_(at::softmax(logits, -1));
    const at::Tensor p = wide(gates);  // [T, B, K], as stored
    // P[t, b, e]: the weight of expert e in task t's mixture of row b.
    const at::Tensor weights = g.identity_index ? p : at::bmm(p, gate_membership(g, p.options()));
    const at::Tensor ex = wide(experts);
    mixtures.copy_(at::bmm(weights.permute({1, 0, 2}), ex.permute({1, 0, 2})).permute({1, 0, 2}));
  }

  void dropout_forward(double p, const at::Tensor& in, const at::Tensor& keep, const at::Tensor& out) const override {
    auto [dropped, mask] = at::native_dropout(in, p, true);
    out.copy_(dropped);
    keep.copy_(mask);
  }

  void dropout_apply(double p, const at::Tensor& keep, const at::Tensor& in, const at::Tensor& out) const override {
    out.copy_(at::native_dropout_backward(in, keep, p >= 1.0 ? 0.0 : 1.0 / (1.0 - p)));
  }

  void gated_mixture_backward(const GateArgs& g, const at::Tensor& grad_mixtures, const at::Tensor& gates,
                              const at::Tensor& experts, const at::Tensor& grad_logits, const at::Tensor& grad_experts,
                              const at::Tensor& grad_bias) const override {
    const at::Tensor p = wide(gates), dm = wide(grad_mixtures), ex = wide(experts);
    const at::Tensor membership = g.identity_index ? at::Tensor() : gate_membership(g, p.options());
    const at::Tensor weights = g.identity_index ? p : at::bmm(p, membership);  // [T, B, E]
    // d weights[t, b, e] = <d mixture[t, b], expert e at row b>, then back to the gate entries.
    const at::Tensor d_weights = at::bmm(dm.permute({1, 0, 2}), ex.permute({1, 2, 0})).permute({1, 0, 2});  // [T, B, E]
    const at::Tensor dot = g.identity_index ? d_weights : at::bmm(d_weights, membership.transpose(1, 2));
    const at::Tensor dl = p * (dot - (p * dot).sum(-1, /*keepdim=*/true));
    grad_logits.copy_(dl);
    grad_experts.copy_(at::bmm(weights.permute({1, 2, 0}), dm.permute({1, 0, 2})).permute({1, 0, 2}));
    if (grad_bias.defined()) sum_into(grad_logits, 1, grad_bias);
  }
};

}  // namespace

const Steps& portable_steps() {
  static const PortableSteps steps;
  return steps;
}

}  // namespace fastmtl::kernels
