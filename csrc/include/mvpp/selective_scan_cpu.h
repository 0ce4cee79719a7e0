// Torch-free core of the CPU selective scan: one (batch, channel) recurrence at a time, the state in
// a fixed-size local array so the compiler keeps it in vector registers and unrolls the loops over
// the state dimension.
//
//   h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t u_t B_t,  y_t = C_t · h_t + D u_t,  out_t = y_t · silu(z_t)
//
// Layout contract (the torch binding prepares it):
//   u, delta, z, dout, du, ddelta, dz, out: (batch, dim, L) contiguous, compute type T
//   A: (dim, NP) padded with zeros; B/C: constant (dim, NP) or variable (batch, G, L, NP) -- i.e. B
//   transposed so one time step's states are contiguous -- both zero-padded from N to NP.
//   Padded states have A = B = C = 0 and a zero initial state, so they stay zero and contribute nothing.
// T is float (float32/float16/bfloat16 inputs) or double (float64 inputs); the state and every
// accumulation use T.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "mvpp/common.h"

namespace mvpp {
namespace scan_cpu {

// -std=c++17 turns off FMA contraction in GCC; the hot loops ask for it explicitly.
template <typename T>
MVPP_INLINE T fmadd(T a, T b, T c) {
#if defined(__FMA__) || defined(__aarch64__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// exp for float, branch-free so `#pragma omp simd` loops over the state vectorise (glibc's expf is
// scalar). Cody-Waite reduction x = n ln2 + r, a degree-7 polynomial for e^r (Cephes' coefficients),
// 2^n built from the exponent bits. Max error about 2 ulp on the clamped range; inputs below -87
// give ~e^-87 (≈ 1.6e-38) instead of an underflow to 0, which is harmless for a decay factor.
MVPP_INLINE float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  // Adding 1.5 * 2^23 rounds x*log2(e) to the nearest integer without a rounding instruction.
  const float magic = 12582912.0f;
  const float t = fmadd(x, 1.44269504088896341f, magic);
  const float n = t - magic;
  float r = fmadd(n, -0.693359375f, x);
  r = fmadd(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = fmadd(p, r, 1.3981999507e-3f);
  p = fmadd(p, r, 8.3334519073e-3f);
  p = fmadd(p, r, 4.1665795894e-2f);
  p = fmadd(p, r, 1.6666665459e-1f);
  p = fmadd(p, r, 5.0000001201e-1f);
  p = fmadd(p, r * r, r + 1.0f);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// float64 inputs are the accuracy path: libm.
MVPP_INLINE double exp_approx(double x) { return std::exp(x); }

// log(1 + v) for v in [0, 1]: 2 atanh(s), s = v / (2 + v) in [0, 1/3]; the odd series to s^15
// is below float rounding there. Only used by softplus, where v = exp(-|x|).
MVPP_INLINE float log1p_unit(float v) {
  const float s = v / (2.0f + v);
  const float s2 = s * s;
  float p = 1.0f / 15.0f;
  p = fmadd(p, s2, 1.0f / 13.0f);
  p = fmadd(p, s2, 1.0f / 11.0f);
  p = fmadd(p, s2, 1.0f / 9.0f);
  p = fmadd(p, s2, 1.0f / 7.0f);
  p = fmadd(p, s2, 1.0f / 5.0f);
  p = fmadd(p, s2, 1.0f / 3.0f);
  p = fmadd(p, s2, 1.0f);
  return 2.0f * s * p;
}

// softplus with torch's threshold (x > 20 -> x), and its derivative sigmoid(x) (1 past the threshold).
MVPP_INLINE void softplus_and_grad(float x, float& sp, float& dsp) {
  const float e = exp_approx(-std::fabs(x));  // in (0, 1]: no overflow for any x
  const float inv = 1.0f / (1.0f + e);
  const float sig = x >= 0.0f ? inv : e * inv;
  const float val = std::max(x, 0.0f) + log1p_unit(e);
  sp = x > 20.0f ? x : val;
  dsp = x > 20.0f ? 1.0f : sig;
}

MVPP_INLINE void softplus_and_grad(double x, double& sp, double& dsp) {
  // torch: x > threshold ? x : log1p(exp(x)); backward: z / (z + 1), z = exp(x).
  if (x > 20.0) {
    sp = x;
    dsp = 1.0;
  } else {
    const double z = std::exp(x);
    sp = std::log1p(z);
    dsp = z / (z + 1.0);
  }
}

// Sum of v[0..NP), NP a power of two >= 8, v 64-byte aligned. `#pragma omp simd reduction` makes
// GCC add the lanes one by one in order (a chain of scalar adds every step); this adds whole
// 256-bit vectors first and reduces one at the end. (AVX-512's reduce/extract intrinsics trip a
// false -Wmaybe-uninitialized in GCC 12's headers, and were no faster here.)
template <int NP>
MVPP_INLINE float lane_sum(const float* v) {
#if defined(__AVX__)
  __m256 acc = _mm256_load_ps(v);
  for (int i = 8; i < NP; i += 8) acc = _mm256_add_ps(acc, _mm256_load_ps(v + i));
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
#else
  float part[8];
  for (int j = 0; j < 8; ++j) part[j] = v[j];
  for (int i = 8; i < NP; i += 8)
    for (int j = 0; j < 8; ++j) part[j] += v[i + j];
  return ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
#endif
}

// float64 is the accuracy path; a plain pairwise sum is enough there.
template <int NP>
MVPP_INLINE double lane_sum(const double* v) {
  double part[8];
  for (int j = 0; j < 8; ++j) part[j] = v[j];
  for (int i = 8; i < NP; i += 8)
    for (int j = 0; j < 8; ++j) part[j] += v[i + j];
  return ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
}

template <typename T>
MVPP_INLINE T sigmoid(T x) {
  return T(1) / (T(1) + exp_approx(-x));
}

template <typename T>
struct ScanArgs {
  int64_t batch = 0, dim = 0, L = 0, N = 0;
  int64_t chunk_size = 64;
  bool softplus = false;
  // Inputs (see the layout contract above). Optional ones are nullptr when absent.
  const T* u = nullptr;
  const T* delta = nullptr;
  const T* z = nullptr;
  const T* A = nullptr;   // (dim, NP)
  const T* B = nullptr;   // (dim, NP) or (batch, GB, L, NP)
  const T* C = nullptr;   // (dim, NP) or (batch, GC, L, NP)
  int64_t GB = 0, GC = 0;  // 0: constant B/C
  const T* D = nullptr;           // (dim,)
  const T* delta_bias = nullptr;  // (dim,)
  const T* initial_state = nullptr;  // (batch, dim, N)
  const int64_t* lengths = nullptr;  // (batch,), each in [0, L]
  // Forward outputs.
  T* out = nullptr;           // (batch, dim, L)
  T* last_state = nullptr;    // (batch, dim, N)
  T* chunk_states = nullptr;  // (batch, dim, n_chunks, N); read by the backward
  // Backward inputs/outputs.
  const T* dout = nullptr;        // (batch, dim, L)
  const T* dlast_state = nullptr;  // (batch, dim, N) or nullptr
  T* du = nullptr;
  T* ddelta = nullptr;
  T* dz = nullptr;       // nullptr when z is absent
  T* dA = nullptr;       // (batch, dim, N) per-batch partials
  T* dD = nullptr;       // (batch, dim)
  T* ddelta_bias = nullptr;  // (batch, dim)
  T* dinitial_state = nullptr;  // (batch, dim, N)
  T* dB_const = nullptr;  // (batch, dim, N) when B is constant
  T* dC_const = nullptr;

  int64_t n_chunks() const { return chunk_size > 0 ? (L + chunk_size - 1) / chunk_size : 0; }
  int64_t length(int64_t b) const { return lengths ? lengths[b] : L; }
  // Where channel d of batch b reads B_t: base + t * stride (stride 0 for a constant B).
  const T* B_base(int64_t b, int64_t d, int64_t NP) const {
    return GB ? B + ((b * GB + d / (dim / GB)) * L) * NP : B + d * NP;
  }
  const T* C_base(int64_t b, int64_t d, int64_t NP) const {
    return GC ? C + ((b * GC + d / (dim / GC)) * L) * NP : C + d * NP;
  }
};

// Per-thread scratch for one chunk: Δ_t, Δ_t u_t and dsoftplus/dx for each step, plus (backward
// only) the state before each step and each step's decay, chunk_size x NP each.
template <typename T>
struct ChunkScratch {
  T* dt;
  T* dtu;
  T* dsp;
  T* hprev;  // backward only
  T* decay;  // backward only
};

// Δ_t, Δ_t u_t and dΔ/d(delta) for steps [t0, t1) of one channel, into scratch[0, t1 - t0).
template <typename T>
MVPP_INLINE void chunk_deltas(const ScanArgs<T>& a, const T* delta, const T* u, T bias, int64_t t0, int64_t t1,
                              const ChunkScratch<T>& s) {
  const int64_t n = t1 - t0;
  if (a.softplus) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      T sp, dsp;
      softplus_and_grad(delta[t0 + i] + bias, sp, dsp);
      s.dt[i] = sp;
      s.dsp[i] = dsp;
      s.dtu[i] = sp * u[t0 + i];
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const T v = delta[t0 + i] + bias;
      s.dt[i] = v;
      s.dsp[i] = T(1);
      s.dtu[i] = v * u[t0 + i];
    }
  }
}

// Forward for channel (b, d). NP: the padded state size (compile time, so h lives in registers).
template <typename T, int NP>
void scan_fwd_channel(const ScanArgs<T>& a, int64_t b, int64_t d, const ChunkScratch<T>& s, T* y) {
  const int64_t L = a.L, N = a.N, cs = a.chunk_size, nc = a.n_chunks();
  const int64_t row = (b * a.dim + d) * L;
  const T* u = a.u + row;
  const T* delta = a.delta + row;
  const T* z = a.z ? a.z + row : nullptr;
  T* out = a.out + row;
  const int64_t len = a.length(b);
  const T bias = a.delta_bias ? a.delta_bias[d] : T(0);
  const T Dd = a.D ? a.D[d] : T(0);

  alignas(64) T h[NP];
  alignas(64) T Ad[NP];
  for (int n = 0; n < NP; ++n) {
    h[n] = (a.initial_state && n < N) ? a.initial_state[(b * a.dim + d) * N + n] : T(0);
    Ad[n] = a.A[d * NP + n];
  }
  const T* Bb = a.B_base(b, d, NP);
  const T* Cb = a.C_base(b, d, NP);
  const int64_t Bs = a.GB ? NP : 0, Cs = a.GC ? NP : 0;
  T* cstates = a.chunk_states + (b * a.dim + d) * nc * N;

  for (int64_t c = 0; c < nc; ++c) {
    const int64_t t0 = c * cs, t1 = std::min(t0 + cs, L), te = std::min(t1, len);
    if (te > t0) {
      chunk_deltas(a, delta, u, bias, t0, te, s);
      for (int64_t t = t0; t < te; ++t) {
        const T dt = s.dt[t - t0], dtu = s.dtu[t - t0];
        const T* Bt = Bb + t * Bs;
        const T* Ct = Cb + t * Cs;
        alignas(64) T prod[NP];
#pragma omp simd
        for (int n = 0; n < NP; ++n) {
          h[n] = fmadd(exp_approx(dt * Ad[n]), h[n], dtu * Bt[n]);
          prod[n] = Ct[n] * h[n];
        }
        y[t - t0] = lane_sum<NP>(prod);
      }
      if (z) {
#pragma omp simd
        for (int64_t t = t0; t < te; ++t) {
          const T zt = z[t];
          out[t] = fmadd(Dd, u[t], y[t - t0]) * (zt * sigmoid(zt));
        }
      } else {
#pragma omp simd
        for (int64_t t = t0; t < te; ++t) out[t] = fmadd(Dd, u[t], y[t - t0]);
      }
    }
    for (int64_t t = std::max(te, t0); t < t1; ++t) out[t] = T(0);
    for (int64_t n = 0; n < N; ++n) cstates[c * N + n] = h[n];
  }
  T* last = a.last_state + (b * a.dim + d) * N;
  for (int64_t n = 0; n < N; ++n) last[n] = h[n];
}

// Backward for channel (b, d), by recomputation: for each chunk in reverse, rerun the forward from
// the saved chunk-start state into scratch (state before each step and its decay), then run the
// adjoint recurrence g_{t-1} = exp(Δ_t A) ⊙ (g_t + dy_t C_t) backwards through the chunk.
// dB_var/dC_var: (L, NP) accumulators for this channel's group (nullptr for constant B/C); the
// caller owns them per task, so channels of a group never write the same memory concurrently.
template <typename T, int NP>
void scan_bwd_channel(const ScanArgs<T>& a, int64_t b, int64_t d, const ChunkScratch<T>& s, T* dB_var,
                      T* dC_var) {
  const int64_t L = a.L, N = a.N, cs = a.chunk_size, nc = a.n_chunks();
  const int64_t bd = b * a.dim + d;
  const int64_t row = bd * L;
  const T* u = a.u + row;
  const T* delta = a.delta + row;
  const T* z = a.z ? a.z + row : nullptr;
  const T* dout = a.dout + row;
  T* du = a.du + row;
  T* ddelta = a.ddelta + row;
  T* dz = a.dz ? a.dz + row : nullptr;
  const int64_t len = a.length(b);
  const T bias = a.delta_bias ? a.delta_bias[d] : T(0);
  const T Dd = a.D ? a.D[d] : T(0);

  alignas(64) T Ad[NP];
  alignas(64) T g[NP];      // d(loss)/d(h_t) as t runs backwards
  alignas(64) T dA_acc[NP];
  alignas(64) T dBc[NP];    // constant-B/C gradient accumulators
  alignas(64) T dCc[NP];
  alignas(64) T h[NP];
  for (int n = 0; n < NP; ++n) {
    Ad[n] = a.A[d * NP + n];
    g[n] = (a.dlast_state && n < N) ? a.dlast_state[bd * N + n] : T(0);
    dA_acc[n] = T(0);
    dBc[n] = T(0);
    dCc[n] = T(0);
  }
  const T* Bb = a.B_base(b, d, NP);
  const T* Cb = a.C_base(b, d, NP);
  const bool Bvar = a.GB != 0, Cvar = a.GC != 0;
  const int64_t Bs = Bvar ? NP : 0, Cs = Cvar ? NP : 0;
  const T* cstates = a.chunk_states + bd * nc * N;
  T dD_acc = T(0), ddb_acc = T(0);

  // Past a sequence's end nothing depends on the inputs.
  for (int64_t t = std::max<int64_t>(len, 0); t < L; ++t) {
    du[t] = T(0);
    ddelta[t] = T(0);
    if (dz) dz[t] = T(0);
  }

  const int64_t c_last = len > 0 ? (len - 1) / cs : -1;
  for (int64_t c = c_last; c >= 0; --c) {
    const int64_t t0 = c * cs, te = std::min(std::min(t0 + cs, L), len);
    for (int n = 0; n < NP; ++n) {
      if (n >= N) {
        h[n] = T(0);
      } else if (c == 0) {
        h[n] = a.initial_state ? a.initial_state[bd * N + n] : T(0);
      } else {
        h[n] = cstates[(c - 1) * N + n];
      }
    }
    chunk_deltas(a, delta, u, bias, t0, te, s);
    for (int64_t t = t0; t < te; ++t) {
      const int64_t i = t - t0;
      const T dt = s.dt[i], dtu = s.dtu[i];
      const T* Bt = Bb + t * Bs;
      T* hp = s.hprev + i * NP;
      T* dc = s.decay + i * NP;
#pragma omp simd
      for (int n = 0; n < NP; ++n) {
        const T e = exp_approx(dt * Ad[n]);
        hp[n] = h[n];
        dc[n] = e;
        h[n] = fmadd(e, h[n], dtu * Bt[n]);
      }
    }
    for (int64_t t = te - 1; t >= t0; --t) {
      const int64_t i = t - t0;
      const T dt = s.dt[i], dtu = s.dtu[i], ut = u[t];
      const T* Bt = Bb + t * Bs;
      const T* Ct = Cb + t * Cs;
      const T* hp = s.hprev + i * NP;
      const T* dc = s.decay + i * NP;
      T gate = T(1), dgate = T(0);
      if (z) {
        const T zt = z[t], sg = sigmoid(zt);
        gate = zt * sg;
        dgate = sg * (T(1) + zt * (T(1) - sg));  // d silu / dz
      }
      const T dy = dout[t] * gate;
      T* dBt = Bvar ? dB_var + t * NP : dBc;
      T* dCt = Cvar ? dC_var + t * NP : dCc;
      alignas(64) T py[NP];
      alignas(64) T pdecay[NP];
      alignas(64) T pB[NP];
#pragma omp simd
      for (int n = 0; n < NP; ++n) {
        const T ht = fmadd(dc[n], hp[n], dtu * Bt[n]);
        py[n] = Ct[n] * ht;
        dCt[n] = fmadd(dy, ht, dCt[n]);
        const T gn = fmadd(dy, Ct[n], g[n]);
        const T w = gn * dc[n] * hp[n];
        pdecay[n] = w * Ad[n];
        dA_acc[n] = fmadd(dt, w, dA_acc[n]);
        pB[n] = gn * Bt[n];
        dBt[n] = fmadd(gn, dtu, dBt[n]);
        g[n] = dc[n] * gn;
      }
      const T yacc = z ? lane_sum<NP>(py) : T(0);
      const T s_decay = lane_sum<NP>(pdecay);
      const T s_B = lane_sum<NP>(pB);
      if (dz) dz[t] = dout[t] * fmadd(Dd, ut, yacc) * dgate;
      dD_acc = fmadd(dy, ut, dD_acc);
      du[t] = fmadd(dy, Dd, dt * s_B);
      const T dd = fmadd(ut, s_B, s_decay) * s.dsp[i];
      ddelta[t] = dd;
      ddb_acc += dd;
    }
  }

  for (int64_t n = 0; n < N; ++n) {
    a.dinitial_state[bd * N + n] = g[n];
    a.dA[bd * N + n] = dA_acc[n];
    if (!Bvar) a.dB_const[bd * N + n] = dBc[n];
    if (!Cvar) a.dC_const[bd * N + n] = dCc[n];
  }
  a.dD[bd] = dD_acc;
  a.ddelta_bias[bd] = ddb_acc;
}

// Padded state sizes the kernels are instantiated for; N is rounded up to the next one.
constexpr int kPaddedSizes[] = {8, 16, 32, 64, 128, 256};
static_assert(kMaxDState == 256, "kPaddedSizes must reach kMaxDState");

inline int padded_state_size(int64_t N) {
  for (int p : kPaddedSizes)
    if (N <= p) return p;
  return -1;
}

// Calls f(std::integral_constant<int, NP>{}) for the padded size of N.
template <typename F>
void dispatch_padded(int NP, F&& f) {
  switch (NP) {
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    case 256: f(std::integral_constant<int, 256>{}); break;
    default: break;
  }
}

}  // namespace scan_cpu
}  // namespace mvpp
