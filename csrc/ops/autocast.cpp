// The Autocast rules of the fastmtl ops, for torch.autocast on CPU and CUDA, with PyTorch's own
// policy (aten/src/ATen/autocast_mode.cpp): an op whose work is GEMMs runs in the
// autocast dtype ("lower_precision_fp", as mm / addmm / linear), the rest runs in the dtypes it is
// given ("fallthrough").
//
//   lower precision  fused_mlp, fused_mlp_norm, fused_experts, gated_mixture, multitask_head_loss:
//                    every floating tensor argument cast to the autocast dtype (float64 stays, as
//                    for at::mm), except the head-loss targets, which are in the loss dtype
//                    (float32) at any dtype of z, and fused_mlp_norm's normalisation parameters
//                    and running statistics (float32, see keeps_dtype). The ops compute their losses in float32
//                    (loss_dtype), as autocast does for binary_cross_entropy_with_logits / cross_entropy / mse_loss.
//   fallthrough      the backward ops (autograd gives them the forward's dtypes), pack_targets (its
//                    dtype is an argument), the engine ops (they take what the forward returned and
//                    compute in float32 for 16-bit inputs) and the aggregation ops (they solve in
//                    float64 for a Gram of any dtype).
//
// Why one boxed kernel and not a typed wrapper per op: the cast is the same walk over the
// arguments for every op; the schema says which are tensors and tensor lists. Autocast runs above
// Autograd in the dispatcher, so the casts are recorded by autograd (the gradients of float32
// parameters come back in float32) and the cast weights are cached for the autocast region, as
// PyTorch caches them for its own GEMMs.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace fastmtl::ops {
namespace {

// Arguments that keep their dtype under autocast although they are floating tensors.
bool keeps_dtype(const c10::OperatorName& op, const std::string& arg) {
  if (op.name == "fastmtl::multitask_head_loss") return arg == "targets";
  // As autocast leaves batch_norm / layer_norm: the normalisation's parameters and running
  // statistics stay float32 (the op normalises 16-bit inputs in float32 and returns the updated
  // running statistics in their own dtype).
  if (op.name == "fastmtl::fused_mlp_norm")
    return arg == "norm_weights" || arg == "norm_biases" || arg == "running_means" || arg == "running_vars";
  return false;
}

template <c10::DeviceType device>
void lower_precision_kernel(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  const at::ScalarType lower = at::autocast::get_autocast_dtype(device);
  const auto first = stack->end() - static_cast<std::ptrdiff_t>(arguments.size());
  for (size_t i = 0; i < arguments.size(); ++i) {
    c10::IValue& value = first[static_cast<std::ptrdiff_t>(i)];
    if (keeps_dtype(op.operator_name(), arguments[i].name())) continue;
    if (value.isTensor()) {
      value = at::autocast::cached_cast(lower, value.toTensor(), device);
    } else if (value.isTensorList()) {
      // A new list: c10::List has reference semantics, and the caller's list is not ours to change.
      c10::List<at::Tensor> cast;
      for (const at::Tensor& t : value.toTensorList().vec())
        cast.push_back(at::autocast::cached_cast(lower, t, device));
      value = std::move(cast);
    }
  }
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(device));
  op.callBoxed(stack);
}

constexpr const char* kLowerPrecisionOps[] = {"fused_mlp", "fused_mlp_norm", "fused_experts", "gated_mixture",
                                              "multitask_head_loss"};
constexpr const char* kFallthroughOps[] = {
    "fused_mlp_backward",
    "fused_mlp_norm_backward",
    "fused_experts_backward",
    "gated_mixture_backward",
    "multitask_head_loss_backward",
    "pack_targets",
    "mtl_trunk_gram",
    "mtl_representation_gram",
    "mtl_weighted_backward",
    "dual_cone_projection",
    "dual_cone_weights",
    "min_norm_weights",
    "cagrad_weights",
    "power_system_weights",
    "pcgrad_weights",
    "gradvac_weights",
    "aligned_mtl_weights",
    "imtlg_weights",
    "config_weights",
};

template <c10::DeviceType device>
void register_autocast_rules(torch::Library& m) {
  for (const char* op : kLowerPrecisionOps)
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&lower_precision_kernel<device>>());
  for (const char* op : kFallthroughOps) m.impl(op, torch::CppFunction::makeFallthrough());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmtl, AutocastCPU, m) { register_autocast_rules<c10::DeviceType::CPU>(m); }
TORCH_LIBRARY_IMPL(fastmtl, AutocastCUDA, m) { register_autocast_rules<c10::DeviceType::CUDA>(m); }

}  // namespace fastmtl::ops
