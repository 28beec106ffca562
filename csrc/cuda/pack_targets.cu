// Packing of per-task targets into one [rows, sum of widths] tensor on CUDA (see kernels.h): one
// launch converts every task's column(s), whatever their dtypes, as csrc/ops/pack_targets.cpp does.
#include <algorithm>

#include "cuda/device_math.cuh"
#include "cuda/kernels.h"

namespace fastmtl::cuda {
namespace {

struct PackTable {
  int32_t count;
  PackSource source[kMaxSourcesPerLaunch];  // 40 bytes each: 2.5 KiB, under the 4 KiB argument limit
};

template <typename Out>
__device__ __forceinline__ Out read_as(const PackSource& s, int64_t offset) {
  switch (s.type) {
    case SourceType::Float32:
      return static_cast<Out>(static_cast<const float*>(s.data)[offset]);
    case SourceType::Float64:
      return static_cast<Out>(static_cast<const double*>(s.data)[offset]);
    case SourceType::Float16:
      return static_cast<Out>(__half2float(static_cast<const __half*>(s.data)[offset]));
    case SourceType::BFloat16:
      return static_cast<Out>(__bfloat162float(static_cast<const __nv_bfloat16*>(s.data)[offset]));
    case SourceType::Bool:
      return static_cast<Out>(static_cast<const bool*>(s.data)[offset]);
    case SourceType::UInt8:
      return static_cast<Out>(static_cast<const uint8_t*>(s.data)[offset]);
    case SourceType::Int8:
      return static_cast<Out>(static_cast<const int8_t*>(s.data)[offset]);
    case SourceType::Int16:
      return static_cast<Out>(static_cast<const int16_t*>(s.data)[offset]);
    case SourceType::Int32:
      return static_cast<Out>(static_cast<const int32_t*>(s.data)[offset]);
    case SourceType::Int64:
    default:
      return static_cast<Out>(static_cast<const int64_t*>(s.data)[offset]);
  }
}

// blockIdx.y: the source; x: a grid-stride loop over its rows * width values.
template <typename Out>
__global__ void pack_targets_kernel(PackTable table, int64_t rows, int64_t out_cols, Out* out) {
  const PackSource s = table.source[blockIdx.y];
  const int64_t n = rows * s.width;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = k / s.width;
    const int64_t j = k - i * s.width;
    out[i * out_cols + s.out_offset + j] = read_as<Out>(s, i * s.row_stride + j * s.column_stride);
  }
}

}  // namespace

template <typename Out>
cudaError_t pack_targets(const PackSource* sources, int64_t num_sources, int64_t rows, int64_t out_cols, Out* out,
                         cudaStream_t stream) {
  for (int64_t first = 0; first < num_sources; first += kMaxSourcesPerLaunch) {
    PackTable table{};
    table.count = static_cast<int32_t>(std::min<int64_t>(kMaxSourcesPerLaunch, num_sources - first));
    int64_t widest = 1;
    for (int32_t k = 0; k < table.count; ++k) {
      table.source[k] = sources[first + k];
      widest = std::max<int64_t>(widest, sources[first + k].width);
    }
    const dim3 grid(blocks_for(rows * widest), static_cast<unsigned int>(table.count));
    pack_targets_kernel<Out><<<grid, kThreads, 0, stream>>>(table, rows, out_cols, out);
  }
  return cudaGetLastError();
}

template cudaError_t pack_targets<float>(const PackSource*, int64_t, int64_t, int64_t, float*, cudaStream_t);
template cudaError_t pack_targets<double>(const PackSource*, int64_t, int64_t, int64_t, double*, cudaStream_t);

}  // namespace fastmtl::cuda
