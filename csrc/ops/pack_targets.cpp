// fastmtl::pack_targets: the per-task targets of a batch (dict values in task order) into the
// packed [B, sum of widths] tensor the head-loss op reads, in one call: one copy loop per task
// instead of a Python loop of conversions and a torch.cat. CPU kernel here; the argument checks are
// ops/pack_targets_checks.h, shared with the CUDA entry point in csrc/cuda/.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "ops/pack_targets_checks.h"

namespace fastmtl::ops {
namespace {

constexpr const char* kOp = "pack_targets";

template <typename Out, typename In>
void copy_columns(const at::Tensor& src, int64_t width, Out* dst, int64_t dst_stride) {
  const In* p = src.const_data_ptr<In>();
  const int64_t rows = src.size(0);
  const int64_t s0 = src.stride(0);
  const int64_t s1 = src.dim() == 2 ? src.stride(1) : 0;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < width; ++j) dst[i * dst_stride + j] = static_cast<Out>(p[i * s0 + j * s1]);
}

at::Tensor pack_targets_entry(const std::vector<at::Tensor>& targets, const std::vector<std::string>& names,
                              const std::vector<std::string>& losses, c10::ArrayRef<int64_t> num_outputs,
                              at::ScalarType dtype) {
  const TaskLayout layout = check_pack_targets_args(targets, names, losses, num_outputs, dtype);
  const int64_t rows = targets[0].size(0);
  if (!targets[0].is_cpu()) no_kernel_for_device(kOp, targets[0], "targets");

  at::Tensor packed = at::empty({rows, layout.target_cols}, targets[0].options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(dtype, "fastmtl_pack_targets_out", [&] {
    using Out = scalar_t;
    Out* out = packed.mutable_data_ptr<Out>();
    for (size_t t = 0; t < targets.size(); ++t) {
      const HeadTask& task = layout.tasks[t];
      const int64_t width = target_width(task.loss, task.num_outputs);
      AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, targets[t].scalar_type(),
                                 "fastmtl_pack_targets_in", [&] {
        copy_columns<Out, scalar_t>(targets[t], width, out + task.target_offset, layout.target_cols);
      });
    }
  });
  return packed;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmtl, CPU, m) { m.impl("pack_targets", &pack_targets_entry); }
#if !FASTMTL_WITH_CUDA
// A build without CUDA kernels still checks CUDA tensors, then says it has no kernel for them.
TORCH_LIBRARY_IMPL(fastmtl, CUDA, m) { m.impl("pack_targets", &pack_targets_entry); }
#endif

}  // namespace fastmtl::ops
