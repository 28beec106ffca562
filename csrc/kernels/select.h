// Which kernels an op runs: the one place that says, per op, which devices have custom kernels and
// which of those have been verified on real hardware, and the FASTMTL_KERNELS switch.
//
//   FASTMTL_KERNELS unset or ""  the default: custom kernels where they are verified (CPU: all ops),
//                                portable steps elsewhere (CUDA: until a GPU run has verified the
//                                op's custom kernels; see kCudaVerified in select.cpp and the README).
//   FASTMTL_KERNELS=custom       custom kernels wherever the device has them (CPU, CUDA).
//   FASTMTL_KERNELS=portable     the portable ATen steps for every op on every device.
// Read on every call (a getenv, ~100 ns), so a test can switch it within one process. Any other
// value raises ValueError. Meta tensors (and any device without custom kernels) always take the
// portable steps, and so do 16-bit tensors on the CPU (the CPU loops are float32 / float64).
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "kernels/steps.h"

namespace fastmtl::kernels {

enum class Choice { Auto, ForcePortable };

// The steps op `op` (its schema name, e.g. "fused_mlp_backward") runs for tensors of t's device and
// dtype (t: the op's compute input, e.g. x or z).
const Steps& steps_for(const char* op, const at::Tensor& t, Choice choice = Choice::Auto);

// Whether `op` has custom kernels on `device` in this build (the device table).
bool has_custom_kernels(const char* op, c10::DeviceType device);

// The name ("cpu", "cuda" or "portable") of the steps `op` runs on `device` now (FASTMTL_KERNELS
// as set at this call), and every op of the device table: what fastmtl.build_info() reports.
const char* kernels_name(const char* op, c10::DeviceType device);
std::vector<const char*> device_table_ops();

}  // namespace fastmtl::kernels
