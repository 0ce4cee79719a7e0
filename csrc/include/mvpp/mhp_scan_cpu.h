// Torch-free core of the CPU mhp_scan: the continuous-time selective scan fused with the exact
// integral of its readout, one (batch, channel) recurrence at a time (see docs/mhp_scan.md).
//
//   gap i (t_{i-1}, t_i], p = i-1 (p = 0 for the first gap), s = Δ_p dt_i, x_n = A_n s <= 0:
//     I_i      = dt_i Σ_n C_{p,n} h_{p,n}^+ φ(x_n),   φ(x) = (e^x - 1) / x  (φ(0) = 1)
//     h_i^-    = e^{x} ⊙ h_{p}^+,   y_left_i = C_p · h_i^-
//     h_i^+    = h_i^- + Δ_i u_i B_i,  y_i = (C_i · h_i^+ + D u_i) silu(z_i)
//   plus the last gap (t_n, T] of length dt_end with p = n.
//
// Layout contract: selective_scan_cpu.h's (inputs in the compute type T, A/B/C zero-padded from N
// to NP, variable B/C transposed to (batch, G, L, NP)), plus dt (batch, L) and dt_end (batch,) in T.
// Its vectorisable exp/softplus, ScanArgs and padded-state dispatch are shared with it
// (mvpp/scan_cpu_common.h).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "mvpp/common.h"
#include "mvpp/scan_cpu_common.h"

