// fastmtl::pack_targets: the per-task targets of a batch (dict values in task order) into the
// packed [B, sum of widths] tensor the head-loss op reads, in one call instead of a Python loop of
// conversions and a torch.cat. Argument checks: ops/pack_targets_checks.h; the copy is one step
// of the kernel interface (kernels/steps.h) on whatever device the targets are.
#include <torch/library.h>

#include "kernels/select.h"
#include "ops/pack_targets_checks.h"

namespace fastmtl::ops {
namespace {

template <kernels::Choice choice>
at::Tensor pack_targets_entry(const std::vector<at::Tensor>& targets, const std::vector<std::string>& names,
                              const std::vector<std::string>& losses, c10::ArrayRef<int64_t> num_outputs,
                              at::ScalarType dtype) {
  const TaskLayout layout = check_pack_targets_args(targets, names, losses, num_outputs, dtype);
  const OpEntryGuard guard(targets[0]);
  at::Tensor packed = at::empty({targets[0].size(0), layout.target_cols}, targets[0].options().dtype(dtype));
  kernels::steps_for("pack_targets", packed, choice).pack_targets(targets, layout.tasks, packed);
  return packed;
}

// Reached when no device kernel matches: an empty 'targets' list (no tensor, so no dispatch key: the
// dispatcher would raise its own NotImplementedError) or targets on a device fastmtl has no kernels
// for. The checks name the argument; whatever passes them is on an unsupported device.
at::Tensor pack_targets_without_device_kernel(const std::vector<at::Tensor>& targets,
                                              const std::vector<std::string>& names,
                                              const std::vector<std::string>& losses,
                                              c10::ArrayRef<int64_t> num_outputs, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(!targets.empty(), "fastmtl.pack_targets: argument 'targets' expected one tensor per task (at ",
                    "least one), got an empty list");
  check_pack_targets_args(targets, names, losses, num_outputs, dtype);
  TORCH_CHECK_VALUE(false, "fastmtl.pack_targets: argument 'targets' expected tensors on cpu or cuda, got ",
                    targets[0].device());
  return {};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmtl, CompositeExplicitAutograd, m) {
  m.impl("pack_targets", &pack_targets_without_device_kernel);
}
TORCH_LIBRARY_IMPL(fastmtl, CPU, m) { m.impl("pack_targets", &pack_targets_entry<kernels::Choice::Auto>); }
TORCH_LIBRARY_IMPL(fastmtl, CUDA, m) { m.impl("pack_targets", &pack_targets_entry<kernels::Choice::Auto>); }
TORCH_LIBRARY_IMPL(fastmtl_portable, CompositeExplicitAutograd, m) {
  m.impl("pack_targets", &pack_targets_entry<kernels::Choice::ForcePortable>);
}

}  // namespace fastmtl::ops
