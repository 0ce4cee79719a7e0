// Selective scan (Mamba's S6 recurrence, real A) on CUDA: torch-free kernel cores.
//
//   Δ_t = softplus(delta_t + delta_bias) (or delta_t + delta_bias)
//   h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t u_t B_t,   y_t = C_t · h_t + D u_t,   out_t = y_t · silu(z_t)
//
// Design (after mamba-ssm's kernels, written independently):
// - one thread block per (batch, channel); the block walks L in chunks of kNThreads * kNItems steps,
//   each thread owning kNItems consecutive steps. For each state n the affine maps h -> a h + b of
//   the chunk's steps are composed with a warp-shuffle scan plus one exchange of per-warp aggregates
//   through shared memory, and the state at the chunk's end is carried to the next chunk in shared
//   memory. The state of all N is never held at once, so N up to kMaxDState needs no templates.
// - the forward saves only the state after each chunk (chunk_states); the backward walks the chunks
//   in reverse, recomputes h inside a chunk from the saved state, and runs the adjoint recurrence
//   (a reverse scan of the same form) in the same exchange as the forward recomputation.
// - float32 accumulation for every input type; 16-byte vector loads/stores where a thread's items
//   are in bounds and aligned, scalar otherwise (misaligned views and tails stay correct).
// - reductions that several blocks contribute to (dB/dC of a group of channels) either use float
//   atomics (fast, order-dependent) or, when deterministic, fixed-order accumulation: a block walks
//   several channels of one group in order and writes into its own slot, and a second kernel sums the
//   slots in order. Per-(batch, channel) reductions (dA, dD, ...) are written as partials, no atomics.
//
// Launchers are instantiated once per input type in csrc/cuda/kernels/selective_scan_{fwd,bwd}_*.cu
// (the `mvpp_kernels_cuda` library); everything here is usable without torch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "mvpp/common.h"

namespace mvpp {
namespace cuda {

// ------------------------------------------------------------------------------------------------
// Parameters. Element strides; the L dimension of every (.., L) tensor must have stride 1.
// Input-typed tensors (u, delta, z, variable B/C, dout; outputs out/du/ddelta/dz) use the launcher's
// type T; weights and states are float32. nullptr = absent.
// ------------------------------------------------------------------------------------------------
struct SelectiveScanParams {
  int batch = 0, dim = 0, seqlen = 0, dstate = 0;
  // Variable B/C are (batch, groups, N, L); channel d reads group d / (dim / groups).
  int B_groups = 1, C_groups = 1;
  bool B_variable = false, C_variable = false;
  bool delta_softplus = false;
  // Steps between saved chunk states; chunk_states has n_chunks = ceil(seqlen / chunk_size) entries.
  int chunk_size = 2048;
  int n_chunks = 0;

  const void* u = nullptr;
  int64_t u_batch_stride = 0, u_dim_stride = 0;
  const void* delta = nullptr;
  int64_t delta_batch_stride = 0, delta_dim_stride = 0;
  const float* A = nullptr;  // (dim, N)
  int64_t A_dim_stride = 0, A_state_stride = 0;
  // Variable: T (batch, groups, N, L) with batch/group/state strides. Constant: float (dim, N).
  const void* B = nullptr;
  int64_t B_batch_stride = 0, B_group_stride = 0, B_dim_stride = 0, B_state_stride = 0;
  const void* C = nullptr;
  int64_t C_batch_stride = 0, C_group_stride = 0, C_dim_stride = 0, C_state_stride = 0;
  const float* D = nullptr;           // (dim,) contiguous
  const float* delta_bias = nullptr;  // (dim,) contiguous
  const void* z = nullptr;
  int64_t z_batch_stride = 0, z_dim_stride = 0;
  const float* initial_state = nullptr;  // (batch, dim, N)
  int64_t init_batch_stride = 0, init_dim_stride = 0, init_state_stride = 0;
  const int64_t* lengths = nullptr;  // (batch,) contiguous; clamped to [0, seqlen]

  // Forward outputs (all contiguous): out (batch, dim, L) T; last_state (batch, dim, N) float;
  // chunk_states (batch, dim, n_chunks, N) float (read by the backward).
  void* out = nullptr;
  float* last_state = nullptr;
  float* chunk_states = nullptr;
};

struct SelectiveScanBwdParams : SelectiveScanParams {
  const void* dout = nullptr;  // (batch, dim, L) T
  int64_t dout_batch_stride = 0, dout_dim_stride = 0;
  const float* dlast_state = nullptr;  // (batch, dim, N) or nullptr
  int64_t dlast_batch_stride = 0, dlast_dim_stride = 0, dlast_state_stride = 0;

  // Outputs, all contiguous. du/ddelta/dz: (batch, dim, L) T (dz only when z is given).
  void* du = nullptr;
  void* ddelta = nullptr;
  void* dz = nullptr;
  float* dA = nullptr;              // (batch, dim, N) per-batch partials
  float* dB = nullptr;              // variable: (batch, B_groups, N, L); constant: (batch, dim, N) partials
  float* dC = nullptr;              // likewise
  float* dD = nullptr;              // (batch, dim) partials; zeros when D is absent
  float* ddelta_bias = nullptr;     // (batch, dim) partials; zeros when delta_bias is absent
  float* dinitial_state = nullptr;  // (batch, dim, N)