namespace mvpp {
namespace mhp_cpu {

// The numerics and plumbing shared with selective_scan's CPU core (mvpp/scan_cpu_common.h).
using scan_cpu::exp_approx;  // exp_approx<true>: the one-sided clamp for decays (x <= 0)
using scan_cpu::fmadd;
using scan_cpu::sigmoid;
using scan_cpu::ScanArgs;
using scan_cpu::softplus_and_grad;

// Padded state sizes the kernels are instantiated for; N is rounded up to the next one.
// Unlike selective_scan, small sizes too: the classic Hawkes process (N = 1) and small multivariate
// ones would otherwise spend 8x the work on padding.
using StateSizes = scan_cpu::PaddedStateSizes<1, 2, 4, 8, 16, 32, 64, 128, 256>;

inline int padded_state_size(int64_t N) { return StateSizes::padded(N); }

// Calls f(std::integral_constant<int, NP>{}) for the padded size of N.
template <typename F>
void dispatch_padded(int NP, F&& f) {
  StateSizes::dispatch(NP, std::forward<F>(f));
}

// Below |x| < kThr, φ and φ' come from their Taylor series; above, from e^x (shared with the decay).
// float: (e^x - 1)/x loses ~ulp(1)/|x| to the approximate exp, so 0.1 keeps it near 1e-6 relative
// and 7 terms make the series exact to float rounding there; double: libm exp, 1e-2 and 9 terms.
template <typename T>
struct PhiConst;
template <>
struct PhiConst<float> {
  static constexpr float kThr = 0.1f;
  static constexpr int kTerms = 7;
  // Gaps with Δ dt or dt at or past this take the backward's closed forms (see mhp_bwd_channel): far
  // below where dt^2 or 1/x^2 leave float's range, far above any time scale a model uses.
  static constexpr float kHuge = 1e15f;
};
template <>
struct PhiConst<double> {
  static constexpr double kThr = 1e-2;
  static constexpr int kTerms = 9;
  static constexpr double kHuge = 1e150;
};

constexpr double factorial(int k) { return k <= 1 ? 1.0 : k * factorial(k - 1); }

// φ(x) = (e^x - 1)/x = Σ_k x^k/(k+1)!, given e = e^x and invx = 1/x (any finite value when x = 0).
// kSeries = false when the caller knows |x| >= kThr on every lane (the common case): no series, no
// select. Branch-free otherwise (a select) so the loops over the state vectorise.
template <typename T, bool kSeries>
MVPP_INLINE T phi(T x, T e, T invx) {
  const T big = (e - T(1)) * invx;
  if (!kSeries) return big;
  constexpr int K = PhiConst<T>::kTerms;
  T ser = T(1.0 / factorial(K + 1));
  for (int k = K - 1; k >= 0; --k) ser = fmadd(ser, x, T(1.0 / factorial(k + 1)));
  return std::fabs(x) < PhiConst<T>::kThr ? ser : big;
}

// φ'(x) = Σ_k (k+1) x^k/(k+2)! = (e^x - φ(x))/x = ∫_0^1 s e^{xs} ds, given e, φ(x) and 1/x.
template <typename T, bool kSeries>
MVPP_INLINE T dphi(T x, T e, T ph, T invx) {
  const T big = (e - ph) * invx;
  if (!kSeries) return big;
  constexpr int K = PhiConst<T>::kTerms;
  T ser = T((K + 1) / factorial(K + 2));
  for (int k = K - 1; k >= 0; --k) ser = fmadd(ser, x, T((k + 1) / factorial(k + 2)));
  return std::fabs(x) < PhiConst<T>::kThr ? ser : big;
}

// dt φ(x) = ∫_0^dt e^{A Δ r} dr, the integral of one lane's decay over a gap, given e = e^x and
// q = 1/Δ (inv_step): dt times φ's series near x = 0, else (e^x - 1) invA q -- never through 1/s,
// so right for any dt (a saturated s, or φ(-inf) * dt = 0 * dt, would lose it).
template <typename T, bool kSeries>
MVPP_INLINE T dt_phi(T x, T e, T invA, T q, T dt) {
  const T big = (e - T(1)) * invA * q;
  if (!kSeries) return big;
  constexpr int K = PhiConst<T>::kTerms;
  T ser = T(1.0 / factorial(K + 1));
  for (int k = K - 1; k >= 0; --k) ser = fmadd(ser, x, T(1.0 / factorial(k + 1)));
  return std::fabs(x) < PhiConst<T>::kThr ? ser * dt : big;
}

// d(dt φ(A Δ dt))/dA = dt s φ'(x), given φ' = dph and dt φ = dtph: (dt s) φ' near x = 0, else
// (dt e^x - dt φ) / A, which needs neither s (saturated) nor φ' (whose 1/x^2 underflows at large
// |x|: a 1e38 gap lost the integral's whole dA in float).
template <typename T, bool kSeries>
MVPP_INLINE T dA_of_int(T x, T e, T dph, T dtph, T invA, T dt, T s) {
  const T big = invA * fmadd(dt, e, -dtph);
  if (!kSeries) return big;
  return std::fabs(x) < PhiConst<T>::kThr ? (dt * s) * dph : big;
}

// d(dt φ(A Δ dt))/dΔ = A dt^2 φ'(x): (A dt) dt φ' near x = 0 (A first: exactly 0 for A = 0 and the
// padded lanes, where dt^2 alone may overflow), else A dA_of_int / Δ (q = 1/Δ). Never dt * (dt φ'):
// at a 1e38 gap dt φ' ~ 1/(A^2 Δ^2 dt) underflows.
template <typename T, bool kSeries>
MVPP_INLINE T dD_of_int(T x, T dph, T dAi, T q, T A, T dt) {
  const T big = dAi * q * A;
  if (!kSeries) return big;
  return std::fabs(x) < PhiConst<T>::kThr ? (A * dt) * dt * dph : big;
}

// Per-channel constants: 1/A_n (0 where A_n = 0, whose x = 0 always takes the series) and the
// smallest |A_n|, so a gap with s * min|A| >= kThr skips the series on every lane.
template <typename T, int NP>
MVPP_INLINE T rate_constants(const T* Ad, int64_t N, T* invA) {
  T minA = std::numeric_limits<T>::infinity();
  for (int n = 0; n < NP; ++n) {
    invA[n] = Ad[n] != T(0) ? T(1) / Ad[n] : T(0);
    if (n < N) minA = std::min(minA, std::fabs(Ad[n]));
  }
  return minA;
}

// Whether every rate is <= 0, so x = A Δ dt <= 0 for any step with Δ dt >= 0 (the wrapper checks
// A <= 0, but outside torch.compile only).
template <typename T, int NP>
MVPP_INLINE bool all_nonpositive(const T* Ad) {
  bool ok = true;
  for (int n = 0; n < NP; ++n) ok = ok && Ad[n] <= T(0);
  return ok;
}

// 1/s for s = Δ dt >= 0 (0 for s = 0: every x is then 0 and takes the series).
template <typename T>
MVPP_INLINE T safe_inv(T s) {
  return s != T(0) ? T(1) / s : T(0);
}

// The numerics of a gap under overflow (issue 16), each in one place: every gap's step (gap_step),
// decay (decay_exp) and integral (inv_step, dt_phi, dA_of_int above) go through these, so no lane
// ever computes 0 * inf and no float under- or overflow of an intermediate reaches a result.
//
// gap_step: s = Δ_p dt, saturated at the largest finite T. Δ dt overflows for finite inputs (a gap
// of 3e38 with Δ = 2); x = A_n s is then never 0 * inf (the zero-padded lanes N..NP and real A = 0
// lanes give x = 0, e^x = 1, and their h = 0 or x = 0 is exact), and e^x s is never 0 * inf. NaN
// stays NaN (std::min returns its first argument when unordered).
template <typename T>
MVPP_INLINE T gap_step(T dp, T dt) {
  return std::min(dp * dt, std::numeric_limits<T>::max());
}

// e^x for a decay, exactly 0 below log(FLT_MIN) (error < FLT_MIN). exp_approx used to floor at
// e^-87 ~ 1.6e-38, which a huge state or step showed (1.6e-38 * s ~ 5 in dA at s = 3e38); it now
// returns 0 itself from x <= -87.68 (scan_cpu_common.h), and this select also zeroes its subnormal
// results in (-87.68, -87.34), so the huge-gap closed forms never meet a subnormal decay.
template <bool kNonPos = false>
MVPP_INLINE float decay_exp(float x) {
  return x < -87.3365448f ? 0.0f : exp_approx<kNonPos>(x);
}
template <bool kNonPos = false>
MVPP_INLINE double decay_exp(double x) {
  return exp_approx<kNonPos>(x);
}

// q = 1/Δ_p for the integral's closed form dt φ(x) = (e^x - 1) / (A Δ_p): 1/Δ when Δ is normal,
// else dt/s (s = Δ dt cannot overflow then, so it is not saturated); 0 for Δ = 0 (every x is then 0
// and takes the series). Never dt/s for a normal Δ: a saturated s would make it wrong.
template <typename T>
MVPP_INLINE T inv_step(T dp, T inv_dp, T dt, T s) {
  return dp >= std::numeric_limits<T>::min() ? inv_dp : dt * safe_inv(s);
}

// A lane's term of a sum over the state, with the padded lanes N..NP selected to 0 (issue 16). The
// padded lanes (A = B = C = h = 0) are inert in exact arithmetic, but at a huge gap their
// intermediates need not be finite (dt times an upstream gradient overflows, then times their zero C
// gives NaN). Every term that crosses lanes at a gap past PhiConst::kHuge (and at the last gap, and
// in the integral's lane total), and the adjoint those gaps carry to the next, passes through here, so what a padded lane computes stays in that
// lane, whose own per-lane results (dA, dB, dC) are never read; below kHuge every factor a padded
// lane meets is bounded, so its terms are exact zeros without the select (see mhp_bwd_channel).
template <typename T>
MVPP_INLINE T live(int n, int64_t N, T v) {
  return n < N ? v : T(0);
}

template <typename T>
struct MhpArgs : ScanArgs<T> {
  const T* dt = nullptr;      // (batch, L)
  const T* dt_end = nullptr;  // (batch,) or nullptr
  // Forward outputs (ScanArgs::out is y).
  T* y_left = nullptr;    // (batch, dim, L)
  T* integral = nullptr;  // (batch, dim)
  // Backward inputs/outputs (ScanArgs::dout is dy).
  const T* dy_left = nullptr;    // (batch, dim, L) or nullptr
  const T* dintegral = nullptr;  // (batch, dim) or nullptr
  T* ddt = nullptr;              // (batch, dim, L) per-channel partials
  T* ddt_end = nullptr;          // (batch, dim) per-channel partials
};

// The channel kernels are flattened: every helper (exp_approx, softplus, sigmoid, the lane sums)
// is inlined into them, which is what lets GCC vectorise the per-event loops (an out-of-line call
// inside a `#pragma omp simd` loop keeps it scalar).
#if defined(__GNUC__)
#define MVPP_MHP_FLATTEN __attribute__((flatten))
#else
#define MVPP_MHP_FLATTEN
#endif

template <typename T>
MVPP_INLINE T step_of(const MhpArgs<T>& a, T delta_plus_bias) {
  if (!a.softplus) return delta_plus_bias;
  T sp, dsp;
  softplus_and_grad(delta_plus_bias, sp, dsp);
  return sp;
}

// Per-thread scratch, each array chunk_size (or chunk_size x NP) long.
template <typename T>
struct MhpScratch {
  T* d;      // Δ_t
  T* dtu;    // Δ_t u_t
  T* dsp;    // dΔ_t / d(delta_t)
  T* inv_d;  // 1 / Δ_t (0 for Δ_t = 0)
  T* ev0;    // forward: y before D/z; backward: dy_t (gated)
  T* ev1;    // backward: d silu(z_t)/dz_t
  T* ev2;    // backward: next event's pending dΔ (see mhp_bwd_channel)
  T* rows;   // forward: 2 x cs x NP; backward: (cs + 1) x NP states, cs x NP decays, 4 x cs x NP lanes
  T* sums;   // 4 x cs row sums
};

// Δ, Δu, dΔ/d(delta) and 1/Δ for events [t0, t1) of one channel (vectorised: the softplus is
// branch-free and inlined).
template <typename T>
MVPP_INLINE void prep_steps(const MhpArgs<T>& a, const T* delta, const T* u, T bias, int64_t t0, int64_t t1,
                            const MhpScratch<T>& s) {
  const int64_t n = t1 - t0;
  if (a.softplus) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      T sp, dsp;
      softplus_and_grad(delta[t0 + i] + bias, sp, dsp);
      s.d[i] = sp;
      s.dsp[i] = dsp;
      s.dtu[i] = sp * u[t0 + i];
      s.inv_d[i] = sp != T(0) ? T(1) / sp : T(0);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const T v = delta[t0 + i] + bias;
      s.d[i] = v;
      s.dsp[i] = T(1);
      s.dtu[i] = v * u[t0 + i];
      s.inv_d[i] = v != T(0) ? T(1) / v : T(0);
    }
  }
}

