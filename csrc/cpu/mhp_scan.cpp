// CPU mhp_scan: torch bindings for the torch-free core in mvpp/mhp_scan_cpu.h. at::parallel_for over
// (batch, channel) in the forward; over (batch, channel block) in the backward so the channels that
// share a variable B/C group accumulate its gradient in one task's buffer, in a fixed order (no
// atomics: deterministic for a given thread count).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "mvpp/mhp_scan_cpu.h"

namespace {

using at::Tensor;
using mvpp::mhp_cpu::MhpArgs;
using mvpp::mhp_cpu::MhpScratch;

at::ScalarType compute_type(const Tensor& u) { return u.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// A float32 call with a gap dt / dt_end at or past this, or whose step/input bound reaches it
// (scan_cpu::float32_may_overflow: Δ u B, the state or C h could overflow), runs in float64 (issue
// 16). A gap that long with a step Δ |A| too small to decay the state away (Δ = 0, subnormal, or
// 1e-30 |A|) has exact gradients that are finite and float32-representable, but the adjoint carries
// dint * dt * C and d/dΔ of the integral A dt^2 φ'(x), past float32's range for dt near its max.
// float32 intermediates then give inf - inf = NaN or a spurious inf; float64 holds them (its own
// kHuge is 1e150) and the results are rounded to float32 like the reference's (chunk_states too: the
// backward recomputes from float32-rounded chunk starts). The value, 1e15 (PhiConst<float>::kHuge), is far
// above any time scale a model uses, so the common case pays only the max passes (~6 us per 131k
// floats over dt, delta, u, B, C, in the forward and again in the backward).
constexpr double kWidening = mvpp::scan_cpu::kWidenFloat64;

float max_abs(const Tensor& x) { return x.defined() ? mvpp::scan_cpu::max_abs(x.data_ptr<float>(), x.numel()) : 0.0f; }

// The kernel's compute type for inputs already converted to `ct` (contiguous, A/B/C padded): float64
// for a float32 call with a gap past kWidening or a step/input bound past it (see
// scan_cpu::float32_may_overflow).
at::ScalarType kernel_type(at::ScalarType ct, const Tensor& u, const Tensor& delta, const Tensor& bias,
                           const Tensor& B, const Tensor& C, const Tensor& dt, const Tensor& dt_end) {
  if (ct != at::kFloat) return ct;
  const bool wide = max_abs(dt) >= kWidening || max_abs(dt_end) >= kWidening ||
                    mvpp::scan_cpu::float32_may_overflow(max_abs(delta), max_abs(bias), max_abs(u), max_abs(B),
                                                         max_abs(C));
  return wide ? at::kDouble : ct;
}

Tensor widen(const Tensor& x, at::ScalarType kt) { return x.defined() ? x.to(kt) : x; }

Tensor cvt(const Tensor& x, at::ScalarType ct) { return x.to(ct).contiguous(); }

Tensor cvt_opt(const c10::optional<Tensor>& x, at::ScalarType ct) {
  return (x.has_value() && x->defined()) ? cvt(*x, ct) : Tensor();
}

template <typename T>
T* ptr_or_null(const Tensor& x) {
  return x.defined() ? x.data_ptr<T>() : nullptr;
}

// (dim, N) -> (dim, NP) and (batch, G, N, L) -> (batch, G, L, NP), zero-padded: one step's states
// contiguous, and padded states inert (A = B = C = 0; their terms are also selected out of every sum
// over the state, see `live` in mhp_scan_cpu.h).
Tensor pad_states(const Tensor& X, int64_t NP, at::ScalarType ct) {
  if (X.dim() == 2) {
    Tensor out = at::zeros({X.size(0), NP}, X.options().dtype(ct));
    out.narrow(1, 0, X.size(1)).copy_(X);
    return out;
  }
  Tensor out = at::zeros({X.size(0), X.size(1), X.size(3), NP}, X.options().dtype(ct));
  out.narrow(3, 0, X.size(2)).copy_(X.transpose(2, 3));
  return out;
}

void check_inputs(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                  const Tensor& dt, int64_t chunk_size) {
  TORCH_CHECK(u.dim() == 3, "mhp_scan_fwd: u must be (batch, dim, L)");
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2);
  TORCH_CHECK(delta.sizes() == u.sizes(), "mhp_scan: delta must match u");
  TORCH_CHECK(A.dim() == 2 && A.size(0) == dim, "mhp_scan: A must be (dim, N)");
  const int64_t N = A.size(1);
  TORCH_CHECK(N >= 1 && N <= mvpp::kMaxDState, "mhp_scan: N must be in [1, ", mvpp::kMaxDState, "]");
  for (const Tensor* X : {&B, &C}) {
    TORCH_CHECK((X->dim() == 2 && X->size(0) == dim && X->size(1) == N) ||
                    (X->dim() == 4 && X->size(0) == batch && X->size(1) >= 1 && dim % X->size(1) == 0 &&
                     X->size(2) == N && X->size(3) == L),
                "mhp_scan: B and C must be (dim, N) or (batch, G, N, L)");
  }
  TORCH_CHECK(dt.dim() == 2 && dt.size(0) == batch && dt.size(1) == L, "mhp_scan: dt must be (batch, L)");
  TORCH_CHECK(chunk_size >= 1, "mhp_scan: chunk_size must be >= 1");
}

template <typename T>
void fill_common(MhpArgs<T>& a, const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                 const Tensor& C, const Tensor& dt, const Tensor& D, const Tensor& z, const Tensor& bias,
                 const Tensor& dt_end, const Tensor& lengths, const Tensor& init, bool softplus, int64_t chunk_size,
                 int64_t N) {
  a.batch = u.size(0);
  a.dim = u.size(1);
  a.L = u.size(2);
  a.N = N;
  a.chunk_size = chunk_size;
  a.softplus = softplus;
  a.u = u.data_ptr<T>();
  a.delta = delta.data_ptr<T>();
  a.z = ptr_or_null<T>(z);
  a.A = A.data_ptr<T>();
  a.B = B.data_ptr<T>();
  a.C = C.data_ptr<T>();
  a.GB = B.dim() == 4 ? B.size(1) : 0;
  a.GC = C.dim() == 4 ? C.size(1) : 0;
  a.D = ptr_or_null<T>(D);
  a.delta_bias = ptr_or_null<T>(bias);
  a.initial_state = ptr_or_null<T>(init);
  a.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  a.dt = dt.data_ptr<T>();
  a.dt_end = ptr_or_null<T>(dt_end);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> mhp_scan_fwd_cpu(
    const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C, const Tensor& dt,
    const c10::optional<Tensor>& D, const c10::optional<Tensor>& z, const c10::optional<Tensor>& delta_bias,
    const c10::optional<Tensor>& dt_end, const c10::optional<Tensor>& lengths,
    const c10::optional<Tensor>& initial_state, bool delta_softplus, int64_t chunk_size) {
  check_inputs(u, delta, A, B, C, dt, chunk_size);
  const at::ScalarType out_ct = compute_type(u);  // the results' type
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2), N = A.size(1);
  const int NP = mvpp::mhp_cpu::padded_state_size(N);
  const int64_t nc = (L + chunk_size - 1) / chunk_size;
  Tensor u_ = cvt(u, out_ct), delta_ = cvt(delta, out_ct), dt_ = cvt(dt, out_ct);
  Tensor A_ = pad_states(A, NP, out_ct), B_ = pad_states(B, NP, out_ct), C_ = pad_states(C, NP, out_ct);
  Tensor D_ = cvt_opt(D, out_ct), z_ = cvt_opt(z, out_ct), bias_ = cvt_opt(delta_bias, out_ct);
  Tensor dt_end_ = cvt_opt(dt_end, out_ct), init_ = cvt_opt(initial_state, out_ct);
  const at::ScalarType ct = kernel_type(out_ct, u_, delta_, bias_, B_, C_, dt_, dt_end_);  // the kernel's
  if (ct != out_ct) {
    for (Tensor* X : {&u_, &delta_, &dt_, &A_, &B_, &C_, &D_, &z_, &bias_, &dt_end_, &init_}) *X = widen(*X, ct);
  }
  Tensor len_ = (lengths.has_value() && lengths->defined()) ? lengths->to(at::kLong).contiguous() : Tensor();

  auto opts = u.options().dtype(ct);
  Tensor y = at::empty({batch, dim, L}, opts);
  Tensor y_left = at::empty({batch, dim, L}, opts);
  Tensor integral = at::empty({batch, dim}, opts);
  Tensor last_state = at::empty({batch, dim, N}, opts);
  Tensor chunk_states = at::empty({batch, dim, nc * N}, opts);  // [b][d][chunk][n], flat (see _library.py)

  AT_DISPATCH_FLOATING_TYPES(ct, "mhp_scan_fwd_cpu", [&] {
    using T = scalar_t;
    MhpArgs<T> a;
    fill_common<T>(a, u_, delta_, A_, B_, C_, dt_, D_, z_, bias_, dt_end_, len_, init_, delta_softplus, chunk_size,
                   N);
    a.out = y.data_ptr<T>();
    a.y_left = y_left.data_ptr<T>();
    a.integral = integral.data_ptr<T>();
    a.last_state = last_state.data_ptr<T>();
    a.chunk_states = chunk_states.data_ptr<T>();
    const int64_t cs = std::min<int64_t>(chunk_size, std::max<int64_t>(L, 1));
    const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, L * NP));
    at::parallel_for(0, batch * dim, grain, [&](int64_t begin, int64_t end) {
      std::vector<T> buf(5 * cs + 2 * cs * NP);
      T* p = buf.data();
      MhpScratch<T> s{p, p + cs, p + 2 * cs, p + 3 * cs, p + 4 * cs, nullptr, nullptr, p + 5 * cs, nullptr};
      mvpp::mhp_cpu::dispatch_padded(NP, [&](auto np) {
        for (int64_t idx = begin; idx < end; ++idx)
          mvpp::mhp_cpu::mhp_fwd_channel<T, decltype(np)::value>(a, idx / dim, idx % dim, s);
      });
    });
  });
  if (y.scalar_type() != u.scalar_type()) y = y.to(u.scalar_type());
  if (ct != out_ct) {
    y_left = y_left.to(out_ct);
    integral = integral.to(out_ct);
    last_state = last_state.to(out_ct);
    chunk_states = chunk_states.to(out_ct);  // the backward widens them again
  }
  return {y, y_left, integral, last_state, chunk_states};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mhp_scan_bwd_cpu(
    const Tensor& dy, const c10::optional<Tensor>& dy_left, const c10::optional<Tensor>& dintegral,
    const c10::optional<Tensor>& dlast_state, const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
    const Tensor& C, const Tensor& dt, const c10::optional<Tensor>& D, const c10::optional<Tensor>& z,
    const c10::optional<Tensor>& delta_bias, const c10::optional<Tensor>& dt_end,
    const c10::optional<Tensor>& lengths, const c10::optional<Tensor>& initial_state, const Tensor& chunk_states,
    bool delta_softplus, int64_t chunk_size, bool deterministic) {
  (void)deterministic;  // this backward is always deterministic
  check_inputs(u, delta, A, B, C, dt, chunk_size);
  const at::ScalarType out_ct = compute_type(u);
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2), N = A.size(1);
  const int NP = mvpp::mhp_cpu::padded_state_size(N);
  const int64_t nc = (L + chunk_size - 1) / chunk_size;
  TORCH_CHECK(dy.sizes() == u.sizes(), "mhp_scan_bwd: dy must be (batch, dim, L)");
  TORCH_CHECK(chunk_states.dim() == 3 && chunk_states.size(0) == batch && chunk_states.size(1) == dim &&
                  chunk_states.size(2) == nc * N,
              "mhp_scan_bwd: chunk_states must be (batch, dim, ceil(L / chunk_size) * N) from mhp_scan_fwd");
  Tensor u_ = cvt(u, out_ct), delta_ = cvt(delta, out_ct), dt_ = cvt(dt, out_ct);
  Tensor A_ = pad_states(A, NP, out_ct), B_ = pad_states(B, NP, out_ct), C_ = pad_states(C, NP, out_ct);
  Tensor D_ = cvt_opt(D, out_ct), z_ = cvt_opt(z, out_ct), bias_ = cvt_opt(delta_bias, out_ct);
  Tensor dt_end_ = cvt_opt(dt_end, out_ct), init_ = cvt_opt(initial_state, out_ct);
  const at::ScalarType ct = kernel_type(out_ct, u_, delta_, bias_, B_, C_, dt_, dt_end_);  // as the forward's
  if (ct != out_ct) {
    for (Tensor* X : {&u_, &delta_, &dt_, &A_, &B_, &C_, &D_, &z_, &bias_, &dt_end_, &init_}) *X = widen(*X, ct);
  }
  Tensor dy_ = cvt(dy, ct);
  Tensor dyl_ = cvt_opt(dy_left, ct), dint_ = cvt_opt(dintegral, ct), dlast_ = cvt_opt(dlast_state, ct);
  Tensor cst_ = cvt(chunk_states, ct);
  Tensor len_ = (lengths.has_value() && lengths->defined()) ? lengths->to(at::kLong).contiguous() : Tensor();

  auto opts = u.options().dtype(ct);
  Tensor du = at::empty({batch, dim, L}, opts);
  Tensor ddelta = at::empty({batch, dim, L}, opts);
  Tensor dz = z_.defined() ? at::empty({batch, dim, L}, opts) : Tensor();
  Tensor dA = at::empty({batch, dim, N}, opts);
  Tensor dD = at::empty({batch, dim}, opts);
  Tensor ddb = at::empty({batch, dim}, opts);
  Tensor ddt = at::empty({batch, dim, L}, opts);
  Tensor ddt_end = at::empty({batch, dim}, opts);
  Tensor dinit = at::empty({batch, dim, N}, opts);
  const bool Bvar = B.dim() == 4, Cvar = C.dim() == 4;
  const int64_t GB = Bvar ? B.size(1) : 0, GC = Cvar ? C.size(1) : 0;
  Tensor dB_const = Bvar ? Tensor() : at::empty({batch, dim, N}, opts);
  Tensor dC_const = Cvar ? Tensor() : at::empty({batch, dim, N}, opts);

  // Channel blocks: each lies inside one B group and one C group, and there are enough
  // (batch x block) tasks to keep every thread busy; the per-task dB/dC buffers are then at most
  // about max(batch * G, tasks) x L x NP, never (batch, dim, N, L).
  const int64_t gsize = std::gcd(Bvar ? dim / GB : dim, Cvar ? dim / GC : dim);
  int64_t bs = 1;
  if (Bvar || Cvar) {
    const int64_t target = 4 * static_cast<int64_t>(at::get_num_threads());
    for (int64_t cand = gsize; cand >= 1; --cand) {
      if (gsize % cand != 0) continue;
      bs = cand;
      if (batch * (dim / cand) >= target) break;
    }
  }
  const int64_t nblk = dim / bs;
  Tensor dB_part = Bvar ? at::zeros({batch, nblk, L, NP}, opts) : Tensor();
  Tensor dC_part = Cvar ? at::zeros({batch, nblk, L, NP}, opts) : Tensor();

  AT_DISPATCH_FLOATING_TYPES(ct, "mhp_scan_bwd_cpu", [&] {
    using T = scalar_t;
    MhpArgs<T> a;
    fill_common<T>(a, u_, delta_, A_, B_, C_, dt_, D_, z_, bias_, dt_end_, len_, init_, delta_softplus, chunk_size,
                   N);
    a.chunk_states = cst_.data_ptr<T>();
    a.dout = dy_.data_ptr<T>();
    a.dy_left = ptr_or_null<T>(dyl_);
    a.dintegral = ptr_or_null<T>(dint_);
    a.dlast_state = ptr_or_null<T>(dlast_);
    a.du = du.data_ptr<T>();
    a.ddelta = ddelta.data_ptr<T>();
    a.dz = ptr_or_null<T>(dz);
    a.dA = dA.data_ptr<T>();
    a.dD = dD.data_ptr<T>();
    a.ddelta_bias = ddb.data_ptr<T>();
    a.dinitial_state = dinit.data_ptr<T>();
    a.dB_const = ptr_or_null<T>(dB_const);
    a.dC_const = ptr_or_null<T>(dC_const);
    a.ddt = ddt.data_ptr<T>();
    a.ddt_end = ddt_end.data_ptr<T>();
    T* dBp = ptr_or_null<T>(dB_part);
    T* dCp = ptr_or_null<T>(dC_part);
    const int64_t cs = std::min<int64_t>(chunk_size, std::max<int64_t>(L, 1));
    at::parallel_for(0, batch * nblk, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> buf(7 * cs + (6 * cs + 1) * NP + 4 * cs);
      T* p = buf.data();
      MhpScratch<T> s{p, p + cs, p + 2 * cs, p + 3 * cs, p + 4 * cs, p + 5 * cs, p + 6 * cs, p + 7 * cs,
                      p + 7 * cs + (6 * cs + 1) * NP};
      mvpp::mhp_cpu::dispatch_padded(NP, [&](auto np) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task / nblk, k = task % nblk;
          T* dBt = dBp ? dBp + task * L * NP : nullptr;
          T* dCt = dCp ? dCp + task * L * NP : nullptr;
          for (int64_t d = k * bs; d < (k + 1) * bs; ++d)
            mvpp::mhp_cpu::mhp_bwd_channel<T, decltype(np)::value>(a, b, d, s, dBt, dCt);
        }
      });
    });
  });

  // (batch, nblk, L, NP) task buffers -> (batch, G, N, L), B's layout.
  auto fold = [&](const Tensor& part, int64_t G) {
    return part.view({batch, G, nblk / G, L, NP}).sum(2).narrow(3, 0, N).transpose(2, 3).contiguous();
  };
  Tensor dB = Bvar ? fold(dB_part, GB) : dB_const;
  Tensor dC = Cvar ? fold(dC_part, GC) : dC_const;
  if (ct != out_ct) {
    for (Tensor* X : {&dA, &dB, &dC, &dD, &ddb, &ddt, &ddt_end, &dinit}) *X = X->to(out_ct);
  }
  if (du.scalar_type() != u.scalar_type()) du = du.to(u.scalar_type());
  if (ddelta.scalar_type() != delta.scalar_type()) ddelta = ddelta.to(delta.scalar_type());
  if (dz.defined()) {
    if (dz.scalar_type() != z->scalar_type()) dz = dz.to(z->scalar_type());
  } else {
    dz = at::empty({0}, u.options());
  }
  return {du, ddelta, dA, dB, dC, dD, dz, ddb, ddt, ddt_end, dinit};
}