  bool deterministic = false;
  // Filled by selective_scan_bwd_plan(); the caller provides `workspace` of workspace_floats floats.
  int unit_groups = 1;          // lcm of the variable B/C group counts: a block never spans two groups
  int channels_per_block = 1;
  int slots_per_unit = 1;       // blocks per unit group
  bool bc_atomic = false;       // dB/dC of shared groups via atomicAdd (non-deterministic)
  int64_t workspace_floats = 0;
  float* workspace = nullptr;
};

// Kernel chunk lengths the launchers are instantiated for. chunk_size must be one of them; a
// sequence no longer than chunk_size runs as one chunk of the smallest size that covers it.
constexpr int kSelectiveScanChunkSizes[] = {128, 256, 512, 1024, 2048};
constexpr int kSelectiveScanDefaultChunk = 2048;

inline bool selective_scan_chunk_size_supported(int64_t chunk_size) {
  for (int c : kSelectiveScanChunkSizes) {
    if (c == chunk_size) return true;
  }
  return false;
}

inline int selective_scan_kernel_chunk(int seqlen, int chunk_size) {
  if (seqlen > chunk_size) return chunk_size;
  for (int c : kSelectiveScanChunkSizes) {
    if (c >= seqlen) return c < chunk_size ? c : chunk_size;
  }
  return chunk_size;
}

inline int selective_scan_num_chunks(int64_t seqlen, int64_t chunk_size) {
  return static_cast<int>((seqlen + chunk_size - 1) / chunk_size);
}

namespace detail {

inline int64_t gcd64(int64_t a, int64_t b) {
  while (b != 0) {
    const int64_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}

// Workspace bytes the deterministic backward may take for its per-slot dB/dC copies before it
// trades parallelism (fewer slots, more channels per block) for memory.
constexpr int64_t kBwdWorkspaceCapBytes = int64_t(256) << 20;

// Number of slots a variable tensor with `groups` groups is accumulated in: one per block that
// writes into the same group.
MVPP_HOST_DEVICE inline int64_t bc_slots(const SelectiveScanBwdParams& p, int groups) {
  return int64_t(p.unit_groups / groups) * p.slots_per_unit;
}

MVPP_HOST_DEVICE inline int64_t bc_numel(const SelectiveScanBwdParams& p, int groups) {
  return int64_t(p.batch) * groups * p.dstate * p.seqlen;
}

inline int64_t bwd_workspace_floats(const SelectiveScanBwdParams& p) {
  if (p.bc_atomic) return 0;
  int64_t total = 0;
  if (p.B_variable && bc_slots(p, p.B_groups) > 1) total += bc_slots(p, p.B_groups) * bc_numel(p, p.B_groups);
  if (p.C_variable && bc_slots(p, p.C_groups) > 1) total += bc_slots(p, p.C_groups) * bc_numel(p, p.C_groups);
  return total;
}

}  // namespace detail

// Decide how the backward's blocks cover the channels (fills unit_groups, channels_per_block,
// slots_per_unit, bc_atomic, workspace_floats). `num_sms`: the device's multiprocessor count, used
// to give the deterministic path enough blocks. Deterministic results are bit-reproducible for
// the same shapes on the same device.
inline void selective_scan_bwd_plan(SelectiveScanBwdParams& p, int num_sms) {
  const int gB = p.B_variable ? p.B_groups : 1;
  const int gC = p.C_variable ? p.C_groups : 1;
  p.unit_groups = static_cast<int>(int64_t(gB) / detail::gcd64(gB, gC) * gC);
  const int per_unit = p.dim > 0 ? p.dim / p.unit_groups : 0;
  // With one channel per block, does any block share its dB/dC group with another block?
  const bool shared_groups = (p.B_variable && p.B_groups < p.dim) || (p.C_variable && p.C_groups < p.dim);
  p.bc_atomic = false;
  p.workspace_floats = 0;
  p.channels_per_block = 1;
  p.slots_per_unit = per_unit > 0 ? per_unit : 1;
  if (!shared_groups) {
    // Every block owns what it writes.
  } else if (!p.deterministic) {
    p.bc_atomic = true;
  } else {
    // Enough blocks for a few waves, each walking a contiguous run of channels of one unit group.
    const int64_t target_blocks = 4 * int64_t(num_sms > 0 ? num_sms : 132);
    const int64_t rows = int64_t(p.batch > 0 ? p.batch : 1) * p.unit_groups;
    int64_t want = (target_blocks + rows - 1) / rows;
    if (want < 1) want = 1;
    if (want > per_unit) want = per_unit;
    for (; want > 1; --want) {
      p.channels_per_block = static_cast<int>((per_unit + want - 1) / want);
      p.slots_per_unit = static_cast<int>((per_unit + p.channels_per_block - 1) / p.channels_per_block);
      if (detail::bwd_workspace_floats(p) * int64_t(sizeof(float)) <= detail::kBwdWorkspaceCapBytes) break;
    }
    p.channels_per_block = static_cast<int>((per_unit + want - 1) / want);
    p.slots_per_unit = static_cast<int>((per_unit + p.channels_per_block - 1) / p.channels_per_block);
    p.workspace_floats = detail::bwd_workspace_floats(p);
  }
}

// The launchers. They return the first CUDA error they meet (cudaSuccess otherwise); kernel launch
// errors are also left for cudaGetLastError(). No device synchronisation.
template <typename T>
cudaError_t selective_scan_fwd_launch(const SelectiveScanParams& params, cudaStream_t stream);
// Requires selective_scan_bwd_plan(params, ...) and params.workspace when workspace_floats > 0.
template <typename T>
cudaError_t selective_scan_bwd_launch(const SelectiveScanBwdParams& params, cudaStream_t stream);

// ------------------------------------------------------------------------------------------------
// Device helpers
// ------------------------------------------------------------------------------------------------
namespace detail {

MVPP_DEVICE MVPP_INLINE float to_float(float x) { return x; }
MVPP_DEVICE MVPP_INLINE float to_float(__half x) { return __half2float(x); }
MVPP_DEVICE MVPP_INLINE float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
MVPP_DEVICE MVPP_INLINE T from_float(float x);
template <>
MVPP_DEVICE MVPP_INLINE float from_float<float>(float x) {
  return x;
}
template <>
MVPP_DEVICE MVPP_INLINE __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
MVPP_DEVICE MVPP_INLINE __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <int kBytes>
struct RawVec;
template <>
struct RawVec<16> {
  using type = uint4;
};
template <>
struct RawVec<8> {
  using type = uint2;
};
template <>
struct RawVec<4> {
  using type = unsigned int;
};

// A thread's kItems consecutive elements starting at p, as float. Elements at index >= n_valid
// read as 0 (and are not read), so masked-out positions can never inject NaN/inf.
template <typename T, int kItems>
MVPP_DEVICE MVPP_INLINE void load_items(const T* p, int n_valid, float (&v)[kItems]) {
  constexpr int kBytes = kItems * int(sizeof(T));
  constexpr int kVecBytes = kBytes >= 16 ? 16 : kBytes;
  constexpr int kPerVec = kVecBytes / int(sizeof(T));
  static_assert(kItems % kPerVec == 0, "items must fill whole vectors");
  using Raw = typename RawVec<kVecBytes>::type;
  if (n_valid >= kItems && reinterpret_cast<uintptr_t>(p) % kVecBytes == 0) {
#pragma unroll
    for (int j = 0; j < kItems / kPerVec; ++j) {
      const Raw raw = reinterpret_cast<const Raw*>(p)[j];
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < kPerVec; ++k) v[j * kPerVec + k] = to_float(e[k]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i) v[i] = i < n_valid ? to_float(p[i]) : 0.f;
  }
}

template <typename T, int kItems>
MVPP_DEVICE MVPP_INLINE void store_items(T* p, const float (&v)[kItems], int n_store) {
  constexpr int kBytes = kItems * int(sizeof(T));
  constexpr int kVecBytes = kBytes >= 16 ? 16 : kBytes;
  constexpr int kPerVec = kVecBytes / int(sizeof(T));
  using Raw = typename RawVec<kVecBytes>::type;
  if (n_store >= kItems && reinterpret_cast<uintptr_t>(p) % kVecBytes == 0) {
#pragma unroll
    for (int j = 0; j < kItems / kPerVec; ++j) {
      Raw raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int k = 0; k < kPerVec; ++k) e[k] = from_float<T>(v[j * kPerVec + k]);
      reinterpret_cast<Raw*>(p)[j] = raw;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (i < n_store) p[i] = from_float<T>(v[i]);
    }
  }
}

enum AccumulateMode : int { kAccStore = 0, kAccAdd = 1, kAccAtomic = 2 };

// dB/dC contributions of one channel at a thread's steps: store (first writer of a slot), add
// (later channels of the same block: only this thread ever touches these addresses, so a plain
// read-modify-write is race-free and its order fixed) or atomicAdd (channels in other blocks).
template <int kItems>
MVPP_DEVICE MVPP_INLINE void accumulate_items(float* p, const float (&v)[kItems], int n, int mode) {
  static_assert(kItems % 4 == 0, "float4 vectors");
  const bool vec = n >= kItems && reinterpret_cast<uintptr_t>(p) % 16 == 0;
  if (mode == kAccStore) {
    if (vec) {
#pragma unroll
      for (int j = 0; j < kItems / 4; ++j)
        reinterpret_cast<float4*>(p)[j] = make_float4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]);
    } else {
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        if (i < n) p[i] = v[i];
      }
    }
  } else if (mode == kAccAdd) {
    if (vec) {
#pragma unroll
      for (int j = 0; j < kItems / 4; ++j) {
        float4 x = reinterpret_cast<float4*>(p)[j];
        x.x += v[4 * j];
        x.y += v[4 * j + 1];
        x.z += v[4 * j + 2];
        x.w += v[4 * j + 3];
        reinterpret_cast<float4*>(p)[j] = x;
      }
    } else {
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        if (i < n) p[i] += v[i];
      }
    }
  } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (vec) {
#pragma unroll
      for (int j = 0; j < kItems / 4; ++j)
        atomicAdd(reinterpret_cast<float4*>(p) + j, make_float4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]));
      return;
    }