// Sums of the NP lanes of each of `rows` rows (row stride NP): out[i] = Σ_n P[i * NP + n].
// These replace a horizontal reduction per event inside the sequential loop. With AVX-512 and
// float rows of 16k lanes, 16 rows are reduced together by a transpose-and-add tree (about 3
// instructions a row instead of ~6 for a per-row horizontal sum, and no scalar add chain).
template <typename T, int NP>
MVPP_INLINE T lane_total(const T* __restrict v) {
  if constexpr (NP >= 8) {
    T part[8];
    for (int j = 0; j < 8; ++j) part[j] = v[j];
    for (int i = 8; i < NP; i += 8)
      for (int j = 0; j < 8; ++j) part[j] += v[i + j];
    return ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
  } else {
    T acc = v[0];
    for (int n = 1; n < NP; ++n) acc += v[n];
    return acc;
  }
}

#if defined(__AVX512F__)
// v[0..16): 16 vectors; returns the vector of their 16 horizontal sums, in order. (The maskz forms
// with a full mask compile to the plain instructions; the unmasked intrinsics trip GCC 12's false
// -Wmaybe-uninitialized on their undefined pass-through operand.)
MVPP_INLINE __m512 transpose_sum16(const __m512* v) {
  constexpr __mmask16 all = 0xFFFF;
  __m512 a[8], b[4], c[2];
  for (int k = 0; k < 8; ++k) {
    // Within each 128-bit lane: [x0+x2, y0+y2, x1+x3, y1+y3] for rows x = v[2k], y = v[2k+1].
    a[k] = _mm512_add_ps(_mm512_maskz_unpacklo_ps(all, v[2 * k], v[2 * k + 1]),
                         _mm512_maskz_unpackhi_ps(all, v[2 * k], v[2 * k + 1]));
  }
  for (int k = 0; k < 4; ++k) {
    // Within each 128-bit lane: that lane's sums of rows 4k..4k+3, in order.
    b[k] = _mm512_add_ps(_mm512_maskz_shuffle_ps(all, a[2 * k], a[2 * k + 1], 0x44),
                         _mm512_maskz_shuffle_ps(all, a[2 * k], a[2 * k + 1], 0xEE));
  }
  // Then across the four 128-bit lanes: pairs of lanes, then the rest.
  for (int k = 0; k < 2; ++k) {
    c[k] = _mm512_add_ps(_mm512_maskz_shuffle_f32x4(all, b[2 * k], b[2 * k + 1], 0x88),
                         _mm512_maskz_shuffle_f32x4(all, b[2 * k], b[2 * k + 1], 0xDD));
  }
  return _mm512_add_ps(_mm512_maskz_shuffle_f32x4(all, c[0], c[1], 0x88),
                       _mm512_maskz_shuffle_f32x4(all, c[0], c[1], 0xDD));
}
#endif

