// Torch binding of the CUDA mhp_scan (kernels in csrc/include/mvpp/mhp_scan.cuh, instantiated in
// csrc/cuda/kernels/mhp_scan_*.cu). Implements the mvpp::mhp_scan_fwd / mhp_scan_bwd schemas defined
// in mvpp_kernels/_library.py: input checks, dtype/layout normalisation (the kernels take contiguous
// tensors), output allocation, launch on the current stream.
// c10's stream/guard headers rather than ATen/cuda/CUDAContext.h, which pulls in cuBLAS headers that a
// compiler-only toolkit (the CI compile check) does not ship.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdlib>
#include <optional>
#include <tuple>

#include "mvpp/mhp_scan.cuh"

namespace mvpp {
namespace cuda {
namespace mhp {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

constexpr const char* kOp = "mhp_scan (cuda): ";

struct Shapes {
  int64_t batch, dim, L, N;
};

void check_device(const char* name, const Tensor& t, const Tensor& u) {
  TORCH_CHECK(t.device() == u.device(), kOp, name, " must be on ", u.device(), " like u, got ", t.device());
}

void check_float(const char* name, const Tensor& t) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), kOp, name, " must be a floating-point tensor, got ",
              t.scalar_type());
}

Shapes check_core(const Tensor& u, const Tensor& A, int64_t chunk_size) {
  TORCH_CHECK(u.is_cuda(), kOp, "u must be a CUDA tensor, got ", u.device());
  TORCH_CHECK(u.dim() == 3, kOp, "u must have shape (batch, dim, L), got ", u.sizes());
  const auto st = u.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, kOp,
              "u must be float32, float16 or bfloat16 on the cuda backend, got ", st,
              " (float64 runs on the cpu and reference backends)");
  TORCH_CHECK(A.dim() == 2 && A.size(0) == u.size(1), kOp, "A must have shape (dim=", u.size(1), ", N), got ",
              A.sizes());
  const int64_t N = A.size(1);
  TORCH_CHECK(N >= 1 && N <= kMaxDState, kOp, "the state size N = A.shape[1] must be in [1, ", kMaxDState, "], got ",
              N);
  TORCH_CHECK(chunk_size >= 1 && chunk_size <= INT32_MAX, kOp, "chunk_size must be >= 1, got ", chunk_size);
  TORCH_CHECK(u.size(0) * u.size(1) <= INT32_MAX && u.size(2) <= INT32_MAX / 2, kOp, "batch * dim and L too large: ",
              u.sizes());
  return {u.size(0), u.size(1), u.size(2), N};
}

// (batch, dim, L) input in u's dtype, contiguous.
Tensor as_sequence(const char* name, const Tensor& t, const Tensor& u) {
  check_device(name, t, u);
  check_float(name, t);
  TORCH_CHECK(t.sizes() == u.sizes(), kOp, name, " must have shape (batch, dim, L) = ", u.sizes(), ", got ", t.sizes());
  return t.to(u.scalar_type()).contiguous();
}

Tensor as_f32(const char* name, const Tensor& t, const Tensor& u, at::IntArrayRef shape) {
  check_device(name, t, u);
  check_float(name, t);
  TORCH_CHECK(t.sizes() == shape, kOp, name, " must have shape ", shape, ", got ", t.sizes());
  return t.to(at::kFloat).contiguous();
}

OptTensor opt_f32(const char* name, const OptTensor& t, const Tensor& u, at::IntArrayRef shape) {
  if (!t.has_value()) return std::nullopt;
  return as_f32(name, *t, u, shape);
}

// B or C: constant (dim, N) -> float32; variable (batch, G, N, L) -> u's dtype. Returns (tensor, G or 0).
std::pair<Tensor, int> prepare_bc(const char* name, const Tensor& X, const Tensor& u, const Shapes& s) {
  check_device(name, X, u);
  check_float(name, X);
  if (X.dim() == 2) {
    TORCH_CHECK(X.size(0) == s.dim && X.size(1) == s.N, kOp, name, " must have shape (dim=", s.dim, ", N=", s.N,
                ") when constant, got ", X.sizes());
    return {X.to(at::kFloat).contiguous(), 0};
  }
  TORCH_CHECK(X.dim() == 4 && X.size(0) == s.batch && X.size(2) == s.N && X.size(3) == s.L, kOp, name,
              " must have shape (dim, N) or (batch=", s.batch, ", G, N=", s.N, ", L=", s.L, "), got ", X.sizes());
  const int64_t G = X.size(1);
  TORCH_CHECK(G >= 1 && s.dim % G == 0, kOp, name, ": the group count G = ", G, " must divide dim = ", s.dim);
  return {X.to(u.scalar_type()).contiguous(), static_cast<int>(G)};
}

