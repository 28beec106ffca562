// Elementwise maps over a row-major [rows, cols] matrix, optionally with the column sums of what
// they store, reduced deterministically: each block owns a fixed chunk of rows and a tile of
// columns, sums it in a fixed order into a per-chunk partial (double), and a second kernel adds
// the partials in chunk order. No atomics: the bits of the sums never vary between runs.
//
// A Map is a device functor `double operator()(Index k, Index col) const` that computes and stores
// element k (= row * cols + col) and returns the stored value as a double.
#pragma once

#include "cuda/device_math.cuh"

namespace fastmtl::cuda {

constexpr int kSumTileCols = 32;  // one warp across consecutive columns: coalesced rows
constexpr int kSumLanes = 8;      // warps per block, each walking every 8th row of the chunk
constexpr int64_t kSumChunkRows = 64;
constexpr int64_t kMaxGridY = 65535;

__host__ __device__ inline int64_t column_sum_chunks(int64_t rows) {
  return (rows + kSumChunkRows - 1) / kSumChunkRows;
}

template <typename Index, typename Map>
__global__ void map_elements_kernel(Index n, Index cols, Map map) {
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index k = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; k < n; k += stride) map(k, k % cols);
}

// 32-bit indexing where it fits: the column of an element is a division, 64-bit ones cost several
// times more and these passes are otherwise bound by memory bandwidth. Up to 2^31 elements, so that
// k + grid stride (at most kMaxBlocks * kThreads = 2^21) cannot wrap around in unsigned 32 bits.
template <typename Map>
cudaError_t map_elements(int64_t rows, int64_t cols, Map map, cudaStream_t stream) {
  const int64_t n = rows * cols;
  if (n == 0) return cudaGetLastError();
  if (n <= static_cast<int64_t>(INT32_MAX)) {
    map_elements_kernel<uint32_t>
        <<<blocks_for(n), kThreads, 0, stream>>>(static_cast<uint32_t>(n), static_cast<uint32_t>(cols), map);
  } else {
    map_elements_kernel<int64_t><<<blocks_for(n), kThreads, 0, stream>>>(n, cols, map);
  }
  return cudaGetLastError();
}

template <typename Map>
__global__ void map_with_column_partials_kernel(int64_t rows, int64_t cols, Map map, double* partial) {
  __shared__ double lane_sum[kSumLanes][kSumTileCols];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kSumTileCols + threadIdx.x;
  const int64_t num_chunks = column_sum_chunks(rows);
  for (int64_t chunk = blockIdx.y; chunk < num_chunks; chunk += gridDim.y) {
    const int64_t row_end = min(rows, (chunk + 1) * kSumChunkRows);
    double sum = 0.0;
    if (col < cols) {
      for (int64_t row = chunk * kSumChunkRows + threadIdx.y; row < row_end; row += kSumLanes)
        sum += map(row * cols + col, col);
    }
    lane_sum[threadIdx.y][threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.y == 0 && col < cols) {
      double total = 0.0;
      for (int lane = 0; lane < kSumLanes; ++lane) total += lane_sum[lane][threadIdx.x];
      partial[chunk * cols + col] = total;
    }
    __syncthreads();
  }
}

// col_sum[col] = sum over chunks of partial[chunk, col], parallel over the chunks too: block
// (kSumTileCols, kSumLanes), lane l of a column adding chunks l, l + kSumLanes, ... in order, then
// the lanes added in lane order. A fixed assignment and order: deterministic bits.
template <typename T>
__global__ void column_sum_finalize_kernel(int64_t num_chunks, int64_t cols, const double* partial, T* out) {
  __shared__ double lane_sum[kSumLanes][kSumTileCols];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kSumTileCols + threadIdx.x;
  double total = 0.0;
  if (col < cols)
    for (int64_t chunk = threadIdx.y; chunk < num_chunks; chunk += kSumLanes) total += partial[chunk * cols + col];
  lane_sum[threadIdx.y][threadIdx.x] = total;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    double sum = 0.0;
    for (int lane = 0; lane < kSumLanes; ++lane) sum += lane_sum[lane][threadIdx.x];
    out[col] = store_as<T>(sum);
  }
}

// Runs map over every element and writes col_sum[j] = sum over rows of the stored values.
// workspace: column_sum_chunks(rows) * cols doubles.
template <typename T, typename Map>
cudaError_t map_with_column_sum(int64_t rows, int64_t cols, Map map, T* col_sum, double* workspace,
                                cudaStream_t stream) {
  if (cols == 0) return cudaGetLastError();
  const int64_t num_chunks = column_sum_chunks(rows);
  const dim3 grid(static_cast<unsigned int>((cols + kSumTileCols - 1) / kSumTileCols),
                  static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(num_chunks, 1), kMaxGridY)));
  const dim3 block(kSumTileCols, kSumLanes);
  if (num_chunks > 0) map_with_column_partials_kernel<<<grid, block, 0, stream>>>(rows, cols, map, workspace);
  column_sum_finalize_kernel<T><<<grid.x, block, 0, stream>>>(num_chunks, cols, workspace, col_sum);
  return cudaGetLastError();
}

}  // namespace fastmtl::cuda
