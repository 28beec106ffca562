// Argument checks of pack_targets, shared by the CPU entry point (csrc/ops/pack_targets.cpp) and
// the CUDA one (csrc/cuda/pack_targets.cpp).
#pragma once

#include <algorithm>
#include <string>
#include <vector>

#include "ops/checks.h"
#include "ops/task_spec.h"

namespace fastmtl::ops {

inline void check_target_dtype(const at::Tensor& t, LossKind loss, const std::string& arg) {
  const at::ScalarType st = t.scalar_type();
  if (loss == LossKind::Ce) {
    TORCH_CHECK_TYPE(at::isIntegralType(st, /*includeBool=*/false), "fastmtl.pack_targets: argument '", arg,
                     "' (multiclass task) expected integer class indices (-100 = missing), got dtype ", dtype_name(st));
  } else if (loss == LossKind::Bce) {
    TORCH_CHECK_TYPE(at::isFloatingType(st) || st == at::kBool, "fastmtl.pack_targets: argument '", arg,
                     "' (binary task) expected a floating or bool tensor (NaN = missing), got dtype ", dtype_name(st));
  } else {
    TORCH_CHECK_TYPE(at::isFloatingType(st), "fastmtl.pack_targets: argument '", arg,
                     "' (regression task) expected a floating tensor (NaN = missing), got dtype ", dtype_name(st));
  }
}

// One target per task, each [B] or [B, width] with the first one's batch (B >= 1) and device;
// dtype (of the packed result) float32 or float64.
inline TaskLayout check_pack_targets_args(const std::vector<at::Tensor>& targets, const std::vector<std::string>& names,
                                          const std::vector<std::string>& losses, c10::ArrayRef<int64_t> num_outputs,
                                          at::ScalarType dtype) {
  TaskLayout layout = parse_task_layout("pack_targets", losses, num_outputs);
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
  return layout;
}

}  // namespace fastmtl::ops
