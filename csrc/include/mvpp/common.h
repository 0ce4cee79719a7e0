// Shared, torch-free definitions for the kernel cores (C++ and CUDA).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MVPP_HOST_DEVICE __host__ __device__
#define MVPP_DEVICE __device__
#define MVPP_INLINE __forceinline__
#else
#define MVPP_HOST_DEVICE
#define MVPP_DEVICE
#define MVPP_INLINE inline
#endif

namespace mvpp {

// The largest state size (N) the fused kernels keep on chip; the Python wrappers refuse larger N
// (mvpp_kernels.ops.selective_scan.MAX_DSTATE must match).
constexpr int kMaxDState = 256;

}  // namespace mvpp