template <typename T, int NP>
MVPP_INLINE void row_sums(const T* __restrict P, int64_t rows, T* __restrict out) {
  int64_t i = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value && NP % 16 == 0) {
    for (; i + 16 <= rows; i += 16) {
      __m512 v[16];
      for (int r = 0; r < 16; ++r) {
        const float* row = P + (i + r) * NP;
        v[r] = _mm512_loadu_ps(row);
        for (int k = 16; k < NP; k += 16) v[r] = _mm512_add_ps(v[r], _mm512_loadu_ps(row + k));
      }
      _mm512_storeu_ps(out + i, transpose_sum16(v));
    }
  }
#endif
  for (; i < rows; ++i) out[i] = lane_total<T, NP>(P + i * NP);
}

// One gap then one jump of one channel (the forward's hot loop): decay h over the gap, integrate
// its readout over the gap, then add the jump. The per-lane readouts at the gap's end (y_left)
// and after the jump (y) go to rows of a buffer, summed over the state after the chunk.
//
// The integral of lane n over the gap is C h^+ (e^x - 1) / (A_n Δ_p) (x = A_n Δ_p dt): with
// kSeries = false (|x| >= kThr on every lane, Δ_p normal) it is accumulated as
// (C h e^x - C h) / Δ_p — one fused multiply-subtract from the decay already computed (no φ, no
// division, no 1/x) — and multiplied by 1/A_n once per channel at the end (Ivec). Otherwise each
// lane takes φ from its series or from e^x (IvecS, already in integral units): with kHuge (a step
// or gap past PhiConst::kHuge) as dt_phi's closed form, q = 1/Δ_p, else as φ(x) dt, q = 1/s.
template <typename T, int NP, bool kSeries, bool kHuge = false>
MVPP_INLINE void fwd_gap_jump(T* __restrict h, const T* __restrict Ad, const T* __restrict invA,
                              const T* __restrict Cp, const T* __restrict Bt, const T* __restrict Ct, T sg, T q,
                              T inv_dp, T dtu, T dtt, T* __restrict Ivec, T* __restrict IvecS, T* __restrict Pyl,
                              T* __restrict Py, int64_t N) {
#pragma omp simd
  for (int n = 0; n < NP; ++n) {
    const T x = Ad[n] * sg;
    // (the fast path's caller checked x <= 0)
    const T e = kHuge ? decay_exp<!kSeries>(x) : exp_approx<!kSeries>(x);
    const T hn = h[n];
    const T ch = Cp[n] * hn;
    // Padded lanes (A = B = C = h = 0) give x = 0 * s = 0 (s is saturated), so their terms are exact
    // zeros here unless a huge step overflows Δ u: only huge steps pay for the select.
    Pyl[n] = kHuge ? live(n, N, ch * e) : ch * e;
    if constexpr (!kSeries) {
      Ivec[n] = fmadd(fmadd(ch, e, -ch), inv_dp, Ivec[n]);
    } else {
      if constexpr (kHuge) {
        IvecS[n] = fmadd(ch, dt_phi<T, true>(x, e, invA[n], q, dtt), IvecS[n]);
      } else {
        IvecS[n] = fmadd(ch * phi<T, true>(x, e, invA[n] * q), dtt, IvecS[n]);
      }
    }
    const T hp = fmadd(e, hn, dtu * Bt[n]);
    h[n] = hp;
    Py[n] = kHuge ? live(n, N, Ct[n] * hp) : Ct[n] * hp;
  }
}