// The wrapper's checks of dt / dt_end / marks in one sequential pass that allocates nothing: on
// (batch, L) inputs of a few hundred thousand events a masked copy and three torch reductions cost
// more than the scan itself. Integers are reported as doubles (exact below 2^53).
template <typename V>
void masked_stats(const V* p, const int64_t* lens, int64_t rows, int64_t cols, double& lo, double& hi,
                  int64_t& nonfinite) {
  constexpr bool kFloat = std::is_floating_point<V>::value;
  // Branch-free so the loop vectorises: a NaN/inf value is counted and replaced by the running
  // extreme's neutral element (v - v is 0 exactly for finite v).
  V mn = std::numeric_limits<V>::max(), mx = std::numeric_limits<V>::lowest();
  int64_t bad = 0, valid = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = lens ? std::min(std::max<int64_t>(lens[r], 0), cols) : cols;
    const V* row = p + r * cols;
    valid += n;
#pragma omp simd reduction(min : mn) reduction(max : mx) reduction(+ : bad)
    for (int64_t i = 0; i < n; ++i) {
      const V v = row[i];
      bool fin = true;
      if constexpr (kFloat) fin = (v - v) == V(0);
      bad += fin ? 0 : 1;
      mn = std::min(mn, fin ? v : std::numeric_limits<V>::max());
      mx = std::max(mx, fin ? v : std::numeric_limits<V>::lowest());
    }
  }
  nonfinite = bad;
  // No finite value reads as (+inf, -inf), not as the type's extremes (which could be real values).
  lo = valid > bad ? static_cast<double>(mn) : std::numeric_limits<double>::infinity();
  hi = valid > bad ? static_cast<double>(mx) : -std::numeric_limits<double>::infinity();
}

