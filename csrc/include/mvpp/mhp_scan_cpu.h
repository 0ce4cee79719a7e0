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
using scan_cpu::ChunkScratch;
using scan_cpu::chunk_deltas;
using scan_cpu::exp_approx;
using scan_cpu::fmadd;
using scan_cpu::ScanArgs;
using scan_cpu::sigmoid;
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
};
template <>
struct PhiConst<double> {
  static constexpr double kThr = 1e-2;
  static constexpr int kTerms = 9;
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

// 1/s for s = Δ dt >= 0 (0 for s = 0: every x is then 0 and takes the series).
template <typename T>
MVPP_INLINE T safe_inv(T s) {
  return s != T(0) ? T(1) / s : T(0);
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

template <typename T>
MVPP_INLINE T step_of(const MhpArgs<T>& a, T delta_plus_bias) {
  if (!a.softplus) return delta_plus_bias;
  T sp, dsp;
  softplus_and_grad(delta_plus_bias, sp, dsp);
  return sp;
}

// One gap then one jump of one channel (the forward's hot loop): decay h over the gap, integrate
// its readout over the gap into the per-lane Ivec, then add the jump. The per-lane readouts at the
// gap's end (y_left) and after the jump (y) go to rows of a buffer and are summed over the state
// after the chunk: no horizontal reduction sits inside the sequential loop. Restrict pointers so
// the loop over the state vectorises without aliasing checks; kSeries as in phi().
template <typename T, int NP, bool kSeries>
MVPP_INLINE void fwd_gap_jump(T* __restrict h, const T* __restrict Ad, const T* __restrict invA, const T* Cp,
                              const T* __restrict Bt, const T* Ct, T sg, T inv_sg, T dtu, T dtt,
                              T* __restrict Ivec, T* __restrict Pyl, T* __restrict Py) {
#pragma omp simd
  for (int n = 0; n < NP; ++n) {
    const T x = Ad[n] * sg;
    const T e = exp_approx(x);
    const T ch = Cp[n] * h[n];
    Ivec[n] = fmadd(ch * phi<T, kSeries>(x, e, invA[n] * inv_sg), dtt, Ivec[n]);
    Pyl[n] = ch * e;
    h[n] = fmadd(e, h[n], dtu * Bt[n]);
    Py[n] = Ct[n] * h[n];
  }
}

// Row sums of a (rows, NP) buffer; rows are independent, so they overlap in the pipeline.
template <typename T, int NP>
MVPP_INLINE void row_sums(const T* __restrict P, int64_t rows, T* __restrict out) {
  for (int64_t i = 0; i < rows; ++i) {
    T acc = T(0);
#pragma omp simd reduction(+ : acc)
    for (int n = 0; n < NP; ++n) acc += P[i * NP + n];
    out[i] = acc;
  }
}

// Forward for channel (b, d). s: chunk scratch (dt/dtu/dsp, chunk_size each); ybuf: chunk_size;
// lanes: 2 x min(chunk_size, L) x NP.
template <typename T, int NP>
void mhp_fwd_channel(const MhpArgs<T>& a, int64_t b, int64_t d, const ChunkScratch<T>& s, T* ybuf, T* lanes) {
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
  const T* Bb = a.B_base(b, d, NP);
  const T* Cb = a.C_base(b, d, NP);
  const int64_t Bs = a.GB ? NP : 0, Cs = a.GC ? NP : 0;
  T* cstates = a.chunk_states + bd * nc * N;

  const int64_t rows = std::min(cs, L);  // rows of each lanes buffer (the caller sizes it so)
  alignas(64) T Ivec[NP];  // the integral so far, per state (summed over the state at the end)
  for (int n = 0; n < NP; ++n) Ivec[n] = T(0);
  T dprev = T(0);      // Δ of the event before the current gap
  const T* Cprev = Cb;  // C of that event (the first gap borrows event 1's)
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t t0 = c * cs, t1 = std::min(t0 + cs, L), te = std::min(t1, len);
    if (te > t0) {
      chunk_deltas(a, delta, u, bias, t0, te, s);
      if (t0 == 0) dprev = s.dt[0];
      for (int64_t t = t0; t < te; ++t) {
        const T dtt = dtb[t];
        const T sg = dprev * dtt;
        const T inv_sg = safe_inv(sg);
        const T dtu = s.dtu[t - t0];
        const T* Bt = Bb + t * Bs;
        const T* Ct = Cb + t * Cs;
        T* Pyl = lanes + (t - t0) * NP;
        T* Py = lanes + (rows + t - t0) * NP;
        if (sg * minA >= PhiConst<T>::kThr) {
          fwd_gap_jump<T, NP, false>(h, Ad, invA, Cprev, Bt, Ct, sg, inv_sg, dtu, dtt, Ivec, Pyl, Py);
        } else {
          fwd_gap_jump<T, NP, true>(h, Ad, invA, Cprev, Bt, Ct, sg, inv_sg, dtu, dtt, Ivec, Pyl, Py);
        }
        dprev = s.dt[t - t0];
        Cprev = Ct;
      }
      row_sums<T, NP>(lanes, te - t0, yl + t0);
      row_sums<T, NP>(lanes + rows * NP, te - t0, ybuf);
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
    const T sg = dprev * dte;
    const T inv_sg = safe_inv(sg);
#pragma omp simd
    for (int n = 0; n < NP; ++n) {
      const T x = Ad[n] * sg;
      Ivec[n] = fmadd(Cprev[n] * h[n] * phi<T, true>(x, exp_approx(x), invA[n] * inv_sg), dte, Ivec[n]);
    }
  }
  T integ = T(0);
  for (int n = 0; n < NP; ++n) integ += Ivec[n];
  a.integral[bd] = integ;
  T* last = a.last_state + bd * N;
  for (int64_t n = 0; n < N; ++n) last[n] = h[n];
}

// Backward for channel (b, d) by recomputation from the chunk-end states, chunk by chunk in reverse.
// The adjoint g of h^+ runs backwards; each gap's contribution to its decay rate Δ_p is "pending"
// until event p is reached (it may lie in the previous chunk). dB_var/dC_var: (L, NP) accumulators
// owned by the calling task (nullptr for constant B/C). lanes: 4 x min(chunk_size, L) x NP;
// sums: 4 x min(chunk_size, L).
template <typename T, int NP>
void mhp_bwd_channel(const MhpArgs<T>& a, int64_t b, int64_t d, const ChunkScratch<T>& s, T* lanes, T* sums,
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
  const T* Bb = a.B_base(b, d, NP);
  const T* Cb = a.C_base(b, d, NP);
  const bool Bvar = a.GB != 0, Cvar = a.GC != 0;
  const int64_t Bs = Bvar ? NP : 0, Cs = Cvar ? NP : 0;
  const T* cstates = a.chunk_states + bd * nc * N;
  T dD_acc = T(0), ddb_acc = T(0), ddt_end = T(0);
  T pend = T(0);  // d(loss)/dΔ_p from gaps already processed, p = the next event to be reached

  for (int64_t t = std::max<int64_t>(len, 0); t < L; ++t) {
    du[t] = T(0);
    ddelta[t] = T(0);
    ddt[t] = T(0);
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
    const T dprev0 = t0 == 0 ? s.dt[0] : step_of(a, delta[t0 - 1] + bias);
    for (int64_t t = t0; t < te; ++t) {
      const int64_t i = t - t0;
      const T sg = (i == 0 ? dprev0 : s.dt[i - 1]) * dtb[t];
      const T dtu = s.dtu[i];
      const T* Bt = Bb + t * Bs;
      T* hp = s.hprev + i * NP;
      T* dc = s.decay + i * NP;
#pragma omp simd
      for (int n = 0; n < NP; ++n) {
        const T e = exp_approx(Ad[n] * sg);
        hp[n] = h[n];
        dc[n] = e;
        h[n] = fmadd(e, h[n], dtu * Bt[n]);
      }
    }
    if (c == c_last && a.dt_end) {
      // The last gap (t_len, T]: h holds h_len^+, read out with C_len and decayed at Δ_len.
      const T dte = a.dt_end[b];
      const T dp = s.dt[te - 1 - t0];
      const T sg = dp * dte;
      const T inv_sg = safe_inv(sg);
      const T* Cp = Cb + (len - 1) * Cs;
      T* dCp = Cvar ? dC_var + (len - 1) * NP : dCc;
      const T w = dint * dte;
      T S = T(0), Iacc = T(0);
#pragma omp simd reduction(+ : S, Iacc)
      for (int n = 0; n < NP; ++n) {
        const T x = Ad[n] * sg;
        const T e = exp_approx(x);
        const T invx = invA[n] * inv_sg;
        const T ph = phi<T, true>(x, e, invx);
        const T ch = Cp[n] * h[n];
        const T wx = w * ch * dphi<T, true>(x, e, ph, invx);
        S += wx * Ad[n];
        dA_acc[n] = fmadd(wx, sg, dA_acc[n]);
        Iacc += ch * ph;
        dCp[n] = fmadd(w * ph, h[n], dCp[n]);
        g[n] = fmadd(w * ph, Cp[n], g[n]);
      }
      pend += dte * S;
      ddt_end = fmadd(dp, S, dint * Iacc);
    }
    // Adjoint recurrence over the chunk, newest event first. Per-lane terms of the four sums over
    // the state go to rows of `lanes`; the sums and the per-event scalars follow the loop, off
    // the sequential path.
    T* Pyacc = lanes;
    T* PsB = lanes + rows * NP;
    T* PS = lanes + 2 * rows * NP;
    T* PI = lanes + 3 * rows * NP;
    for (int64_t t = te - 1; t >= t0; --t) {
      const int64_t i = t - t0;
      const T dp = i == 0 ? dprev0 : s.dt[i - 1];
      const T dtt = dtb[t];
      const T sg = dp * dtt;
      const T dtu = s.dtu[i];
      const int64_t p = t > 0 ? t - 1 : 0;
      const T* Bt = Bb + t * Bs;
      const T* Ct = Cb + t * Cs;
      const T* Cp = Cb + p * Cs;
      const T* hp = s.hprev + i * NP;
      const T* dc = s.decay + i * NP;
      T* dBt = Bvar ? dB_var + t * NP : dBc;
      T* dCt = Cvar ? dC_var + t * NP : dCc;
      T* dCp = Cvar ? dC_var + p * NP : dCc;
      const T dy = dout[t] * (z ? z[t] * sigmoid(z[t]) : T(1));
      const T dylt = dyl ? dyl[t] : T(0);
      const T w = dint * dtt;
      const T inv_sg = safe_inv(sg);
      T* ryacc = Pyacc + i * NP;
      T* rsB = PsB + i * NP;
      T* rS = PS + i * NP;
      T* rI = PI + i * NP;
      auto step = [&](auto series) {
        constexpr bool kS = decltype(series)::value;
#pragma omp simd
        for (int n = 0; n < NP; ++n) {
          const T e = dc[n], hpn = hp[n];
          const T hm = e * hpn;
          const T hplus = fmadd(dtu, Bt[n], hm);
          ryacc[n] = Ct[n] * hplus;
          dCt[n] = fmadd(dy, hplus, dCt[n]);
          const T gp = fmadd(dy, Ct[n], g[n]);  // adjoint of h_t^+
          rsB[n] = gp * Bt[n];
          dBt[n] = fmadd(gp, dtu, dBt[n]);
          const T gm = fmadd(dylt, Cp[n], gp);  // adjoint of h_t^-
          const T x = Ad[n] * sg;
          const T invx = invA[n] * inv_sg;
          const T ph = phi<T, kS>(x, e, invx);
          const T cph = Cp[n] * hpn;
          dCp[n] = fmadd(dylt, hm, fmadd(w * ph, hpn, dCp[n]));
          const T wx = fmadd(gm * hpn, e, w * cph * dphi<T, kS>(x, e, ph, invx));  // d(loss)/dx_n
          rS[n] = wx * Ad[n];
          dA_acc[n] = fmadd(wx, sg, dA_acc[n]);
          rI[n] = cph * ph;
          g[n] = fmadd(gm, e, w * ph * Cp[n]);
        }
      };
      if (sg * minA >= PhiConst<T>::kThr) {
        step(std::false_type{});
      } else {
        step(std::true_type{});
      }
    }
    const int64_t m = te - t0;
    T* Ryacc = sums;
    T* RsB = sums + rows;
    T* RS = sums + 2 * rows;
    T* RI = sums + 3 * rows;
    row_sums<T, NP>(Pyacc, m, Ryacc);
    row_sums<T, NP>(PsB, m, RsB);
    row_sums<T, NP>(PS, m, RS);
    row_sums<T, NP>(PI, m, RI);
    for (int64_t t = te - 1; t >= t0; --t) {
      const int64_t i = t - t0;
      const T dp = i == 0 ? dprev0 : s.dt[i - 1];
      const T dtt = dtb[t];
      const T ut = u[t];
      T gate = T(1), dgate = T(0);
      if (z) {
        const T zt = z[t], sgm = sigmoid(zt);
        gate = zt * sgm;
        dgate = sgm * (T(1) + zt * (T(1) - sgm));
      }
      const T dy = dout[t] * gate;
      const T sB = RsB[i], S = RS[i];
      ddt[t] = fmadd(dp, S, dint * RI[i]);
      if (dz) dz[t] = dout[t] * fmadd(Dd, ut, Ryacc[i]) * dgate;
      dD_acc = fmadd(dy, ut, dD_acc);
      du[t] = fmadd(dy, Dd, s.dt[i] * sB);
      T dstep = fmadd(ut, sB, pend);
      if (t == 0) {
        dstep = fmadd(dtt, S, dstep);  // the first gap decays at Δ_1
        pend = T(0);
      } else {
        pend = dtt * S;
      }
      const T dd = dstep * s.dsp[i];
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
  a.ddt_end[bd] = ddt_end;
}

}  // namespace mhp_cpu
}  // namespace mvpp
