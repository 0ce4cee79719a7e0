// CPU implementation of mvpp::selective_scan_fwd / selective_scan_bwd (schemas in
// mvpp_kernels/_library.py). The math is in csrc/include/mvpp/selective_scan_cpu.h; this file
// prepares the layouts that core wants, splits the work over threads, and registers the kernels.
//
// Memory: the forward keeps one state per channel in registers and saves only the chunk-boundary
// states; the backward recomputes one chunk at a time into a per-thread (chunk_size x N) buffer.
// No (batch, dim, N, L) tensor is ever allocated.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <numeric>
#include <optional>
#include <tuple>
#include <vector>

#include "mvpp/selective_scan_cpu.h"

namespace mvpp {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using scan_cpu::ChunkScratch;
using scan_cpu::ScanArgs;

bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

// Inputs converted once into the compute type and the layouts the core expects. The conversions
// double as the handling of non-contiguous inputs: the kernels read u/delta/z along L with unit
// stride, and B/C transposed to (.., L, NP) so one step's states are contiguous.
struct Prepared {
  int64_t batch, dim, L, N, NP, GB, GC;
  at::ScalarType ct;      // the kernels' compute type
  at::ScalarType out_ct;  // the state-dtype results' type (float32; float64 for float64 inputs)
  Tensor u, delta, z, A, B, C, D, delta_bias, initial_state, lengths;
};

Tensor as_compute(const Tensor& t, at::ScalarType ct) { return t.to(ct).contiguous(); }

Tensor pad_state_matrix(const Tensor& X, int64_t NP, at::ScalarType ct, const char* name, int64_t batch, int64_t dim,
                        int64_t N, int64_t L, int64_t& groups) {
  if (X.dim() == 2) {
    TORCH_CHECK(X.size(0) == dim && X.size(1) == N, "selective_scan: ", name, " must have shape (dim=", dim,
                ", N=", N, ") when constant, got ", X.sizes());
    groups = 0;
    Tensor P = at::zeros({dim, NP}, X.options().dtype(ct));
    P.narrow(1, 0, N).copy_(X);
    return P;
  }
  TORCH_CHECK(X.dim() == 4, "selective_scan: ", name,
              " must be (dim, N) or (batch, G, N, L) (the wrapper turns (batch, N, L) into G = 1), got ",
              X.sizes());
  const int64_t G = X.size(1);
  TORCH_CHECK(X.size(0) == batch && G >= 1 && dim % G == 0 && X.size(2) == N && X.size(3) == L,
              "selective_scan: ", name, " must have shape (batch=", batch, ", G, N=", N, ", L=", L,
              ") with G dividing dim=", dim, ", got ", X.sizes());
  groups = G;
  Tensor P = at::zeros({batch, G, L, NP}, X.options().dtype(ct));
  P.narrow(3, 0, N).copy_(X.transpose(2, 3));
  return P;
}

Prepared prepare(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                 const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias, const OptTensor& initial_state,
                 const OptTensor& lengths, int64_t chunk_size) {
  TORCH_CHECK(u.dim() == 3, "selective_scan: u must be (batch, dim, L), got ", u.sizes());
  TORCH_CHECK(u.is_floating_point(), "selective_scan: u must be floating point, got ", u.scalar_type());
  TORCH_CHECK(chunk_size >= 1, "selective_scan: chunk_size must be >= 1, got ", chunk_size);
  Prepared p;
  p.batch = u.size(0);
  p.dim = u.size(1);
  p.L = u.size(2);
  TORCH_CHECK(delta.sizes() == u.sizes(), "selective_scan: delta must have u's shape ", u.sizes(), ", got ",
              delta.sizes());
  TORCH_CHECK(A.dim() == 2 && A.size(0) == p.dim && A.size(1) >= 1, "selective_scan: A must be (dim=", p.dim,
              ", N >= 1), got ", A.sizes());
  p.N = A.size(1);
  p.NP = scan_cpu::padded_state_size(p.N);
  TORCH_CHECK(p.NP > 0, "selective_scan: N = ", p.N, " exceeds the CPU kernel's maximum state size ",
              kMaxDState);
  p.out_ct = u.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  p.ct = p.out_ct;
  p.u = as_compute(u, p.ct);
  p.delta = as_compute(delta, p.ct);
  Tensor Ap = at::zeros({p.dim, p.NP}, A.options().dtype(p.ct));
  Ap.narrow(1, 0, p.N).copy_(A);
  p.A = Ap;
  p.B = pad_state_matrix(B, p.NP, p.ct, "B", p.batch, p.dim, p.N, p.L, p.GB);
  p.C = pad_state_matrix(C, p.NP, p.ct, "C", p.batch, p.dim, p.N, p.L, p.GC);
  if (present(D)) {
    TORCH_CHECK(D->dim() == 1 && D->size(0) == p.dim, "selective_scan: D must be (dim=", p.dim, ",), got ",
                D->sizes());
    p.D = as_compute(*D, p.ct);
  }
  if (present(delta_bias)) {
    TORCH_CHECK(delta_bias->dim() == 1 && delta_bias->size(0) == p.dim, "selective_scan: delta_bias must be (dim=",
                p.dim, ",), got ", delta_bias->sizes());
    p.delta_bias = as_compute(*delta_bias, p.ct);
  }
  if (present(z)) {
    TORCH_CHECK(z->sizes() == u.sizes(), "selective_scan: z must have u's shape ", u.sizes(), ", got ",
                z->sizes());
    p.z = as_compute(*z, p.ct);
  }
  if (present(initial_state)) {
    TORCH_CHECK(initial_state->dim() == 3 && initial_state->size(0) == p.batch && initial_state->size(1) == p.dim &&
                    initial_state->size(2) == p.N,
                "selective_scan: initial_state must be (batch=", p.batch, ", dim=", p.dim, ", N=", p.N, "), got ",
                initial_state->sizes());
    p.initial_state = as_compute(*initial_state, p.ct);
  }
  if (present(lengths)) {
    TORCH_CHECK(!lengths->is_floating_point() && lengths->scalar_type() != at::kBool,
                "selective_scan: lengths must be an integer tensor, got ", lengths->scalar_type());
    TORCH_CHECK(lengths->dim() == 1 && lengths->size(0) == p.batch, "selective_scan: lengths must be (batch=",
                p.batch, ",), got ", lengths->sizes());
    p.lengths = lengths->to(at::kLong).contiguous();
    if (p.batch > 0) {
      // The kernels index with these; out-of-range values must never reach them.
      const int64_t lo = p.lengths.min().item<int64_t>(), hi = p.lengths.max().item<int64_t>();
      TORCH_CHECK(lo >= 0 && hi <= p.L, "selective_scan: lengths must lie in [0, L=", p.L, "], got values in [",
                  lo, ", ", hi, "]");
    }
  }
  if (p.ct == at::kFloat) {
    // Steps or inputs so large that Δ u B, the state or C h could overflow float32
    // (scan_cpu::float32_may_overflow) run the call in float64 (issue 16): the outputs and gradients
    // the loss sees can be finite there, and the float32 kernel gave NaN (inf - inf) for them.
    // Results are rounded back to float32 (out_ct).
    auto mx = [](const Tensor& t) {
      return t.defined() ? scan_cpu::max_abs(t.data_ptr<float>(), t.numel()) : 0.0f;
    };
    if (scan_cpu::float32_may_overflow(mx(p.delta), mx(p.delta_bias), mx(p.u), mx(p.B), mx(p.C))) {
      p.ct = at::kDouble;
      for (Tensor* X : {&p.u, &p.delta, &p.z, &p.A, &p.B, &p.C, &p.D, &p.delta_bias, &p.initial_state})
        if (X->defined()) *X = X->to(p.ct);
    }
  }
  return p;
}

template <typename T>
const T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <typename T>
ScanArgs<T> make_args(const Prepared& p, bool softplus, int64_t chunk_size) {
  ScanArgs<T> a;
  a.batch = p.batch;
  a.dim = p.dim;
  a.L = p.L;
  a.N = p.N;
  a.chunk_size = chunk_size;
  a.softplus = softplus;
  a.u = p.u.data_ptr<T>();
  a.delta = p.delta.data_ptr<T>();
  a.z = ptr_or_null<T>(p.z);
  a.A = p.A.data_ptr<T>();
  a.B = p.B.data_ptr<T>();
  a.C = p.C.data_ptr<T>();
  a.GB = p.GB;
  a.GC = p.GC;
  a.D = ptr_or_null<T>(p.D);
  a.delta_bias = ptr_or_null<T>(p.delta_bias);
  a.initial_state = ptr_or_null<T>(p.initial_state);
  a.lengths = p.lengths.defined() ? p.lengths.data_ptr<int64_t>() : nullptr;
  return a;
}

// The kernels run on the compute type; results go back to the caller's dtype where they differ.
Tensor to_dtype(const Tensor& t, at::ScalarType dt) { return t.scalar_type() == dt ? t : t.to(dt); }

std::tuple<Tensor, Tensor, Tensor> selective_scan_fwd_cpu(const Tensor& u, const Tensor& delta, const Tensor& A,
                                                          const Tensor& B, const Tensor& C, const OptTensor& D,
                                                          const OptTensor& z, const OptTensor& delta_bias,
                                                          const OptTensor& initial_state, const OptTensor& lengths,
                                                          bool delta_softplus, int64_t chunk_size) {
  Prepared p = prepare(u, delta, A, B, C, D, z, delta_bias, initial_state, lengths, chunk_size);
  const int64_t nc = (p.L + chunk_size - 1) / chunk_size;
  auto opts = u.options().dtype(p.ct);
  Tensor out = at::empty({p.batch, p.dim, p.L}, opts);
  Tensor last_state = at::empty({p.batch, p.dim, p.N}, opts);
  Tensor chunk_states = at::empty({p.batch, p.dim, nc * p.N}, opts);  // [b][d][chunk][n], flat (see _library.py)
  // Chunk scratch is per thread; a chunk longer than L only wastes scratch.
  const int64_t cs_eff = std::max<int64_t>(1, std::min(chunk_size, p.L));

  AT_DISPATCH_FLOATING_TYPES(p.u.scalar_type(), "selective_scan_fwd_cpu", [&] {
    ScanArgs<scalar_t> a = make_args<scalar_t>(p, delta_softplus, chunk_size);
    a.out = out.data_ptr<scalar_t>();
    a.last_state = last_state.data_ptr<scalar_t>();
    a.chunk_states = chunk_states.data_ptr<scalar_t>();
    scan_cpu::dispatch_padded(static_cast<int>(p.NP), [&](auto np) {
      constexpr int NP = decltype(np)::value;
      at::parallel_for(0, p.batch * p.dim, 1, [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> buf(4 * cs_eff);
        ChunkScratch<scalar_t> s{buf.data(), buf.data() + cs_eff, buf.data() + 2 * cs_eff, nullptr, nullptr};
        scalar_t* y = buf.data() + 3 * cs_eff;
        for (int64_t i = begin; i < end; ++i) scan_cpu::scan_fwd_channel<scalar_t, NP>(a, i / p.dim, i % p.dim, s, y);
      });
    });
  });
  return {to_dtype(out, u.scalar_type()), to_dtype(last_state, p.out_ct), to_dtype(chunk_states, p.out_ct)};
}

// The backward's unit of parallel work: `cb` consecutive channels of one batch element, never
// straddling a group of B or C, so their variable-B/C gradients go to a buffer only this task
// writes. When batch x G alone gives too few tasks to keep the threads busy, groups are split into
// several tasks, each with its own (L, NP) buffer, summed in a fixed order afterwards: no atomics,
// and the buffers total about max(16, 2 x threads) x L x NP elements (or dB's own size), never
// batch x dim x N x L. The split depends on the thread count only above 8 threads, so results are
// bit-for-bit reproducible for a given thread count, and across thread counts up to 8.
int64_t channels_per_task(int64_t batch, int64_t dim, int64_t GB, int64_t GC) {
  const int64_t cpgB = GB ? dim / GB : dim, cpgC = GC ? dim / GC : dim;
  const int64_t c0 = std::gcd(cpgB, cpgC);
  const int64_t target = std::max<int64_t>(16, 2 * static_cast<int64_t>(at::get_num_threads()));
  for (int64_t cb = c0; cb >= 1; --cb)
    if (c0 % cb == 0 && batch * (dim / cb) >= target) return cb;
  // Too few channels to fill the threads anyway: one task per group, buffers the size of dB/dC.
  return c0;
}

// dX[b, g, n, t] = sum over the tasks k of group g of buf[b, k, t, n] (n < N).
template <typename T>
void reduce_group_buffers(const T* buf, T* dX, int64_t batch, int64_t G, int64_t blocks_per_group, int64_t L,
                          int64_t N, int64_t NP) {
  at::parallel_for(0, batch * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> acc(NP);
    for (int64_t bg = begin; bg < end; ++bg) {
      const T* src = buf + bg * blocks_per_group * L * NP;  // tasks of (b, g) are consecutive
      T* dst = dX + bg * N * L;
      for (int64_t t = 0; t < L; ++t) {
        for (int64_t n = 0; n < NP; ++n) acc[n] = src[t * NP + n];
        for (int64_t k = 1; k < blocks_per_group; ++k)
          for (int64_t n = 0; n < NP; ++n) acc[n] += src[(k * L + t) * NP + n];
        for (int64_t n = 0; n < N; ++n) dst[n * L + t] = acc[n];
      }
    }
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> selective_scan_bwd_cpu(
    const Tensor& dout, const OptTensor& dlast_state, const Tensor& u, const Tensor& delta, const Tensor& A,
    const Tensor& B, const Tensor& C, const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias,
    const OptTensor& initial_state, const OptTensor& lengths, const Tensor& chunk_states, bool delta_softplus,
    int64_t chunk_size, bool deterministic) {
  (void)deterministic;  // this backward is always deterministic (fixed-order reductions, no atomics)
  Prepared p = prepare(u, delta, A, B, C, D, z, delta_bias, initial_state, lengths, chunk_size);
  const int64_t batch = p.batch, dim = p.dim, L = p.L, N = p.N, NP = p.NP;
  const int64_t nc = (L + chunk_size - 1) / chunk_size;
  TORCH_CHECK(dout.sizes() == u.sizes(), "selective_scan_bwd: dout must have u's shape ", u.sizes(), ", got ",
              dout.sizes());
  TORCH_CHECK(chunk_states.dim() == 3 && chunk_states.size(0) == batch && chunk_states.size(1) == dim &&
                  chunk_states.size(2) == nc * N,
              "selective_scan_bwd: chunk_states must be (batch=", batch, ", dim=", dim, ", ceil(L / chunk_size) * N=", nc,
              " * ", N, ") as saved by the forward with the same chunk_size, got ", chunk_states.sizes());
  Tensor dout_c = as_compute(dout, p.ct);
  Tensor cstates = as_compute(chunk_states, p.ct);
  Tensor dlast;
  if (present(dlast_state) && dlast_state->numel() > 0) {
    TORCH_CHECK(dlast_state->dim() == 3 && dlast_state->size(0) == batch && dlast_state->size(1) == dim &&
                    dlast_state->size(2) == N,
                "selective_scan_bwd: dlast_state must be (batch=", batch, ", dim=", dim, ", N=", N, "), got ",
                dlast_state->sizes());
    dlast = as_compute(*dlast_state, p.ct);
  }

  auto opts = u.options().dtype(p.ct);
  Tensor du = at::empty({batch, dim, L}, opts);
  Tensor ddelta = at::empty({batch, dim, L}, opts);
  Tensor dz = p.z.defined() ? at::empty({batch, dim, L}, opts) : Tensor();
  Tensor dA = at::empty({batch, dim, N}, opts);
  Tensor dD = at::empty({batch, dim}, opts);
  Tensor ddb = at::empty({batch, dim}, opts);
  Tensor dinit = at::empty({batch, dim, N}, opts);
  Tensor dB = p.GB ? at::empty({batch, p.GB, N, L}, opts) : at::empty({batch, dim, N}, opts);
  Tensor dC = p.GC ? at::empty({batch, p.GC, N, L}, opts) : at::empty({batch, dim, N}, opts);

  const int64_t cb = (p.GB || p.GC) ? channels_per_task(batch, dim, p.GB, p.GC) : 1;
  const int64_t blocks = dim / cb;
  Tensor dBbuf = p.GB ? at::empty({batch, blocks, L, NP}, opts) : Tensor();
  Tensor dCbuf = p.GC ? at::empty({batch, blocks, L, NP}, opts) : Tensor();
  const int64_t cs_eff = std::max<int64_t>(1, std::min(chunk_size, L));

  AT_DISPATCH_FLOATING_TYPES(p.u.scalar_type(), "selective_scan_bwd_cpu", [&] {
    using T = scalar_t;
    ScanArgs<T> a = make_args<T>(p, delta_softplus, chunk_size);
    a.chunk_states = cstates.data_ptr<T>();
    a.dout = dout_c.data_ptr<T>();
    a.dlast_state = ptr_or_null<T>(dlast);
    a.du = du.data_ptr<T>();
    a.ddelta = ddelta.data_ptr<T>();
    a.dz = dz.defined() ? dz.data_ptr<T>() : nullptr;
    a.dA = dA.data_ptr<T>();
    a.dD = dD.data_ptr<T>();
    a.ddelta_bias = ddb.data_ptr<T>();
    a.dinitial_state = dinit.data_ptr<T>();
    a.dB_const = p.GB ? nullptr : dB.data_ptr<T>();
    a.dC_const = p.GC ? nullptr : dC.data_ptr<T>();
    T* bufB = p.GB ? dBbuf.data_ptr<T>() : nullptr;
    T* bufC = p.GC ? dCbuf.data_ptr<T>() : nullptr;
    scan_cpu::dispatch_padded(static_cast<int>(NP), [&](auto np) {
      constexpr int NPc = decltype(np)::value;
      at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
        std::vector<T> buf(3 * cs_eff + 2 * cs_eff * NPc);
        ChunkScratch<T> s{buf.data(), buf.data() + cs_eff, buf.data() + 2 * cs_eff, buf.data() + 3 * cs_eff,
                          buf.data() + 3 * cs_eff + cs_eff * NPc};
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task / blocks, blk = task % blocks;
          T* tB = bufB ? bufB + task * L * NPc : nullptr;
          T* tC = bufC ? bufC + task * L * NPc : nullptr;
          if (tB) std::fill(tB, tB + L * NPc, T(0));
          if (tC) std::fill(tC, tC + L * NPc, T(0));
          for (int64_t d = blk * cb; d < (blk + 1) * cb; ++d) scan_cpu::scan_bwd_channel<T, NPc>(a, b, d, s, tB, tC);
        }
      });
    });
    // Tasks of one (batch, group) are consecutive in the buffers because cb divides the group size.
    if (p.GB) reduce_group_buffers<T>(bufB, dB.data_ptr<T>(), batch, p.GB, blocks / p.GB, L, N, NP);
    if (p.GC) reduce_group_buffers<T>(bufC, dC.data_ptr<T>(), batch, p.GC, blocks / p.GC, L, N, NP);
  });
  // The schema's convention: gradients of absent D / delta_bias are zeros.
  if (!p.D.defined()) dD.zero_();
  if (!p.delta_bias.defined()) ddb.zero_();
  Tensor dz_out = p.z.defined() ? to_dtype(dz, z->scalar_type()) : at::empty({0}, u.options());
  const at::ScalarType oc = p.out_ct;
  return {to_dtype(du, u.scalar_type()),
          to_dtype(ddelta, delta.scalar_type()),
          to_dtype(dA, oc),
          to_dtype(dB, oc),
          to_dtype(dC, oc),
          to_dtype(dD, oc),
          dz_out,
          to_dtype(ddb, oc),
          to_dtype(dinit, oc)};
}

}  // namespace

TORCH_LIBRARY_IMPL(mvpp, CPU, m) {
  m.impl("selective_scan_fwd", &selective_scan_fwd_cpu);
  m.impl("selective_scan_bwd", &selective_scan_bwd_cpu);
}

}  // namespace mvpp
