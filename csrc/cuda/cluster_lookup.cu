// Torch binding of the CUDA memory-bank search ops (exact_search, cluster_lookup). The scan kernel
// is the torch-free core csrc/include/mvpp/cluster_lookup.cuh, instantiated in
// csrc/cuda/kernels/cluster_lookup_*.cu. Routing for cluster_lookup (two small GEMMs over the
// centroids and a stable sort, i.e. the reference's tie rule) uses ATen ops on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "mvpp/check_offsets.h"
#include "mvpp/cluster_lookup.cuh"

namespace mvpp {
namespace cluster_lookup {
// Compiled once, in csrc/cuda/kernels/cluster_lookup_*.cu.
extern template cudaError_t launch_scan_topk<float, 32>(const ScanParams<float>&, cudaStream_t);
extern template cudaError_t launch_scan_topk<float, 128>(const ScanParams<float>&, cudaStream_t);
extern template cudaError_t launch_scan_topk<__half, 32>(const ScanParams<__half>&, cudaStream_t);
extern template cudaError_t launch_scan_topk<__half, 128>(const ScanParams<__half>&, cudaStream_t);
extern template cudaError_t launch_scan_topk<__nv_bfloat16, 32>(const ScanParams<__nv_bfloat16>&, cudaStream_t);
extern template cudaError_t launch_scan_topk<__nv_bfloat16, 128>(const ScanParams<__nv_bfloat16>&, cudaStream_t);
}  // namespace cluster_lookup

namespace cuda {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
constexpr int kMaxK = 128;
constexpr int64_t kMaxD = 8192;  // the query lives in shared memory
// Ids the packed (score << 32 | 2**32 - 1 - id) sort keys carry exactly (KERNEL_ID_LIMIT in Python).
constexpr int64_t kMaxId = 4294967294LL;

int k_pad(int64_t k) {
  int p = 2;
  while (p < k) p <<= 1;
  return p;
}

template <typename T>
void launch(const cluster_lookup::ScanParams<T>& p, cudaStream_t stream) {
  cudaError_t err = p.k <= 32 ? cluster_lookup::launch_scan_topk<T, 32>(p, stream)
                              : cluster_lookup::launch_scan_topk<T, 128>(p, stream);
  C10_CUDA_CHECK(err);
}

// (q, R, k_pad) int64 partial lists -> (scores (q, k) float32, ids (q, k) int64).
std::tuple<Tensor, Tensor> merge_unpack(const Tensor& partial, int64_t k) {
  const int64_t q = partial.size(0);
  Tensor flat = partial.view({q, -1});
  Tensor keys = std::get<0>(at::topk(flat, k, 1, /*largest=*/true, /*sorted=*/true));
  Tensor empty = keys == cluster_lookup::kEmptyKey;
  Tensor key32 = keys.__rshift__(32).to(at::kInt);
  Tensor bits = at::where(key32 >= 0, key32, key32.__xor__(0x7FFFFFFF));
  Tensor scores = bits.view(at::kFloat).clone();
  Tensor ids = (4294967295LL - keys.bitwise_and(4294967295LL));
  scores.masked_fill_(empty, -std::numeric_limits<float>::infinity());
  ids.masked_fill_(empty, -1);
  return {scores, ids};
}

std::tuple<Tensor, Tensor> scan(const Tensor& queries, const Tensor& keys, const OptTensor& ids, const Tensor& start,
                                const Tensor& end, const OptTensor& exclude, int64_t k) {
  TORCH_CHECK(k >= 1 && k <= kMaxK, "mvpp (cuda): k must be in [1, ", kMaxK, "], got ", k);
  TORCH_CHECK(keys.size(1) <= kMaxD, "mvpp (cuda): d must be <= ", kMaxD, ", got ", keys.size(1));
  const int64_t q = queries.size(0), R = start.size(1);
  const int kp = k_pad(k);
  Tensor partial = at::empty({q, R, kp}, queries.options().dtype(at::kLong));
  Tensor ex = exclude.has_value() ? exclude->to(at::kLong).contiguous() : Tensor();
  Tensor id = ids.has_value() ? ids->to(at::kLong).contiguous() : Tensor();
  Tensor st = start.contiguous(), en = end.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(queries.get_device()).stream();
  auto fill = [&](auto* Q, auto* K) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(Q)>>;
    cluster_lookup::ScanParams<T> p;
    p.Q = Q;
    p.K = K;
    p.ids = id.defined() ? id.data_ptr<int64_t>() : nullptr;
    p.start = st.data_ptr<int64_t>();
    p.end = en.data_ptr<int64_t>();
    p.exclude = ex.defined() ? ex.data_ptr<int64_t>() : nullptr;
    p.out = reinterpret_cast<long long*>(partial.data_ptr<int64_t>());
    p.q = q;
    p.d = keys.size(1);
    p.R = R;
    p.stride_q = queries.stride(0);
    p.stride_k = keys.stride(0);
    p.k = static_cast<int>(k);
    p.k_pad = kp;
    launch(p, stream);
  };
  switch (keys.scalar_type()) {
    case at::kFloat:
      fill(queries.data_ptr<float>(), keys.data_ptr<float>());
      break;
    case at::kHalf:
      fill(reinterpret_cast<const __half*>(queries.data_ptr<at::Half>()),
           reinterpret_cast<const __half*>(keys.data_ptr<at::Half>()));
      break;
    case at::kBFloat16:
      fill(reinterpret_cast<const __nv_bfloat16*>(queries.data_ptr<at::BFloat16>()),
           reinterpret_cast<const __nv_bfloat16*>(keys.data_ptr<at::BFloat16>()));
      break;
    default:
      TORCH_CHECK(false, "mvpp (cuda): keys must be float32, float16 or bfloat16, got ", keys.scalar_type());
  }
  return merge_unpack(partial, k);
}

void check_inputs(const Tensor& keys, const Tensor& queries) {
  TORCH_CHECK(keys.is_cuda() && queries.device() == keys.device(), "mvpp (cuda): inputs must be on one CUDA device");
  TORCH_CHECK(keys.dim() == 2 && queries.dim() == 2 && keys.size(1) == queries.size(1),
              "mvpp (cuda): keys (n, d) and queries (q, d) must share d");
  TORCH_CHECK(keys.size(1) >= 1, "mvpp (cuda): the feature dimension d must be >= 1, got d = 0");
  TORCH_CHECK(keys.scalar_type() == queries.scalar_type(), "mvpp (cuda): queries must have keys' dtype");
}

// Always-on check of what cluster_lookup indexes with (the CUDA mirror of mvpp::check_csr_offsets):
// the Python wrapper's checks are skipped under torch.compile, and a bad offset would make
// repeat_interleave and the scan kernel read/write out of bounds. The offsets live on the GPU, so the
// conditions are reduced on the device into one flag and read back with one host sync; only when that
// flag is set are the arrays copied to the host to build the detailed message (the CPU checker's).
// The member-id range of the packed sort keys ([0, 2**32 - 2)) is checked in the same reduction.
void check_index_arrays(const Tensor& coarse_off, int64_t c1, const Tensor& fine_off, int64_t cf, const Tensor& mids,
                        int64_t n) {
  const char* op = "mvpp::cluster_lookup (cuda)";
  TORCH_CHECK(coarse_off.dim() == 1 && coarse_off.numel() == c1 + 1, op, ": coarse_offsets must have shape (", c1 + 1,
              ",), got ", coarse_off.sizes());
  TORCH_CHECK(fine_off.dim() == 1 && fine_off.numel() == cf + 1, op, ": fine_offsets must have shape (", cf + 1,
              ",), got ", fine_off.sizes());
  TORCH_CHECK(mids.dim() == 1 && mids.numel() == n, op, ": member_ids must have shape (", n,
              ",) (one id per member key), got ", mids.sizes());
  TORCH_CHECK(coarse_off.device() == mids.device() && fine_off.device() == mids.device(), op,
              ": coarse_offsets, fine_offsets and member_ids must be on the member keys' device ", mids.device());
  TORCH_CHECK(!at::isFloatingType(coarse_off.scalar_type()) && !at::isFloatingType(fine_off.scalar_type()) &&
                  !at::isFloatingType(mids.scalar_type()),
              op, ": offsets and member_ids must be integer tensors");
  const Tensor co = coarse_off.to(at::kLong), fo = fine_off.to(at::kLong), id = mids.to(at::kLong);
  auto bad_csr = [](const Tensor& o, int64_t items) {
    Tensor b = o.select(0, 0).ne(0).logical_or(o.select(0, -1).ne(items));
    if (o.numel() > 1) b = b.logical_or(o.diff().lt(0).any());
    return b;
  };
  Tensor bad = bad_csr(co, cf).logical_or(bad_csr(fo, n));
  if (n > 0) {
    bad = bad.logical_or(id.min().lt(0)).logical_or(id.max().ge(kMaxId));
  }
  if (!bad.item<bool>()) return;  // the one sync
  check_csr_offsets(co.cpu().contiguous(), c1, cf, op, "coarse_offsets");
  check_csr_offsets(fo.cpu().contiguous(), cf, n, op, "fine_offsets");
  const int64_t lo = id.min().item<int64_t>(), hi = id.max().item<int64_t>();
  TORCH_CHECK(false, op, ": member_ids must lie in [0, ", kMaxId,
              ") (the packed top-k keys carry 32-bit ids), got min ", lo, ", max ", hi);
}

std::tuple<Tensor, Tensor> exact_search_cuda(const Tensor& keys_, const Tensor& queries_, int64_t k,
                                             const OptTensor& exclude) {
  check_inputs(keys_, queries_);
  const c10::cuda::CUDAGuard guard(keys_.device());
  const Tensor keys = keys_.contiguous(), queries = queries_.contiguous();
  const int64_t n = keys.size(0), q = queries.size(0);
  TORCH_CHECK(n <= kMaxId, "mvpp::exact_search (cuda): at most ", kMaxId,
              " keys (positions are packed into 32 bits), got ", n);
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, keys.get_device()));
  // Enough (query, split) blocks to fill the GPU, each split at least 256 keys.
  const int64_t want = (4LL * sms + std::max<int64_t>(q, 1) - 1) / std::max<int64_t>(q, 1);
  const int64_t S = std::max<int64_t>(1, std::min<int64_t>((n + 255) / 256, want));
  const int64_t per = (n + S - 1) / S;
  Tensor bounds = (at::arange(S + 1, keys.options().dtype(at::kLong)) * per).clamp_max(n);
  Tensor start = bounds.slice(0, 0, S).unsqueeze(0).expand({q, S}).contiguous();
  Tensor end = bounds.slice(0, 1, S + 1).unsqueeze(0).expand({q, S}).contiguous();
  return scan(queries, keys, std::nullopt, start, end, exclude, k);
}

