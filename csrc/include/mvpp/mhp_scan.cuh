// mhp_scan on CUDA: the continuous-time selective scan fused with the exact integral of its readout.
// Torch-free kernel cores; the torch binding is csrc/cuda/mhp_scan.cu.
//
// Per (batch, channel) row, events t = 0..len-1 with gaps dt_t (dt_0 from the window start), Δ_t =
// softplus(delta_t + delta_bias) (or without softplus), h_{-1}^+ = h0, and Δ_{-1} := Δ_0, C_{-1} := C_0:
//
//   h_t^-    = exp(A Δ_{t-1} dt_t) ⊙ h_{t-1}^+            y_left_t = C_{t-1} · h_t^-
//   I_t      = Σ_n C_{t-1,n} h_{t-1,n}^+ dt_t φ(A_n Δ_{t-1} dt_t),   φ(x) = expm1(x)/x
//   h_t^+    = h_t^- + Δ_t B_t u_t                         y_t = (C_t · h_t^+ + D u_t) silu(z_t)
//   integral = Σ_t I_t + Σ_n C_{len-1,n} h_{len-1,n}^+ dt_end φ(A_n Δ_{len-1} dt_end)
//
// Design: one group of `lanes` threads (a power of two <= 32, inside one warp) owns a row; lane l
// holds states n = l, l + lanes, ... (at most kMaxK of them) in registers and walks the events
// sequentially, so the gap quantities of event t use the carried C_{t-1}, Δ_{t-1} and h_{t-1}^+ with
// no state ever written to memory. A block packs kThreads / lanes rows (consecutive channels of a
// batch share B/C in cache), which keeps short sequences from leaving the GPU idle. Reductions over
// N are warp shuffles within the group; every thread runs the same event loop (rows past their
// length compute zeros), so the shuffles always see a converged warp.
//
// The forward saves h^+ after every chunk of `chunk_size` events. The backward walks the events in
// reverse: for each chunk (last first) it recomputes the chunk's states from the saved one, kHist
// events at a time into a per-thread history, and runs the adjoint
//   g_{t-1} = e_t (g_t + dyl_t C_{t-1}) + dI C_{t-1} dt_t φ(x_t)   (g = dL/dh^+)
// with the contributions to event t-1's C and Δ carried one step in registers. Every gradient is a
// per-row value (or a per-row partial the caller sums) except variable dB/dC, which channels of a
// group share: `deterministic` writes them per channel (the caller sums each group in a fixed
// order), otherwise float atomics add into (batch, G, N, L).
//
// float32 state and accumulation for every input type. Launchers are instantiated once per input
// type in csrc/cuda/kernels/mhp_scan_{fwd,bwd}_{fp32,fp16,bf16}.cu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "mvpp/common.h"

namespace mvpp {
namespace cuda {
namespace mhp {

// ------------------------------------------------------------------------------------------------
// Parameters. Every tensor is contiguous. Input-typed (T): u, delta, z, variable B/C, dy, and the
// outputs y, du, ddelta, dz. Everything else float32. nullptr = absent.
// ------------------------------------------------------------------------------------------------
struct MhpScanParams {
  int batch = 0, dim = 0, L = 0, N = 0;
  int B_groups = 0, C_groups = 0;  // variable B/C: (batch, G, N, L); 0 = constant (dim, N) float
  int chunk_size = 64, n_chunks = 0;
  // Upper bound on threads per row (a power of two <= 32). Fewer lanes hold more states each (at most
  // 8, so it is raised to ceil(N / 8) if needed) and repeat less per-event scalar work; more lanes give
  // more parallelism. A tuning knob (MVPP_MHP_SCAN_LANES in the binding), 32 by default.
  int max_lanes = 32;
  bool softplus = false;