#endif
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (i < n) atomicAdd(p + i, v[i]);
    }
  }
}

// The affine map h -> a h + b. then(f, g) applies f first, then g.
struct AffineMap {
  float a, b;
};

MVPP_DEVICE MVPP_INLINE AffineMap identity_map() { return {1.f, 0.f}; }

MVPP_DEVICE MVPP_INLINE AffineMap then(AffineMap f, AffineMap g) { return {f.a * g.a, fmaf(g.a, f.b, g.b)}; }

MVPP_DEVICE MVPP_INLINE AffineMap shfl_up(AffineMap x, int delta) {
  return {__shfl_up_sync(0xffffffffu, x.a, delta), __shfl_up_sync(0xffffffffu, x.b, delta)};
}

MVPP_DEVICE MVPP_INLINE AffineMap shfl_down(AffineMap x, int delta) {
  return {__shfl_down_sync(0xffffffffu, x.a, delta), __shfl_down_sync(0xffffffffu, x.b, delta)};
}

MVPP_DEVICE MVPP_INLINE float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <int kNWarps>
struct ScanSmem {
  // Double-buffered by the caller's parity, so one __syncthreads per scan suffices: a buffer is
  // rewritten two scans later, after every thread has passed the intervening barrier.
  AffineMap fwd[2][kNWarps];
  AffineMap rev[2][kNWarps];
};

