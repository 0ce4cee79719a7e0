// Host stand-in for <cuda_runtime.h>, enough for csrc/include/mvpp/frame_score.cuh's kernels to compile
// as C++: every thread of a block runs as an OS thread (one block at a time), __syncthreads is a
// block-wide barrier, and a warp shuffle is a store to the warp's exchange slots between two warp
// barriers. Used only by tests/ops/test_frame_score_cuda_emulated.py.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>

typedef int cudaError_t;
typedef void* cudaStream_t;

struct EmulDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local EmulDim3 threadIdx, blockIdx, blockDim;

#define __global__
#define __shared__ static  // one block in flight: a function-local static is the block's shared variable

template <typename T>
inline T min(T a, T b) {
  return a < b ? a : b;
}
template <typename T>
inline T max(T a, T b) {
  return a > b ? a : b;
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline float __expf(float x) { return std::exp(x); }
inline unsigned __float_as_uint(float x) {
  unsigned u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}
inline float __uint_as_float(unsigned u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

// The block in flight.
struct EmulBlock {
  std::barrier<>* block_bar = nullptr;
  std::barrier<>* warp_bar[32] = {};
  int64_t slot[32][32] = {};  // [warp][lane]
  float* dynamic_smem = nullptr;
};
inline EmulBlock emul_block;

inline void __syncthreads() { emul_block.block_bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emul_block.warp_bar[threadIdx.x / 32]->arrive_and_wait(); }

// Every lane of the warp must arrive (full masks only, as the kernels use): a lane that skipped a
// shuffle the others reach deadlocks the emulation rather than reading a stale value.
template <typename T>
inline T emul_exchange(T v, int src_lane) {
  static_assert(sizeof(T) <= 8, "shuffle of a 4- or 8-byte value");
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  int64_t raw = 0;
  std::memcpy(&raw, &v, sizeof(T));
  emul_block.slot[w][lane] = raw;
  emul_block.warp_bar[w]->arrive_and_wait();
  raw = emul_block.slot[w][src_lane];
  emul_block.warp_bar[w]->arrive_and_wait();
  T r;
  std::memcpy(&r, &raw, sizeof(T));
  return r;
}
template <typename T>
inline T __shfl_sync(unsigned, T v, int src) {
  return emul_exchange(v, src);
}
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int off) {
  return emul_exchange(v, (static_cast<int>(threadIdx.x) % 32) ^ off);
}
