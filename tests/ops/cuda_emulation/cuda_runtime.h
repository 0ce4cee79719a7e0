// Host stand-in for <cuda_runtime.h>: just enough for the torch-free kernel cores in
// csrc/include/mvpp/*.cuh to compile as C++. The emulation (mhp_scan_emul.cpp) runs every thread of
// a warp as an OS thread; a warp shuffle is a store to the warp's exchange slots and two barriers.
// Used only by tests/ops/test_mhp_scan_cuda_emulated.py.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <mutex>

typedef int cudaError_t;
typedef void* cudaStream_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1 };

struct EmulDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local EmulDim3 threadIdx, blockIdx;

#define __global__
#define __launch_bounds__(...)

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

// One warp in flight at a time: its 32 threads share these.
struct EmulWarp {
  std::barrier<>* bar = nullptr;
  float slot[32] = {};
};
inline EmulWarp emul_warp;

// Every lane must arrive (as on the GPU with a full mask): a lane that skipped a shuffle the others
// reach deadlocks the emulation instead of silently reading stale values.
inline float __shfl_xor_sync(unsigned, float v, int off) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  emul_warp.slot[lane] = v;
  emul_warp.bar->arrive_and_wait();
  const float r = emul_warp.slot[lane ^ off];
  emul_warp.bar->arrive_and_wait();
  return r;
}

inline std::mutex emul_atomic_mutex;
inline float atomicAdd(float* p, float v) {
  std::lock_guard<std::mutex> lock(emul_atomic_mutex);
  const float old = *p;
  *p = old + v;
  return old;
}