// Block-wide scans of one map per thread. Forward: thread order (time order); f_excl = maps of
// the threads before this one, f_total = all. Reverse (kReverse): against thread order, for the
// adjoint; r_excl = maps of the threads after this one (applied first), r_total = all.
// Contains exactly one __syncthreads; every thread of the block must call it.
template <int kNWarps, bool kReverse>
MVPP_DEVICE MVPP_INLINE void block_scan(AffineMap f, AffineMap r, ScanSmem<kNWarps>& sm, int parity,
                                        AffineMap& f_excl, AffineMap& f_total, AffineMap& r_excl,
                                        AffineMap& r_total) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  AffineMap fi = f;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const AffineMap o = shfl_up(fi, off);
    if (lane >= off) fi = then(o, fi);
  }
  AffineMap fe = shfl_up(fi, 1);
  if (lane == 0) fe = identity_map();
  AffineMap ri = r, re = identity_map();
  if constexpr (kReverse) {
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const AffineMap o = shfl_down(ri, off);
      if (lane + off < 32) ri = then(o, ri);
    }
    re = shfl_down(ri, 1);
    if (lane == 31) re = identity_map();
    if (lane == 0) sm.rev[parity][warp] = ri;
  }
  if (lane == 31) sm.fwd[parity][warp] = fi;
  __syncthreads();
  AffineMap acc = identity_map(), before = identity_map();
#pragma unroll
  for (int w = 0; w < kNWarps; ++w) {
    if (w == warp) before = acc;
    acc = then(acc, sm.fwd[parity][w]);
  }
  f_excl = then(before, fe);
  f_total = acc;
  if constexpr (kReverse) {
    AffineMap racc = identity_map(), after = identity_map();
#pragma unroll
    for (int w = kNWarps - 1; w >= 0; --w) {
      if (w == warp) after = racc;
      racc = then(racc, sm.rev[parity][w]);
    }
    r_excl = then(after, re);
    r_total = racc;
  } else {
    r_excl = identity_map();
    r_total = identity_map();
  }
}

MVPP_DEVICE MVPP_INLINE int clamp_items(int64_t remaining, int items) {
  return remaining <= 0 ? 0 : (remaining >= items ? items : static_cast<int>(remaining));
}

MVPP_DEVICE MVPP_INLINE int sequence_end(const SelectiveScanParams& p, int b) {
  if (p.lengths == nullptr) return p.seqlen;
  const int64_t len = p.lengths[b];
  return len <= 0 ? 0 : (len >= p.seqlen ? p.seqlen : static_cast<int>(len));
}

// softplus with mamba's threshold: above 20 it is the identity to float precision.
MVPP_DEVICE MVPP_INLINE float softplus(float x) { return x <= 20.f ? log1pf(expf(x)) : x; }

MVPP_DEVICE MVPP_INLINE float sigmoid(float x) { return 1.f / (1.f + __expf(-x)); }

constexpr float kLog2e = 1.4426950408889634f;

// ------------------------------------------------------------------------------------------------
// Forward kernel: grid (dim, batch), one channel per block.
// ------------------------------------------------------------------------------------------------
template <typename T, int kNThreads, int kNItems>
__global__ void __launch_bounds__(kNThreads) selective_scan_fwd_kernel(const SelectiveScanParams p) {
  constexpr int kChunk = kNThreads * kNItems;
  constexpr int kNWarps = kNThreads / 32;
  static_assert(kNThreads % 32 == 0, "whole warps");
  __shared__ ScanSmem<kNWarps> scan_smem;
  __shared__ float run_state[kMaxDState];  // state at the current chunk's start, per n

  const int d = blockIdx.x;
  const int b = blockIdx.y;
  const int N = p.dstate;
  const int L = p.seqlen;
  const int seq_end = sequence_end(p, b);
  const int gB = p.B_variable ? d / (p.dim / p.B_groups) : 0;
  const int gC = p.C_variable ? d / (p.dim / p.C_groups) : 0;

  const T* u = static_cast<const T*>(p.u) + b * p.u_batch_stride + d * p.u_dim_stride;
  const T* delta = static_cast<const T*>(p.delta) + b * p.delta_batch_stride + d * p.delta_dim_stride;
  const T* z = p.z ? static_cast<const T*>(p.z) + b * p.z_batch_stride + d * p.z_dim_stride : nullptr;
  T* out = static_cast<T*>(p.out) + (int64_t(b) * p.dim + d) * L;
  const float* A = p.A + d * p.A_dim_stride;
  const T* Bv = p.B_variable ? static_cast<const T*>(p.B) + b * p.B_batch_stride + gB * p.B_group_stride : nullptr;
  const float* Bc = p.B_variable ? nullptr : static_cast<const float*>(p.B) + d * p.B_dim_stride;
  const T* Cv = p.C_variable ? static_cast<const T*>(p.C) + b * p.C_batch_stride + gC * p.C_group_stride : nullptr;
  const float* Cc = p.C_variable ? nullptr : static_cast<const float*>(p.C) + d * p.C_dim_stride;
  const float Dv = p.D ? p.D[d] : 0.f;
  const float bias = p.delta_bias ? p.delta_bias[d] : 0.f;
  float* chunk_states = p.chunk_states + (int64_t(b) * p.dim + d) * int64_t(p.n_chunks) * N;

  for (int n = threadIdx.x; n < N; n += kNThreads) {
    run_state[n] = p.initial_state
                       ? p.initial_state[b * p.init_batch_stride + d * p.init_dim_stride + n * p.init_state_stride]
                       : 0.f;
  }

  int parity = 0;
  for (int c = 0; c < p.n_chunks; ++c) {
    // Thread 0 updates run_state[n] after the n-th scan's barrier; make the last of those visible.
    __syncthreads();
    const int c0 = c * kChunk;
    const int t0 = c0 + threadIdx.x * kNItems;
    const int n_mem = clamp_items(int64_t(L) - t0, kNItems);
    const int n_valid = clamp_items(int64_t(seq_end) - t0, kNItems);
    if (c0 >= seq_end) {
      // Wholly past this sequence's end: zeros out, the state is frozen.
      float zeros[kNItems];
#pragma unroll
      for (int i = 0; i < kNItems; ++i) zeros[i] = 0.f;
      store_items(out + t0, zeros, n_mem);
      for (int n = threadIdx.x; n < N; n += kNThreads) chunk_states[int64_t(c) * N + n] = run_state[n];
      continue;
    }
    float uv[kNItems], dt[kNItems], dtu[kNItems], y[kNItems];
    load_items(u + t0, n_valid, uv);
    load_items(delta + t0, n_valid, dt);
#pragma unroll
    for (int i = 0; i < kNItems; ++i) {
      float x = dt[i] + bias;
      if (p.delta_softplus) x = softplus(x);
      // Δ = 0 past the end makes each such step the identity map (exp(0) = 1, Δ u B = 0).
      dt[i] = i < n_valid ? x : 0.f;
      dtu[i] = dt[i] * uv[i];
      y[i] = 0.f;
    }
    for (int n = 0; n < N; ++n) {
      const float A2 = A[n * p.A_state_stride] * kLog2e;
      float Bn[kNItems], Cn[kNItems];
      if (Bv) {
        load_items(Bv + n * p.B_state_stride + t0, n_valid, Bn);
      } else {
        const float x = Bc[n * p.B_state_stride];
#pragma unroll
        for (int i = 0; i < kNItems; ++i) Bn[i] = x;
      }
      if (Cv) {
        load_items(Cv + n * p.C_state_stride + t0, n_valid, Cn);
      } else {
        const float x = Cc[n * p.C_state_stride];
#pragma unroll
        for (int i = 0; i < kNItems; ++i) Cn[i] = x;
      }
      float a[kNItems];
      AffineMap agg = identity_map();
#pragma unroll
      for (int i = 0; i < kNItems; ++i) {
        a[i] = exp2f(dt[i] * A2);
        agg = then(agg, AffineMap{a[i], dtu[i] * Bn[i]});
      }
      const float h0 = run_state[n];
      AffineMap excl, total, unused_excl, unused_total;
      block_scan<kNWarps, false>(agg, agg, scan_smem, parity, excl, total, unused_excl, unused_total);
      parity ^= 1;
      float h = fmaf(excl.a, h0, excl.b);
#pragma unroll
      for (int i = 0; i < kNItems; ++i) {
        h = fmaf(a[i], h, dtu[i] * Bn[i]);
        y[i] = fmaf(Cn[i], h, y[i]);
      }
      if (threadIdx.x == 0) {
        const float h_end = fmaf(total.a, h0, total.b);
        run_state[n] = h_end;
        chunk_states[int64_t(c) * N + n] = h_end;
      }
    }
    float zv[kNItems];
    if (z) load_items(z + t0, n_valid, zv);
#pragma unroll
    for (int i = 0; i < kNItems; ++i) {
      float o = fmaf(Dv, uv[i], y[i]);
      if (z) o *= zv[i] * sigmoid(zv[i]);
      y[i] = i < n_valid ? o : 0.f;
    }
    store_items(out + t0, y, n_mem);
  }
  __syncthreads();
  float* last = p.last_state + (int64_t(b) * p.dim + d) * N;
  for (int n = threadIdx.x; n < N; n += kNThreads) last[n] = run_state[n];
}