// Forward for channel (b, d).
template <typename T, int NP>
MVPP_MHP_FLATTEN void mhp_fwd_channel(const MhpArgs<T>& a, int64_t b, int64_t d, const MhpScratch<T>& s) {
  const int64_t L = a.L, N = a.N, cs = a.chunk_size, nc = a.n_chunks();
  const int64_t bd = b * a.dim + d;
  const int64_t row = bd * L;
  const T* u = a.u + row;
  const T* delta = a.delta + row;
  const T* z = a.z ? a.z + row : nullptr;
  const T* dtb = a.dt + b * L;
  T* out = a.out + row;
  T* yl = a.y_left + row;
  const int64_t len = a.length(b);
  const T bias = a.delta_bias ? a.delta_bias[d] : T(0);
  const T Dd = a.D ? a.D[d] : T(0);

  alignas(64) T h[NP];
  alignas(64) T Ad[NP];
  alignas(64) T invA[NP];
  for (int n = 0; n < NP; ++n) {
    h[n] = (a.initial_state && n < N) ? a.initial_state[bd * N + n] : T(0);
    Ad[n] = a.A[d * NP + n];
  }
  const T minA = rate_constants<T, NP>(Ad, N, invA);
  const bool nonpos = all_nonpositive<T, NP>(Ad);
  const T* Bb = a.B_base(b, d, NP);
  const T* Cb = a.C_base(b, d, NP);
  const int64_t Bs = a.GB ? NP : 0, Cs = a.GC ? NP : 0;
  T* cstates = a.chunk_states + bd * nc * N;

  const int64_t rows = std::min(cs, L);
  T* Pyl0 = s.rows;
  T* Py0 = s.rows + rows * NP;
  T* ybuf = s.ev0;
  alignas(64) T Ivec[NP];   // Σ over fast-path gaps of (C h e^x - C h) / Δ_p, per state (x 1/A_n at the end)
  alignas(64) T IvecS[NP];  // Σ over the other gaps of their integral, per state
  for (int n = 0; n < NP; ++n) Ivec[n] = IvecS[n] = T(0);
  T dprev = T(0), inv_dprev = T(0);  // Δ (and 1/Δ) of the event before the current gap
  const T* Cprev = Cb;                 // C of that event (the first gap borrows event 1's)
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t t0 = c * cs, t1 = std::min(t0 + cs, L), te = std::min(t1, len);
    if (te > t0) {
      prep_steps(a, delta, u, bias, t0, te, s);
      if (t0 == 0) {
        dprev = s.d[0];
        inv_dprev = s.inv_d[0];
      }
      for (int64_t t = t0; t < te; ++t) {
        const int64_t i = t - t0;
        const T dtt = dtb[t];
        const T sg = gap_step(dprev, dtt);
        const T* Bt = Bb + t * Bs;
        const T* Ct = Cb + t * Cs;
        T* Pyl = Pyl0 + i * NP;
        T* Py = Py0 + i * NP;
        const bool huge = sg >= PhiConst<T>::kHuge || dtt >= PhiConst<T>::kHuge;
        if (nonpos && sg * minA >= PhiConst<T>::kThr && dprev >= std::numeric_limits<T>::min()) {
          if (huge) {
            fwd_gap_jump<T, NP, false, true>(h, Ad, invA, Cprev, Bt, Ct, sg, T(0), inv_dprev, s.dtu[i], dtt, Ivec,
                                             IvecS, Pyl, Py, N);
          } else {
            fwd_gap_jump<T, NP, false>(h, Ad, invA, Cprev, Bt, Ct, sg, T(0), inv_dprev, s.dtu[i], dtt, Ivec, IvecS,
                                       Pyl, Py, N);
          }
        } else if (huge) {
          fwd_gap_jump<T, NP, true, true>(h, Ad, invA, Cprev, Bt, Ct, sg, inv_step(dprev, inv_dprev, dtt, sg), T(0),
                                          s.dtu[i], dtt, Ivec, IvecS, Pyl, Py, N);
        } else {
          fwd_gap_jump<T, NP, true>(h, Ad, invA, Cprev, Bt, Ct, sg, safe_inv(sg), T(0), s.dtu[i], dtt, Ivec, IvecS,
                                    Pyl, Py, N);
        }
        dprev = s.d[i];
        inv_dprev = s.inv_d[i];
        Cprev = Ct;
      }
      row_sums<T, NP>(Pyl0, te - t0, yl + t0);
      row_sums<T, NP>(Py0, te - t0, ybuf);
      if (z) {
#pragma omp simd
        for (int64_t t = t0; t < te; ++t) {
          const T zt = z[t];
          out[t] = fmadd(Dd, u[t], ybuf[t - t0]) * (zt * sigmoid(zt));
        }
      } else {
#pragma omp simd
        for (int64_t t = t0; t < te; ++t) out[t] = fmadd(Dd, u[t], ybuf[t - t0]);
      }
    }
    for (int64_t t = std::max(te, t0); t < t1; ++t) {
      out[t] = T(0);
      yl[t] = T(0);
    }
    for (int64_t n = 0; n < N; ++n) cstates[c * N + n] = h[n];
  }
  if (a.dt_end && len > 0) {
    const T dte = a.dt_end[b];
    const T sg = gap_step(dprev, dte);
    const T q = inv_step(dprev, inv_dprev, dte, sg);
#pragma omp simd
    for (int n = 0; n < NP; ++n) {
      const T x = Ad[n] * sg;
      IvecS[n] = fmadd(Cprev[n] * h[n], dt_phi<T, true>(x, decay_exp(x), invA[n], q, dte), IvecS[n]);
    }
  }
  alignas(64) T Itot[NP];
  for (int n = 0; n < NP; ++n) Itot[n] = live(n, N, fmadd(invA[n], Ivec[n], IvecS[n]));
  a.integral[bd] = lane_total<T, NP>(Itot);
  T* last = a.last_state + bd * N;
  for (int64_t n = 0; n < N; ++n) last[n] = h[n];
}

