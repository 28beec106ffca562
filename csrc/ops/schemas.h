// The schemas of the fused ops, shared by the fastmtl and fastmtl_portable libraries (library.cpp).
#pragma once

namespace fastmtl::ops {

inline constexpr const char* kFusedOpSchemas[] = {
    // The whole trunk: z_l = act(z_{l-1} W_l^T + b_l). biases: one per layer, or empty for none
    // (not Tensor?[]: torch.library autograd gives no gradient to a list holding None).
    // Returns (output, saved for backward).
    "fused_mlp(Tensor x, Tensor[] weights, Tensor[] biases, str activation) -> (Tensor, Tensor[])",
    // Returns (dx, dW per layer, db per layer or empty when the forward had no biases).
    "fused_mlp_backward(Tensor grad_out, Tensor x, Tensor[] weights, Tensor out, Tensor[] saved, "
    "str activation, bool has_bias, bool need_input_grad) -> (Tensor, Tensor[], Tensor[])",
    // The towers real models use: z_l = dropout(act(norm(z_{l-1} W_l^T + b_l))), norm 'batch'
    // (BatchNorm1d: batch statistics in training, running ones in eval), 'layer' or 'none'.
    // Lists: one tensor per layer, or empty for none (biases; norm_weights / norm_biases for a
    // non-affine norm; running statistics). Returns (output, saved for backward: ops/norm_trunk.h's
    // five per layer, the updated running means then variances: 2 per layer in training with
    // running statistics, else none). Functional: the caller writes the new running statistics
    // into its buffers (torch.compile cannot functionalise a mutating op that returns a list).
    "fused_mlp_norm(Tensor x, Tensor[] weights, Tensor[] biases, Tensor[] norm_weights, Tensor[] norm_biases, "
    "Tensor[] running_means, Tensor[] running_vars, str norm, str activation, float dropout, "
    "bool training, float momentum, float eps) -> (Tensor, Tensor[], Tensor[])",
    // Returns (dx or [0], dW per layer, db per layer or empty, d norm_weights, d norm_biases (or empty)).
    "fused_mlp_norm_backward(Tensor grad_out, Tensor x, Tensor[] weights, Tensor[] biases, Tensor[] norm_weights, "
    "Tensor[] norm_biases, Tensor[] running_means, Tensor[] running_vars, Tensor out, Tensor[] saved, str norm, "
    "str activation, float dropout, bool training, float momentum, float eps, bool need_input_grad) "
    "-> (Tensor, Tensor[], Tensor[], Tensor[], Tensor[])",
    // All heads (one GEMM) and all per-task losses. Returns (losses [T], dL/dlogits before the
    // 1/count [B, C], 1/count per task [T]).
    "multitask_head_loss(Tensor z, Tensor weight, Tensor? bias, Tensor targets, str[] losses, "
    "int[] num_outputs) -> (Tensor, Tensor, Tensor)",
    // Returns (dz = sum_t w_t dL_t/dz, dweight, dbias).
    "multitask_head_loss_backward(Tensor grad_losses, Tensor z, Tensor weight, Tensor logit_grad, "
    "Tensor scale, int[] num_outputs, bool has_bias, bool need_z_grad) -> (Tensor, Tensor, Tensor)",
    // E expert MLPs on one input x [B, d0] (or one input each, [E, B, d0]): weights[l] [E, out_l,
    // in_l], biases[l] [E, out_l] or none. Returns ([E, B, out_L], saved for backward).
    "fused_experts(Tensor x, Tensor[] weights, Tensor[] biases, str activation) -> (Tensor, Tensor[])",
    // Returns (dx, dW per layer, db per layer or empty when the forward had no biases).
    "fused_experts_backward(Tensor grad_out, Tensor x, Tensor[] weights, Tensor out, Tensor[] saved, "
    "str activation, bool has_bias, bool need_input_grad) -> (Tensor, Tensor[], Tensor[])",
    // Per-task softmax gates over experts (all gate logits in one GEMM) and the mixtures
    // sum_k softmax(x_t W_t^T + b_t)_k experts[expert_index[t, k]]. x [B, d] or [T, B, d];
    // gate_weight [T, K, d]; gate_bias [T, K]; experts [E, B, h]; expert_index: T * K entries, or
    // empty for K = E and every gate over all experts. Returns (mixtures [T, B, h], gates).
    "gated_mixture(Tensor x, Tensor gate_weight, Tensor? gate_bias, Tensor experts, int[] expert_index) "
    "-> (Tensor, Tensor)",
    // Returns (dx or [0], d gate_weight, d gate_bias or [0], d experts).
    "gated_mixture_backward(Tensor grad_mixtures, Tensor x, Tensor gate_weight, Tensor experts, Tensor gates, "
    "int[] expert_index, bool has_bias, bool need_x_grad) -> (Tensor, Tensor, Tensor, Tensor)",
    // Per-task targets (float / bool / integer class indices) into one [B, sum of widths] tensor.
    "pack_targets(Tensor[] targets, str[] names, str[] losses, int[] num_outputs, ScalarType dtype) "
    "-> Tensor",

    // The per-task engine of the fused model (csrc/ops/engine.h): it reads what fused_mlp and
    // multitask_head_loss returned. task_weights: the weight of each task's loss. Not differentiable.
    // Returns (gram [T, T], jacobian [T, P] or [0], the Gram path each layer took [L] int64).
    "mtl_trunk_gram(Tensor x, Tensor[] weights, Tensor out, Tensor[] saved, str activation, bool has_bias, "
    "Tensor head_weight, Tensor logit_grad, Tensor count_scale, Tensor task_weights, int[] num_outputs, "
    "str gram_path, bool keep_jacobian) -> (Tensor, Tensor, Tensor)",
    // The Gram of the per-task gradients of the trunk output (representation mode).
    "mtl_representation_gram(Tensor head_weight, Tensor logit_grad, Tensor count_scale, Tensor task_weights, "
    "int[] num_outputs) -> Tensor",
    // One backward: heads from head_task_weights, trunk from trunk_task_weights. Returns
    // (d head_weight, d head_bias or [0], dx or [0], dW per layer, db per layer or empty).
    "mtl_weighted_backward(Tensor x, Tensor[] weights, Tensor out, Tensor[] saved, str activation, bool has_bias, "
    "Tensor head_weight, bool head_has_bias, Tensor logit_grad, Tensor count_scale, Tensor head_task_weights, "
    "Tensor trunk_task_weights, int[] num_outputs, bool need_input_grad) "
    "-> (Tensor, Tensor, Tensor, Tensor[], Tensor[])",
};

}  // namespace fastmtl::ops