// Row-wise top-p indices under (score desc, index asc); -1 where the score is -inf.
Tensor top_index(const Tensor& scores, int64_t p) {
  auto sorted = at::sort(scores, /*stable=*/true, /*dim=*/1, /*descending=*/true);
  Tensor val = std::get<0>(sorted).slice(1, 0, p);
  Tensor idx = std::get<1>(sorted).slice(1, 0, p);
  return at::where(at::isneginf(val), at::full_like(idx, -1), idx);
}

std::tuple<Tensor, Tensor> cluster_lookup_cuda(const Tensor& queries_, const Tensor& coarse, const Tensor& coarse_off,
                                               const Tensor& fine, const Tensor& fine_off, const Tensor& mkeys_,
                                               const Tensor& mids, int64_t k, int64_t p1, int64_t p2,
                                               const OptTensor& exclude) {
  check_inputs(mkeys_, queries_);
  const c10::cuda::CUDAGuard guard(mkeys_.device());
  const Tensor queries = queries_.contiguous(), mkeys = mkeys_.contiguous();
  TORCH_CHECK(p1 >= 1 && p2 >= 1, "mvpp::cluster_lookup (cuda): nprobe must be >= 1, got ", p1, ", ", p2);
  TORCH_CHECK(coarse.dim() == 2 && fine.dim() == 2 && coarse.size(1) == mkeys.size(1) &&
                  fine.size(1) == mkeys.size(1),
              "mvpp::cluster_lookup (cuda): coarse (c1, d) and fine (cf, d) centroids must share the keys' d = ",
              mkeys.size(1), ", got ", coarse.sizes(), " and ", fine.sizes());
  TORCH_CHECK(coarse.device() == mkeys.device() && fine.device() == mkeys.device(),
              "mvpp::cluster_lookup (cuda): centroids must be on the member keys' device ", mkeys.device());
  const int64_t c1 = coarse.size(0), cf = fine.size(0);
  check_index_arrays(coarse_off, c1, fine_off, cf, mids, mkeys.size(0));
  const int64_t P1 = std::min(p1, c1), P2 = std::min(p2, cf);
  const Tensor qf = queries.to(at::kFloat);
  // Routing, in float32 like the reference for float32/bf16/fp16 keys.
  Tensor cs = at::mm(qf, coarse.to(at::kFloat).t()).add(0.0);
  Tensor top_c = top_index(cs, P1);  // (q, P1)
  Tensor coff = coarse_off.to(at::kLong);
  Tensor parent = at::repeat_interleave(at::arange(c1, coff.options()), coff.diff(), 0, cf);
  Tensor allowed = (parent.view({1, cf, 1}) == top_c.unsqueeze(1)).any(2);
  Tensor fs = at::mm(qf, fine.to(at::kFloat).t()).add(0.0).masked_fill(allowed.logical_not(),
                                                                         -std::numeric_limits<float>::infinity());
  Tensor top_f = top_index(fs, P2);  // (q, P2)
  Tensor foff = fine_off.to(at::kLong);
  Tensor ok = top_f >= 0;
  Tensor f = top_f.clamp_min(0);
  Tensor start = at::where(ok, foff.index({f}), at::zeros_like(f));
  Tensor end = at::where(ok, foff.index({f + 1}), at::zeros_like(f));
  return scan(queries, mkeys, mids, start, end, exclude, k);
}

}  // namespace

TORCH_LIBRARY_IMPL(mvpp, CUDA, m) {
  m.impl("exact_search", &exact_search_cuda);
  m.impl("cluster_lookup", &cluster_lookup_cuda);
}

}  // namespace cuda
}  // namespace mvpp