// Backward for channel (b, d) by recomputation from the chunk-end states, chunk by chunk in reverse.
// The adjoint g of h^+ runs backwards; each gap's contribution to its decay rate Δ_p is "pending"
// until event p is reached (it may lie in the previous chunk). dB_var/dC_var: (L, NP) accumulators
// owned by the calling task (nullptr for constant B/C).
//
// Per chunk: the per-event scalars (Δ, softplus', the gated dy, silu') in vector loops; the states
// recomputed forward into an L1-sized buffer (h before every event plus the one after the chunk, so
// h^+ of an event is read back, not recomputed); the adjoint in reverse with the per-lane terms of
// its four sums over the state written to rows; the sums by row_sums; then every per-event gradient
// in one vector loop (the pending dΔ of event t is just the next gap's dt * S, no carried chain).
template <typename T, int NP>
MVPP_MHP_FLATTEN void mhp_bwd_channel(const MhpArgs<T>& a, int64_t b, int64_t d, const MhpScratch<T>& s,
                                      T* dB_var, T* dC_var) {
  const int64_t rows = std::min(a.chunk_size, a.L);
  const int64_t L = a.L, N = a.N, cs = a.chunk_size, nc = a.n_chunks();
  const int64_t bd = b * a.dim + d;
  const int64_t row = bd * L;
  const T* u = a.u + row;
  const T* delta = a.delta + row;
  const T* z = a.z ? a.z + row : nullptr;
  const T* dout = a.dout + row;
  const T* dyl = a.dy_left ? a.dy_left + row : nullptr;
  const T* dtb = a.dt + b * L;
  T* du = a.du + row;
  T* ddelta = a.ddelta + row;
  T* dz = a.dz ? a.dz + row : nullptr;
  T* ddt = a.ddt + row;
  const int64_t len = a.length(b);
  const T bias = a.delta_bias ? a.delta_bias[d] : T(0);
  const T Dd = a.D ? a.D[d] : T(0);
  const T dint = a.dintegral ? a.dintegral[bd] : T(0);

  alignas(64) T Ad[NP];
  alignas(64) T g[NP];  // adjoint of h^+ after the event being processed
  alignas(64) T dA_acc[NP];
  alignas(64) T dBc[NP];
  alignas(64) T dCc[NP];
  alignas(64) T h[NP];
  alignas(64) T invA[NP];
  for (int n = 0; n < NP; ++n) {
    Ad[n] = a.A[d * NP + n];
    g[n] = (a.dlast_state && n < N) ? a.dlast_state[bd * N + n] : T(0);
    dA_acc[n] = T(0);
    dBc[n] = T(0);
    dCc[n] = T(0);
  }
  const T minA = rate_constants<T, NP>(Ad, N, invA);
  const bool nonpos = all_nonpositive<T, NP>(Ad);
  const T* Bb = a.B_base(b, d, NP);
  const T* Cb = a.C_base(b, d, NP);
  const bool Bvar = a.GB != 0, Cvar = a.GC != 0;
  const int64_t Bs = Bvar ? NP : 0, Cs = Cvar ? NP : 0;
  const T* cstates = a.chunk_states + bd * nc * N;
  T dD_acc = T(0), ddb_acc = T(0), ddt_end = T(0);
  T pend = T(0);  // d(loss)/dΔ of the chunk's last event from the gap after it

  for (int64_t t = std::max<int64_t>(len, 0); t < L; ++t) {
    du[t] = T(0);
    ddelta[t] = T(0);
    ddt[t] = T(0);
    if (dz) dz[t] = T(0);
  }

  T* hs = s.rows;                     // (rows + 1) x NP: h^+ before each event, then after the chunk
  T* dc = hs + (rows + 1) * NP;       // rows x NP: each event's gap decay
  T* Pyacc = dc + rows * NP;          // 4 x rows x NP per-lane terms
  T* PsB = Pyacc + rows * NP;
  T* PS = PsB + rows * NP;
  T* PI = PS + rows * NP;
  T* Ryacc = s.sums;
  T* RsB = Ryacc + rows;
  T* RS = RsB + rows;
  T* RI = RS + rows;
  T* dyv = s.ev0;
  T* dgv = s.ev1;
  T* nextS = s.ev2;

  const int64_t c_last = len > 0 ? (len - 1) / cs : -1;
  for (int64_t c = c_last; c >= 0; --c) {
    const int64_t t0 = c * cs, te = std::min(std::min(t0 + cs, L), len);
    const int64_t m = te - t0;
    for (int n = 0; n < NP; ++n) {
      if (n >= N) {
        h[n] = T(0);
      } else if (c == 0) {
        h[n] = a.initial_state ? a.initial_state[bd * N + n] : T(0);
      } else {
        h[n] = cstates[(c - 1) * N + n];
      }
    }
    prep_steps(a, delta, u, bias, t0, te, s);
    if (z) {
#pragma omp simd
      for (int64_t i = 0; i < m; ++i) {
        const T zt = z[t0 + i], sgm = sigmoid(zt);
        dyv[i] = dout[t0 + i] * (zt * sgm);
        dgv[i] = sgm * (T(1) + zt * (T(1) - sgm));
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < m; ++i) dyv[i] = dout[t0 + i];
    }
    const T dprev0 = t0 == 0 ? s.d[0] : step_of(a, delta[t0 - 1] + bias);
    for (int64_t i = 0; i < m; ++i) {
      const T sg = gap_step(i == 0 ? dprev0 : s.d[i - 1], dtb[t0 + i]);
      const T dtu = s.dtu[i];
      const T* Bt = Bb + (t0 + i) * Bs;
      T* hp = hs + i * NP;
      T* dci = dc + i * NP;
      auto recompute = [&](auto nonpos_x) {
#pragma omp simd
        for (int n = 0; n < NP; ++n) {
          const T e = decay_exp<decltype(nonpos_x)::value>(Ad[n] * sg);
          hp[n] = h[n];
          dci[n] = e;
          h[n] = fmadd(e, h[n], dtu * Bt[n]);
        }
      };
      if (nonpos && sg >= T(0)) {
        recompute(std::true_type{});
      } else {
        recompute(std::false_type{});
      }
    }
    for (int n = 0; n < NP; ++n) hs[m * NP + n] = h[n];
    if (c == c_last && a.dt_end) {
      // The last gap (t_len, T]: h holds h_len^+, read out with C_len and decayed at Δ_len.
      const T dte = a.dt_end[b];
      const T dp = s.d[m - 1];
      const T sg = gap_step(dp, dte);
      const T inv_sg = safe_inv(sg);
      const T q = inv_step(dp, s.inv_d[m - 1], dte, sg);
      const T* Cp = Cb + (len - 1) * Cs;
      T* dCp = Cvar ? dC_var + (len - 1) * NP : dCc;
      alignas(64) T pS[NP];
      alignas(64) T pI[NP];
#pragma omp simd
      for (int n = 0; n < NP; ++n) {
        const T x = Ad[n] * sg;
        const T e = decay_exp(x);
        const T invx = invA[n] * inv_sg;
        const T ph = phi<T, true>(x, e, invx);
        const T dph = dphi<T, true>(x, e, ph, invx);
        const T dtph = dt_phi<T, true>(x, e, invA[n], q, dte);
        const T ch = Cp[n] * h[n];
        const T dAi = dA_of_int<T, true>(x, e, dph, dtph, invA[n], dte, sg);
        pS[n] = live(n, N, dint * ch * dD_of_int<T, true>(x, dph, dAi, q, Ad[n], dte));  // d(loss)/dΔ_len
        dA_acc[n] = fmadd(dint * ch, dAi, dA_acc[n]);
        pI[n] = live(n, N, dint * ch * e);  // d(loss)/d dt_end: d(dt φ(A Δ dt))/d dt = e^x
        dCp[n] = fmadd(dint * dtph, h[n], dCp[n]);
        g[n] = live(n, N, fmadd(dint * dtph, Cp[n], g[n]));  // the carried adjoint: padded lanes stay 0
      }
      pend = lane_total<T, NP>(pS);
      ddt_end = lane_total<T, NP>(pI);
    }
    // Adjoint recurrence over the chunk, newest event first.
    for (int64_t i = m - 1; i >= 0; --i) {
      const int64_t t = t0 + i;
      const T dp = i == 0 ? dprev0 : s.d[i - 1];
      const T dtt = dtb[t];
      const T sg = gap_step(dp, dtt);
      const T dtu = s.dtu[i];
      const int64_t p = t > 0 ? t - 1 : 0;
      const T* __restrict Bt = Bb + t * Bs;
      const T* __restrict Ct = Cb + t * Cs;
      const T* __restrict Cp = Cb + p * Cs;
      const T* __restrict hp = hs + i * NP;
      const T* __restrict hq = hs + (i + 1) * NP;  // h_t^+
      const T* __restrict dci = dc + i * NP;
      T* dBt = Bvar ? dB_var + t * NP : dBc;
      T* dCt = Cvar ? dC_var + t * NP : dCc;
      T* dCp = Cvar ? dC_var + p * NP : dCc;
      const T dy = dyv[i];
      const T dylt = dyl ? dyl[t] : T(0);
      const T inv_sg = safe_inv(sg);
      const T q = inv_step(dp, i == 0 ? safe_inv(dprev0) : s.inv_d[i - 1], dtt, sg);
      T* __restrict ryacc = Pyacc + i * NP;
      T* __restrict rsB = PsB + i * NP;
      T* __restrict rS = PS + i * NP;
      T* __restrict rI = PI + i * NP;
      // kHuge: a gap whose step s, length dt or integral weight dint dt is past PhiConst::kHuge takes
      // the closed forms below (no s, no dt^2, no φ' ~ 1/x^2 that under- or overflow) and selects
      // the padded lanes out of its row terms (live). Every other gap takes the cheaper direct
      // products; there every factor a padded lane (A = B = C = h = 0, so x = 0, e = φ = 1) meets is
      // bounded by kHuge, so its terms are exact zeros without a select.
      const T w = dint * dtt;
      auto step = [&](auto series, auto huge) {
        constexpr bool kS = decltype(series)::value;
        constexpr bool kHuge = decltype(huge)::value;
#pragma omp simd
        for (int n = 0; n < NP; ++n) {
          const T e = dci[n], hpn = hp[n];
          const T hm = e * hpn;
          const T hplus = hq[n];
          ryacc[n] = kHuge ? live(n, N, Ct[n] * hplus) : Ct[n] * hplus;
          dCt[n] = fmadd(dy, hplus, dCt[n]);
          const T gp = fmadd(dy, Ct[n], g[n]);  // adjoint of h_t^+
          rsB[n] = kHuge ? live(n, N, gp * Bt[n]) : gp * Bt[n];
          dBt[n] = fmadd(gp, dtu, dBt[n]);
          const T gm = fmadd(dylt, Cp[n], gp);  // adjoint of h_t^-
          const T x = Ad[n] * sg;
          const T invx = invA[n] * inv_sg;
          const T ph = phi<T, kS>(x, e, invx);
          const T dph = dphi<T, kS>(x, e, ph, invx);
          const T cph = Cp[n] * hpn;
          // d(loss)/dx_n = gh e + dint dt C h φ'(x) reaches A (x s), Δ_p (x A dt) and dt (x A Δ_p,
          // plus the integral's own dint C h φ); rS holds the gap's d(loss)/dΔ_p, rI its d(loss)/d dt.
          if constexpr (!kHuge) {
            dCp[n] = fmadd(dylt, hm, fmadd(w * ph, hpn, dCp[n]));
            const T wx = fmadd(gm * hpn, e, w * cph * dph);
            dA_acc[n] = fmadd(wx, sg, dA_acc[n]);
            const T wA = wx * Ad[n];
            rS[n] = wA * dtt;
            rI[n] = fmadd(wA, dp, dint * cph * ph);
            g[n] = fmadd(gm, e, w * ph * Cp[n]);
          } else {
            // Closed forms: dA = (gh e) s + dint C h dA_of_int; dΔ_p = (gh e) dt A + dint C h
            // dD_of_int; d dt = (gh e) A Δ_p + dint C h e (x φ' + φ = e^x).
            const T dtph = dt_phi<T, kS>(x, e, invA[n], q, dtt);
            dCp[n] = fmadd(dylt, hm, fmadd(dint * dtph, hpn, dCp[n]));
            const T ghe = gm * hpn * e;
            const T dAi = dA_of_int<T, kS>(x, e, dph, dtph, invA[n], dtt, sg);
            dA_acc[n] = fmadd(ghe, sg, fmadd(dint * cph, dAi, dA_acc[n]));
            rS[n] = live(n, N, fmadd(ghe * dtt, Ad[n], dint * cph * dD_of_int<T, kS>(x, dph, dAi, q, Ad[n], dtt)));
            rI[n] = live(n, N, fmadd(ghe * Ad[n], dp, dint * cph * e));
            g[n] = live(n, N, fmadd(gm, e, dint * dtph * Cp[n]));  // carried: padded lanes stay 0
          }
        }
      };
      const bool fast = sg * minA >= PhiConst<T>::kThr;
      if (sg >= PhiConst<T>::kHuge || dtt >= PhiConst<T>::kHuge || !(std::fabs(w) < PhiConst<T>::kHuge)) {
        if (fast) {
          step(std::false_type{}, std::true_type{});
        } else {
          step(std::true_type{}, std::true_type{});
        }
      } else if (fast) {
        step(std::false_type{}, std::false_type{});
      } else {
        step(std::true_type{}, std::false_type{});
      }
    }
    if (z) row_sums<T, NP>(Pyacc, m, Ryacc);
    row_sums<T, NP>(PsB, m, RsB);
    row_sums<T, NP>(PS, m, RS);
    row_sums<T, NP>(PI, m, RI);
    // Event t's Δ_t decays the gap after it (read out at t + 1): its pending dΔ is RS_{t+1} (the
    // gap's d(loss)/dΔ_p), from this chunk or (for the chunk's last event) carried in `pend`.
    for (int64_t i = 0; i + 1 < m; ++i) nextS[i] = RS[i + 1];
    nextS[m - 1] = pend;
    const T* ut = u + t0;
    T dD_c = T(0), ddb_c = T(0);
#pragma omp simd reduction(+ : dD_c, ddb_c)
    for (int64_t i = 0; i < m; ++i) {
      const T dy = dyv[i];
      const T sB = RsB[i];
      ddt[t0 + i] = RI[i];
      if (dz) dz[t0 + i] = dout[t0 + i] * fmadd(Dd, ut[i], Ryacc[i]) * dgv[i];
      dD_c = fmadd(dy, ut[i], dD_c);
      du[t0 + i] = fmadd(dy, Dd, s.d[i] * sB);
      const T dd = fmadd(ut[i], sB, nextS[i]) * s.dsp[i];
      ddelta[t0 + i] = dd;
      ddb_c += dd;
    }
    if (t0 == 0) {
      // The first gap decays at Δ_1 (event 0 here): its dΔ goes to event 0 itself.
      const T extra = RS[0] * s.dsp[0];
      ddelta[0] += extra;
      ddb_c += extra;
      pend = T(0);
    } else {
      pend = RS[0];
    }
    dD_acc += dD_c;
    ddb_acc += ddb_c;
  }

  for (int64_t n = 0; n < N; ++n) {
    a.dinitial_state[bd * N + n] = g[n];
    a.dA[bd * N + n] = dA_acc[n];
    if (!Bvar) a.dB_const[bd * N + n] = dBc[n];
    if (!Cvar) a.dC_const[bd * N + n] = dCc[n];
  }
  a.dD[bd] = dD_acc;
  a.ddelta_bias[bd] = ddb_acc;
  a.ddt_end[bd] = ddt_end;
}

}  // namespace mhp_cpu
}  // namespace mvpp
