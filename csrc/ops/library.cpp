// The op schemas of the fastmtl namespace. Kernels are registered per device in the files beside
// this one (CPU) and in csrc/cuda/ (CUDA); fake kernels and autograd live in python/fastmtl/ops.py.
//
// Forward ops return, after their result, the tensors their backward needs; the Python wrappers
// return only the result. Backward ops return [0]-sized tensors for gradients not asked for.
#include <torch/library.h>

TORCH_LIBRARY(fastmtl, m) {
  // The whole trunk: z_l = act(z_{l-1} W_l^T + b_l). biases: one per layer, or empty for none
  // (not Tensor?[]: torch.library autograd gives no gradient to a list holding None).
  // Returns (output, saved for backward).
  m.def("fused_mlp(Tensor x, Tensor[] weights, Tensor[] biases, str activation) -> (Tensor, Tensor[])");
  // Returns (dx, dW per layer, db per layer or empty when the forward had no biases).
  m.def(
      "fused_mlp_backward(Tensor grad_out, Tensor x, Tensor[] weights, Tensor out, Tensor[] saved, "
      "str activation, bool has_bias, bool need_input_grad) -> (Tensor, Tensor[], Tensor[])");
  // All heads (one GEMM) and all per-task losses. Returns (losses [T], dL/dlogits before the
  // 1/count [B, C], 1/count per task [T]).
  m.def(
      "multitask_head_loss(Tensor z, Tensor weight, Tensor? bias, Tensor targets, str[] losses, "
      "int[] num_outputs) -> (Tensor, Tensor, Tensor)");
  // Returns (dz = sum_t w_t dL_t/dz, dweight, dbias).
  m.def(
      "multitask_head_loss_backward(Tensor grad_losses, Tensor z, Tensor weight, Tensor logit_grad, "
      "Tensor scale, int[] num_outputs, bool has_bias, bool need_z_grad) -> (Tensor, Tensor, Tensor)");
  // E expert MLPs on one input x [B, d0] (or one input each, [E, B, d0]): weights[l] [E, out_l,
  // in_l], biases[l] [E, out_l] or none. Returns ([E, B, out_L], saved for backward).
  m.def("fused_experts(Tensor x, Tensor[] weights, Tensor[] biases, str activation) -> (Tensor, Tensor[])");
  // Returns (dx, dW per layer, db per layer or empty when the forward had no biases).
  m.def(
      "fused_experts_backward(Tensor grad_out, Tensor x, Tensor[] weights, Tensor out, Tensor[] saved, "
      "str activation, bool has_bias, bool need_input_grad) -> (Tensor, Tensor[], Tensor[])");
  // Per-task softmax gates over experts (all gate logits in one GEMM) and the mixtures
  // sum_k softmax(x_t W_t^T + b_t)_k experts[expert_index[t, k]]. x [B, d] or [T, B, d];
  // gate_weight [T, K, d]; gate_bias [T, K]; experts [E, B, h]; expert_index: T * K entries, or
  // empty for K = E and every gate over all experts. Returns (mixtures [T, B, h], gates).
  m.def(
      "gated_mixture(Tensor x, Tensor gate_weight, Tensor? gate_bias, Tensor experts, int[] expert_index) "
      "-> (Tensor, Tensor)");
  // Returns (dx or [0], d gate_weight, d gate_bias or [0], d experts).
  m.def(
      "gated_mixture_backward(Tensor grad_mixtures, Tensor x, Tensor gate_weight, Tensor experts, Tensor gates, "
      "int[] expert_index, bool has_bias, bool need_x_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  // Per-task targets (float / bool / integer class indices) into one [B, sum of widths] tensor.
  m.def(
      "pack_targets(Tensor[] targets, str[] names, str[] losses, int[] num_outputs, ScalarType dtype) "
      "-> Tensor");

  // The per-task engine of the fused model (csrc/cpu/mtl_engine.h): it reads what fused_mlp and
  // multitask_head_loss returned. task_weights: the weight of each task's loss. Not differentiable.
  // Returns (gram [T, T], jacobian [T, P] or [0], the Gram path each layer took [L] int64).
  m.def(
      "mtl_trunk_gram(Tensor x, Tensor[] weights, Tensor out, Tensor[] saved, str activation, bool has_bias, "
      "Tensor head_weight, Tensor logit_grad, Tensor count_scale, Tensor task_weights, int[] num_outputs, "
      "str gram_path, bool keep_jacobian) -> (Tensor, Tensor, Tensor)");
  // The Gram of the per-task gradients of the trunk output (representation mode).
  m.def(
      "mtl_representation_gram(Tensor head_weight, Tensor logit_grad, Tensor count_scale, Tensor task_weights, "
      "int[] num_outputs) -> Tensor");
  // One backward: heads from head_task_weights, trunk from trunk_task_weights. Returns
  // (d head_weight, d head_bias or [0], dx or [0], dW per layer, db per layer or empty).
  m.def(
      "mtl_weighted_backward(Tensor x, Tensor[] weights, Tensor out, Tensor[] saved, str activation, bool has_bias, "
      "Tensor head_weight, bool head_has_bias, Tensor logit_grad, Tensor count_scale, Tensor head_task_weights, "
      "Tensor trunk_task_weights, int[] num_outputs, bool need_input_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor[], Tensor[])");

  // Aggregation: batches of Gram matrices gram [N, T, T] -> task weights [N, T], solved in double
  // precision on the CPU (csrc/cpu/aggregation/). Non-differentiable: the weights are constants of
  // the update, as in every method they implement.
  // UPGrad / DualProj: for each u [N, K, T], the v >= u minimising v^T H v, H = G / tr(G) + reg_eps I.
  m.def("dual_cone_projection(Tensor gram, Tensor u, float norm_eps, float reg_eps) -> Tensor");
  // UPGrad (each) / DualProj (not each) as weights in one call; gram [T, T] or [N, T, T], pref [T] or [N, T].
  m.def("dual_cone_weights(Tensor gram, Tensor pref, float norm_eps, float reg_eps, bool each) -> Tensor");
  // MGDA: the weights of the minimum-norm point of the convex hull of the gradients.
  m.def("min_norm_weights(Tensor gram) -> Tensor");
  m.def("cagrad_weights(Tensor gram, float c, float norm_eps) -> Tensor");
  // Nash-MTL (exponent 1) and FairGrad (exponent 1/alpha): the x > 0 with G x = x^(-exponent).
  // Returns (weights [N, T], relative residuals [N] in float64: above 1e-9 where Newton did not converge).
  m.def("power_system_weights(Tensor gram, float exponent) -> (Tensor, Tensor)");
  // order [N, T, T]: for each task, the order in which the others are visited.
  m.def("pcgrad_weights(Tensor gram, Tensor order) -> Tensor");
  // order [N, T, T - 1]; targets [N, T, T] the EMA cosine targets. Returns (weights, new targets).
  m.def("gradvac_weights(Tensor gram, Tensor order, Tensor targets, float beta, float eps) -> (Tensor, Tensor)");
  m.def("aligned_mtl_weights(Tensor gram, Tensor pref, str scale_mode) -> Tensor");
  m.def("imtlg_weights(Tensor gram) -> Tensor");
  m.def("config_weights(Tensor gram, Tensor pref) -> Tensor");
}
