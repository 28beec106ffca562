// FASTMTL_HOST_DEVICE: the device-neutral math in csrc/common/ is compiled for the host by the C++
// compiler (the CPU loops) and for host and device by nvcc (the CUDA kernels), so both devices
// compute exactly the same formulas from one source.
#pragma once

#if defined(__CUDACC__)
#define FASTMTL_HOST_DEVICE __host__ __device__
#else
#define FASTMTL_HOST_DEVICE
#endif