struct Prepared {
  Shapes s;
  Tensor u, delta, A, B, C, dt;
  OptTensor D, z, delta_bias, dt_end, lengths, h0;
  int B_groups = 0, C_groups = 0;
};

Prepared prepare(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                 const Tensor& dt, const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias,
                 const OptTensor& dt_end, const OptTensor& lengths, const OptTensor& initial_state,
                 int64_t chunk_size) {
  Prepared p;
  p.s = check_core(u, A, chunk_size);
  const Shapes& s = p.s;
  p.u = u.contiguous();
  p.delta = as_sequence("delta", delta, u);
  p.A = as_f32("A", A, u, {s.dim, s.N});
  std::tie(p.B, p.B_groups) = prepare_bc("B", B, u, s);
  std::tie(p.C, p.C_groups) = prepare_bc("C", C, u, s);
  p.dt = as_f32("dt", dt, u, {s.batch, s.L});
  p.D = opt_f32("D", D, u, {s.dim});
  p.delta_bias = opt_f32("delta_bias", delta_bias, u, {s.dim});
  p.dt_end = opt_f32("dt_end", dt_end, u, {s.batch});
  p.h0 = opt_f32("initial_state", initial_state, u, {s.batch, s.dim, s.N});
  if (z.has_value()) p.z = as_sequence("z", *z, u);
  if (lengths.has_value()) {
    check_device("lengths", *lengths, u);
    TORCH_CHECK(!at::isFloatingType(lengths->scalar_type()) && lengths->scalar_type() != at::kBool, kOp,
                "lengths must be an integer tensor, got ", lengths->scalar_type());
    TORCH_CHECK(lengths->dim() == 1 && lengths->size(0) == s.batch, kOp, "lengths must have shape (batch=", s.batch,
                ",), got ", lengths->sizes());
    p.lengths = lengths->to(at::kLong).contiguous();
  }
  return p;
}

// MVPP_MHP_SCAN_LANES: the most threads per row (1, 2, 4, 8, 16 or 32), read once; see max_lanes.
int max_lanes_setting() {
  static const int lanes = [] {
    const char* env = std::getenv("MVPP_MHP_SCAN_LANES");
    if (env == nullptr || *env == '\0') return 32;
    const int v = std::atoi(env);
    TORCH_CHECK(v >= 1 && v <= 32 && (v & (v - 1)) == 0, kOp,
                "MVPP_MHP_SCAN_LANES must be a power of two in [1, 32], got '", env, "'");
    return v;
  }();
  return lanes;
}

