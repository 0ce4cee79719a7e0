// Torch binding of the CUDA frame_score (kernels in csrc/include/mvpp/frame_score.cuh, instantiated in
// csrc/cuda/kernels/frame_score_*.cu). Implements the schemas defined in mvpp_kernels/_library.py.
// c10's stream/guard headers rather than ATen/cuda/CUDAContext.h: the latter pulls in cuBLAS headers,
// which the compile-only toolkit of the CI lane does not ship. (ATen ops such as at::bmm still run on
// cuBLAS at run time; the header is simply not needed to call them.)
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "mvpp/frame_score.cuh"

namespace mvpp {
namespace cuda {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
namespace fs = mvpp::frame_score;

int device_attr(cudaDeviceAttr attr, int device) {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, attr, device));
  return v;
}

Tensor param_f32(const char* name, const Tensor& t, const Tensor& frames) {
  TORCH_CHECK(t.device() == frames.device(), "frame_score (cuda): ", name, " must be on ", frames.device(),
              " like frames, got ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "frame_score (cuda): ", name, " must be floating-point, got ",
              t.scalar_type());
  return t.to(at::kFloat).contiguous();
}

void check_frames(const Tensor& frames) {
  TORCH_CHECK(frames.is_cuda(), "frame_score (cuda): frames must be a CUDA tensor, got ", frames.device());
  TORCH_CHECK(frames.dim() == 3, "frame_score (cuda): frames must be (batch, T, F), got ", frames.sizes());
  const auto st = frames.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "frame_score (cuda): frames must be float32, float16 or bfloat16, got ", st,
              " (float64 runs on the cpu and reference backends)");
  TORCH_CHECK(frames.size(0) <= 65535 && frames.size(1) < (int64_t(1) << 30) && frames.size(2) < (int64_t(1) << 30),
              "frame_score (cuda): frames too large: ", frames.sizes());
}

