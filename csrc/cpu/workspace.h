// Scratch buffers for a kernel's internal intermediates (never for its outputs), kept per thread
// and reused across calls. Why: large fresh allocations come from mmap, and touching them costs a
// page fault per 4 KiB; at B=1024 x 512 wide layers that was ~4% of a training step on CPU.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace fastmtl::cpu {

// Returns a contiguous [rows, cols] tensor backed by this thread's scratch slot `slot`
// (contents undefined). Valid until the same slot is asked for again on this thread. CPU only:
// on other devices (CUDA: the caching allocator already reuses memory, and a buffer shared between
// calls would race across streams and pin memory into captured graphs; meta) a fresh tensor.
inline at::Tensor scratch_matrix(size_t slot, int64_t rows, int64_t cols, const at::TensorOptions& options) {
  if (options.device().type() != c10::DeviceType::CPU) return at::empty({rows, cols}, options);
  thread_local std::vector<at::Tensor> slots;
  if (slots.size() <= slot) slots.resize(slot + 1);
  at::Tensor& buffer = slots[slot];
  const int64_t needed = rows * cols;
  if (!buffer.defined() || buffer.numel() < needed || buffer.dtype() != options.dtype() ||
      buffer.device() != options.device()) {
    buffer = at::empty({needed}, options);
  }
  return buffer.narrow(0, 0, needed).view({rows, cols});
}

}  // namespace fastmtl::cpu
