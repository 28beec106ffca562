// fastmtl::pack_targets: the per-task targets of a batch (dict values in task order) into the
// packed [B, sum of widths] tensor the head-loss op reads, in one call: one copy loop per task
// instead of a Python loop of conversions and a torch.cat.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "ops/checks.h"
#include "ops/task_spec.h"

namespace fastmtl::ops {
namespace {

constexpr const char* kOp = "pack_targets";

void check_target_dtype(const at::Tensor& t, LossKind loss, const std::string& arg) {
  const at::ScalarType st = t.scalar_type();
  if (loss == LossKind::Ce) {
    TORCH_CHECK_TYPE(at::isIntegralType(st, /*includeBool=*/false), "fastmtl.pack_targets: argument '", arg,
                     "' (multiclass task) expected integer class indices (-100 = missing), got dtype ",
                     dtype_name(st));
  } else if (loss == LossKind::Bce) {
    TORCH_CHECK_TYPE(at::isFloatingType(st) || st == at::kBool, "fastmtl.pack_targets: argument '", arg,
                     "' (binary task) expected a floating or bool tensor (NaN = missing), got dtype ", dtype_name(st));
  } else {
    TORCH_CHECK_TYPE(at::isFloatingType(st), "fastmtl.pack_targets: argument '", arg,
                     "' (regression task) expected a floating tensor (NaN = missing), got dtype ", dtype_name(st));
  }
}

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
  const TaskLayout layout = parse_task_layout(kOp, losses, num_outputs);
  TORCH_CHECK_VALUE(targets.size() == losses.size() && names.size() == losses.size(),
                    "fastmtl.pack_targets: arguments 'targets' and 'names' expected ", losses.size(),
                    " entries (one per task), got ", targets.size(), " and ", names.size());
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble,
                   "fastmtl.pack_targets: argument 'dtype' expected torch.float32 or torch.float64, got ",
                   dtype_name(dtype));
  const int64_t rows = targets[0].dim() >= 1 ? targets[0].size(0) : 0;
  for (size_t t = 0; t < targets.size(); ++t) {
    const std::string arg = "targets['" + names[t] + "']";
    const int64_t width = target_width(layout.tasks[t].loss, layout.tasks[t].num_outputs);
    const at::Tensor& target = targets[t];
    const bool shape_ok = (target.dim() == 1 && width == 1) || (target.dim() == 2 && target.size(1) == width);
    TORCH_CHECK_VALUE(shape_ok && target.size(0) == rows && rows >= 1, "fastmtl.pack_targets: argument '", arg,
                      "' expected shape [", std::max<int64_t>(rows, 1), "]", width == 1 ? " or [B, 1]" : "",
                      " with B = ", rows, width == 1 ? "" : (" and " + std::to_string(width) + " columns"),
                      " (B >= 1, the batch of the first task), got ", shape_str(target.sizes()));
    TORCH_CHECK_VALUE(target.device() == targets[0].device(), "fastmtl.pack_targets: argument '", arg,
                      "' expected device ", targets[0].device(), " (the device of the first task's targets), got ",
                      target.device());
    check_target_dtype(target, layout.tasks[t].loss, arg);
  }
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
TORCH_LIBRARY_IMPL(fastmtl, CUDA, m) { m.impl("pack_targets", &pack_targets_entry); }

}  // namespace fastmtl::ops
