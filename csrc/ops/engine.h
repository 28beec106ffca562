// The per-task engine of fastmtl's own model, one orchestration for every device: the Gram matrix of the per-task
// gradients of the fused trunk's parameters, without T backward passes and without the T x P Jacobian, and the weighted
// backward that applies the aggregator's weights. The math is ARCHITECTURE.md's:
//  - task t's cotangent of the trunk output is dz_t = S_t H_t (S: the loss pass's logit gradients
//    scaled by task weight / labelled count, H_t: the task's head rows);
//  - the T cotangents go down the trunk together as one [B*T, d] matrix (row b*T + t), one GEMM per
//    layer, every task meeting the same activation derivative;
//  - layer l adds its Gram share G_l[s, t] = <g_s, g_t> (+ bias terms) with g_t = delta_t^T X_l,
//    either by materialising all g_t in one GEMM or by the ghost product with K = X_l X_l^T.
// Its elementwise / reduction steps go through the kernel interface (kernels/steps.h). Inputs are
// checked and contiguous (csrc/ops/mtl_engine.cpp does that); 16-bit inputs arrive as float32.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "common/activation.h"
#include "kernels/steps.h"

namespace fastmtl::ops {

// How a layer's Gram share is computed. Auto picks the cheaper by the cost model below.
enum class GramPath : int64_t { Auto = -1, Materialise = 0, Ghost = 1 };

// Multiply-adds of each path for one layer (T tasks, B rows, d_in -> d_out).
//  materialise: all g_t in one GEMM (T*B*d_in*d_out), then their Gram (T^2*d_in*d_out);
//  ghost: K = X X^T (B^2*d_in), K delta (T*B^2*d_out), then <delta_s, K delta_t> (T^2*B*d_out).
double materialise_cost(int64_t tasks, int64_t rows, int64_t d_in, int64_t d_out);
double ghost_cost(int64_t tasks, int64_t rows, int64_t d_in, int64_t d_out);

struct TrunkGram {
  at::Tensor gram;         // [T, T]
  at::Tensor jacobian;     // [T, P] (every weight, then every bias, as FusedMLP.parameters()); or [0]
  at::Tensor layer_paths;  // [L] int64: the GramPath each layer used
};

// logit_grad [B, C], count_scale [T] (1/labelled count), task_weights [T]: the head loss's outputs
// and the weight of each task's loss; head_weight [C, d_L]. keep_jacobian forces materialise.
TrunkGram trunk_task_gram(const kernels::Steps& steps, const at::Tensor& x, const std::vector<at::Tensor>& weights,
                          const at::Tensor& out, const std::vector<at::Tensor>& saved, Activation act, bool has_bias,
                          const at::Tensor& head_weight, const at::Tensor& logit_grad, const at::Tensor& count_scale,
                          const at::Tensor& task_weights, const std::vector<int64_t>& num_outputs, GramPath path,
                          bool keep_jacobian);

// The Gram of the per-task gradients of the trunk output (representation mode, MGDA-UB):
// G[s, t] = sum over (i in s, j in t) of (S^T S)[i, j] (H H^T)[i, j]: C^2 (B + d) work instead of
// T^2 B d.
at::Tensor representation_gram(const kernels::Steps& steps, const at::Tensor& head_weight, const at::Tensor& logit_grad,
                               const at::Tensor& count_scale, const at::Tensor& task_weights,
                               const std::vector<int64_t>& num_outputs);

struct WeightedBackward {
  at::Tensor head_weight_grad, head_bias_grad;       // from head_task_weights (each head: its own task)
  at::Tensor input_grad;                             // [0] unless need_input_grad
  std::vector<at::Tensor> weight_grads, bias_grads;  // trunk, from trunk_task_weights
};

// One ordinary backward with separate upstream weights for the heads (task.weight) and for the
// trunk (the aggregator's weights times task.weight): both read the same logit gradients.
WeightedBackward weighted_backward(const kernels::Steps& steps, const at::Tensor& x,
                                   const std::vector<at::Tensor>& weights, const at::Tensor& out,
                                   const std::vector<at::Tensor>& saved, Activation act, bool has_bias,
                                   const at::Tensor& head_weight, bool head_has_bias, const at::Tensor& logit_grad,
                                   const at::Tensor& count_scale, const at::Tensor& head_task_weights,
                                   const at::Tensor& trunk_task_weights, const std::vector<int64_t>& num_outputs,
                                   bool need_input_grad);

}  // namespace fastmtl::ops
