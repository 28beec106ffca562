// The Python extension module fastmtl._C. Loading it registers the ops (the TORCH_LIBRARY blocks
// in csrc/ops/ run as static initialisers); it also exposes build_info() and the lean entries of
// csrc/binding/ (calls that are faster without the dispatcher).
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>

#include "binding/unbatched_aggregation.h"
#include "cpu/isa.h"
#include "kernels/select.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastmtl compiled ops (registered under torch.ops.fastmtl)";
  m.def(
      "build_info",
      [] {
        py::dict info;
        info["version"] = FASTMTL_VERSION;
        info["torch_built_against"] = FASTMTL_TORCH_VERSION;
        info["cuda"] = static_cast<bool>(FASTMTL_WITH_CUDA);
        info["threads"] = at::get_num_threads();
        // Whether the loops compiled twice (csrc/cpu/isa.h) run their AVX2 + FMA version here.
        info["cpu_avx2_kernels"] = fastmtl::cpu::cpu_has_avx2_fma();
#if defined(__clang__)
        info["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
        info["compiler"] = "gcc " __VERSION__;
#endif
        // Per op and device, the steps it runs now (kernels/select.h; FASTMTL_KERNELS as set now):
        // "cpu" / "cuda" (the custom kernels) or "portable" (the ATen steps).
        py::dict kernels;
        for (const char* op : fastmtl::kernels::device_table_ops()) {
          py::dict per_device;
          per_device["cpu"] = fastmtl::kernels::kernels_name(op, c10::DeviceType::CPU);
          per_device["cuda"] = fastmtl::kernels::kernels_name(op, c10::DeviceType::CUDA);
          kernels[op] = per_device;
        }
        info["kernels"] = kernels;
        return info;
      },
      "What this build of fastmtl is: version, torch it was built against, CUDA kernels, the kernels each op "
      "runs per device, threads.");
  fastmtl::binding::bind_unbatched_aggregation(m);
}
