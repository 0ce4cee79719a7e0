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

#include <cstdint>

#include "mvpp/scan_cpu_common.h"

namespace mvpp {
namespace scan_cpu {

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

// Padded state sizes the kernels are instantiated for; N is rounded up to the next one. No sizes
// below 8: lane_sum reads whole 8-lane vectors.
using StateSizes = PaddedStateSizes<8, 16, 32, 64, 128, 256>;

inline int padded_state_size(int64_t N) { return StateSizes::padded(N); }

// Calls f(std::integral_constant<int, NP>{}) for the padded size of N.
template <typename F>
void dispatch_padded(int NP, F&& f) {
  StateSizes::dispatch(NP, std::forward<F>(f));
}

}  // namespace scan_cpu
}  // namespace mvpp