std::tuple<double, double, int64_t> mhp_scan_masked_stats_cpu(const Tensor& x, const c10::optional<Tensor>& lengths) {
  const bool masked = lengths.has_value() && lengths->defined();
  TORCH_CHECK(!masked || x.dim() == 2, "mhp_scan_masked_stats: x must be (batch, L) with lengths");
  Tensor xc = x.contiguous();
  Tensor len_ = masked ? lengths->to(at::kLong).contiguous() : Tensor();
  TORCH_CHECK(!masked || len_.numel() == x.size(0), "mhp_scan_masked_stats: lengths must be (batch,)");
  const int64_t rows = masked ? x.size(0) : 1;
  const int64_t cols = masked ? x.size(1) : x.numel();
  double lo = 0, hi = 0;
  int64_t nonfinite = 0;
  AT_DISPATCH_ALL_TYPES(xc.scalar_type(), "mhp_scan_masked_stats", [&] {
    masked_stats<scalar_t>(xc.data_ptr<scalar_t>(), masked ? len_.data_ptr<int64_t>() : nullptr, rows, cols, lo,
                           hi, nonfinite);
  });
  return {lo, hi, nonfinite};
}

}  // namespace

TORCH_LIBRARY_IMPL(mvpp, CPU, m) {
  m.impl("mhp_scan_fwd", &mhp_scan_fwd_cpu);
  m.impl("mhp_scan_bwd", &mhp_scan_bwd_cpu);
  m.impl("mhp_scan_masked_stats", &mhp_scan_masked_stats_cpu);
}
