// frame_score CUDA kernels, torch-free (instantiated per dtype in csrc/cuda/kernels/frame_score_*.cu;
// the torch binding is csrc/cuda/frame_score.cu).
//
// Forward, frames read once (split-T, as flash-decoding):
//   fwd_split_kernel, grid (batch, n_split), nw warps: warp w of a block takes frames t0 + w, t0 + w + nw,
//     ... of its chunk. Per frame the warp computes the score (linear: a lane-strided dot + shuffle
//     reduction; MLP: lanes own hidden units, frames are broadcast 32 features at a time by shuffles),
//     updates its online-softmax state (max, sum) and its weighted frame sum -- a row of F floats in
//     shared memory -- and its top-k list, also in shared memory. Each warp then writes a partial
//     state: (m, l), acc (F,), and its sorted top-k list.
//   fwd_merge_kernel, grid (batch,): combines the n_split * nw partials (rescaled by exp(m_i - M)),
//     k-way merges the sorted top-k lists and gathers the k selected frames.
// Backward (the binding adds the few (batch, T)-sized steps with ATen, and cuBLAS GEMMs for the MLP):
//   bwd_rows_kernel, grid (batch, n_split): g_t = ddense . f_t, and the MLP's pre-activations a_t.
//   bwd_frames_kernel, grid (batch, F tiles, T splits): dframes from p_t, ds_t and the top-k slots, and
//     the linear scorer's dweight partials (one owner per element: no atomics, deterministic).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "mvpp/common.h"

// The dynamic shared-memory array of a kernel. The host emulation of the kernels
// (tests/ops/frame_score_emulation/) substitutes its own per-block buffer.
#ifndef MVPP_FS_DYNAMIC_SMEM
#define MVPP_FS_DYNAMIC_SMEM(name) extern __shared__ float name[]
#endif

