// Argument checks shared by the op entry points. Every message names the op and the argument and
// says what was expected and what was given; TORCH_CHECK_VALUE / TORCH_CHECK_TYPE surface in
// Python as ValueError / TypeError.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/DeviceGuard.h>

#include <sstream>
#include <string>

namespace fastmtl::ops {

// The dtype as Python spells it ("torch.float32", "torch.complex64", ...).
inline std::string dtype_name(at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); }

inline std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < sizes.size(); ++i) os << (i ? ", " : "") << sizes[i];
  os << "]";
  return os.str();
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const std::string& arg) {
  TORCH_CHECK_VALUE(t.dim() == dim, "fastmtl.", op, ": argument '", arg, "' expected a ", dim, "-D tensor, got shape ",
                    shape_str(t.sizes()));
}

inline void check_float_dtype(const at::Tensor& t, const char* op, const std::string& arg) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "fastmtl.", op, ": argument '", arg,
                   "' expected dtype torch.float32 or torch.float64, got ", dtype_name(t.scalar_type()));
}

// The dtypes of the fused ops: float32, float64, float16 and bfloat16 on every device. 16-bit
// storage computes in float32 and rounds once (GEMMs by ATen in 16-bit with float32 accumulation;
// the elementwise and reduction steps in float32: the CUDA kernels, or on the CPU the portable
// steps, kernels/select.cpp), and the losses, scales and packed targets are float32 (loss_dtype).
inline bool is_16bit_float(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

inline void check_compute_dtype(const at::Tensor& t, const char* op, const std::string& arg) {
  const at::ScalarType st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || is_16bit_float(st), "fastmtl.", op, ": argument '", arg,
                   "' expected dtype torch.float32, torch.float64, torch.float16 or torch.bfloat16, got ",
                   dtype_name(st));
}

// The dtype of per-task losses, 1/count scales and packed targets for inputs of dtype t: t itself,
// float32 for the 16-bit dtypes (a class index above 256 is not exact in bfloat16).
inline at::ScalarType loss_dtype(at::ScalarType t) { return is_16bit_float(t) ? at::kFloat : t; }

inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op, const std::string& arg,
                       const char* ref_arg) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "fastmtl.", op, ": argument '", arg, "' expected dtype ",
                   dtype_name(ref.scalar_type()), " (the dtype of '", ref_arg, "'), got ", dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.device() == ref.device(), "fastmtl.", op, ": argument '", arg, "' expected device ", ref.device(),
                    " (the device of '", ref_arg, "'), got ", t.device());
}

// t on ref's device in loss_dtype(ref's dtype): ref's own dtype, or float32 for a 16-bit ref.
inline void check_loss_like(const at::Tensor& t, const at::Tensor& ref, const char* op, const std::string& arg,
                            const char* ref_arg) {
  if (!is_16bit_float(ref.scalar_type())) return check_like(t, ref, op, arg, ref_arg);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "fastmtl.", op, ": argument '", arg,
                   "' expected dtype torch.float32 (losses, scales and targets of a ", dtype_name(ref.scalar_type()),
                   " '", ref_arg, "' are float32), got ", dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.device() == ref.device(), "fastmtl.", op, ": argument '", arg, "' expected device ", ref.device(),
                    " (the device of '", ref_arg, "'), got ", t.device());
}

inline void check_size(const at::Tensor& t, int64_t dim, int64_t expected, const char* op, const std::string& arg,
                       const std::string& why) {
  TORCH_CHECK_VALUE(t.size(dim) == expected, "fastmtl.", op, ": argument '", arg, "' expected size ", expected,
                    " in dimension ", dim, " (", why, "), got shape ", shape_str(t.sizes()));
}

inline std::string indexed(const char* arg, size_t i) { return std::string(arg) + "[" + std::to_string(i) + "]"; }

}  // namespace fastmtl::ops

namespace fastmtl::ops {

// Every op is registered for the CPU and CUDA dispatch keys with one entry point each (and for the
// fastmtl_portable library, see ops/library.cpp); the entry checks the arguments, then holds this
// guard while it runs the op's one orchestration with the steps kernels/select.h picks. The guard
// makes the tensors' device current (CUDA) and keeps the orchestration below autograd: an entry is
// a backend kernel, so the ATen calls of the portable steps must not record a graph of their own.
// (They did where autograd reached an entry directly, the *_backward ops under a double backward:
// their outputs carried MmBackward0 nodes with the portable steps and torch's "no autograd kernel"
// node with the custom ones, and opcheck's aot_dispatch test failed on the portable steps.)
class OpEntryGuard {
 public:
  explicit OpEntryGuard(const at::Tensor& t) {
    if (t.is_cuda()) guard_.reset_device(t.device());
  }

 private:
  c10::OptionalDeviceGuard guard_;
  at::AutoDispatchBelowADInplaceOrView below_autograd_;
};

}  // namespace fastmtl::ops

namespace fastmtl::ops {

// The CUDA kernels index task columns with 32-bit offsets.
inline void check_fits_int32(int64_t value, const char* op, const char* what) {
  TORCH_CHECK_VALUE(value < (int64_t{1} << 31), "fastmtl.", op, ": ", what, " expected fewer than 2^31 on CUDA, got ",
                    value);
}

}  // namespace fastmtl::ops
