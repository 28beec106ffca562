// Helpers of the fused ops' rules at the Batched dispatch key, the key of torch's legacy vmap, which
// torch.autograd.grad(..., is_grads_batched=True) runs on (the batched backward of
// fastmtl.mtl_backward): the cotangent of a backward op arrives as a BatchedTensor holding T tasks'
// cotangents; the rules take its physical tensor, compute all T tasks' gradients (over batched ATen
// ops, or with the op's kernel once per task: ops/per_task_batched.h)
// and hand them back batched at the same level. Only the cotangent may be batched: the other
// arguments are the forward's saved tensors (a vmap over them is refused, naming the op).
#pragma once

#include <ATen/ATen.h>
#include <ATen/LegacyBatchedTensorImpl.h>

#include <initializer_list>
#include <vector>

#include "common/activation.h"

namespace fastmtl::ops {

// The physical tensor of a legacy BatchedTensor with its (single) batch dimension first, and its level.
inline at::Tensor physical_batch_first(const at::Tensor& t, int64_t* level, const char* op, const char* arg) {
  const at::BatchedTensorImpl* impl = at::maybeGetBatchedImpl(t);
  TORCH_CHECK(impl != nullptr && impl->bdims().size() == 1, "fastmtl.", op, ": argument '", arg,
              "' expected one vmap level, got nested vmaps");
  *level = impl->bdims()[0].level();
  return impl->value().movedim(impl->bdims()[0].dim(), 0);
}

// A batch of no cotangents has no task to take the shapes from: refused, naming the argument.
inline void check_some_cotangents(const at::Tensor& physical, const char* op, const char* arg) {
  TORCH_CHECK_VALUE(physical.size(0) >= 1, "fastmtl.", op, ": argument '", arg,
                    "' expected a batch of at least one cotangent, got an empty batch");
}

inline at::Tensor batched_at(const at::Tensor& physical, int64_t level) {
  return at::makeBatched(physical, at::BatchDims{at::BatchDim(level, 0)});
}

inline bool any_batched(std::initializer_list<const at::Tensor*> tensors,
                        std::initializer_list<const std::vector<at::Tensor>*> lists = {}) {
  for (const at::Tensor* t : tensors)
    if (t->defined() && at::isBatchedTensor(*t)) return true;
  for (const std::vector<at::Tensor>* list : lists)
    for (const at::Tensor& t : *list)
      if (at::isBatchedTensor(t)) return true;
  return false;
}

// Refuses a call whose batched arguments are anything but the cotangent ``grad``.
inline void check_only_cotangent_batched(bool others_batched, const at::Tensor& grad, const char* op,
                                         const char* grad_name, const char* others) {
  TORCH_CHECK(!others_batched && at::isBatchedTensor(grad), "fastmtl.", op, ": a vmap over the forward's tensors (",
              others, ") is not supported; only the cotangent '", grad_name,
              "' may be batched (torch.autograd.grad with is_grads_batched=True, as fastmtl.mtl_backward does)");
}

// float32 for 16-bit tensors (the batched rules compute in float32 and round once, as the ops do).
inline at::Tensor widened(const at::Tensor& t) {
  const at::ScalarType dtype = t.scalar_type();
  return dtype == at::kBFloat16 || dtype == at::kHalf ? t.to(at::kFloat) : t;
}

// The activation of a saved pre-activation (gelu / silu: the layer input the backward recomputes).
inline at::Tensor activation_of(const at::Tensor& pre, Activation act) {
  switch (act) {
    case Activation::Gelu:
      return at::gelu(pre, "none");
    case Activation::GeluTanh:
      return at::gelu(pre, "tanh");
    case Activation::Silu:
      return at::silu(pre);
    default:
      return pre;  // not reached: the post-activation kinds save the output itself
  }
}

// act'(layer) * g for T cotangents g [T, ...]; ``kept`` the layer's saved tensor [...] (its output
// for relu / tanh / identity, its pre-activation for gelu / silu).
inline at::Tensor through_activation(const at::Tensor& g, const at::Tensor& kept, Activation act) {
  const at::Tensor k = kept.unsqueeze(0).expand_as(g);
  switch (act) {
    case Activation::Relu:
      return at::threshold_backward(g, k, 0);
    case Activation::Tanh:
      return at::tanh_backward(g, k);
    case Activation::Identity:
      return g;
    case Activation::Gelu:
      return at::gelu_backward(g, k, "none");
    case Activation::GeluTanh:
      return at::gelu_backward(g, k, "tanh");
    case Activation::Silu:
      return at::silu_backward(g, k);
  }
  return g;
}

}  // namespace fastmtl::ops
