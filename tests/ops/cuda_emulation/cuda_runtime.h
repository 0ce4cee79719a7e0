// Host stand-in for <cuda_runtime.h>: just enough for the torch-free kernel cores in
// csrc/include/mvpp/*.cuh to compile as sequential C++ when each row has ONE lane (so no warp
// shuffle ever runs). Used only by tests/ops/test_mhp_scan_cuda_emulated.py.
#pragma once
#include <cassert>
#include <cmath>
#include <cstdint>

typedef int cudaError_t;
typedef void* cudaStream_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1 };

struct EmulDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline EmulDim3 threadIdx, blockIdx;

#define __global__
#define __launch_bounds__(...)

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

// A warp shuffle needs the other lanes: with one lane per row the kernels never reach one.
inline float __shfl_xor_sync(unsigned, float v, int) {
  assert(false && "warp shuffle in the host emulation");
  return v;
}

// The emulation runs threads one after another, so a plain add is the atomic add.
inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}