  const void* u = nullptr;      // (batch, dim, L) T
  const void* delta = nullptr;  // (batch, dim, L) T
  const void* z = nullptr;      // (batch, dim, L) T
  const void* B = nullptr;
  const void* C = nullptr;
  const float* A = nullptr;           // (dim, N)
  const float* D = nullptr;           // (dim,)
  const float* delta_bias = nullptr;  // (dim,)
  const float* dt = nullptr;          // (batch, L)
  const float* dt_end = nullptr;      // (batch,)
  const int64_t* lengths = nullptr;   // (batch,), in [0, L]
  const float* h0 = nullptr;          // (batch, dim, N)

  // Forward outputs.
  void* y = nullptr;              // (batch, dim, L) T
  float* y_left = nullptr;        // (batch, dim, L)
  float* integral = nullptr;      // (batch, dim)
  float* last_state = nullptr;    // (batch, dim, N)
  float* chunk_states = nullptr;  // (batch, dim, n_chunks, N)
};

struct MhpScanBwdParams : MhpScanParams {
  const void* dy = nullptr;          // (batch, dim, L) T
  const float* dy_left = nullptr;    // (batch, dim, L)
  const float* dintegral = nullptr;  // (batch, dim)
  const float* dlast = nullptr;      // (batch, dim, N)
  // Backward outputs: du, ddelta, dz (batch, dim, L) T; dA (batch, dim, N); dD, ddelta_bias,
  // ddt_end (batch, dim); ddt (batch, dim, L); dh0 (batch, dim, N). dB/dC: constant -> (batch, dim, N)
  // partials; variable -> per-channel (batch, dim, N, L) when `deterministic`, else accumulated with
  // atomics into a zero-filled (batch, G, N, L).
  void* du = nullptr;
  void* ddelta = nullptr;
  void* dz = nullptr;
  float* dA = nullptr;
  float* dB = nullptr;
  float* dC = nullptr;
  float* dD = nullptr;
  float* ddelta_bias = nullptr;
  float* ddt = nullptr;
  float* ddt_end = nullptr;
  float* dh0 = nullptr;
  bool deterministic = true;
};

template <typename T>
cudaError_t mhp_scan_fwd_launch(const MhpScanParams& p, cudaStream_t stream);
template <typename T>
cudaError_t mhp_scan_bwd_launch(const MhpScanBwdParams& p, cudaStream_t stream);

// The instantiations live in csrc/cuda/kernels/ (one per file).
extern template cudaError_t mhp_scan_fwd_launch<float>(const MhpScanParams&, cudaStream_t);
extern template cudaError_t mhp_scan_fwd_launch<__half>(const MhpScanParams&, cudaStream_t);
extern template cudaError_t mhp_scan_fwd_launch<__nv_bfloat16>(const MhpScanParams&, cudaStream_t);
extern template cudaError_t mhp_scan_bwd_launch<float>(const MhpScanBwdParams&, cudaStream_t);
extern template cudaError_t mhp_scan_bwd_launch<__half>(const MhpScanBwdParams&, cudaStream_t);
extern template cudaError_t mhp_scan_bwd_launch<__nv_bfloat16>(const MhpScanBwdParams&, cudaStream_t);

// ------------------------------------------------------------------------------------------------
// Device helpers
// ------------------------------------------------------------------------------------------------
namespace detail {

constexpr int kFwdThreads = 128;
constexpr int kBwdThreads = 64;
// Events recomputed into the backward's per-thread history at a time.
constexpr int kHist = 64;

MVPP_DEVICE MVPP_INLINE float to_f(float x) { return x; }
MVPP_DEVICE MVPP_INLINE float to_f(__half x) { return __half2float(x); }
MVPP_DEVICE MVPP_INLINE float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
MVPP_DEVICE MVPP_INLINE T from_f(float x);
template <>
MVPP_DEVICE MVPP_INLINE float from_f<float>(float x) { return x; }
template <>
MVPP_DEVICE MVPP_INLINE __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
MVPP_DEVICE MVPP_INLINE __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// φ(x) = (1 - e^x) / (-x) = expm1(x)/x, φ(0) = 1: the Taylor series below |x| = 0.5 (no
// cancellation, exact at 0), expm1 above.
MVPP_DEVICE MVPP_INLINE float phi(float x) {
  if (fabsf(x) < 0.5f) {
    float s = 1.f;
#pragma unroll
    for (int k = 9; k >= 1; --k) s = 1.f + x * (1.f / float(k + 1)) * s;
    return s;
  }
  return expm1f(x) / x;
}

// φ'(x) = (e^x - φ(x)) / x; near 0 the series Σ_m (m+1) x^m / (m+2)! = 1/2 (1 + x r_1 (1 + x r_2 ...)),
// r_m = (m+1) / (m (m+2)).
MVPP_DEVICE MVPP_INLINE float dphi(float x, float ph) {
  if (fabsf(x) < 0.5f) {
    float s = 1.f;
#pragma unroll
    for (int m = 9; m >= 1; --m) s = 1.f + x * (float(m + 1) / float(m * (m + 2))) * s;
    return 0.5f * s;
  }
  return (expf(x) - ph) / x;
}

MVPP_DEVICE MVPP_INLINE float softplus(float x) { return x > 20.f ? x : log1pf(expf(x)); }
MVPP_DEVICE MVPP_INLINE float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// Sum over the `lanes` threads of a row group (xor butterfly: every lane gets the total). Must be
// reached by the whole warp.
MVPP_DEVICE MVPP_INLINE float group_sum(float v, int lanes) {
  for (int off = lanes >> 1; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Δ_t of a row; callers only ask for valid events (padding may hold NaN).
template <typename T>
MVPP_DEVICE MVPP_INLINE float step_at(const T* delta_row, int t, float bias, bool softplus_on) {
  const float x = to_f(delta_row[t]) + bias;
  return softplus_on ? softplus(x) : x;
}

struct RowInfo {
  bool ok;
  int row, b, d, len, lane, K;
};

MVPP_DEVICE MVPP_INLINE RowInfo row_info(const MhpScanParams& p, int lanes, int threads) {
  RowInfo r;
  const int tid = threadIdx.x;
  r.lane = tid & (lanes - 1);
  const int row = blockIdx.x * (threads / lanes) + tid / lanes;
  r.ok = row < p.batch * p.dim;
  r.row = r.ok ? row : 0;
  r.b = r.row / p.dim;
  r.d = r.row % p.dim;
  int len = p.lengths != nullptr ? static_cast<int>(p.lengths[r.b]) : p.L;
  len = len < 0 ? 0 : (len > p.L ? p.L : len);
  r.len = r.ok ? len : 0;
  r.K = (p.N + lanes - 1) / lanes;
  return r;
}

// Pointer to (n = 0, t = 0) of this row's variable B/C group, or the constant (dim, N) row.
template <typename T>
MVPP_DEVICE MVPP_INLINE const T* var_base(const void* X, int groups, const MhpScanParams& p, const RowInfo& r) {
  const int g = r.d / (p.dim / groups);
  return static_cast<const T*>(X) + (static_cast<int64_t>(r.b) * groups + g) * p.N * static_cast<int64_t>(p.L);
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------
template <typename T, int kMaxK>
__global__ void __launch_bounds__(kFwdThreads) mhp_scan_fwd_kernel(MhpScanParams p, int lanes) {
  const RowInfo r = row_info(p, lanes, kFwdThreads);
  const int64_t L = p.L;
  const int64_t io = static_cast<int64_t>(r.row) * L;
  const T* u_row = static_cast<const T*>(p.u) + io;
  const T* delta_row = static_cast<const T*>(p.delta) + io;
  const T* z_row = p.z != nullptr ? static_cast<const T*>(p.z) + io : nullptr;
  const float* dt_row = p.dt + static_cast<int64_t>(r.b) * L;
  const float bias = p.delta_bias != nullptr ? p.delta_bias[r.d] : 0.f;
  const float Dd = p.D != nullptr ? p.D[r.d] : 0.f;
  const bool B_var = p.B_groups > 0, C_var = p.C_groups > 0;
  const T* B_row = B_var ? var_base<T>(p.B, p.B_groups, p, r) : nullptr;
  const T* C_row = C_var ? var_base<T>(p.C, p.C_groups, p, r) : nullptr;

  float A[kMaxK], h[kMaxK], Cp[kMaxK], Bc[kMaxK], Cc[kMaxK];
#pragma unroll
  for (int k = 0; k < kMaxK; ++k) {
    const int n = r.lane + k * lanes;
    const bool on = k < r.K && n < p.N;
    A[k] = on ? p.A[r.d * p.N + n] : 0.f;
    h[k] = (on && p.h0 != nullptr) ? p.h0[static_cast<int64_t>(r.row) * p.N + n] : 0.f;
    Bc[k] = (on && !B_var) ? static_cast<const float*>(p.B)[r.d * p.N + n] : 0.f;
    Cc[k] = (on && !C_var) ? static_cast<const float*>(p.C)[r.d * p.N + n] : 0.f;
    Cp[k] = 0.f;
  }

  float dprev = 0.f;
  float acc_int = 0.f;  // this lane's share of the integral
  int chunk = 0;
  for (int t = 0; t < p.L; ++t) {
    const bool valid = t < r.len;
    float yl_part = 0.f, y_part = 0.f, uu = 0.f;
    if (valid) {
      uu = to_f(u_row[t]);
      const float dl = step_at(delta_row, t, bias, p.softplus);
      const float dtt = dt_row[t];
      if (t == 0) dprev = dl;  // the first gap borrows event 0's step and readout
#pragma unroll
      for (int k = 0; k < kMaxK; ++k) {
        const int n = r.lane + k * lanes;
        if (k < r.K && n < p.N) {
          const float Ct = C_var ? to_f(C_row[static_cast<int64_t>(n) * L + t]) : Cc[k];
          const float Bt = B_var ? to_f(B_row[static_cast<int64_t>(n) * L + t]) : Bc[k];
          if (t == 0) Cp[k] = Ct;
          const float x = A[k] * dprev * dtt;
          const float e = expf(x);
          const float ch = Cp[k] * h[k];
          yl_part += ch * e;
          acc_int += ch * phi(x) * dtt;
          h[k] = e * h[k] + dl * Bt * uu;
          y_part += Ct * h[k];
          Cp[k] = Ct;
        }
      }
      dprev = dl;
    }
    const float ysum = group_sum(y_part, lanes);
    const float ylsum = group_sum(yl_part, lanes);
    if (r.ok && r.lane == 0) {
      float yv = 0.f;
      if (valid) {
        yv = ysum + Dd * uu;
        if (z_row != nullptr) {
          const float zz = to_f(z_row[t]);
          yv *= zz * sigmoid(zz);
        }
      }
      static_cast<T*>(p.y)[io + t] = from_f<T>(yv);
      p.y_left[io + t] = valid ? ylsum : 0.f;
    }
    if (t == p.L - 1 || (t + 1) % p.chunk_size == 0) {
      if (r.ok) {
#pragma unroll
        for (int k = 0; k < kMaxK; ++k) {
          const int n = r.lane + k * lanes;
          if (k < r.K && n < p.N) p.chunk_states[(static_cast<int64_t>(r.row) * p.n_chunks + chunk) * p.N + n] = h[k];
        }
      }
      ++chunk;
    }
  }
  // The last gap (t_len, T]: h_len^+ decays at A Δ_{len-1}, read out with C_{len-1}.
  if (r.len > 0 && p.dt_end != nullptr) {
    const float dte = p.dt_end[r.b];
#pragma unroll
    for (int k = 0; k < kMaxK; ++k) {
      const int n = r.lane + k * lanes;
      if (k < r.K && n < p.N) acc_int += Cp[k] * h[k] * phi(A[k] * dprev * dte) * dte;
    }
  }
  const float total = group_sum(acc_int, lanes);
  if (r.ok) {
    if (r.lane == 0) p.integral[r.row] = r.len > 0 ? total : 0.f;
#pragma unroll
    for (int k = 0; k < kMaxK; ++k) {
      const int n = r.lane + k * lanes;
      if (k < r.K && n < p.N) p.last_state[static_cast<int64_t>(r.row) * p.N + n] = h[k];
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------
template <typename T, int kMaxK>
__global__ void __launch_bounds__(kBwdThreads) mhp_scan_bwd_kernel(MhpScanBwdParams p, int lanes) {
  const RowInfo r = row_info(p, lanes, kBwdThreads);
  const int64_t L = p.L;
  const int64_t io = static_cast<int64_t>(r.row) * L;
  const T* u_row = static_cast<const T*>(p.u) + io;
  const T* delta_row = static_cast<const T*>(p.delta) + io;
  const T* z_row = p.z != nullptr ? static_cast<const T*>(p.z) + io : nullptr;
  const T* dy_row = static_cast<const T*>(p.dy) + io;
  const float* dyl_row = p.dy_left != nullptr ? p.dy_left + io : nullptr;
  const float* dt_row = p.dt + static_cast<int64_t>(r.b) * L;
  const float bias = p.delta_bias != nullptr ? p.delta_bias[r.d] : 0.f;
  const float Dd = p.D != nullptr ? p.D[r.d] : 0.f;
  const float dI = (p.dintegral != nullptr && r.ok) ? p.dintegral[r.row] : 0.f;
  const bool has_end = p.dt_end != nullptr;
  const float dte = (has_end && r.ok) ? p.dt_end[r.b] : 0.f;
  const bool B_var = p.B_groups > 0, C_var = p.C_groups > 0;
  const T* B_row = B_var ? var_base<T>(p.B, p.B_groups, p, r) : nullptr;
  const T* C_row = C_var ? var_base<T>(p.C, p.C_groups, p, r) : nullptr;
  // Variable dB/dC destinations: this channel's own slice of the per-channel partials
  // (deterministic), or its group's slice of (batch, G, N, L) shared through atomics.
  float* dB_row = nullptr;
  float* dC_row = nullptr;
  if (B_var) {
    dB_row = p.dB + (p.deterministic ? static_cast<int64_t>(r.row)
                                     : static_cast<int64_t>(r.b) * p.B_groups + r.d / (p.dim / p.B_groups)) *
                        p.N * L;
  }
  if (C_var) {
    dC_row = p.dC + (p.deterministic ? static_cast<int64_t>(r.row)
                                     : static_cast<int64_t>(r.b) * p.C_groups + r.d / (p.dim / p.C_groups)) *
                        p.N * L;
  }

  float A[kMaxK], Bc[kMaxK], Cc[kMaxK], g[kMaxK], hs[kMaxK], dA[kMaxK], dBc[kMaxK], dCc[kMaxK], pend_dC[kMaxK];
  // h^+ of events s0-1 .. s1-1 of the current sub-block (slot 0: the state before it).
  float hist[(kHist + 1) * kMaxK];
#pragma unroll
  for (int k = 0; k < kMaxK; ++k) {
    const int n = r.lane + k * lanes;
    const bool on = r.ok && k < r.K && n < p.N;
    A[k] = on ? p.A[r.d * p.N + n] : 0.f;
    Bc[k] = (on && !B_var) ? static_cast<const float*>(p.B)[r.d * p.N + n] : 0.f;
    Cc[k] = (on && !C_var) ? static_cast<const float*>(p.C)[r.d * p.N + n] : 0.f;
    g[k] = (on && p.dlast != nullptr) ? p.dlast[static_cast<int64_t>(r.row) * p.N + n] : 0.f;
    dA[k] = dBc[k] = dCc[k] = pend_dC[k] = hs[k] = 0.f;
  }
  // dL/dΔ_t and dL/dC_t found at event t+1 (the gap after t), this lane's share: carried one step.
  float pend_dsA = 0.f;
  float dD_acc = 0.f, ddb_acc = 0.f, ddte_part = 0.f;

  for (int c = p.n_chunks - 1; c >= 0; --c) {
    const int c0 = c * p.chunk_size;
    const int c1 = min(p.L, c0 + p.chunk_size);
    const int n_sub = (c1 - c0 + kHist - 1) / kHist;
    for (int j = n_sub - 1; j >= 0; --j) {
      const int s0 = c0 + j * kHist;
      const int s1 = min(c1, s0 + kHist);
      // ---- recompute h^+ from the chunk's saved start state up to s1, keeping [s0 - 1, s1) ----
#pragma unroll
      for (int k = 0; k < kMaxK; ++k) {
        const int n = r.lane + k * lanes;
        float v = 0.f;
        if (r.ok && k < r.K && n < p.N) {
          if (c > 0) v = p.chunk_states[(static_cast<int64_t>(r.row) * p.n_chunks + (c - 1)) * p.N + n];
          else if (p.h0 != nullptr) v = p.h0[static_cast<int64_t>(r.row) * p.N + n];
        }
        hs[k] = v;
      }
      for (int t = c0; t < s1; ++t) {
        if (t == s0) {
#pragma unroll
          for (int k = 0; k < kMaxK; ++k) hist[k] = hs[k];
        }
        if (t < r.len) {
          const float dl = step_at(delta_row, t, bias, p.softplus);
          const float dp = t > 0 ? step_at(delta_row, t - 1, bias, p.softplus) : dl;
          const float du_b = dl * to_f(u_row[t]);
          const float dtt = dt_row[t];
#pragma unroll
          for (int k = 0; k < kMaxK; ++k) {
            const int n = r.lane + k * lanes;
            if (k < r.K && n < p.N) {
              const float Bt = B_var ? to_f(B_row[static_cast<int64_t>(n) * L + t]) : Bc[k];
              hs[k] = expf(A[k] * dp * dtt) * hs[k] + du_b * Bt;
            }
          }
        }
        if (t >= s0) {
#pragma unroll
          for (int k = 0; k < kMaxK; ++k) hist[(t - s0 + 1) * kMaxK + k] = hs[k];
        }
      }

      // ---- the adjoint over events s1-1 down to s0 ----
      for (int t = s1 - 1; t >= s0; --t) {
        const bool valid = t < r.len;
        float ypre_part = 0.f, gB_part = 0.f, dl_part = 0.f, ddt_part = 0.f, gap_dsA = 0.f;
        float uu = 0.f, dl = 0.f, dsp = 1.f, gy = 0.f, dyv = 0.f, zz = 0.f;
        if (valid) {
          uu = to_f(u_row[t]);
          const float xdl = to_f(delta_row[t]) + bias;
          dl = p.softplus ? softplus(xdl) : xdl;
          dsp = p.softplus ? sigmoid(xdl) : 1.f;
          const float dp = t > 0 ? step_at(delta_row, t - 1, bias, p.softplus) : dl;
          const float dtt = dt_row[t];
          const float dyl = dyl_row != nullptr ? dyl_row[t] : 0.f;
          dyv = to_f(dy_row[t]);
          if (z_row != nullptr) {
            zz = to_f(z_row[t]);
            gy = dyv * zz * sigmoid(zz);
          } else {
            gy = dyv;
          }
          const bool end_gap = has_end && t == r.len - 1;
          dl_part = pend_dsA;
#pragma unroll
          for (int k = 0; k < kMaxK; ++k) {
            const int n = r.lane + k * lanes;
            if (k < r.K && n < p.N) {
              const float hp = hist[(t - s0 + 1) * kMaxK + k];  // h_t^+
              const float hprev = hist[(t - s0) * kMaxK + k];   // h_{t-1}^+ (h0 for t = 0)
              const float Ct = C_var ? to_f(C_row[static_cast<int64_t>(n) * L + t]) : Cc[k];
              const float Bt = B_var ? to_f(B_row[static_cast<int64_t>(n) * L + t]) : Bc[k];
              const float Cp = (t > 0 && C_var) ? to_f(C_row[static_cast<int64_t>(n) * L + t - 1]) : Ct;
              float gk = g[k];
              float dCv = gy * hp + pend_dC[k];
              if (end_gap) {
                // The last gap (t, T]: h_t^+ decays at A Δ_t, read out with C_t.
                const float x = A[k] * dl * dte;
                const float ph = phi(x);
                const float ds = dI * Ct * hp * dte * dte * dphi(x, ph);
                gk += dI * Ct * dte * ph;
                dl_part += ds * A[k];
                dA[k] += ds * dl;
                dCv += dI * hp * dte * ph;
                ddte_part += dI * Ct * hp * expf(x);
              }
              // The jump at t: h_t^+ = h_t^- + Δ_t B_t u_t, and the readout y_t.
              ypre_part += Ct * hp;
              gk += gy * Ct;
              const float dBv = gk * dl * uu;
              if (B_var) {
                if (p.deterministic) dB_row[static_cast<int64_t>(n) * L + t] = dBv;
                else atomicAdd(dB_row + static_cast<int64_t>(n) * L + t, dBv);
              } else {
                dBc[k] += dBv;
              }
              gB_part += gk * Bt;
              // The gap before t: h_{t-1}^+ decays at s = A Δ_{t-1} over dt_t, read out with C_{t-1}.
              const float s = A[k] * dp;
              const float x = s * dtt;
              const float e = expf(x);
              const float ph = phi(x);
              const float gm = gk + dyl * Cp;  // dL/dh_t^-
              const float ds = gm * hprev * e * dtt + dI * Cp * hprev * dtt * dtt * dphi(x, ph);
              ddt_part += gm * hprev * e * s + dI * Cp * hprev * e;
              dA[k] += ds * dp;
              gap_dsA += ds * A[k];
              const float gap_dC = dyl * e * hprev + dI * hprev * dtt * ph;
              if (t == 0) {
                dCv += gap_dC;  // event 0 supplies the first gap's readout itself
                pend_dC[k] = 0.f;
              } else {
                pend_dC[k] = gap_dC;
              }
              if (C_var) {
                if (p.deterministic) dC_row[static_cast<int64_t>(n) * L + t] = dCv;
                else atomicAdd(dC_row + static_cast<int64_t>(n) * L + t, dCv);
              } else {
                dCc[k] += dCv;
              }
              g[k] = gm * e + dI * Cp * dtt * ph;  // dL/dh_{t-1}^+
            }
          }
          if (t == 0) {
            dl_part += gap_dsA;  // and its step Δ_0 sets the first gap's decay
            pend_dsA = 0.f;
          } else {
            pend_dsA = gap_dsA;
          }
        } else if (r.ok && p.deterministic) {
          // Padding: the per-channel partials are summed by the caller, so they must be written.
#pragma unroll
          for (int k = 0; k < kMaxK; ++k) {
            const int n = r.lane + k * lanes;
            if (k < r.K && n < p.N) {
              if (B_var) dB_row[static_cast<int64_t>(n) * L + t] = 0.f;
              if (C_var) dC_row[static_cast<int64_t>(n) * L + t] = 0.f;
            }
          }
        }
        const float ypre = group_sum(ypre_part, lanes);
        const float gB = group_sum(gB_part, lanes);
        const float dlt = group_sum(dl_part, lanes);
        const float ddt_t = group_sum(ddt_part, lanes);
        if (r.ok && r.lane == 0) {
          float du = 0.f, dd = 0.f, dz = 0.f;
          if (valid) {
            du = gB * dl + gy * Dd;
            dd = (gB * uu + dlt) * dsp;
            if (z_row != nullptr) {
              const float sz = sigmoid(zz);
              dz = dyv * (ypre + Dd * uu) * sz * (1.f + zz * (1.f - sz));
            }
            dD_acc += gy * uu;
            ddb_acc += dd;
          }
          static_cast<T*>(p.du)[io + t] = from_f<T>(du);
          static_cast<T*>(p.ddelta)[io + t] = from_f<T>(dd);
          if (z_row != nullptr) static_cast<T*>(p.dz)[io + t] = from_f<T>(dz);
          p.ddt[io + t] = valid ? ddt_t : 0.f;
        }
      }
    }
  }

  const float ddte = group_sum(ddte_part, lanes);
  if (!r.ok) return;
#pragma unroll
  for (int k = 0; k < kMaxK; ++k) {
    const int n = r.lane + k * lanes;
    if (k < r.K && n < p.N) {
      const int64_t o = static_cast<int64_t>(r.row) * p.N + n;
      p.dh0[o] = g[k];  // with no events, dlast passes straight through
      p.dA[o] = dA[k];
      if (!B_var) p.dB[o] = dBc[k];
      if (!C_var) p.dC[o] = dCc[k];
    }
  }
  if (r.lane == 0) {
    p.dD[r.row] = p.D != nullptr ? dD_acc : 0.f;
    p.ddelta_bias[r.row] = p.delta_bias != nullptr ? ddb_acc : 0.f;
    p.ddt_end[r.row] = has_end ? ddte : 0.f;
  }
}

// Threads per row: N rounded up to a power of two, capped at max_lanes (at most a warp) but at least
// enough that each lane holds K = ceil(N / lanes) <= 8 states (kMaxK = 1 when K = 1, else 8; N <= 256).
inline int lanes_for(int N, int max_lanes) {
  int cap = 1;
  while (cap < max_lanes && cap < 32) cap <<= 1;
  int need = 1;
  while (need * 8 < N) need <<= 1;
  int l = 1;
  while (l < N && l < cap) l <<= 1;
  return l < need ? need : l;
}

// ------------------------------------------------------------------------------------------------
// Launchers (CUDA only: tests/ops/test_mhp_scan_cuda_emulated.py compiles the kernels above for the
// host, runs each warp's threads as OS threads with an emulated shuffle, and checks them without a GPU)
// ------------------------------------------------------------------------------------------------
#if defined(__CUDACC__)
template <typename T, int kMaxK>
cudaError_t launch_fwd(const MhpScanParams& p, int lanes, cudaStream_t stream) {
  const int64_t rows_per_block = kFwdThreads / lanes;
  const int64_t blocks = (static_cast<int64_t>(p.batch) * p.dim + rows_per_block - 1) / rows_per_block;
  mhp_scan_fwd_kernel<T, kMaxK><<<static_cast<unsigned>(blocks), kFwdThreads, 0, stream>>>(p, lanes);
  return cudaGetLastError();
}

template <typename T, int kMaxK>
cudaError_t launch_bwd(const MhpScanBwdParams& p, int lanes, cudaStream_t stream) {
  const int64_t rows_per_block = kBwdThreads / lanes;
  const int64_t blocks = (static_cast<int64_t>(p.batch) * p.dim + rows_per_block - 1) / rows_per_block;
  mhp_scan_bwd_kernel<T, kMaxK><<<static_cast<unsigned>(blocks), kBwdThreads, 0, stream>>>(p, lanes);
  return cudaGetLastError();
}

#endif  // __CUDACC__
}  // namespace detail

#if defined(__CUDACC__)
template <typename T>
cudaError_t mhp_scan_fwd_launch(const MhpScanParams& p, cudaStream_t stream) {
  if (p.batch <= 0 || p.dim <= 0 || p.L <= 0) return cudaSuccess;
  if (p.N < 1 || p.N > kMaxDState || p.chunk_size < 1) return cudaErrorInvalidValue;
  const int lanes = detail::lanes_for(p.N, p.max_lanes);
  if (p.N <= lanes) return detail::launch_fwd<T, 1>(p, lanes, stream);
  return detail::launch_fwd<T, 8>(p, lanes, stream);
}

template <typename T>
cudaError_t mhp_scan_bwd_launch(const MhpScanBwdParams& p, cudaStream_t stream) {
  if (p.batch <= 0 || p.dim <= 0 || p.L <= 0) return cudaSuccess;
  if (p.N < 1 || p.N > kMaxDState || p.chunk_size < 1) return cudaErrorInvalidValue;
  const int lanes = detail::lanes_for(p.N, p.max_lanes);
  if (p.N <= lanes) return detail::launch_bwd<T, 1>(p, lanes, stream);
  return detail::launch_bwd<T, 8>(p, lanes, stream);
}
#endif  // __CUDACC__

}  // namespace mhp
}  // namespace cuda
}  // namespace mvpp