// ------------------------------------------------------------------------------------------------
// Backward kernel: grid (unit_groups * slots_per_unit, batch); a block walks channels_per_block
// consecutive channels of one unit group (one channel unless deterministic with shared groups).
// ------------------------------------------------------------------------------------------------
template <typename T, int kNThreads, int kNItems>
__global__ void __launch_bounds__(kNThreads) selective_scan_bwd_kernel(const SelectiveScanBwdParams p) {
  constexpr int kChunk = kNThreads * kNItems;
  constexpr int kNWarps = kNThreads / 32;
  static_assert(kNThreads % 32 == 0, "whole warps");
  __shared__ ScanSmem<kNWarps> scan_smem;
  // Adjoint flowing into the current chunk's last state from all later steps (and dlast_state).
  __shared__ float carry[kMaxDState];
  // Per-warp running sums over L of dA, dB (constant B), dC (constant C): each slot is written by
  // lane 0 of its warp only, and summed over warps in a fixed order at the end of the channel.
  __shared__ float partial[3][kNWarps][kMaxDState];
  __shared__ float red[2][kNWarps];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int b = blockIdx.y;
  const int N = p.dstate;
  const int L = p.seqlen;
  const int seq_end = sequence_end(p, b);
  const int per_unit = p.dim / p.unit_groups;
  const int ug = blockIdx.x / p.slots_per_unit;
  const int slot = blockIdx.x % p.slots_per_unit;
  const int d_begin = ug * per_unit + slot * p.channels_per_block;
  const int d_limit = (ug + 1) * per_unit;
  const int d_end = d_begin + p.channels_per_block < d_limit ? d_begin + p.channels_per_block : d_limit;

  // Where this block's variable dB/dC contributions go.
  float* dB_base = nullptr;
  float* dC_base = nullptr;
  int gB = 0, gC = 0;
  bool B_own = true, C_own = true;  // this block is the only writer of its group's dB/dC
  {
    float* ws = p.workspace;
    if (p.B_variable) {
      gB = d_begin / (p.dim / p.B_groups);
      const int64_t slots = bc_slots(p, p.B_groups);
      const int64_t numel = bc_numel(p, p.B_groups);
      B_own = slots == 1;
      if (B_own || p.bc_atomic) {
        dB_base = p.dB;
      } else {
        const int64_t j = int64_t(ug % (p.unit_groups / p.B_groups)) * p.slots_per_unit + slot;
        dB_base = ws + j * numel;
        ws += slots * numel;
      }
      dB_base += ((int64_t(b) * p.B_groups + gB) * N) * L;
    }
    if (p.C_variable) {
      gC = d_begin / (p.dim / p.C_groups);
      const int64_t slots = bc_slots(p, p.C_groups);
      const int64_t numel = bc_numel(p, p.C_groups);
      C_own = slots == 1;
      if (C_own || p.bc_atomic) {
        dC_base = p.dC;
      } else {
        const int64_t j = int64_t(ug % (p.unit_groups / p.C_groups)) * p.slots_per_unit + slot;
        dC_base = ws + j * numel;
      }
      dC_base += ((int64_t(b) * p.C_groups + gC) * N) * L;
    }
  }
  const T* Bv = p.B_variable ? static_cast<const T*>(p.B) + b * p.B_batch_stride + gB * p.B_group_stride : nullptr;
  const T* Cv = p.C_variable ? static_cast<const T*>(p.C) + b * p.C_batch_stride + gC * p.C_group_stride : nullptr;

  int parity = 0;
  for (int d = d_begin; d < d_end; ++d) {
    const int modeB = (p.bc_atomic && !B_own) ? kAccAtomic : (d == d_begin ? kAccStore : kAccAdd);
    const int modeC = (p.bc_atomic && !C_own) ? kAccAtomic : (d == d_begin ? kAccStore : kAccAdd);
    const int64_t row = int64_t(b) * p.dim + d;
    const T* u = static_cast<const T*>(p.u) + b * p.u_batch_stride + d * p.u_dim_stride;
    const T* delta = static_cast<const T*>(p.delta) + b * p.delta_batch_stride + d * p.delta_dim_stride;
    const T* dout = static_cast<const T*>(p.dout) + b * p.dout_batch_stride + d * p.dout_dim_stride;
    const T* z = p.z ? static_cast<const T*>(p.z) + b * p.z_batch_stride + d * p.z_dim_stride : nullptr;
    T* du = static_cast<T*>(p.du) + row * L;
    T* ddelta = static_cast<T*>(p.ddelta) + row * L;
    T* dz = p.z ? static_cast<T*>(p.dz) + row * L : nullptr;
    const float* A = p.A + d * p.A_dim_stride;
    const float* Bc = p.B_variable ? nullptr : static_cast<const float*>(p.B) + d * p.B_dim_stride;
    const float* Cc = p.C_variable ? nullptr : static_cast<const float*>(p.C) + d * p.C_dim_stride;
    const float Dv = p.D ? p.D[d] : 0.f;
    const float bias = p.delta_bias ? p.delta_bias[d] : 0.f;
    const float* chunk_states = p.chunk_states + row * int64_t(p.n_chunks) * N;
    const float* init =
        p.initial_state ? p.initial_state + b * p.init_batch_stride + d * p.init_dim_stride : nullptr;

    __syncthreads();  // the previous channel's readers of carry/partial/red are done
    for (int n = threadIdx.x; n < N; n += kNThreads) {
      carry[n] = p.dlast_state
                     ? p.dlast_state[b * p.dlast_batch_stride + d * p.dlast_dim_stride + n * p.dlast_state_stride]
                     : 0.f;
#pragma unroll
      for (int w = 0; w < kNWarps; ++w) {
        partial[0][w][n] = 0.f;
        partial[1][w][n] = 0.f;
        partial[2][w][n] = 0.f;
      }
    }
    __syncthreads();

    float dD_acc = 0.f, dbias_acc = 0.f;
    for (int c = p.n_chunks - 1; c >= 0; --c) {
      // Thread 0 updates carry[n] after the n-th scan's barrier; make the last of those visible.
      __syncthreads();
      const int c0 = c * kChunk;
      const int t0 = c0 + threadIdx.x * kNItems;
      const int n_mem = clamp_items(int64_t(L) - t0, kNItems);
      const int n_valid = clamp_items(int64_t(seq_end) - t0, kNItems);
      if (c0 >= seq_end) {
        // Past this sequence's end every gradient is 0 and the adjoint passes through unchanged.
        float zeros[kNItems];
#pragma unroll
        for (int i = 0; i < kNItems; ++i) zeros[i] = 0.f;
        store_items(du + t0, zeros, n_mem);
        store_items(ddelta + t0, zeros, n_mem);
        if (z) store_items(dz + t0, zeros, n_mem);
        for (int n = 0; n < N; ++n) {
          if (Bv && modeB == kAccStore) accumulate_items(dB_base + int64_t(n) * L + t0, zeros, n_mem, kAccStore);
          if (Cv && modeC == kAccStore) accumulate_items(dC_base + int64_t(n) * L + t0, zeros, n_mem, kAccStore);
        }
        continue;
      }
      float uv[kNItems], dt[kNItems], dtu[kNItems], dy[kNItems], zv[kNItems];
      float du_v[kNItems], dd_v[kNItems], y[kNItems];
      load_items(u + t0, n_valid, uv);
      load_items(delta + t0, n_valid, dt);
      load_items(dout + t0, n_valid, dy);
      if (z) load_items(z + t0, n_valid, zv);
#pragma unroll
      for (int i = 0; i < kNItems; ++i) {
        float x = dt[i] + bias;
        if (p.delta_softplus) x = softplus(x);
        dt[i] = i < n_valid ? x : 0.f;
        dtu[i] = dt[i] * uv[i];
        // out = y * silu(z): dy = dout * silu(z) reaches y, and dz = dout * y * silu'(z) once y is
        // known; zv is reused for dout * silu'(z). dout is 0 past the end (masked load).
        if (z) {
          const float s = sigmoid(zv[i]);
          const float g = dy[i];
          dy[i] = g * zv[i] * s;
          zv[i] = g * s * fmaf(zv[i], 1.f - s, 1.f);
        }
        du_v[i] = Dv * dy[i];
        dD_acc = fmaf(dy[i], uv[i], dD_acc);
        dd_v[i] = 0.f;
        y[i] = 0.f;
      }
      for (int n = 0; n < N; ++n) {
        const float An = A[n * p.A_state_stride];
        const float A2 = An * kLog2e;
        float Bn[kNItems], Cn[kNItems];
        if (Bv) {
          load_items(Bv + n * p.B_state_stride + t0, n_valid, Bn);
        } else {
          const float x = Bc[n * p.B_state_stride];
#pragma unroll
          for (int i = 0; i < kNItems; ++i) Bn[i] = x;
        }
        if (Cv) {
          load_items(Cv + n * p.C_state_stride + t0, n_valid, Cn);
        } else {
          const float x = Cc[n * p.C_state_stride];
#pragma unroll
          for (int i = 0; i < kNItems; ++i) Cn[i] = x;
        }
        // Forward maps h -> a h + Δ u B; adjoint maps p -> a p + a C dy, where p_t = a_t dL/dh_t is
        // what step t passes back to h_{t-1}: dL/dh_t = C_t dy_t + p_{t+1}.
        float a[kNItems];
        AffineMap fagg = identity_map(), ragg = identity_map();
#pragma unroll
        for (int i = 0; i < kNItems; ++i) {
          a[i] = exp2f(dt[i] * A2);
          fagg = then(fagg, AffineMap{a[i], dtu[i] * Bn[i]});
        }
#pragma unroll
        for (int i = kNItems - 1; i >= 0; --i) ragg = then(ragg, AffineMap{a[i], a[i] * Cn[i] * dy[i]});
        const float h0 = c > 0 ? chunk_states[int64_t(c - 1) * N + n] : (init ? init[n * p.init_state_stride] : 0.f);
        const float pc = carry[n];
        AffineMap fe, ft, re, rt;
        block_scan<kNWarps, true>(fagg, ragg, scan_smem, parity, fe, ft, re, rt);
        parity ^= 1;
        if (threadIdx.x == 0) carry[n] = fmaf(rt.a, pc, rt.b);

        const float h_in = fmaf(fe.a, h0, fe.b);
        float hs[kNItems];
        float h = h_in;
#pragma unroll
        for (int i = 0; i < kNItems; ++i) {
          h = fmaf(a[i], h, dtu[i] * Bn[i]);
          hs[i] = h;
          y[i] = fmaf(Cn[i], h, y[i]);
        }
        float pn = fmaf(re.a, pc, re.b);
        float dA_t = 0.f, dB_t = 0.f, dC_t = 0.f;
        // Step i is the last user of a[i] and hs[i] (step i+1 already read hs[i] as its h_{t-1}),
        // so they are overwritten in place with the dB and dC contributions: fewer registers.
        float (&dBv)[kNItems] = a;
        float (&dCv)[kNItems] = hs;
#pragma unroll
        for (int i = kNItems - 1; i >= 0; --i) {
          const float r = fmaf(Cn[i], dy[i], pn);  // dL/dh_i
          const float hp = i > 0 ? hs[i - 1] : h_in;
          const float ai = a[i];
          const float q = r * ai * hp;
          du_v[i] = fmaf(r * dt[i], Bn[i], du_v[i]);
          dd_v[i] = fmaf(An, q, fmaf(r * Bn[i], uv[i], dd_v[i]));
          dA_t = fmaf(dt[i], q, dA_t);
          pn = ai * r;
          dBv[i] = r * dtu[i];
          dCv[i] = dy[i] * hs[i];
          dB_t += dBv[i];
          dC_t += dCv[i];
        }
        dA_t = warp_sum(dA_t);
        if (!Bv) dB_t = warp_sum(dB_t);
        if (!Cv) dC_t = warp_sum(dC_t);
        if (lane == 0) {
          partial[0][warp][n] += dA_t;
          if (!Bv) partial[1][warp][n] += dB_t;
          if (!Cv) partial[2][warp][n] += dC_t;
        }
        if (Bv) accumulate_items(dB_base + int64_t(n) * L + t0, dBv, modeB == kAccAtomic ? n_valid : n_mem, modeB);
        if (Cv) accumulate_items(dC_base + int64_t(n) * L + t0, dCv, modeC == kAccAtomic ? n_valid : n_mem, modeC);
      }
      float dz_v[kNItems];
#pragma unroll
      for (int i = 0; i < kNItems; ++i) {
        // zv holds dout * silu'(z) by now; y is recomputed, not saved by the forward.
        dz_v[i] = z ? (i < n_valid ? zv[i] * fmaf(Dv, uv[i], y[i]) : 0.f) : 0.f;
        // dΔ/d(delta + bias) = sigmoid(delta + bias) = 1 - exp(-Δ) for Δ = softplus(delta + bias);
        // expm1f keeps it accurate for small Δ, and it is 1 to float precision past the threshold.
        float dd = p.delta_softplus ? dd_v[i] * -expm1f(-dt[i]) : dd_v[i];
        dd = i < n_valid ? dd : 0.f;
        dd_v[i] = dd;
        dbias_acc += dd;
        du_v[i] = i < n_valid ? du_v[i] : 0.f;
      }
      store_items(du + t0, du_v, n_mem);
      store_items(ddelta + t0, dd_v, n_mem);
      if (z) store_items(dz + t0, dz_v, n_mem);
    }

    // Per-channel results.
    dD_acc = warp_sum(dD_acc);
    dbias_acc = warp_sum(dbias_acc);
    if (lane == 0) {
      red[0][warp] = dD_acc;
      red[1][warp] = dbias_acc;
    }
    __syncthreads();
    for (int n = threadIdx.x; n < N; n += kNThreads) {
      float sA = 0.f, sB = 0.f, sC = 0.f;
#pragma unroll
      for (int w = 0; w < kNWarps; ++w) {
        sA += partial[0][w][n];
        sB += partial[1][w][n];
        sC += partial[2][w][n];
      }
      p.dA[row * N + n] = sA;
      if (!Bv) p.dB[row * N + n] = sB;
      if (!Cv) p.dC[row * N + n] = sC;
      p.dinitial_state[row * N + n] = carry[n];
    }
    if (threadIdx.x == 0) {
      float sD = 0.f, sb = 0.f;
#pragma unroll
      for (int w = 0; w < kNWarps; ++w) {
        sD += red[0][w];
        sb += red[1][w];
      }
      p.dD[row] = p.D ? sD : 0.f;
      p.ddelta_bias[row] = p.delta_bias ? sb : 0.f;
    }
  }
}

