// fastmtl::pack_targets on CUDA: the shared argument checks, then one kernel launch (per 64 tasks)
// converting every task's targets into the packed tensor (pack_targets.cu), on the current stream.
#include <torch/library.h>

#include "cuda/glue.h"
#include "ops/pack_targets_checks.h"

namespace fastmtl::cuda {
namespace {

SourceType source_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return SourceType::Float32;
    case at::kDouble: return SourceType::Float64;
    case at::kHalf: return SourceType::Float16;
    case at::kBFloat16: return SourceType::BFloat16;
    case at::kBool: return SourceType::Bool;
    case at::kByte: return SourceType::UInt8;
    case at::kChar: return SourceType::Int8;
    case at::kShort: return SourceType::Int16;
    case at::kInt: return SourceType::Int32;
    case at::kLong: return SourceType::Int64;
    default:
      TORCH_CHECK_TYPE(false, "fastmtl.pack_targets: no CUDA conversion from dtype ", ops::dtype_name(t));
  }
}

at::Tensor pack_targets_entry(const std::vector<at::Tensor>& targets, const std::vector<std::string>& names,
                              const std::vector<std::string>& losses, c10::ArrayRef<int64_t> num_outputs,
                              at::ScalarType dtype) {
  const ops::TaskLayout layout = ops::check_pack_targets_args(targets, names, losses, num_outputs, dtype);
  const c10::cuda::CUDAGuard device_guard(targets[0].device());
  const int64_t rows = targets[0].size(0);
  std::vector<PackSource> sources;
  sources.reserve(targets.size());
  for (size_t t = 0; t < targets.size(); ++t) {
    const at::Tensor& target = targets[t];
    const HeadTask& task = layout.tasks[t];
    sources.push_back(PackSource{target.const_data_ptr(), target.stride(0), target.dim() == 2 ? target.stride(1) : 0,
                                 task.target_offset, static_cast<int32_t>(target_width(task.loss, task.num_outputs)),
                                 source_type(target.scalar_type())});
  }
  at::Tensor packed = at::empty({rows, layout.target_cols}, targets[0].options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(dtype, "fastmtl_pack_targets_cuda", [&] {
    check_launch(pack_targets<scalar_t>(sources.data(), static_cast<int64_t>(sources.size()), rows,
                                        layout.target_cols, packed.mutable_data_ptr<scalar_t>(),
                                        current_stream(packed)));
  });
  return packed;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmtl, CUDA, m) { m.impl("pack_targets", &pack_targets_entry); }

}  // namespace fastmtl::cuda
