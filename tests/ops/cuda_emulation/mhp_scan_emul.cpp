// The CUDA mhp_scan kernels (csrc/include/mvpp/mhp_scan.cuh) run on the host: every line of kernel
// code is the GPU's, each warp's 32 threads run as OS threads and a warp shuffle is emulated with
// barriers (cuda_runtime.h here). Driven through ctypes by tests/ops/test_mhp_scan_cuda_emulated.py.
#include <cstdint>
#include <thread>
#include <vector>

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
  p.max_lanes = static_cast<int>(in[9]);
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

// The launch: blocks one after another, warps one after another, the 32 threads of a warp at once.
template <typename P, typename K>
void run_grid(const P& p, int threads, int lanes, K kernel) {
  const int rows = p.batch * p.dim;
  const int rows_per_block = threads / lanes;
  const int blocks = (rows + rows_per_block - 1) / rows_per_block;
  std::barrier<> bar(32);
  emul_warp.bar = &bar;
  for (int b = 0; b < blocks; ++b) {
    for (int w = 0; w < threads / 32; ++w) {
      std::vector<std::thread> warp;
      for (int l = 0; l < 32; ++l) {
        warp.emplace_back([&, b, w, l] {
          blockIdx.x = static_cast<unsigned>(b);
          threadIdx.x = static_cast<unsigned>(w * 32 + l);
          kernel(p, lanes);
        });
      }
      for (auto& t : warp) t.join();
    }
  }
}

// The launcher's choice of lanes per row and states per lane.
template <typename P, typename K1, typename K8>
void launch(const P& p, int threads, K1 k1, K8 k8) {
  const int lanes = detail::lanes_for(p.N, p.max_lanes);
  if (p.N <= lanes) run_grid(p, threads, lanes, k1);
  else run_grid(p, threads, lanes, k8);
}

}  // namespace

extern "C" int mhp_emul_fwd(const int64_t* in, void** ptr) {
  MhpScanParams p;
  int i = fill(p, in, ptr);
  p.y = ptr[i++];
  p.y_left = static_cast<float*>(ptr[i++]);
  p.integral = static_cast<float*>(ptr[i++]);
  p.last_state = static_cast<float*>(ptr[i++]);
  launch(p, detail::kFwdThreads, detail::mhp_scan_fwd_kernel<float, 1>, detail::mhp_scan_fwd_kernel<float, 8>);
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
  launch(p, detail::kBwdThreads, detail::mhp_scan_bwd_kernel<float, 1>, detail::mhp_scan_bwd_kernel<float, 8>);
  return 0;
}