// Deterministic finish of the slot workspace: out[i] = sum over slots, in slot order.
template <int kDummy = 0>
__global__ void sum_slots_kernel(const float* __restrict__ ws, float* __restrict__ out, int64_t numel, int64_t slots) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    float s = 0.f;
    for (int64_t j = 0; j < slots; ++j) s += ws[j * numel + i];
    out[i] = s;
  }
}

template <typename T, int kNThreads, int kNItems>
cudaError_t launch_fwd(const SelectiveScanParams& p, cudaStream_t stream) {
  selective_scan_fwd_kernel<T, kNThreads, kNItems><<<dim3(p.dim, p.batch), kNThreads, 0, stream>>>(p);
  return cudaPeekAtLastError();
}

template <typename T, int kNThreads, int kNItems>
cudaError_t launch_bwd(const SelectiveScanBwdParams& p, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(int64_t(p.unit_groups) * p.slots_per_unit);
  selective_scan_bwd_kernel<T, kNThreads, kNItems><<<dim3(blocks, p.batch), kNThreads, 0, stream>>>(p);
  return cudaPeekAtLastError();
}

}  // namespace detail

template <typename T>
cudaError_t selective_scan_fwd_launch(const SelectiveScanParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.dim == 0) return cudaSuccess;
  switch (selective_scan_kernel_chunk(p.seqlen, p.chunk_size)) {
    case 128:
      return detail::launch_fwd<T, 32, 4>(p, stream);
    case 256:
      return detail::launch_fwd<T, 32, 8>(p, stream);
    case 512:
      return detail::launch_fwd<T, 64, 8>(p, stream);
    case 1024:
      return detail::launch_fwd<T, 128, 8>(p, stream);
    case 2048:
      return detail::launch_fwd<T, 128, 16>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t selective_scan_bwd_launch(const SelectiveScanBwdParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.dim == 0) return cudaSuccess;
  if (p.workspace_floats != detail::bwd_workspace_floats(p) || (p.workspace_floats > 0 && p.workspace == nullptr)) {
    return cudaErrorInvalidValue;  // selective_scan_bwd_plan() was not applied, or no workspace given
  }
  if (p.bc_atomic) {
    // Atomic accumulation needs zeroed outputs; groups owned by one block are stored directly.
    if (p.B_variable && detail::bc_slots(p, p.B_groups) > 1) {
      const cudaError_t e = cudaMemsetAsync(p.dB, 0, sizeof(float) * detail::bc_numel(p, p.B_groups), stream);
      if (e != cudaSuccess) return e;
    }
    if (p.C_variable && detail::bc_slots(p, p.C_groups) > 1) {
      const cudaError_t e = cudaMemsetAsync(p.dC, 0, sizeof(float) * detail::bc_numel(p, p.C_groups), stream);
      if (e != cudaSuccess) return e;
    }
  }
  cudaError_t e;
  switch (selective_scan_kernel_chunk(p.seqlen, p.chunk_size)) {
    case 128:
      e = detail::launch_bwd<T, 32, 4>(p, stream);
      break;
    case 256:
      e = detail::launch_bwd<T, 32, 8>(p, stream);
      break;
    case 512:
      e = detail::launch_bwd<T, 64, 8>(p, stream);
      break;
    case 1024:
      e = detail::launch_bwd<T, 128, 8>(p, stream);
      break;
    case 2048:
      e = detail::launch_bwd<T, 256, 8>(p, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  if (e != cudaSuccess || p.workspace_floats == 0) return e;
  float* ws = p.workspace;
  const int threads = 256;
  for (int which = 0; which < 2; ++which) {
    const bool variable = which == 0 ? p.B_variable : p.C_variable;
    const int groups = which == 0 ? p.B_groups : p.C_groups;
    if (!variable) continue;
    const int64_t slots = detail::bc_slots(p, groups);
    if (slots <= 1) continue;
    const int64_t numel = detail::bc_numel(p, groups);
    if (numel > 0) {
      int64_t blocks = (numel + threads - 1) / threads;
      if (blocks > 65536) blocks = 65536;
      detail::sum_slots_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(ws, which == 0 ? p.dB : p.dC,
                                                                                      numel, slots);
      e = cudaPeekAtLastError();
      if (e != cudaSuccess) return e;
    }
    ws += slots * numel;
  }
  return cudaSuccess;
}

extern template cudaError_t selective_scan_fwd_launch<float>(const SelectiveScanParams&, cudaStream_t);
extern template cudaError_t selective_scan_fwd_launch<__half>(const SelectiveScanParams&, cudaStream_t);
extern template cudaError_t selective_scan_fwd_launch<__nv_bfloat16>(const SelectiveScanParams&, cudaStream_t);
extern template cudaError_t selective_scan_bwd_launch<float>(const SelectiveScanBwdParams&, cudaStream_t);
extern template cudaError_t selective_scan_bwd_launch<__half>(const SelectiveScanBwdParams&, cudaStream_t);
extern template cudaError_t selective_scan_bwd_launch<__nv_bfloat16>(const SelectiveScanBwdParams&, cudaStream_t);

}  // namespace cuda
}  // namespace mvpp
