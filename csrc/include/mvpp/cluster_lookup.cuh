// Torch-free CUDA core of the memory bank's search ops (exact_search and cluster_lookup): a fused
// scan of one query against row ranges of a key matrix with the running top-k kept on chip.
//
// Grid (q, R): block (i, r) scores query i against key rows [start[i, r], end[i, r]). Each warp takes
// 32 rows at a time; the lanes split the d dimension (coalesced loads), a shuffle reduction gives the
// score, and lane j keeps row j's candidate in its private top-k list. Candidates are int64 sort keys,
//   (order-preserving int32 of the float32 score) << 32 | (2^32 - 1 - id),
// so "larger key" = "higher score, then lower id" (the library-wide order) and keys are unique. The
// block then emits its k largest keys by k rounds of a block-wide max over the lanes' list heads.
// The caller merges the R partial lists of a query (torch.topk over int64 keys is exact).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "mvpp/common.h"

namespace mvpp {
namespace cluster_lookup {

constexpr int kThreads = 128;
constexpr long long kEmptyKey = (-0x7FFFFFFFFFFFFFFFLL - 1);

template <typename T>
struct ScanParams {
  const T* Q;               // (q, d), row stride stride_q
  const T* K;               // (m, d), row stride stride_k
  const int64_t* ids;       // (m,) or nullptr: id = row
  const int64_t* start;     // (q, R)
  const int64_t* end;       // (q, R)
  const int64_t* exclude;   // (q,) or nullptr
  long long* out;           // (q, R, k_pad)
  int64_t q, d, R, stride_q, stride_k;
  int k, k_pad;
};

MVPP_DEVICE MVPP_INLINE float to_f32(float x) { return x; }
MVPP_DEVICE MVPP_INLINE float to_f32(__half x) { return __half2float(x); }
MVPP_DEVICE MVPP_INLINE float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

MVPP_DEVICE MVPP_INLINE long long pack_key(float s, long long id) {
  if (s == 0.0f) s = 0.0f;  // -0 -> +0: the sign of zero never decides a tie
  const int bits = __float_as_int(s);
  const int key32 = bits >= 0 ? bits : (bits ^ 0x7FFFFFFF);
  return (static_cast<long long>(key32) << 32) + (4294967295LL - id);
}

MVPP_DEVICE MVPP_INLINE float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T, int KMAX>
__global__ void __launch_bounds__(kThreads) scan_topk_kernel(ScanParams<T> p) {
  extern __shared__ float s_query[];  // d floats
  __shared__ long long s_val[kThreads / 32];
  __shared__ int s_tid[kThreads / 32];
  __shared__ long long s_best;
  __shared__ int s_owner;
  const int64_t qi = blockIdx.x;
  const int64_t r = blockIdx.y;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int nwarps = blockDim.x >> 5;
  for (int64_t j = tid; j < p.d; j += blockDim.x) s_query[j] = to_f32(p.Q[qi * p.stride_q + j]);
  __syncthreads();
  const int64_t start = p.start[qi * p.R + r];
  const int64_t end = p.end[qi * p.R + r];
  const long long ex = p.exclude ? static_cast<long long>(p.exclude[qi]) : -1LL;
  const int k = p.k;
  long long top[KMAX];
#pragma unroll
  for (int i = 0; i < KMAX; ++i) top[i] = kEmptyKey;
  for (int64_t base = start + static_cast<int64_t>(warp) * 32; base < end; base += static_cast<int64_t>(nwarps) * 32) {
    long long mine = kEmptyKey;
    const int nrows = static_cast<int>(end - base < 32 ? end - base : 32);
    for (int j = 0; j < nrows; ++j) {
      const T* row = p.K + (base + j) * p.stride_k;
      float acc = 0.f;
      for (int64_t c = lane; c < p.d; c += 32) acc += to_f32(row[c]) * s_query[c];
      acc = warp_sum(acc);
      if (lane == j) {
        const long long id = p.ids ? static_cast<long long>(p.ids[base + j]) : static_cast<long long>(base + j);
        if (id != ex) mine = pack_key(acc, id);
      }
    }
    if (mine > top[k - 1]) {  // insertion into the lane's sorted list
      int pos = k - 1;
      while (pos > 0 && top[pos - 1] < mine) {
        top[pos] = top[pos - 1];
        --pos;
      }
      top[pos] = mine;
    }
  }
  // Block merge: k rounds of "largest list head wins, its owner advances".
  int head = 0;
  long long* out = p.out + (qi * p.R + r) * p.k_pad;
  for (int i = 0; i < k; ++i) {
    long long v = head < k ? top[head] : kEmptyKey;
    long long wv = v;
    int wt = tid;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const long long ov = __shfl_xor_sync(0xffffffffu, wv, o);
      const int ot = __shfl_xor_sync(0xffffffffu, wt, o);
      if (ov > wv || (ov == wv && ot < wt)) wv = ov, wt = ot;
    }
    if (lane == 0) s_val[warp] = wv, s_tid[warp] = wt;
    __syncthreads();
    if (tid == 0) {
      long long bv = s_val[0];
      int bt = s_tid[0];
      for (int w = 1; w < nwarps; ++w)
        if (s_val[w] > bv || (s_val[w] == bv && s_tid[w] < bt)) bv = s_val[w], bt = s_tid[w];
      s_best = bv;
      s_owner = bt;
      out[i] = bv;
    }
    __syncthreads();
    if (tid == s_owner && s_best != kEmptyKey) ++head;
    __syncthreads();
  }
  for (int i = k + tid; i < p.k_pad; i += blockDim.x) out[i] = kEmptyKey;
}

template <typename T, int KMAX>
cudaError_t launch_scan_topk(const ScanParams<T>& p, cudaStream_t stream) {
  if (p.q == 0 || p.R == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(p.q), static_cast<unsigned>(p.R));
  const size_t smem = static_cast<size_t>(p.d) * sizeof(float);
  scan_topk_kernel<T, KMAX><<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace cluster_lookup
}  // namespace mvpp
