// The orchestration of fused_mlp_norm, written once for every device: the towers real models use,
// z_l = dropout(act(norm(z_{l-1} W_l^T + b_l))) with norm batch / layer / none, per layer one ATen
// GEMM, the normalisation by ATen's batch_norm / layer_norm kernels (native_batch_norm,
// native_layer_norm and their backwards: every device has them; BatchNorm1d's exact semantics),
// the activation and dropout by the kernel interface (kernels/steps.h; the mask from torch's
// generator). Inputs are checked and contiguous (ops/fused_mlp_norm.cpp).
//
// Stacked form: weights [E, out, in] are E towers with the same widths (the experts of MMoE / PLE,
// the per-task towers), run together: x [B, d] (shared) or [E, B, d], activations [E, B, out],
// per-layer vectors (biases, normalisation parameters, running statistics) [E, out]. On CUDA (and
// below 128 rows) layer-major, one batched GEMM per layer; on the CPU from 128 rows tower-major,
// each tower through every layer on its slices (norm_trunk.cpp says why). Batch norm normalises
// every (tower, feature) over the batch, layer norm every (tower, row) over the features, as E
// separate BatchNorm1d / LayerNorm modules would.
//
// 16-bit storage: GEMMs in 16-bit (float32 accumulation), the normalisation in float32 with
// float32 statistics, one rounding to the storage dtype; the updated running statistics come back
// in their own dtype.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "common/activation.h"
#include "kernels/steps.h"

namespace fastmtl::ops {

enum class NormKind { None, Batch, Layer };

// Tensors of the tower; the lists are empty where the tower has none (biases, an affine
// normalisation, running statistics), else one per layer.
struct NormTrunkParams {
  std::vector<at::Tensor> weights, biases, norm_weights, norm_biases, running_means, running_vars;
};

struct NormTrunkConfig {
  NormKind norm;
  Activation act;  // Identity when softmax
  bool softmax;    // softmax over each row's features in place of an elementwise activation (gates)
  double dropout;  // probability of zeroing an entry, in training
  bool training;
  double momentum;  // of the running statistics (BatchNorm1d's)
  double eps;
};

// What fused_mlp_norm saves per layer, in this order (kSavedPerLayer tensors per layer).
//   pre       the GEMM + bias output (the normalisation's input); [0] without normalisation
//   mean      the batch mean (batch norm in training / without running statistics: [d]; layer
//             norm: [B, 1]); [0] otherwise. float32 (float64 for float64 inputs). Stacked: the
//             leading E ([E, d], [E, B, 1]) on these and on every other saved tensor.
//   invstd    1 / sqrt(var + eps), as mean
//   act_src   what act' reads: the activation's input (gelu, gelu_tanh, silu) or output (relu, tanh,
//             identity, softmax); [0] for the top layer when that is the op's output itself (no
//             dropout)
//   mask      the dropout mask (bool) where dropout ran, else [0]
inline constexpr int64_t kSavedPerLayer = 5;

// Uses batch statistics (not the running ones): in training, or when there are none.
inline bool uses_batch_statistics(const NormTrunkConfig& c, const NormTrunkParams& p) {
  return c.training || p.running_means.empty();
}

// E stacked towers (weights [E, out, in]) rather than one.
inline bool is_stacked(const NormTrunkParams& p) { return p.weights[0].dim() == 3; }

// Returns (output, saved, the updated running statistics: means then variances, in the running
// statistics' dtype, when training with them; else empty). The inputs are not modified.
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> norm_trunk_forward(
    const kernels::Steps& steps, const at::Tensor& x, const NormTrunkParams& params, const NormTrunkConfig& config);

struct NormTrunkGrads {
  at::Tensor input;  // [0] when not asked for
  std::vector<at::Tensor> weights, biases, norm_weights, norm_biases;
};

NormTrunkGrads norm_trunk_backward(const kernels::Steps& steps, const at::Tensor& grad_out, const at::Tensor& x,
                                   const NormTrunkParams& params, const NormTrunkConfig& config, const at::Tensor& out,
                                   const std::vector<at::Tensor>& saved, bool need_input_grad);

}  // namespace fastmtl::ops