template <typename P>
void fill_common(P& k, const Prepared& p, bool delta_softplus, int64_t chunk_size) {
  k.max_lanes = max_lanes_setting();
  k.batch = static_cast<int>(p.s.batch);
  k.dim = static_cast<int>(p.s.dim);
  k.L = static_cast<int>(p.s.L);
  k.N = static_cast<int>(p.s.N);
  k.B_groups = p.B_groups;
  k.C_groups = p.C_groups;
  k.chunk_size = static_cast<int>(chunk_size);
  k.n_chunks = static_cast<int>((p.s.L + chunk_size - 1) / chunk_size);
  k.softplus = delta_softplus;
  k.u = p.u.data_ptr();
  k.delta = p.delta.data_ptr();
  k.z = p.z.has_value() ? p.z->data_ptr() : nullptr;
  k.B = p.B.data_ptr();
  k.C = p.C.data_ptr();
  k.A = p.A.data_ptr<float>();
  k.D = p.D.has_value() ? p.D->data_ptr<float>() : nullptr;
  k.delta_bias = p.delta_bias.has_value() ? p.delta_bias->data_ptr<float>() : nullptr;
  k.dt = p.dt.data_ptr<float>();
  k.dt_end = p.dt_end.has_value() ? p.dt_end->data_ptr<float>() : nullptr;
  k.lengths = p.lengths.has_value() ? p.lengths->data_ptr<int64_t>() : nullptr;
  k.h0 = p.h0.has_value() ? p.h0->data_ptr<float>() : nullptr;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> mhp_scan_fwd_cuda(
    const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C, const Tensor& dt,
    const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias, const OptTensor& dt_end,
    const OptTensor& lengths, const OptTensor& initial_state, bool delta_softplus, int64_t chunk_size) {
  const Prepared p = prepare(u, delta, A, B, C, dt, D, z, delta_bias, dt_end, lengths, initial_state, chunk_size);
  const Shapes& s = p.s;
  const c10::cuda::CUDAGuard guard(u.device());
  const auto f32 = u.options().dtype(at::kFloat);
  const int64_t n_chunks = (s.L + chunk_size - 1) / chunk_size;
  Tensor y = at::empty({s.batch, s.dim, s.L}, u.options());
  Tensor y_left = at::empty({s.batch, s.dim, s.L}, f32);
  Tensor integral = at::empty({s.batch, s.dim}, f32);
  Tensor last_state = at::empty({s.batch, s.dim, s.N}, f32);
  Tensor chunk_states = at::empty({s.batch, s.dim, n_chunks * s.N}, f32);  // [b][d][chunk][n], flat
  if (s.L == 0 || s.batch * s.dim == 0) {
    // Nothing to scan (the public wrapper never sends L == 0): the state stays the initial one.
    y.zero_();
    y_left.zero_();
    integral.zero_();
    if (p.h0.has_value()) last_state.copy_(*p.h0);
    else last_state.zero_();
    return {y, y_left, integral, last_state, chunk_states};
  }
  MhpScanParams k;
  fill_common(k, p, delta_softplus, chunk_size);
  k.y = y.data_ptr();
  k.y_left = y_left.data_ptr<float>();
  k.integral = integral.data_ptr<float>();
  k.last_state = last_state.data_ptr<float>();
  k.chunk_states = chunk_states.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(u.device().index()).stream();
  cudaError_t err = cudaSuccess;
  switch (u.scalar_type()) {
    case at::kFloat: err = mhp_scan_fwd_launch<float>(k, stream); break;
    case at::kHalf: err = mhp_scan_fwd_launch<__half>(k, stream); break;
    case at::kBFloat16: err = mhp_scan_fwd_launch<__nv_bfloat16>(k, stream); break;
    default: TORCH_CHECK(false, kOp, "unsupported dtype ", u.scalar_type());
  }
  TORCH_CHECK(err == cudaSuccess, kOp, "forward kernel launch failed: ", cudaGetErrorString(err));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, y_left, integral, last_state, chunk_states};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mhp_scan_bwd_cuda(
    const Tensor& dy, const OptTensor& dy_left, const OptTensor& dintegral, const OptTensor& dlast_state,
    const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C, const Tensor& dt,
    const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias, const OptTensor& dt_end,
    const OptTensor& lengths, const OptTensor& initial_state, const Tensor& chunk_states, bool delta_softplus,
    int64_t chunk_size, bool deterministic) {
  const Prepared p = prepare(u, delta, A, B, C, dt, D, z, delta_bias, dt_end, lengths, initial_state, chunk_size);
  const Shapes& s = p.s;
  const c10::cuda::CUDAGuard guard(u.device());
  const int64_t n_chunks = (s.L + chunk_size - 1) / chunk_size;
  const Tensor dy_c = as_sequence("dy", dy, u);
  const OptTensor dyl_c = opt_f32("dy_left", dy_left, u, {s.batch, s.dim, s.L});
  const OptTensor dint_c = opt_f32("dintegral", dintegral, u, {s.batch, s.dim});
  const OptTensor dlast_c = opt_f32("dlast_state", dlast_state, u, {s.batch, s.dim, s.N});
  const Tensor cs = as_f32("chunk_states", chunk_states, u, {s.batch, s.dim, n_chunks, s.N});

  const auto f32 = u.options().dtype(at::kFloat);
  Tensor du = at::empty({s.batch, s.dim, s.L}, u.options());
  Tensor ddelta = at::empty({s.batch, s.dim, s.L}, u.options());
  Tensor dz = z.has_value() ? at::empty({s.batch, s.dim, s.L}, u.options()) : at::empty({0}, u.options());
  Tensor dA = at::empty({s.batch, s.dim, s.N}, f32);
  Tensor dD = at::empty({s.batch, s.dim}, f32);
  Tensor ddb = at::empty({s.batch, s.dim}, f32);
  Tensor ddt = at::empty({s.batch, s.dim, s.L}, f32);
  Tensor ddt_end = at::empty({s.batch, s.dim}, f32);
  Tensor dh0 = at::empty({s.batch, s.dim, s.N}, f32);
  // Variable dB/dC: per-channel partials summed per group below (deterministic), or atomics into
  // zeros. Constant: (batch, dim, N) partials.
  auto dbc_buffer = [&](int groups) {
    if (groups == 0) return at::empty({s.batch, s.dim, s.N}, f32);
    if (deterministic) return at::empty({s.batch, s.dim, s.N, s.L}, f32);
    return at::zeros({s.batch, groups, s.N, s.L}, f32);
  };
  Tensor dB = dbc_buffer(p.B_groups);
  Tensor dC = dbc_buffer(p.C_groups);

  if (s.L == 0 || s.batch * s.dim == 0) {
    for (Tensor* t : {&du, &ddelta, &dz, &dA, &dD, &ddb, &ddt, &ddt_end, &dB, &dC}) t->zero_();
    if (dlast_c.has_value()) dh0.copy_(*dlast_c);
    else dh0.zero_();
  } else {
    MhpScanBwdParams k;
    fill_common(k, p, delta_softplus, chunk_size);
    k.chunk_states = const_cast<float*>(cs.data_ptr<float>());
    k.dy = dy_c.data_ptr();
    k.dy_left = dyl_c.has_value() ? dyl_c->data_ptr<float>() : nullptr;
    k.dintegral = dint_c.has_value() ? dint_c->data_ptr<float>() : nullptr;
    k.dlast = dlast_c.has_value() ? dlast_c->data_ptr<float>() : nullptr;
    k.du = du.data_ptr();
    k.ddelta = ddelta.data_ptr();
    k.dz = z.has_value() ? dz.data_ptr() : nullptr;
    k.dA = dA.data_ptr<float>();
    k.dB = dB.data_ptr<float>();
    k.dC = dC.data_ptr<float>();
    k.dD = dD.data_ptr<float>();
    k.ddelta_bias = ddb.data_ptr<float>();
    k.ddt = ddt.data_ptr<float>();
    k.ddt_end = ddt_end.data_ptr<float>();
    k.dh0 = dh0.data_ptr<float>();
    k.deterministic = deterministic;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(u.device().index()).stream();
    cudaError_t err = cudaSuccess;
    switch (u.scalar_type()) {
      case at::kFloat: err = mhp_scan_bwd_launch<float>(k, stream); break;
      case at::kHalf: err = mhp_scan_bwd_launch<__half>(k, stream); break;
      case at::kBFloat16: err = mhp_scan_bwd_launch<__nv_bfloat16>(k, stream); break;
      default: TORCH_CHECK(false, kOp, "unsupported dtype ", u.scalar_type());
    }
    TORCH_CHECK(err == cudaSuccess, kOp, "backward kernel launch failed: ", cudaGetErrorString(err));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // Per-channel partials -> per-group sums, in a fixed order (at::sum is deterministic).
  if (p.B_groups > 0 && deterministic) dB = dB.view({s.batch, p.B_groups, s.dim / p.B_groups, s.N, s.L}).sum(2);
  if (p.C_groups > 0 && deterministic) dC = dC.view({s.batch, p.C_groups, s.dim / p.C_groups, s.N, s.L}).sum(2);
  // Gradients come back in the dtypes of the inputs they belong to.
  if (delta.scalar_type() != u.scalar_type()) ddelta = ddelta.to(delta.scalar_type());
  if (z.has_value() && z->scalar_type() != u.scalar_type()) dz = dz.to(z->scalar_type());
  return {du, ddelta, dA, dB, dC, dD, dz, ddb, ddt, ddt_end, dh0};
}

}  // namespace
}  // namespace mhp
}  // namespace cuda
}  // namespace mvpp

TORCH_LIBRARY_IMPL(mvpp, CUDA, m) {
  m.impl("mhp_scan_fwd", &mvpp::cuda::mhp::mhp_scan_fwd_cuda);
  m.impl("mhp_scan_bwd", &mvpp::cuda::mhp::mhp_scan_bwd_cuda);
}
