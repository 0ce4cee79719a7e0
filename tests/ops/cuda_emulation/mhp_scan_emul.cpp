// The CUDA mhp_scan kernels (csrc/include/mvpp/mhp_scan.cuh) run on the host, one thread after
// another, with one lane per row: every line of kernel math is the GPU's, only the warp-level
// reduction (a no-op for one lane) and the launch differ. Driven through ctypes by
// tests/ops/test_mhp_scan_cuda_emulated.py.
#include <cstdint>

#include "mvpp/mhp_scan.cuh"

using mvpp::cuda::mhp::MhpScanBwdParams;
using mvpp::cuda::mhp::MhpScanParams;
namespace detail = mvpp::cuda::mhp::detail;

namespace {

template <typename P>
int fill(P& p, const int64_t* in, void** ptr) {
  p.batch = static_cast<int>(in[0]);
  p.dim = static_cast<int>(in[1]);
  p.L = static_cast<int>(in[2]);
  p.N = static_cast<int>(in[3]);
  p.B_groups = static_cast<int>(in[4]);
  p.C_groups = static_cast<int>(in[5]);
  p.chunk_size = static_cast<int>(in[6]);
  p.n_chunks = (p.L + p.chunk_size - 1) / p.chunk_size;
  p.softplus = in[7] != 0;
  int i = 0;
  p.u = ptr[i++];
  p.delta = ptr[i++];
  p.z = ptr[i++];
  p.B = ptr[i++];
  p.C = ptr[i++];
  p.A = static_cast<const float*>(ptr[i++]);
  p.D = static_cast<const float*>(ptr[i++]);
  p.delta_bias = static_cast<const float*>(ptr[i++]);
  p.dt = static_cast<const float*>(ptr[i++]);
  p.dt_end = static_cast<const float*>(ptr[i++]);
  p.lengths = static_cast<const int64_t*>(ptr[i++]);
  p.h0 = static_cast<const float*>(ptr[i++]);
  p.chunk_states = static_cast<float*>(ptr[i++]);
  return i;
}

template <typename P, typename K>
void run_grid(const P& p, int threads, K kernel) {
  const int rows = p.batch * p.dim;
  const int blocks = (rows + threads - 1) / threads;  // one lane per row
  for (int b = 0; b < blocks; ++b) {
    for (int t = 0; t < threads; ++t) {
      blockIdx.x = static_cast<unsigned>(b);
      threadIdx.x = static_cast<unsigned>(t);
      kernel(p, 1);
    }
  }
}

}  // namespace

extern "C" int mhp_emul_fwd(const int64_t* in, void** ptr) {
  MhpScanParams p;
  int i = fill(p, in, ptr);
  p.y = ptr[i++];
  p.y_left = static_cast<float*>(ptr[i++]);
  p.integral = static_cast<float*>(ptr[i++]);
  p.last_state = static_cast<float*>(ptr[i++]);
  if (p.N > 8) return 1;  // one lane holds at most kMaxK = 8 states
  run_grid(p, detail::kFwdThreads, detail::mhp_scan_fwd_kernel<float, 8>);
  return 0;
}

extern "C" int mhp_emul_bwd(const int64_t* in, void** ptr) {
  MhpScanBwdParams p;
  int i = fill(p, in, ptr);
  p.deterministic = in[8] != 0;
  p.dy = ptr[i++];
  p.dy_left = static_cast<const float*>(ptr[i++]);
  p.dintegral = static_cast<const float*>(ptr[i++]);
  p.dlast = static_cast<const float*>(ptr[i++]);
  p.du = ptr[i++];
  p.ddelta = ptr[i++];
  p.dz = ptr[i++];
  p.dA = static_cast<float*>(ptr[i++]);
  p.dB = static_cast<float*>(ptr[i++]);
  p.dC = static_cast<float*>(ptr[i++]);
  p.dD = static_cast<float*>(ptr[i++]);
  p.ddelta_bias = static_cast<float*>(ptr[i++]);
  p.ddt = static_cast<float*>(ptr[i++]);
  p.ddt_end = static_cast<float*>(ptr[i++]);
  p.dh0 = static_cast<float*>(ptr[i++]);
  if (p.N > 8) return 1;
  run_grid(p, detail::kBwdThreads, detail::mhp_scan_bwd_kernel<float, 8>);
  return 0;
}