template <typename F>
void dispatch(at::ScalarType st, F&& fn) {
  if (st == at::kFloat) {
    fn(float{});
  } else if (st == at::kHalf) {
    fn(__half{});
  } else {
    fn(__nv_bfloat16{});
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> frame_score_fwd_cuda(const Tensor& frames_in, const Tensor& weight_in,
                                                                        const OptTensor& bias_in,
                                                                        const OptTensor& lengths_in,
                                                                        const OptTensor& W1_in, const OptTensor& b1_in,
                                                                        int64_t k, double temperature) {
  check_frames(frames_in);
  TORCH_CHECK(k >= 1 && k <= fs::kMaxK, "frame_score (cuda): k must be in [1, ", fs::kMaxK, "], got ", k);
  TORCH_CHECK(temperature > 0, "frame_score (cuda): temperature must be > 0, got ", temperature);
  TORCH_CHECK(W1_in.has_value() == b1_in.has_value(), "frame_score (cuda): W1 and b1 come together");
  c10::cuda::CUDAGuard guard(frames_in.device());
  const Tensor frames = frames_in.contiguous();
  const int64_t B = frames.size(0), T = frames.size(1), F = frames.size(2);
  const Tensor weight = param_f32("weight", weight_in, frames);
  Tensor W1, b1, bias, lengths;
  int64_t H = 0;
  if (W1_in.has_value()) {
    W1 = param_f32("W1", *W1_in, frames);
    b1 = param_f32("b1", *b1_in, frames);
    TORCH_CHECK(W1.dim() == 2 && W1.size(0) == F, "frame_score (cuda): W1 must be (F=", F, ", H), got ", W1.sizes());
    H = W1.size(1);
    TORCH_CHECK(H >= 1 && H <= fs::kMaxHidden, "frame_score (cuda): H must be in [1, ", fs::kMaxHidden, "], got ", H);
    TORCH_CHECK(b1.numel() == H && weight.numel() == H, "frame_score (cuda): b1 and weight must be (H=", H, ",)");
  } else {
    TORCH_CHECK(weight.numel() == F, "frame_score (cuda): weight must be (F=", F, ",), got ", weight.sizes());
  }
  if (bias_in.has_value()) {
    bias = param_f32("bias", *bias_in, frames);
    TORCH_CHECK(bias.numel() == 1, "frame_score (cuda): bias must be a scalar");
  }
  if (lengths_in.has_value()) {
    TORCH_CHECK(lengths_in->device() == frames.device(), "frame_score (cuda): lengths must be on ", frames.device());
    lengths = lengths_in->to(at::kLong).contiguous();
    TORCH_CHECK(lengths.numel() == B, "frame_score (cuda): lengths must be (batch,)");
  }
  const auto f32 = frames.options().dtype(at::kFloat);
  Tensor scores = at::empty({B, T}, f32);
  Tensor dense = at::empty({B, F}, frames.options());
  Tensor topk_idx = at::empty({B, k}, frames.options().dtype(at::kLong));
  Tensor topk_frames = at::empty({B, k, F}, frames.options());
  Tensor lse = at::empty({B}, f32);
  if (B == 0) return {scores, dense, topk_idx, topk_frames, lse};

  const int dev = frames.get_device();
  const int64_t max_smem = device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  const int nw = fs::fwd_warps_for(F, max_smem);
  TORCH_CHECK(fs::fwd_smem_bytes(F, k, nw) <= max_smem, "frame_score (cuda): F = ", F,
              " is too large for the on-chip weighted sum (", max_smem, " bytes of shared memory per block); "
              "use the triton or reference backend");
  const int sms = device_attr(cudaDevAttrMultiProcessorCount, dev);
  // Split each video into chunks so that ~2 blocks per SM are busy even for a small batch, but keep a
  // few frames per warp in every chunk.
  const int64_t max_split = std::max<int64_t>(1, (T + 4 * nw - 1) / (4 * nw));
  int64_t n_split = std::min<int64_t>(std::max<int64_t>(1, (2 * sms + B - 1) / B), max_split);
  const int64_t chunk = (T + n_split - 1) / n_split;
  n_split = (T + chunk - 1) / chunk;
  TORCH_CHECK(n_split <= 65535, "frame_score (cuda): too many splits");
  const int64_t P = n_split * nw;
  Tensor part_ml = at::empty({B, P, 2}, f32);
  Tensor part_acc = at::empty({B, P, F}, f32);
  Tensor part_v = at::empty({B, P, k}, f32);
  Tensor part_i = at::empty({B, P, k}, frames.options().dtype(at::kInt));

  fs::FwdParams p{};
  p.frames = frames.data_ptr();
  p.weight = weight.data_ptr<float>();
  p.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  p.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  p.W1 = W1.defined() ? W1.data_ptr<float>() : nullptr;
  p.b1 = b1.defined() ? b1.data_ptr<float>() : nullptr;
  p.scores = scores.data_ptr<float>();
  p.dense = dense.data_ptr();
  p.topk_idx = topk_idx.data_ptr<int64_t>();
  p.topk_frames = topk_frames.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.part_ml = part_ml.data_ptr<float>();
  p.part_acc = part_acc.data_ptr<float>();
  p.part_v = part_v.data_ptr<float>();
  p.part_i = part_i.data_ptr<int32_t>();
  p.batch = B;
  p.T = T;
  p.F = F;
  p.H = H;
  p.k = k;
  p.chunk = chunk;
  p.n_split = int(n_split);
  p.n_warps = nw;
  p.inv_tau = float(1.0 / temperature);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(frames.scalar_type(), [&](auto tag) {
    using T_ = decltype(tag);
    C10_CUDA_CHECK(fs::frame_score_fwd_launch<T_>(p, stream));
  });
  return {scores, dense, topk_idx, topk_frames, lse};
}

// Backward: the frame-sized work runs in the kernels (g_t = ddense . f_t, then dframes); the
// (batch, T)-sized softmax algebra runs in ATen:
//   p_t = exp((s_t - max s) / tau - lse),  c = sum_t p_t g_t,  ds_t = dscores_t + p_t (g_t - c) / tau
// (lse = log sum_t exp((s_t - max s) / tau), max s over the valid scores: no overflow of s / tau; a
// poisoned video -- NaN lse -- gets NaN p_t in its valid frames, as the reference's autograd).
// and, for the MLP scorer, da = ds w * gelu'(a), dW1 = F^T da and the da W1^T term of dframes as cuBLAS
// GEMMs (tensor-core friendly and deterministic).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> frame_score_bwd_cuda(
    const Tensor& dscores_in, const Tensor& ddense_in, const Tensor& dtopk_in, const Tensor& frames_in,
    const Tensor& weight_in, const OptTensor& W1_in, const OptTensor& b1_in, const OptTensor& lengths_in,
    const Tensor& scores_in, const Tensor& lse_in, const Tensor& topk_idx_in, double temperature) {
  check_frames(frames_in);
  TORCH_CHECK(temperature > 0, "frame_score (cuda): temperature must be > 0");
  TORCH_CHECK(W1_in.has_value() == b1_in.has_value(), "frame_score (cuda): W1 and b1 come together");
  c10::cuda::CUDAGuard guard(frames_in.device());
  const Tensor frames = frames_in.contiguous();
  const int64_t B = frames.size(0), T = frames.size(1), F = frames.size(2);
  const auto st = frames.scalar_type();
  const auto f32 = frames.options().dtype(at::kFloat);
  const Tensor weight = param_f32("weight", weight_in, frames);
  const bool mlp = W1_in.has_value();
  Tensor W1, b1, lengths;
  int64_t H = 0;
  if (mlp) {
    W1 = param_f32("W1", *W1_in, frames);
    b1 = param_f32("b1", *b1_in, frames);
    H = W1.size(1);
    TORCH_CHECK(W1.dim() == 2 && W1.size(0) == F && H >= 1 && H <= fs::kMaxHidden,
                "frame_score (cuda): W1 must be (F, H) with H <= ", fs::kMaxHidden);
  }
  if (lengths_in.has_value()) lengths = lengths_in->to(at::kLong).contiguous();
  const Tensor topk_idx = topk_idx_in.to(at::kLong).contiguous();
  const int64_t k = topk_idx.size(1);
  const Tensor dscores = dscores_in.to(at::kFloat).expand({B, T}).contiguous();
  const Tensor ddense = ddense_in.to(st).expand({B, F}).contiguous();
  const Tensor dtopk = dtopk_in.to(st).expand({B, k, F}).contiguous();
  const Tensor scores = scores_in.to(at::kFloat).contiguous();
  const Tensor lse = lse_in.to(at::kFloat).contiguous();
  Tensor dframes = at::empty({B, T, F}, frames.options());
  if (B == 0 || T == 0) {
    dframes.zero_();
    return {dframes, at::zeros({B, mlp ? H : F}, f32), at::zeros({B}, f32),
            mlp ? at::zeros({B, F, H}, f32) : at::empty({0}, f32), mlp ? at::zeros({B, H}, f32) : at::empty({0}, f32)};
  }
  const int dev = frames.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = device_attr(cudaDevAttrMultiProcessorCount, dev);
  const int64_t max_smem = device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  TORCH_CHECK(F * 4 <= max_smem, "frame_score (cuda): F = ", F, " is too large for the backward's shared memory");

  // 1. g_t (and the MLP's pre-activations) per frame.
  constexpr int kRowWarps = 8;
  const int64_t max_split = std::max<int64_t>(1, (T + 4 * kRowWarps - 1) / (4 * kRowWarps));
  int64_t n_split = std::min<int64_t>(std::max<int64_t>(1, (2 * sms + B - 1) / B), max_split);
  const int64_t chunk = (T + n_split - 1) / n_split;
  n_split = (T + chunk - 1) / chunk;
  Tensor g = at::empty({B, T}, f32);
  Tensor a_pre = mlp ? at::empty({B, T, H}, f32) : at::empty({0}, f32);
  fs::BwdRowsParams rp{};
  rp.frames = frames.data_ptr();
  rp.ddense = ddense.data_ptr();
  rp.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  rp.W1 = mlp ? W1.data_ptr<float>() : nullptr;
  rp.b1 = mlp ? b1.data_ptr<float>() : nullptr;
  rp.g = g.data_ptr<float>();
  rp.a_pre = mlp ? a_pre.data_ptr<float>() : nullptr;
  rp.batch = B;
  rp.T = T;
  rp.F = F;
  rp.H = H;
  rp.chunk = chunk;
  rp.n_split = int(n_split);
  rp.n_warps = kRowWarps;
  dispatch(st, [&](auto tag) {
    using T_ = decltype(tag);
    C10_CUDA_CHECK(fs::frame_score_bwd_rows_launch<T_>(rp, stream));
  });

  // 2. The softmax algebra over (batch, T).
  const double inv_tau = 1.0 / temperature;
  Tensor valid = at::arange(T, frames.options().dtype(at::kLong)).unsqueeze(0).expand({B, T});
  valid = lengths.defined() ? valid.lt(lengths.unsqueeze(1)) : at::ones({B, T}, frames.options().dtype(at::kBool));
  const Tensor zero = at::zeros({}, f32);
  const Tensor smax = scores.amax(1, true);  // the forward's shift (-inf past the lengths never wins)
  const Tensor p = at::where(valid, at::exp((scores - smax) * inv_tau - lse.unsqueeze(1)), zero).contiguous();
  const Tensor c = (p * g).sum(1, true);
  const Tensor ds = at::where(valid, dscores + p * (g - c) * inv_tau, zero).contiguous();
  Tensor dweight, dbias = ds.sum(1), dW1 = at::empty({0}, f32), db1 = at::empty({0}, f32), extra;
  if (mlp) {
    const Tensor ga = at::gelu(a_pre);
    const Tensor gprime = 0.5 * (1.0 + at::erf(a_pre * 0.70710678118654752)) +
                          a_pre * at::exp(-0.5 * a_pre * a_pre) * 0.39894228040143267794;
    const Tensor da = ds.unsqueeze(2) * weight.view({1, 1, H}) * gprime;  // 0 past each length
    dweight = at::bmm(ds.unsqueeze(1), ga).squeeze(1);
    db1 = da.sum(1);
    // Padded frames replaced (where, not a product: 0 * NaN = NaN) before the GEMM.
    dW1 = at::bmm(at::where(valid.unsqueeze(2), frames, at::zeros({}, frames.options())).transpose(1, 2).to(at::kFloat), da);
    extra = at::matmul(da, W1.t()).contiguous();
  }
  // Which top-k slot (if any) each frame fills; padded slots (-1) go to a spare column.
  Tensor slot = at::full({B, T + 1}, -1, frames.options().dtype(at::kInt));
  const Tensor sel = at::where(topk_idx.ge(0), topk_idx, at::full({}, T, topk_idx.options()));
  slot.scatter_(1, sel, at::arange(k, frames.options().dtype(at::kInt)).unsqueeze(0).expand({B, k}).contiguous());
  slot = slot.narrow(1, 0, T).contiguous();

  // 3. dframes (+ the linear scorer's dweight partials).
  constexpr int kFrameThreads = 128;
  const int64_t f_tiles = (F + kFrameThreads - 1) / kFrameThreads;
  int64_t t_split = std::min<int64_t>(std::max<int64_t>(1, (4 * sms + B * f_tiles - 1) / (B * f_tiles)), T);
  t_split = std::min<int64_t>(t_split, 65535);
  const int64_t t_chunk = (T + t_split - 1) / t_split;
  t_split = (T + t_chunk - 1) / t_chunk;
  Tensor dw_part = mlp ? Tensor() : at::empty({B, t_split, F}, f32);
  fs::BwdFramesParams fp{};
  fp.frames = frames.data_ptr();
  fp.ddense = ddense.data_ptr();
  fp.dtopk = dtopk.data_ptr();
  fp.weight = mlp ? nullptr : weight.data_ptr<float>();
  fp.p = p.data_ptr<float>();
  fp.ds = ds.data_ptr<float>();
  fp.slot = slot.data_ptr<int32_t>();
  fp.extra = mlp ? extra.data_ptr<float>() : nullptr;
  fp.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  fp.dframes = dframes.data_ptr();
  fp.dweight_part = mlp ? nullptr : dw_part.data_ptr<float>();
  fp.batch = B;
  fp.T = T;
  fp.F = F;
  fp.k = k;
  fp.t_chunk = t_chunk;
  fp.t_split = int(t_split);
  dispatch(st, [&](auto tag) {
    using T_ = decltype(tag);
    C10_CUDA_CHECK(fs::frame_score_bwd_frames_launch<T_>(fp, stream));
  });
  if (!mlp) dweight = dw_part.sum(1);
  return {dframes, dweight, dbias, dW1, db1};
}

}  // namespace

TORCH_LIBRARY_IMPL(mvpp, CUDA, m) {
  m.impl("frame_score_fwd", &frame_score_fwd_cuda);
  m.impl("frame_score_bwd", &frame_score_bwd_cuda);
}

}  // namespace cuda
}  // namespace mvpp
