#include "kernels/select.h"

#include <cstdlib>
#include <cstring>
#include <string>

namespace fastmtl::kernels {
namespace {

// The device table. Every fused op has CPU kernels and CUDA kernels (compiled when the build has
// CUDA); `cuda_verified` turns an op's CUDA kernels on by default and may only be set after a GPU
// run of the test suite passed with FASTMTL_KERNELS=custom (record the GPU, the commit and the
// test counts in the README's CUDA section). No GPU run has happened yet: every entry is false.
// (The aggregation ops are not here: they solve on the CPU for a Gram matrix on any device,
// csrc/ops/aggregation.cpp.)
struct OpKernels {
  const char* op;
  bool cuda_custom;
  bool cuda_verified;
};

constexpr OpKernels kTable[] = {
    {"fused_mlp", true, false},
    {"fused_mlp_backward", true, false},
    {"fused_mlp_norm", true, false},
    {"fused_mlp_norm_backward", true, false},
    {"multitask_head_loss", true, false},
    {"multitask_head_loss_backward", true, false},
    {"pack_targets", true, false},
    {"fused_experts", true, false},
    {"fused_experts_backward", true, false},
    {"gated_mixture", true, false},
    {"gated_mixture_backward", true, false},
    {"mtl_trunk_gram", true, false},
    {"mtl_representation_gram", true, false},
    {"mtl_weighted_backward", true, false},
};

const OpKernels& entry(const char* op) {
  for (const OpKernels& e : kTable)
    if (std::strcmp(e.op, op) == 0) return e;
  TORCH_CHECK(false, "fastmtl internal error: op '", op, "' is missing from the device table (kernels/select.cpp)");
}

enum class Mode { Default, Custom, Portable };

Mode mode_from_environment() {
  const char* value = std::getenv("FASTMTL_KERNELS");
  if (value == nullptr || value[0] == '\0') return Mode::Default;
  if (std::strcmp(value, "custom") == 0) return Mode::Custom;
  if (std::strcmp(value, "portable") == 0) return Mode::Portable;
  TORCH_CHECK_VALUE(false,
                    "fastmtl: environment variable FASTMTL_KERNELS expected 'custom' or 'portable' (or unset "
                    "for the default: custom kernels on CPU, portable steps on CUDA until verified), got '",
                    value, "'");
}

}  // namespace

bool has_custom_kernels(const char* op, c10::DeviceType device) {
  if (device == c10::DeviceType::CPU) return true;
  if (device == c10::DeviceType::CUDA) return FASTMTL_WITH_CUDA && entry(op).cuda_custom;
  return false;
}

namespace {

const Steps& select(const char* op, c10::DeviceType device, Choice choice, bool cpu_16bit) {
  const Mode mode = mode_from_environment();  // an invalid value raises whatever the device
  if (choice == Choice::ForcePortable || mode == Mode::Portable || !has_custom_kernels(op, device))
    return portable_steps();
  // The CPU loops are float32 / float64; 16-bit storage takes the portable steps there (float32
  // math, one rounding; the CPU's own dropout loop), beside ATen's 16-bit GEMMs in the orchestration.
  if (device == c10::DeviceType::CPU) return cpu_16bit ? cpu_16bit_steps() : cpu_steps();
#if FASTMTL_WITH_CUDA
  if (mode == Mode::Custom || entry(op).cuda_verified) return cuda_steps();
#endif
  return portable_steps();
}

}  // namespace

const Steps& steps_for(const char* op, const at::Tensor& t, Choice choice) {
  const at::ScalarType dtype = t.scalar_type();
  return select(op, t.device().type(), choice, dtype == at::kHalf || dtype == at::kBFloat16);
}

const char* kernels_name(const char* op, c10::DeviceType device) {
  return select(op, device, Choice::Auto, /*cpu_16bit=*/false).name();
}

std::vector<const char*> device_table_ops() {
  std::vector<const char*> ops;
  for (const OpKernels& e : kTable) ops.push_back(e.op);
  return ops;
}

}  // namespace fastmtl::kernels