namespace mvpp {
namespace frame_score {

constexpr int kMaxWarps = 8;
constexpr int kMaxK = 256;       // mvpp_kernels.ops.frame_score.MAX_K
constexpr int kMaxHidden = 128;  // mvpp_kernels.ops.frame_score.MAX_HIDDEN
constexpr int kHPerLane = kMaxHidden / 32;
constexpr int kBigIndex = 1 << 30;

struct FwdParams {
  const void* frames;      // (batch, T, F), element type T of the launcher, contiguous
  const float* weight;     // (F,) linear or (H,) MLP
  const float* bias;       // scalar or nullptr
  const int64_t* lengths;  // (batch,) or nullptr
  const float* W1;         // (F, H) or nullptr (linear)
  const float* b1;         // (H,)
  float* scores;           // (batch, T)
  void* dense;             // (batch, F)
  int64_t* topk_idx;       // (batch, k)
  void* topk_frames;       // (batch, k, F)
  float* lse;              // (batch,)
  float* part_ml;          // (batch, P, 2), P = n_split * n_warps
  float* part_acc;         // (batch, P, F)
  float* part_v;           // (batch, P, k)
  int32_t* part_i;         // (batch, P, k)
  int64_t batch, T, F, H, k;
  int64_t chunk;           // frames per split
  int n_split, n_warps;
  float inv_tau;
};

struct BwdRowsParams {
  const void* frames;      // (batch, T, F)
  const void* ddense;      // (batch, F)
  const int64_t* lengths;  // (batch,) or nullptr
  const float* W1;         // (F, H) or nullptr
  const float* b1;
  float* g;                // (batch, T): ddense . f_t (0 past the length)
  float* a_pre;            // (batch, T, H): W1^T f_t + b1 (MLP only; 0 past the length)
  int64_t batch, T, F, H;
  int64_t chunk;
  int n_split, n_warps;
};

struct BwdFramesParams {
  const void* frames;       // (batch, T, F)
  const void* ddense;       // (batch, F)
  const void* dtopk;        // (batch, k, F)
  const float* weight;      // (F,) (linear only)
  const float* p;           // (batch, T) softmax weights (0 past the length)
  const float* ds;          // (batch, T) total score gradients (0 past the length)
  const int32_t* slot;      // (batch, T): j if frame t is topk_idx[b, j], else -1
  const float* extra;       // (batch, T, F) float32 added to dframes (MLP: dL/da W1^T), or nullptr
  const int64_t* lengths;   // (batch,) or nullptr: frames at or past it are never read (they may hold NaN)
  void* dframes;            // (batch, T, F)
  float* dweight_part;      // (batch, t_split, F) (linear) or nullptr
  int64_t batch, T, F, k;
  int64_t t_chunk;
  int t_split;
};

// Planning helpers shared by the binding and the launchers.
inline int fwd_warps_for(int64_t F, int64_t max_smem_bytes) {
  // Each warp keeps an F-float weighted sum and a kMaxK top-k list in shared memory.
  int nw = kMaxWarps;
  while (nw > 1 && int64_t(nw) * (F * 4 + kMaxK * 8) > max_smem_bytes) nw /= 2;
  return nw;
}
inline int64_t fwd_smem_bytes(int64_t F, int64_t k, int nw) { return int64_t(nw) * (F * 4 + k * 8); }

template <typename T>
cudaError_t frame_score_fwd_launch(const FwdParams& p, cudaStream_t stream);
template <typename T>
cudaError_t frame_score_bwd_rows_launch(const BwdRowsParams& p, cudaStream_t stream);
template <typename T>
cudaError_t frame_score_bwd_frames_launch(const BwdFramesParams& p, cudaStream_t stream);

// ------------------------------------------------------------------------------------------------
namespace detail {

MVPP_DEVICE MVPP_INLINE float to_f(float x) { return x; }
MVPP_DEVICE MVPP_INLINE float to_f(__half x) { return __half2float(x); }
MVPP_DEVICE MVPP_INLINE float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
MVPP_DEVICE MVPP_INLINE T from_f(float x);
template <>
MVPP_DEVICE MVPP_INLINE float from_f<float>(float x) {
  return x;
}
template <>
MVPP_DEVICE MVPP_INLINE __half from_f<__half>(float x) {
  return __float2half_rn(x);
}
template <>
MVPP_DEVICE MVPP_INLINE __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

MVPP_DEVICE MVPP_INLINE float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

MVPP_DEVICE MVPP_INLINE float gelu(float a) { return 0.5f * a * (1.f + erff(a * 0.70710678118654752f)); }

// Bit tests rather than isnan()/compares, so that no fast-math setting can fold them away.
MVPP_DEVICE MVPP_INLINE bool is_nan(float x) { return (__float_as_uint(x) & 0x7fffffffu) > 0x7f800000u; }
// A score that poisons its video's dense output: NaN or +inf (docs/frame_score.md, "Non-finite inputs").
MVPP_DEVICE MVPP_INLINE bool poisons(float s) { return is_nan(s) || __float_as_uint(s) == 0x7f800000u; }
MVPP_DEVICE MVPP_INLINE float quiet_nan() { return __uint_as_float(0x7fc00000u); }

// torch.sort's (descending, stable) order: NaN above +inf above every other score; lower frame index
// first among equal scores (NaNs included).
MVPP_DEVICE MVPP_INLINE bool beats(float v, int i, float v2, int i2) {
  const bool n1 = is_nan(v), n2 = is_nan(v2);
  if (n1 || n2) return n1 && (!n2 || i < i2);
  return v > v2 || (v == v2 && i < i2);
}

// The warp's score of one frame x (F features); every lane returns the same value.
template <typename T, bool kMlp>
MVPP_DEVICE MVPP_INLINE float warp_score(const T* __restrict__ x, const float* __restrict__ w,
                                         const float* __restrict__ W1, const float* __restrict__ b1, int F, int H,
                                         int lane) {
  if constexpr (!kMlp) {
    float s = 0.f;
    for (int f = lane; f < F; f += 32) s += to_f(x[f]) * __ldg(w + f);
    return warp_sum(s);
  } else {
    float a[kHPerLane];
#pragma unroll
    for (int j = 0; j < kHPerLane; ++j) {
      const int h = lane + 32 * j;
      a[j] = h < H ? __ldg(b1 + h) : 0.f;
    }
    for (int f0 = 0; f0 < F; f0 += 32) {
      const float xv = f0 + lane < F ? to_f(x[f0 + lane]) : 0.f;
      const int n = min(32, F - f0);
      for (int q = 0; q < n; ++q) {
        const float xq = __shfl_sync(0xffffffffu, xv, q);
        const float* __restrict__ wrow = W1 + int64_t(f0 + q) * H;
#pragma unroll
        for (int j = 0; j < kHPerLane; ++j) {
          const int h = lane + 32 * j;
          if (h < H) a[j] += xq * __ldg(wrow + h);
        }
      }
    }
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < kHPerLane; ++j) {
      const int h = lane + 32 * j;
      if (h < H) s += __ldg(w + h) * gelu(a[j]);
    }
    return warp_sum(s);
  }
}

template <typename T, bool kMlp>
__global__ void fwd_split_kernel(const FwdParams p) {
  MVPP_FS_DYNAMIC_SMEM(smem);
  const int nw = p.n_warps;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int F = int(p.F), H = int(p.H), K = int(p.k);
  const int64_t b = blockIdx.x;
  const int sp = blockIdx.y;
  float* acc = smem + int64_t(warp) * F;
  float* topv = smem + int64_t(nw) * F + int64_t(warp) * K;
  int* topi = reinterpret_cast<int*>(smem + int64_t(nw) * F + int64_t(nw) * K) + int64_t(warp) * K;
  const int64_t len = p.lengths ? p.lengths[b] : p.T;
  const int64_t t0 = int64_t(sp) * p.chunk;
  const int64_t t1 = min(p.T, t0 + p.chunk);
  const int64_t v1 = min(t1, len);
  const T* X = static_cast<const T*>(p.frames) + b * p.T * p.F;
  const float bias = p.bias ? *p.bias : 0.f;
  for (int f = lane; f < F; f += 32) acc[f] = 0.f;
  // m: running max score (score units: (s - m) / tau never overflows where float64 is finite);
  // l = sum exp((s - m) / tau); acc = the running weighted *mean* (an unnormalised sum of many large
  // frames can overflow float32); bad: a NaN or +inf score was seen (the video's dense is then NaN).
  float m = -INFINITY, l = 0.f;
  bool bad = false;
  int n_top = 0;
  for (int64_t t = t0 + warp; t < v1; t += nw) {
    const T* x = X + t * p.F;
    const float s = warp_score<T, kMlp>(x, p.weight, p.W1, p.b1, F, H, lane) + bias;
    if (lane == 0) p.scores[b * p.T + t] = s;
    bad = bad || poisons(s);  // s is the same in every lane: the branches below are warp-uniform
    if (!bad) {
      float scale = 1.f;
      if (s > m) {
        scale = l > 0.f ? __expf((m - s) * p.inv_tau) : 0.f;
        m = s;
      }
      // Every score so far -inf: weight 0 (exp(-inf - -inf) would be NaN). The frame is still added
      // with weight 0, so its non-finite features give NaN as in torch's sum_t p_t f_t.
      const float pr = m == -INFINITY ? 0.f : __expf((s - m) * p.inv_tau);
      const float l_new = l * scale + pr;
      const float keep = l_new > 0.f ? l * scale / l_new : 1.f, q = l_new > 0.f ? pr / l_new : 0.f;
      for (int f = lane; f < F; f += 32) acc[f] = acc[f] * keep + q * to_f(x[f]);
      l = l_new;
    }
    // Frames come in increasing index order per warp, so a later frame never wins a tie.
    if (lane == 0 && (n_top < K || beats(s, int(t), topv[K - 1], topi[K - 1]))) {
      int pos = n_top < K ? n_top++ : K - 1;
      while (pos > 0 && beats(s, int(t), topv[pos - 1], topi[pos - 1])) {
        topv[pos] = topv[pos - 1];
        topi[pos] = topi[pos - 1];
        --pos;
      }
      topv[pos] = s;
      topi[pos] = int(t);
    }
    n_top = __shfl_sync(0xffffffffu, n_top, 0);
    __syncwarp();
  }
  for (int64_t t = max(t0, len) + threadIdx.x; t < t1; t += blockDim.x) p.scores[b * p.T + t] = -INFINITY;
  const int64_t P = int64_t(p.n_split) * nw;
  const int64_t pid = b * P + int64_t(sp) * nw + warp;
  if (lane == 0) {
    p.part_ml[pid * 2] = m;
    p.part_ml[pid * 2 + 1] = bad ? quiet_nan() : l;
  }
  for (int f = lane; f < F; f += 32) p.part_acc[pid * p.F + f] = acc[f];
  for (int j = lane; j < K; j += 32) {
    p.part_v[pid * K + j] = j < n_top ? topv[j] : -INFINITY;
    p.part_i[pid * K + j] = j < n_top ? topi[j] : kBigIndex;
  }
}

template <typename T>
__global__ void fwd_merge_kernel(const FwdParams p) {
  MVPP_FS_DYNAMIC_SMEM(smem);  // P floats of per-partial scales, then P head pointers
  const int64_t b = blockIdx.x;
  const int64_t P = int64_t(p.n_split) * p.n_warps;
  const int K = int(p.k);
  float* scale = smem;
  int* head = reinterpret_cast<int*>(smem + P);
  __shared__ float s_L;
  __shared__ int s_idx, s_bad;
  if (threadIdx.x == 0) {
    float M = -INFINITY;
    bool bad = false;
    for (int64_t i = 0; i < P; ++i) {
      const float li = p.part_ml[(b * P + i) * 2 + 1];
      bad = bad || is_nan(li);
      if (li > 0.f) M = fmaxf(M, p.part_ml[(b * P + i) * 2]);
    }
    float L = 0.f;
    for (int64_t i = 0; i < P; ++i) {
      const float li = p.part_ml[(b * P + i) * 2 + 1];
      const float sc = li > 0.f ? li * __expf((p.part_ml[(b * P + i) * 2] - M) * p.inv_tau) : 0.f;
      scale[i] = sc;
      L += sc;
      head[i] = 0;
    }
    // Each partial's acc is its weighted mean: its share of the video is l_i e^((m_i - M)/tau) / L.
    const float invL = L > 0.f ? 1.f / L : 0.f;
    for (int64_t i = 0; i < P; ++i) scale[i] *= invL;
    // Poisoned: a NaN or +inf valid score, or valid frames that all score -inf (torch.softmax: NaN).
    const int64_t len = p.lengths ? p.lengths[b] : p.T;
    s_bad = bad || (len > 0 && !(L > 0.f));
    s_L = L;
  }
  __syncthreads();
  const float L = s_L;
  const bool poisoned = s_bad != 0;
  T* D = static_cast<T*>(p.dense) + b * p.F;
  for (int64_t f = threadIdx.x; f < p.F; f += blockDim.x) {
    float s = 0.f;
    for (int64_t i = 0; i < P; ++i) s += scale[i] * p.part_acc[(b * P + i) * p.F + f];
    D[f] = from_f<T>(poisoned ? quiet_nan() : s);
  }
  // lse = log sum_t exp((s_t - max s) / tau); the backward takes max s again from the scores.
  if (threadIdx.x == 0) p.lse[b] = poisoned ? quiet_nan() : L > 0.f ? logf(L) : -INFINITY;
  const T* X = static_cast<const T*>(p.frames) + b * p.T * p.F;
  T* G = static_cast<T*>(p.topk_frames) + b * p.k * p.F;
  for (int j = 0; j < K; ++j) {
    if (threadIdx.x == 0) {
      // k-way merge of the sorted partial lists: take the best head.
      int best = -1;
      float bv = -INFINITY;
      int bi = kBigIndex;
      for (int64_t i = 0; i < P; ++i) {
        if (head[i] >= K) continue;
        const float v = p.part_v[(b * P + i) * K + head[i]];
        const int ix = p.part_i[(b * P + i) * K + head[i]];
        if (ix < kBigIndex && beats(v, ix, bv, bi)) {
          bv = v;
          bi = ix;
          best = int(i);
        }
      }
      if (best >= 0) head[best]++;
      s_idx = best >= 0 ? bi : -1;
      p.topk_idx[b * p.k + j] = s_idx;
    }
    __syncthreads();
    const int idx = s_idx;
    for (int64_t f = threadIdx.x; f < p.F; f += blockDim.x)
      G[j * p.F + f] = idx >= 0 ? X[int64_t(idx) * p.F + f] : from_f<T>(0.f);
    __syncthreads();
  }
}

template <typename T, bool kMlp>
__global__ void bwd_rows_kernel(const BwdRowsParams p) {
  MVPP_FS_DYNAMIC_SMEM(dd);  // ddense as float
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int nw = p.n_warps;
  const int F = int(p.F), H = int(p.H);
  const int64_t b = blockIdx.x;
  const int sp = blockIdx.y;
  const T* DD = static_cast<const T*>(p.ddense) + b * p.F;
  for (int f = threadIdx.x; f < F; f += blockDim.x) dd[f] = to_f(DD[f]);
  __syncthreads();
  const int64_t len = p.lengths ? p.lengths[b] : p.T;
  const int64_t t0 = int64_t(sp) * p.chunk;
  const int64_t t1 = min(p.T, t0 + p.chunk);
  const T* X = static_cast<const T*>(p.frames) + b * p.T * p.F;
  for (int64_t t = t0 + warp; t < t1; t += nw) {
    const bool valid = t < len;
    const T* x = X + t * p.F;
    float g = 0.f;
    if (valid)
      for (int f = lane; f < F; f += 32) g += to_f(x[f]) * dd[f];
    g = warp_sum(g);
    if (lane == 0) p.g[b * p.T + t] = g;
    if constexpr (kMlp) {
      float a[kHPerLane];
#pragma unroll
      for (int j = 0; j < kHPerLane; ++j) a[j] = (lane + 32 * j < H && valid) ? __ldg(p.b1 + lane + 32 * j) : 0.f;
      if (valid) {
        for (int f0 = 0; f0 < F; f0 += 32) {
          const float xv = f0 + lane < F ? to_f(x[f0 + lane]) : 0.f;
          const int n = min(32, F - f0);
          for (int q = 0; q < n; ++q) {
            const float xq = __shfl_sync(0xffffffffu, xv, q);
            const float* __restrict__ wrow = p.W1 + int64_t(f0 + q) * H;
#pragma unroll
            for (int j = 0; j < kHPerLane; ++j)
              if (lane + 32 * j < H) a[j] += xq * __ldg(wrow + lane + 32 * j);
          }
        }
      }
#pragma unroll
      for (int j = 0; j < kHPerLane; ++j)
        if (lane + 32 * j < H) p.a_pre[(b * p.T + t) * p.H + lane + 32 * j] = a[j];
    }
  }
}

template <typename T>
__global__ void bwd_frames_kernel(const BwdFramesParams p) {
  const int64_t b = blockIdx.x;
  const int64_t f = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  const int ts = blockIdx.z;
  const int64_t t0 = int64_t(ts) * p.t_chunk;
  const int64_t t1 = min(p.T, t0 + p.t_chunk);
  if (f >= p.F) return;
  const T* X = static_cast<const T*>(p.frames) + b * p.T * p.F;
  const T* G = static_cast<const T*>(p.dtopk) + b * p.k * p.F;
  T* dX = static_cast<T*>(p.dframes) + b * p.T * p.F;
  const float dd = to_f(static_cast<const T*>(p.ddense)[b * p.F + f]);
  const float w = p.weight ? __ldg(p.weight + f) : 0.f;
  const int64_t len = p.lengths ? p.lengths[b] : p.T;
  float dw = 0.f;
  // Past the length: dframes 0, and the frame (which may hold NaN: 0 * NaN = NaN) is never read.
  for (int64_t t = max(t0, len); t < t1; ++t) dX[t * p.F + f] = from_f<T>(0.f);
  for (int64_t t = t0; t < min(t1, len); ++t) {
    const float pt = p.p[b * p.T + t];
    const float ds = p.ds[b * p.T + t];
    float df = pt * dd;
    if (p.weight) {
      df += ds * w;
      dw += ds * to_f(X[t * p.F + f]);
    }
    if (p.extra) df += p.extra[(b * p.T + t) * p.F + f];
    const int j = p.slot[b * p.T + t];
    if (j >= 0) df += to_f(G[int64_t(j) * p.F + f]);
    dX[t * p.F + f] = from_f<T>(df);
  }
  if (p.dweight_part) p.dweight_part[(b * p.t_split + ts) * p.F + f] = dw;
}

}  // namespace detail

#ifndef MVPP_FS_HOST_EMULATION
template <typename T>
cudaError_t frame_score_fwd_launch(const FwdParams& p, cudaStream_t stream) {
  if (p.batch == 0) return cudaSuccess;
  const int64_t smem = fwd_smem_bytes(p.F, p.k, p.n_warps);
  const dim3 grid(unsigned(p.batch), unsigned(p.n_split));
  const dim3 block(unsigned(32 * p.n_warps));
  cudaError_t err;
  if (p.W1 != nullptr) {
    err = cudaFuncSetAttribute(detail::fwd_split_kernel<T, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
    detail::fwd_split_kernel<T, true><<<grid, block, size_t(smem), stream>>>(p);
  } else {
    err = cudaFuncSetAttribute(detail::fwd_split_kernel<T, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
    detail::fwd_split_kernel<T, false><<<grid, block, size_t(smem), stream>>>(p);
  }
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t P = int64_t(p.n_split) * p.n_warps;
  const int64_t msmem = P * 8;
  err = cudaFuncSetAttribute(detail::fwd_merge_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(msmem));
  if (err != cudaSuccess) return err;
  detail::fwd_merge_kernel<T><<<unsigned(p.batch), 256, size_t(msmem), stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t frame_score_bwd_rows_launch(const BwdRowsParams& p, cudaStream_t stream) {
  if (p.batch == 0) return cudaSuccess;
  const int64_t smem = p.F * 4;
  const dim3 grid(unsigned(p.batch), unsigned(p.n_split));
  const dim3 block(unsigned(32 * p.n_warps));
  cudaError_t err;
  if (p.W1 != nullptr) {
    err = cudaFuncSetAttribute(detail::bwd_rows_kernel<T, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
    detail::bwd_rows_kernel<T, true><<<grid, block, size_t(smem), stream>>>(p);
  } else {
    err = cudaFuncSetAttribute(detail::bwd_rows_kernel<T, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
    detail::bwd_rows_kernel<T, false><<<grid, block, size_t(smem), stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t frame_score_bwd_frames_launch(const BwdFramesParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.F == 0) return cudaSuccess;
  constexpr int kThreads = 128;
  const dim3 grid(unsigned(p.batch), unsigned((p.F + kThreads - 1) / kThreads), unsigned(p.t_split));
  detail::bwd_frames_kernel<T><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// Instantiated once per dtype in csrc/cuda/kernels/frame_score_{fp32,fp16,bf16}.cu (so nvcc builds them in
// parallel); every other translation unit only links against them.
#define MVPP_FRAME_SCORE_LAUNCHERS(PREFIX, T)                                                    \
  PREFIX template cudaError_t frame_score_fwd_launch<T>(const FwdParams&, cudaStream_t);         \
  PREFIX template cudaError_t frame_score_bwd_rows_launch<T>(const BwdRowsParams&, cudaStream_t); \
  PREFIX template cudaError_t frame_score_bwd_frames_launch<T>(const BwdFramesParams&, cudaStream_t);
MVPP_FRAME_SCORE_LAUNCHERS(extern, float)
MVPP_FRAME_SCORE_LAUNCHERS(extern, __half)
MVPP_FRAME_SCORE_LAUNCHERS(extern, __nv_bfloat16)
#endif  // MVPP_FS_HOST_EMULATION

}  // namespace frame_score
}  // namespace mvpp
