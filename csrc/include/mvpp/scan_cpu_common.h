// Torch-free CPU helpers shared by the selective_scan and mhp_scan CPU cores
// (selective_scan_cpu.h, mhp_scan_cpu.h): vectorisable exp/softplus, lane sums, the scan arguments
// and per-chunk scratch, Δ preprocessing, and the padded-state-size dispatch (each op picks its own
// list of padded sizes). See selective_scan_cpu.h for the layout contract ScanArgs describes.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

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
// 2^n built from the exponent bits. Max error about 2 ulp down to log(FLT_MIN) ≈ -87.34.
// Underflow (issue 16): x is clamped below at kExpLow = -88, where x log2(e) rounds to n = -127, so
// the exponent bits are 0 and the scale 2^n is exactly +0: every x <= -87.68 (and -inf) gives
// exactly 0, x in (-87.68, -87.34) a subnormal p * 2^-126 (both within FLT_MIN of e^x). The clamp
// used to sit at -87, so every x below it gave e^-87 ≈ 1.6e-38 instead of 0; times a huge |A| in a
// gradient (selective_scan's dΔ = Σ g e^{ΔA} h A with A = -3e38) that floor became an O(1) error.
// The clamp's value is the whole fix: no extra compare in the hot loops.
// kNonPos: the caller knows x <= 0 (a decay: A <= 0 and a non-negative step, checked by the caller),
// so only the lower clamp is applied: GCC compiles the two-sided clamp to a seven-instruction
// compare/mask sequence and one side to two (mhp_scan's hot loops use it). NaN propagates either way.
constexpr float kExpLow = -88.0f;
static_assert(kExpLow * 1.44269504088896341f < -126.5f && kExpLow * 1.44269504088896341f > -127.5f,
              "exp_approx's lower clamp must round to n = -127 (a zero scale)");
template <bool kNonPos = false>
MVPP_INLINE float exp_approx(float x) {
  if constexpr (kNonPos) {
    x = std::max(x, kExpLow);
  } else {
    x = std::min(std::max(x, kExpLow), 88.0f);
  }
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

// max |p[i]| over n floats, NaN ignored (it propagates through the scan either way), 0 for n = 0.
// 64 independent lanes hide the max chain's latency (~6 us per 131k floats, a third of one
// accumulator's). The CPU scans' float64-widening checks (issue 16) use it.
inline float max_abs(const float* p, int64_t n) {
  float m[64] = {0.0f};
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
#pragma omp simd
    for (int j = 0; j < 64; ++j) m[j] = std::max(m[j], std::fabs(p[i + j]));
  }
  for (int64_t k = i; k < n; ++k) m[0] = std::max(m[0], std::fabs(p[k]));
  float r = 0.0f;
  for (int j = 0; j < 64; ++j) r = std::max(r, m[j]);
  return r;
}

// A float32 CPU scan runs in float64 (issue 16) when this bound reaches kWidenFloat64: steps,
// inputs or readouts that large make Δ u B, the state or C h overflow float32 while the outputs and
// gradients the loss sees can be finite, and float32 intermediates then give inf - inf = NaN.
// bound = (max|delta| + max|delta_bias| + 1) max(1, max|u|) max(1, max|B|) max(1, max|C|): the +1
// covers softplus (softplus(x) <= |x| + log 2) and keeps a small step from hiding a huge u or B.
// 1e15 is far above what a model feeds (|u|, |B|, |C| ~ 1-100, Δ ~ 1e-3-10 give < 1e7), so the
// common case pays only the max passes; float64 holds the bound's square with room to spare.
constexpr double kWidenFloat64 = 1e15;

inline bool float32_may_overflow(float max_delta, float max_bias, float max_u, float max_B, float max_C) {
  const double bound = (double(max_delta) + double(max_bias) + 1.0) * std::max(1.0, double(max_u)) *
                       std::max(1.0, double(max_B)) * std::max(1.0, double(max_C));
  return bound >= kWidenFloat64;
}

// float64 inputs are the accuracy path: libm.
template <bool kNonPos = false>
MVPP_INLINE double exp_approx(double x) {
  return std::exp(x);
}

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

// The padded state sizes an op's kernels are instantiated for, ascending; N is rounded up to the
// next one and the kernel called with it as a compile-time constant (so the state lives in
// registers and the loops over it unroll).
template <int... Sizes>
struct PaddedStateSizes {
  static constexpr int kSizes[] = {Sizes...};
  static_assert(kSizes[sizeof...(Sizes) - 1] == kMaxDState, "the padded sizes must reach kMaxDState");

  static int padded(int64_t N) {
    for (int p : kSizes)
      if (N <= p) return p;
    return -1;
  }

  // Calls f(std::integral_constant<int, NP>{}) when NP is one of Sizes; does nothing otherwise.
  template <typename F>
  static void dispatch(int NP, F&& f) {
    (void)((NP == Sizes ? (f(std::integral_constant<int, Sizes>{}), true) : false) || ...);
  }
};

}  // namespace scan_cpu
}  // namespace mvpp
