// The CUDA frame_score kernels (csrc/include/mvpp/frame_score.cuh) run on the host: the kernel code is
// the GPU's, each block's threads run as OS threads (cuda_runtime.h here). The launch geometry (grid,
// block, dynamic shared memory) mirrors the launchers in the header. Driven through ctypes by
// tests/ops/test_frame_score_cuda_emulated.py.
#define MVPP_FS_HOST_EMULATION 1
#define MVPP_FS_DYNAMIC_SMEM(name) float* name = emul_block.dynamic_smem

#include <functional>
#include <thread>
#include <vector>

#include "mvpp/frame_score.cuh"

namespace fs = mvpp::frame_score;

namespace {

void launch(unsigned gx, unsigned gy, unsigned gz, unsigned threads, int64_t smem_floats,
            const std::function<void()>& kernel) {
  for (unsigned z = 0; z < gz; ++z)
    for (unsigned y = 0; y < gy; ++y)
      for (unsigned x = 0; x < gx; ++x) {
        std::vector<float> smem(static_cast<size_t>(smem_floats > 0 ? smem_floats : 1), NAN);
        std::barrier<> block_bar(threads);
        std::vector<std::barrier<>*> warp_bars;
        const unsigned n_warps = (threads + 31) / 32;
        for (unsigned w = 0; w < n_warps; ++w) {
          warp_bars.push_back(new std::barrier<>(std::min(32u, threads - 32 * w)));
          emul_block.warp_bar[w] = warp_bars.back();
        }
        emul_block.block_bar = &block_bar;
        emul_block.dynamic_smem = smem.data();
        std::vector<std::thread> pool;
        for (unsigned t = 0; t < threads; ++t)
          pool.emplace_back([&, t] {
            threadIdx = EmulDim3{t, 0, 0};
            blockIdx = EmulDim3{x, y, z};
            blockDim = EmulDim3{threads, 1, 1};
            kernel();
          });
        for (auto& th : pool) th.join();
        for (auto* b : warp_bars) delete b;
      }
}

}  // namespace

extern "C" {

// dims: batch, T, F, H, k, chunk, n_split, n_warps; ptrs in FwdParams order.
int fs_emul_fwd(const int64_t* d, float inv_tau, void** ptr) {
  fs::FwdParams p{};
  int i = 0;
  p.frames = ptr[i++];
  p.weight = static_cast<const float*>(ptr[i++]);
  p.bias = static_cast<const float*>(ptr[i++]);
  p.lengths = static_cast<const int64_t*>(ptr[i++]);
  p.W1 = static_cast<const float*>(ptr[i++]);
  p.b1 = static_cast<const float*>(ptr[i++]);
  p.scores = static_cast<float*>(ptr[i++]);
  p.dense = ptr[i++];
  p.topk_idx = static_cast<int64_t*>(ptr[i++]);
  p.topk_frames = ptr[i++];
  p.lse = static_cast<float*>(ptr[i++]);
  p.part_ml = static_cast<float*>(ptr[i++]);
  p.part_acc = static_cast<float*>(ptr[i++]);
  p.part_v = static_cast<float*>(ptr[i++]);
  p.part_i = static_cast<int32_t*>(ptr[i++]);
  p.batch = d[0];
  p.T = d[1];
  p.F = d[2];
  p.H = d[3];
  p.k = d[4];
  p.chunk = d[5];
  p.n_split = static_cast<int>(d[6]);
  p.n_warps = static_cast<int>(d[7]);
  p.inv_tau = inv_tau;
  const int64_t smem = fs::fwd_smem_bytes(p.F, p.k, p.n_warps) / 4;
  if (p.W1 != nullptr)
    launch(unsigned(p.batch), unsigned(p.n_split), 1, unsigned(32 * p.n_warps), smem,
           [&] { fs::detail::fwd_split_kernel<float, true>(p); });
  else
    launch(unsigned(p.batch), unsigned(p.n_split), 1, unsigned(32 * p.n_warps), smem,
           [&] { fs::detail::fwd_split_kernel<float, false>(p); });
  const int64_t P = int64_t(p.n_split) * p.n_warps;
  launch(unsigned(p.batch), 1, 1, 256, 2 * P, [&] { fs::detail::fwd_merge_kernel<float>(p); });
  return 0;
}

// dims: batch, T, F, H, chunk, n_split, n_warps.
int fs_emul_bwd_rows(const int64_t* d, void** ptr) {
  fs::BwdRowsParams p{};
  int i = 0;
  p.frames = ptr[i++];
  p.ddense = ptr[i++];
  p.lengths = static_cast<const int64_t*>(ptr[i++]);
  p.W1 = static_cast<const float*>(ptr[i++]);
  p.b1 = static_cast<const float*>(ptr[i++]);
  p.g = static_cast<float*>(ptr[i++]);
  p.a_pre = static_cast<float*>(ptr[i++]);
  p.batch = d[0];
  p.T = d[1];
  p.F = d[2];
  p.H = d[3];
  p.chunk = d[4];
  p.n_split = static_cast<int>(d[5]);
  p.n_warps = static_cast<int>(d[6]);
  if (p.W1 != nullptr)
    launch(unsigned(p.batch), unsigned(p.n_split), 1, unsigned(32 * p.n_warps), p.F,
           [&] { fs::detail::bwd_rows_kernel<float, true>(p); });
  else
    launch(unsigned(p.batch), unsigned(p.n_split), 1, unsigned(32 * p.n_warps), p.F,
           [&] { fs::detail::bwd_rows_kernel<float, false>(p); });
  return 0;
}

// dims: batch, T, F, k, t_chunk, t_split.
int fs_emul_bwd_frames(const int64_t* d, void** ptr) {
  fs::BwdFramesParams p{};
  int i = 0;
  p.frames = ptr[i++];
  p.ddense = ptr[i++];
  p.dtopk = ptr[i++];
  p.weight = static_cast<const float*>(ptr[i++]);
  p.p = static_cast<const float*>(ptr[i++]);
  p.ds = static_cast<const float*>(ptr[i++]);
  p.slot = static_cast<const int32_t*>(ptr[i++]);
  p.extra = static_cast<const float*>(ptr[i++]);
  p.lengths = static_cast<const int64_t*>(ptr[i++]);
  p.dframes = ptr[i++];
  p.dweight_part = static_cast<float*>(ptr[i++]);
  p.batch = d[0];
  p.T = d[1];
  p.F = d[2];
  p.k = d[3];
  p.t_chunk = d[4];
  p.t_split = static_cast<int>(d[5]);
  constexpr unsigned kThreads = 128;  // as frame_score_bwd_frames_launch
  launch(unsigned(p.batch), unsigned((p.F + kThreads - 1) / kThreads), unsigned(p.t_split), kThreads, 0,
         [&] { fs::detail::bwd_frames_kernel<float>(p); });
  return 0;
}
}
