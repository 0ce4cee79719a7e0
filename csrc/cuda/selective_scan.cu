// Torch binding of the CUDA selective scan (kernels in csrc/include/mvpp/selective_scan.cuh,
// instantiated in csrc/cuda/kernels/). Implements the schemas defined in mvpp_kernels/_library.py:
// input checks, dtype/layout normalisation, output allocation, launch on the current stream.
// c10's stream/guard headers rather than ATen/cuda/CUDAContext.h: the latter pulls in cuBLAS/cuSPARSE
// headers, which a compiler-only CUDA toolkit (the CI's compile lane) does not ship.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "mvpp/selective_scan.cuh"

namespace mvpp {
namespace cuda {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_device(const char* name, const Tensor& t, const Tensor& u) {
  TORCH_CHECK(t.device() == u.device(), "selective_scan (cuda): ", name, " must be on ", u.device(), " like u, got ",
              t.device());
}

void check_float(const char* name, const Tensor& t) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "selective_scan (cuda): ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
}

// (batch, dim, L) input in the kernel's element type with a unit stride along L.
Tensor as_sequence(const char* name, const Tensor& t, const Tensor& u, at::ScalarType dtype) {
  check_device(name, t, u);
  check_float(name, t);
  TORCH_CHECK(t.dim() == 3 && t.sizes() == u.sizes(), "selective_scan (cuda): ", name,
              " must have shape (batch, dim, L) = ", u.sizes(), ", got ", t.sizes());
  Tensor r = t.scalar_type() == dtype ? t : t.to(dtype);
  if (r.size(2) > 1 && r.stride(2) != 1) r = r.contiguous();
  return r;
}

// Small float32 parameter tensors (A, constant B/C, D, delta_bias, states): contiguous float32.
Tensor as_f32(const char* name, const Tensor& t, const Tensor& u, at::IntArrayRef shape) {
  check_device(name, t, u);
  check_float(name, t);
  TORCH_CHECK(t.sizes() == shape, "selective_scan (cuda): ", name, " must have shape ", shape, ", got ", t.sizes());
  return t.to(at::kFloat).contiguous();
}

struct Shapes {
  int64_t batch, dim, L, N;
};

Shapes check_core(const Tensor& u, const Tensor& A) {
  TORCH_CHECK(u.is_cuda(), "selective_scan (cuda): u must be a CUDA tensor, got ", u.device());
  TORCH_CHECK(u.dim() == 3, "selective_scan (cuda): u must have shape (batch, dim, L), got ", u.sizes());
  TORCH_CHECK(is_kernel_dtype(u.scalar_type()),
              "selective_scan (cuda): u must be float32, float16 or bfloat16 on the cuda backend, got ",
              u.scalar_type(), " (float64 runs on the cpu and reference backends)");
  TORCH_CHECK(A.dim() == 2 && A.size(0) == u.size(1), "selective_scan (cuda): A must have shape (dim=", u.size(1),
              ", N), got ", A.sizes());
  const int64_t N = A.size(1);
  TORCH_CHECK(N >= 1 && N <= kMaxDState, "selective_scan (cuda): the state size N = A.shape[1] must be in [1, ",
              kMaxDState, "], got ", N);
  TORCH_CHECK(u.size(0) <= 65535, "selective_scan (cuda): batch must be at most 65535, got ", u.size(0));
  TORCH_CHECK(u.size(1) <= INT32_MAX && u.size(2) <= INT32_MAX / 2, "selective_scan (cuda): dim and L too large: ",
              u.sizes());
  return {u.size(0), u.size(1), u.size(2), N};
}

// B or C: constant (dim, N) -> float32; variable (batch, G, N, L) -> kernel dtype, unit L stride.
Tensor prepare_bc(const char* name, const Tensor& X, const Tensor& u, const Shapes& s, at::ScalarType dtype,
                  bool& variable, int& groups) {
  check_device(name, X, u);
  check_float(name, X);
  if (X.dim() == 2) {
    TORCH_CHECK(X.size(0) == s.dim && X.size(1) == s.N, "selective_scan (cuda): constant ", name,
                " must have shape (dim=", s.dim, ", N=", s.N, "), got ", X.sizes());
    variable = false;
    groups = 1;
    return X.to(at::kFloat).contiguous();
  }
  TORCH_CHECK(X.dim() == 4, "selective_scan (cuda): ", name,
              " must be (dim, N) or (batch, G, N, L) (the Python wrapper turns (batch, N, L) into G = 1), got ",
              X.sizes());
  const int64_t G = X.size(1);
  TORCH_CHECK(X.size(0) == s.batch && G >= 1 && X.size(2) == s.N && X.size(3) == s.L && s.dim % G == 0,
              "selective_scan (cuda): variable ", name, " must have shape (batch=", s.batch, ", G, N=", s.N,
              ", L=", s.L, ") with G dividing dim=", s.dim, ", got ", X.sizes());
  variable = true;
  groups = static_cast<int>(G);
  Tensor r = X.scalar_type() == dtype ? X : X.to(dtype);
  if (r.size(3) > 1 && r.stride(3) != 1) r = r.contiguous();
  return r;
}

Tensor prepare_lengths(const OptTensor& lengths, const Tensor& u, int64_t batch) {
  if (!lengths.has_value() || !lengths->defined()) return Tensor();
  const Tensor& l = *lengths;
  check_device("lengths", l, u);
  TORCH_CHECK(!at::isFloatingType(l.scalar_type()) && !at::isComplexType(l.scalar_type()) &&
                  l.scalar_type() != at::kBool,
              "selective_scan (cuda): lengths must be an integer tensor, got ", l.scalar_type());
  TORCH_CHECK(l.dim() == 1 && l.size(0) == batch, "selective_scan (cuda): lengths must have shape (batch=", batch,
              ",), got ", l.sizes());
  return l.to(at::kLong).contiguous();
}

int checked_chunk_size(int64_t chunk_size) {
  TORCH_CHECK(selective_scan_chunk_size_supported(chunk_size),
              "selective_scan (cuda): chunk_size must be one of 128, 256, 512, 1024, 2048, got ", chunk_size);
  return static_cast<int>(chunk_size);
}

// Everything the forward and backward share: normalised inputs and the parameter block.
struct Prepared {
  Tensor u, delta, A, B, C, D, z, delta_bias, init, lengths;
  Shapes s;
};

Prepared prepare(const Tensor& u_in, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                 const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias, const OptTensor& initial_state,
                 const OptTensor& lengths, bool delta_softplus, int chunk_size, SelectiveScanParams& p) {
  Prepared r;
  r.s = check_core(u_in, A);
  const Shapes& s = r.s;
  const at::ScalarType dt = u_in.scalar_type();
  r.u = u_in.size(2) > 1 && u_in.stride(2) != 1 ? u_in.contiguous() : u_in;
  r.delta = as_sequence("delta", delta, u_in, dt);
  r.A = as_f32("A", A, u_in, {s.dim, s.N});
  bool B_var = false, C_var = false;
  int B_groups = 1, C_groups = 1;
  r.B = prepare_bc("B", B, u_in, s, dt, B_var, B_groups);
  r.C = prepare_bc("C", C, u_in, s, dt, C_var, C_groups);
  if (D.has_value() && D->defined()) r.D = as_f32("D", *D, u_in, {s.dim});
  if (delta_bias.has_value() && delta_bias->defined()) r.delta_bias = as_f32("delta_bias", *delta_bias, u_in, {s.dim});
  if (z.has_value() && z->defined()) r.z = as_sequence("z", *z, u_in, dt);
  if (initial_state.has_value() && initial_state->defined()) {
    r.init = as_f32("initial_state", *initial_state, u_in, {s.batch, s.dim, s.N});
  }
  r.lengths = prepare_lengths(lengths, u_in, s.batch);

  p.batch = static_cast<int>(s.batch);
  p.dim = static_cast<int>(s.dim);
  p.seqlen = static_cast<int>(s.L);
  p.dstate = static_cast<int>(s.N);
  p.B_variable = B_var;
  p.C_variable = C_var;
  p.B_groups = B_groups;
  p.C_groups = C_groups;
  p.delta_softplus = delta_softplus;
  p.chunk_size = chunk_size;
  p.n_chunks = selective_scan_num_chunks(s.L, chunk_size);
  p.u = r.u.data_ptr();
  p.u_batch_stride = r.u.stride(0);
  p.u_dim_stride = r.u.stride(1);
  p.delta = r.delta.data_ptr();
  p.delta_batch_stride = r.delta.stride(0);
  p.delta_dim_stride = r.delta.stride(1);
  p.A = r.A.data_ptr<float>();
  p.A_dim_stride = r.A.stride(0);
  p.A_state_stride = r.A.stride(1);
  p.B = r.B.data_ptr();
  if (B_var) {
    p.B_batch_stride = r.B.stride(0);
    p.B_group_stride = r.B.stride(1);
    p.B_state_stride = r.B.stride(2);
  } else {
    p.B_dim_stride = r.B.stride(0);
    p.B_state_stride = r.B.stride(1);
  }
  p.C = r.C.data_ptr();
  if (C_var) {
    p.C_batch_stride = r.C.stride(0);
    p.C_group_stride = r.C.stride(1);
    p.C_state_stride = r.C.stride(2);
  } else {
    p.C_dim_stride = r.C.stride(0);
    p.C_state_stride = r.C.stride(1);
  }
  p.D = r.D.defined() ? r.D.data_ptr<float>() : nullptr;
  p.delta_bias = r.delta_bias.defined() ? r.delta_bias.data_ptr<float>() : nullptr;
  if (r.z.defined()) {
    p.z = r.z.data_ptr();
    p.z_batch_stride = r.z.stride(0);
    p.z_dim_stride = r.z.stride(1);
  }
  if (r.init.defined()) {
    p.initial_state = r.init.data_ptr<float>();
    p.init_batch_stride = r.init.stride(0);
    p.init_dim_stride = r.init.stride(1);
    p.init_state_stride = r.init.stride(2);
  }
  p.lengths = r.lengths.defined() ? r.lengths.data_ptr<int64_t>() : nullptr;
  return r;
}

std::tuple<Tensor, Tensor, Tensor> selective_scan_fwd_cuda(const Tensor& u, const Tensor& delta, const Tensor& A,
                                                           const Tensor& B, const Tensor& C, const OptTensor& D,
                                                           const OptTensor& z, const OptTensor& delta_bias,
                                                           const OptTensor& initial_state, const OptTensor& lengths,
                                                           bool delta_softplus, int64_t chunk_size) {
  const int cs = checked_chunk_size(chunk_size);
  c10::cuda::CUDAGuard guard(u.device());
  SelectiveScanParams p;
  Prepared r = prepare(u, delta, A, B, C, D, z, delta_bias, initial_state, lengths, delta_softplus, cs, p);
  const Shapes& s = r.s;
  Tensor out = at::empty({s.batch, s.dim, s.L}, u.options());
  Tensor last_state = at::empty({s.batch, s.dim, s.N}, u.options().dtype(at::kFloat));
  Tensor chunk_states = at::empty({s.batch, s.dim, p.n_chunks * s.N}, u.options().dtype(at::kFloat));  // flat
  if (s.batch == 0 || s.dim == 0) return {out, last_state, chunk_states};
  p.out = out.data_ptr();
  p.last_state = last_state.data_ptr<float>();
  p.chunk_states = chunk_states.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err = cudaErrorInvalidValue;
  switch (u.scalar_type()) {
    case at::kFloat:
      err = selective_scan_fwd_launch<float>(p, stream);
      break;
    case at::kHalf:
      err = selective_scan_fwd_launch<__half>(p, stream);
      break;
    case at::kBFloat16:
      err = selective_scan_fwd_launch<__nv_bfloat16>(p, stream);
      break;
    default:
      TORCH_CHECK(false, "selective_scan (cuda): unsupported dtype ", u.scalar_type());
  }
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, last_state, chunk_states};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> selective_scan_bwd_cuda(
    const Tensor& dout, const OptTensor& dlast_state, const Tensor& u, const Tensor& delta, const Tensor& A,
    const Tensor& B, const Tensor& C, const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias,
    const OptTensor& initial_state, const OptTensor& lengths, const Tensor& chunk_states, bool delta_softplus,
    int64_t chunk_size, bool deterministic) {
  const int cs = checked_chunk_size(chunk_size);
  c10::cuda::CUDAGuard guard(u.device());
  SelectiveScanBwdParams p;
  Prepared r = prepare(u, delta, A, B, C, D, z, delta_bias, initial_state, lengths, delta_softplus, cs, p);
  const Shapes& s = r.s;
  const at::ScalarType dt = u.scalar_type();
  Tensor dout_k = as_sequence("dout", dout, u, dt);
  Tensor states = as_f32("chunk_states", chunk_states, u, {s.batch, s.dim, p.n_chunks, s.N});
  Tensor dlast;
  if (dlast_state.has_value() && dlast_state->defined()) {
    dlast = as_f32("dlast_state", *dlast_state, u, {s.batch, s.dim, s.N});
  }

  const auto f32 = u.options().dtype(at::kFloat);
  const auto seq_opts = u.options().memory_format(at::MemoryFormat::Contiguous);
  Tensor du = at::empty({s.batch, s.dim, s.L}, seq_opts);
  Tensor ddelta = at::empty({s.batch, s.dim, s.L}, seq_opts);
  Tensor dz = r.z.defined() ? at::empty({s.batch, s.dim, s.L}, seq_opts) : at::empty({0}, u.options());
  Tensor dA = at::empty({s.batch, s.dim, s.N}, f32);
  Tensor dB = p.B_variable ? at::empty(r.B.sizes(), f32) : at::empty({s.batch, s.dim, s.N}, f32);
  Tensor dC = p.C_variable ? at::empty(r.C.sizes(), f32) : at::empty({s.batch, s.dim, s.N}, f32);
  Tensor dD = at::empty({s.batch, s.dim}, f32);
  Tensor ddelta_bias = at::empty({s.batch, s.dim}, f32);
  Tensor dinit = at::empty({s.batch, s.dim, s.N}, f32);

  auto finish = [&]() {
    // ddelta/dz in the dtype of delta/z (the kernel computed them in u's dtype).
    Tensor ddelta_out = delta.scalar_type() == dt ? ddelta : ddelta.to(delta.scalar_type());
    Tensor dz_out = (z.has_value() && z->defined() && z->scalar_type() != dt) ? dz.to(z->scalar_type()) : dz;
    return std::make_tuple(du, ddelta_out, dA, dB, dC, dD, dz_out, ddelta_bias, dinit);
  };
  if (s.batch == 0) return finish();
  if (s.dim == 0) {
    // No channel contributes to the (non-empty) grouped dB/dC.
    dB.zero_();
    dC.zero_();
    return finish();
  }

  p.chunk_states = states.data_ptr<float>();
  p.dout = dout_k.data_ptr();
  p.dout_batch_stride = dout_k.stride(0);
  p.dout_dim_stride = dout_k.stride(1);
  if (dlast.defined()) {
    p.dlast_state = dlast.data_ptr<float>();
    p.dlast_batch_stride = dlast.stride(0);
    p.dlast_dim_stride = dlast.stride(1);
    p.dlast_state_stride = dlast.stride(2);
  }
  p.du = du.data_ptr();
  p.ddelta = ddelta.data_ptr();
  p.dz = r.z.defined() ? dz.data_ptr() : nullptr;
  p.dA = dA.data_ptr<float>();
  p.dB = dB.data_ptr<float>();
  p.dC = dC.data_ptr<float>();
  p.dD = dD.data_ptr<float>();
  p.ddelta_bias = ddelta_bias.data_ptr<float>();
  p.dinitial_state = dinit.data_ptr<float>();
  p.deterministic = deterministic;
  int num_sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, u.get_device()));
  selective_scan_bwd_plan(p, num_sms);
  Tensor workspace;
  if (p.workspace_floats > 0) {
    workspace = at::empty({p.workspace_floats}, f32);
    p.workspace = workspace.data_ptr<float>();
  }

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err = cudaErrorInvalidValue;
  switch (dt) {
    case at::kFloat:
      err = selective_scan_bwd_launch<float>(p, stream);
      break;
    case at::kHalf:
      err = selective_scan_bwd_launch<__half>(p, stream);
      break;
    case at::kBFloat16:
      err = selective_scan_bwd_launch<__nv_bfloat16>(p, stream);
      break;
    default:
      TORCH_CHECK(false, "selective_scan (cuda): unsupported dtype ", dt);
  }
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return finish();
}

}  // namespace
}  // namespace cuda
}  // namespace mvpp

TORCH_LIBRARY_IMPL(mvpp, CUDA, m) {
  m.impl("selective_scan_fwd", &mvpp::cuda::selective_scan_fwd_cuda);
  m.impl("selective_scan_bwd", &mvpp::cuda::selective_scan_bwd_cuda);
}
