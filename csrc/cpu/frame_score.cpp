// frame_score on the CPU: scores, online-softmax pooled frame (dense) and running top-k in one pass
// over the frames, plus the backward. Schemas are defined in mvpp_kernels/_library.py.
//
// Forward: the batch's valid frames are cut into one equal share per thread (a share is a list of
// runs: consecutive frames of one video), so videos of different lengths still keep every core busy;
// each run keeps its own (max, denominator, weighted sum, top-k) and a cheap per-video merge combines
// them. Frames are read once from DRAM, in blocks of kBlockT rows: a block's scores are computed first
// (8 rows against the weight at a time, prefetching the rows ~48 KB ahead into L2), the running sum
// is rescaled at most once per block, and then the block's rows -- still in L1 -- are added into the
// weighted sum with the accumulator held in registers tile by tile. See docs/frame_score.md for the
// measurements behind these choices.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace mvpp {
namespace {

// Rows per block: scored, then added into the weighted sum while still in L1 (8 rows of F = 768 float32
// = 24 KB; 16 rows measured no different).
constexpr int64_t kBlockT = 8;
// Software prefetch distance (bytes) of the frames, into L2. The scorer walks 8 rows side by side: 8
// short streams that the hardware prefetcher only partly follows. Prefetching ~48 KB ahead took one
// thread from 15 to 21 GB/s at (16, 2048, 768) float32 (24-96 KB ahead measured alike; into L1 no gain).
constexpr int64_t kPrefetchBytes = 49152;
// Fewest valid frames per thread before the forward is split across threads.
constexpr int64_t kMinPieceT = 64;

template <typename acc_t>
inline acc_t gelu_exact(acc_t x) {
  return acc_t(0.5) * x * (acc_t(1) + std::erf(x * acc_t(0.70710678118654752440)));
}

template <typename acc_t>
inline acc_t gelu_exact_grad(acc_t x) {
  const acc_t cdf = acc_t(0.5) * (acc_t(1) + std::erf(x * acc_t(0.70710678118654752440)));
  const acc_t pdf = std::exp(acc_t(-0.5) * x * x) * acc_t(0.39894228040143267794);
  return cdf + x * pdf;
}

// (value, index) order of the top-k: higher score first, lower frame index first among equals.
template <typename acc_t>
inline bool beats(acc_t v, int64_t i, acc_t v2, int64_t i2) {
  return v > v2 || (v == v2 && i < i2);
}

// A small sorted list (best first). k is small next to T, so insertion is cheap and rare once full.
template <typename acc_t>
struct TopK {
  int64_t k = 0, n = 0;
  acc_t* val = nullptr;
  int64_t* idx = nullptr;
  void push(acc_t v, int64_t i) {
    if (n == k && !beats(v, i, val[k - 1], idx[k - 1])) return;
    int64_t pos = n < k ? n++ : k - 1;
    while (pos > 0 && beats(v, i, val[pos - 1], idx[pos - 1])) {
      val[pos] = val[pos - 1];
      idx[pos] = idx[pos - 1];
      --pos;
    }
    val[pos] = v;
    idx[pos] = i;
  }
};

// Lanes of the explicit partial sums below: wide enough for one AVX-512 (or two AVX2) registers of
// float, so a dot product runs as several independent FMA chains instead of one latency-bound chain.
constexpr int64_t kLanes = 16;

template <typename scalar_t, typename acc_t>
inline acc_t dot_row(const scalar_t* __restrict__ x, const acc_t* __restrict__ w, int64_t F) {
  acc_t a[kLanes] = {};
  int64_t f = 0;
  for (; f + kLanes <= F; f += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) a[j] += static_cast<acc_t>(x[f + j]) * w[f + j];
  }
  acc_t s = 0;
  for (int64_t j = 0; j < kLanes; ++j) s += a[j];
  for (; f < F; ++f) s += static_cast<acc_t>(x[f]) * w[f];
  return s;
}

// s = weight . gelu(W1^T x + b1) (MLP) or weight . x (linear); `a` is scratch of size H.
template <typename scalar_t, typename acc_t>
inline acc_t score_row(const scalar_t* __restrict__ x, const acc_t* __restrict__ w, const acc_t* __restrict__ W1,
                       const acc_t* __restrict__ b1, int64_t F, int64_t H, acc_t* __restrict__ a) {
  if (W1 == nullptr) return dot_row(x, w, F);
  for (int64_t h = 0; h < H; ++h) a[h] = b1[h];
  for (int64_t f = 0; f < F; ++f) {
    const acc_t xv = static_cast<acc_t>(x[f]);
    const acc_t* __restrict__ wrow = W1 + f * H;
#pragma omp simd
    for (int64_t h = 0; h < H; ++h) a[h] += xv * wrow[h];
  }
  acc_t s = 0;
  for (int64_t h = 0; h < H; ++h) s += w[h] * gelu_exact(a[h]);
  return s;
}

// ---- explicit SIMD helpers (GCC/Clang vector extensions: one 64-byte vector = one AVX-512 register,
// or two AVX2 registers where AVX-512 is absent; the compiler picks the ISA from -march). ----------
template <typename acc_t>
struct Vec {
  static constexpr int64_t W = 64 / sizeof(acc_t);
  typedef acc_t type __attribute__((vector_size(64)));
};

// Load W consecutive frame elements widened to the compute type (unaligned loads: rows are only
// element-aligned when F is not a multiple of the vector width).
template <typename scalar_t, typename acc_t>
inline typename Vec<acc_t>::type loadw(const scalar_t* p) {
  using vt = typename Vec<acc_t>::type;
  vt v;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    __builtin_memcpy(&v, p, sizeof(vt));
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    // bf16 is the top half of a float32: widen the 16-bit patterns and shift them into place.
    typedef uint16_t h16 __attribute__((vector_size(32)));
    typedef uint32_t w32 __attribute__((vector_size(64)));
    h16 h;
    __builtin_memcpy(&h, p, sizeof(h));
    const w32 wide = __builtin_convertvector(h, w32) << 16;
    __builtin_memcpy(&v, &wide, sizeof(v));
  } else {
    for (int64_t j = 0; j < Vec<acc_t>::W; ++j) v[j] = static_cast<acc_t>(p[j]);
  }
  return v;
}

template <typename acc_t>
inline acc_t hsum(typename Vec<acc_t>::type v) {
  acc_t s = 0;
  for (int64_t j = 0; j < Vec<acc_t>::W; ++j) s += v[j];
  return s;
}

// Scores of R consecutive rows against one weight vector: the weight is loaded once per R rows and the
// R accumulators are independent FMA chains (R = 8 hides the FMA latency on every current x86 core).
// `pf` is the prefetch distance in bytes.
template <int R, typename scalar_t, typename acc_t>
inline void dot_rows(const scalar_t* __restrict__ x, int64_t F, const acc_t* __restrict__ w, acc_t* out, int64_t pf) {
  using vt = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::W;
  vt a[R];
  for (int r = 0; r < R; ++r) a[r] = vt{};
  int64_t f = 0;
  for (; f + W <= F; f += W) {
    const vt wv = loadw<acc_t, acc_t>(w + f);
    // Integer address arithmetic: near the end of the frames the target lies past the tensor, which a
    // prefetch may name (it never faults) but a pointer may not.
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
      __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(x + r * F + f) + pf), 0, 2);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) a[r] += loadw<scalar_t, acc_t>(x + r * F + f) * wv;
  }
  for (int r = 0; r < R; ++r) {
    acc_t s = hsum<acc_t>(a[r]);
    for (int64_t g = f; g < F; ++g) s += static_cast<acc_t>(x[r * F + g]) * w[g];
    out[r] = s;
  }
}

// acc[0:F) = acc * scale + sum_r p[r] * x[r, 0:F) for the n rows of a block that is still in cache.
// The accumulator is walked in tiles of kTile vectors held in registers across all n rows, so it is
// loaded and stored once per block instead of once per row.
constexpr int kTile = 8;
template <typename scalar_t, typename acc_t>
inline void axpy_block(acc_t* __restrict__ acc, acc_t scale, const acc_t* __restrict__ p,
                       const scalar_t* __restrict__ x, int64_t n, int64_t F) {
  using vt = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::W;
  int64_t f = 0;
  for (; f + kTile * W <= F; f += kTile * W) {
    vt a[kTile];
#pragma GCC unroll 8
    for (int j = 0; j < kTile; ++j) a[j] = loadw<acc_t, acc_t>(acc + f + j * W) * scale;
    for (int64_t r = 0; r < n; ++r) {
      const acc_t pr = p[r];
      const scalar_t* __restrict__ xr = x + r * F + f;
#pragma GCC unroll 8
      for (int j = 0; j < kTile; ++j) a[j] += loadw<scalar_t, acc_t>(xr + j * W) * pr;
    }
#pragma GCC unroll 8
    for (int j = 0; j < kTile; ++j) __builtin_memcpy(acc + f + j * W, &a[j], sizeof(vt));
  }
  for (; f + W <= F; f += W) {
    vt a = loadw<acc_t, acc_t>(acc + f) * scale;
    for (int64_t r = 0; r < n; ++r) a += loadw<scalar_t, acc_t>(x + r * F + f) * p[r];
    __builtin_memcpy(acc + f, &a, sizeof(vt));
  }
  for (; f < F; ++f) {
    acc_t a = acc[f] * scale;
    for (int64_t r = 0; r < n; ++r) a += static_cast<acc_t>(x[r * F + f]) * p[r];
    acc[f] = a;
  }
}

// A run is the frames [t0, t1) of video b that one thread scores; a video is cut into several runs only
// where a thread's share of the batch's valid frames starts or ends.
struct Run {
  int64_t b, t0, t1;
};

struct RunPartial {
  double m, l;  // running max of s / temperature, and sum of exp(s / temperature - m)
  int64_t n_top;
};

template <typename scalar_t>
void frame_score_fwd_impl(const at::Tensor& frames, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                          const int64_t* len_ptr, const c10::optional<at::Tensor>& W1,
                          const c10::optional<at::Tensor>& b1, int64_t k, double temperature, at::Tensor& scores,
                          at::Tensor& dense, at::Tensor& topk_idx, at::Tensor& topk_frames, at::Tensor& lse) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t B = frames.size(0), T = frames.size(1), F = frames.size(2);
  const bool mlp = W1.has_value();
  const int64_t H = mlp ? W1->size(1) : 0;
  const scalar_t* X = frames.data_ptr<scalar_t>();
  const acc_t* w = weight.data_ptr<acc_t>();
  const acc_t* W1p = mlp ? W1->data_ptr<acc_t>() : nullptr;
  const acc_t* b1p = mlp ? b1->data_ptr<acc_t>() : nullptr;
  const acc_t bias_v = bias.has_value() ? bias->item<acc_t>() : acc_t(0);
  const acc_t inv_tau = acc_t(1.0 / temperature);
  acc_t* S = scores.data_ptr<acc_t>();
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const int64_t kk = std::min(k, T);  // no video has more than T candidates
  const int64_t pf = kPrefetchBytes;

  // Split the batch's valid frames evenly over the threads (videos have different lengths, so a split
  // by video would leave one thread idle while the other finishes the long ones).
  std::vector<int64_t> lens(B);
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) total += lens[b] = len_ptr ? len_ptr[b] : T;
  const int64_t pieces = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total / kMinPieceT));
  std::vector<Run> runs;
  std::vector<int64_t> piece_begin(pieces + 1), video_run(B + 1);
  {
    int64_t b = 0, t = 0, done = 0;
    for (int64_t p = 0; p < pieces; ++p) {
      piece_begin[p] = static_cast<int64_t>(runs.size());
      const int64_t stop = total * (p + 1) / pieces;
      while (done < stop) {
        while (t >= lens[b]) ++b, t = 0;
        const int64_t t1 = std::min(lens[b], t + (stop - done));
        runs.push_back(Run{b, t, t1});
        done += t1 - t;
        t = t1;
      }
    }
    piece_begin[pieces] = static_cast<int64_t>(runs.size());
    // Runs are in video order: video b owns runs [video_run[b], video_run[b + 1]).
    int64_t r = 0;
    for (int64_t v = 0; v <= B; ++v) {
      while (r < static_cast<int64_t>(runs.size()) && runs[r].b < v) ++r;
      video_run[v] = r;
    }
  }
  const int64_t n_runs = static_cast<int64_t>(runs.size());
  std::vector<acc_t> acc(n_runs * F);
  std::vector<RunPartial> part(n_runs);
  std::vector<acc_t> kval(n_runs * kk);
  std::vector<int64_t> kidx(n_runs * kk);

  at::parallel_for(0, pieces, 1, [&](int64_t pbegin, int64_t pend) {
    std::vector<acc_t> a(std::max<int64_t>(H, 1));
    for (int64_t r = piece_begin[pbegin]; r < piece_begin[pend]; ++r) {
      const Run run = runs[r];
      const scalar_t* Xb = X + run.b * T * F;
      acc_t* accp = acc.data() + r * F;
      std::fill(accp, accp + F, acc_t(0));
      TopK<acc_t> top{kk, 0, kval.data() + r * kk, kidx.data() + r * kk};
      acc_t m = neg_inf, l = 0;
      for (int64_t tb = run.t0; tb < run.t1; tb += kBlockT) {
        const int64_t n = std::min(run.t1, tb + kBlockT) - tb;
        const scalar_t* xb = Xb + tb * F;
        acc_t ss[kBlockT], ps[kBlockT];
        int64_t i = 0;
        if (W1p == nullptr) {
          for (; i + 8 <= n; i += 8) dot_rows<8>(xb + i * F, F, w, ss + i, pf);
          for (; i + 4 <= n; i += 4) dot_rows<4>(xb + i * F, F, w, ss + i, pf);
          for (; i < n; ++i) dot_rows<1>(xb + i * F, F, w, ss + i, pf);
        } else {
          for (; i < n; ++i) ss[i] = score_row(xb + i * F, w, W1p, b1p, F, H, a.data());
        }
        acc_t bmax = neg_inf;
        for (i = 0; i < n; ++i) {
          const acc_t s = ss[i] + bias_v;
          S[run.b * T + tb + i] = s;
          ps[i] = s * inv_tau;
          bmax = std::max(bmax, ps[i]);
          top.push(s, tb + i);
        }
        acc_t scale = 1;
        if (bmax > m) {
          if (l > 0) {
            scale = std::exp(m - bmax);
            l *= scale;
          }
          m = bmax;
        }
        for (i = 0; i < n; ++i) {
          ps[i] = std::exp(ps[i] - m);
          l += ps[i];
        }
        axpy_block(accp, scale, ps, xb, n, F);
      }
      part[r] = RunPartial{static_cast<double>(m), static_cast<double>(l), top.n};
    }
  });

  // Per-video merge of its runs' partial states (one run for most videos; at most pieces - 1 videos
  // have two or more). Cheap: a few F-vectors and k-lists per video.
  scalar_t* D = dense.data_ptr<scalar_t>();
  int64_t* I = topk_idx.data_ptr<int64_t>();
  scalar_t* G = topk_frames.data_ptr<scalar_t>();
  acc_t* LSE = lse.data_ptr<acc_t>();
  at::parallel_for(0, B, 8, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> cv(kk), sum(F);
    std::vector<int64_t> ci(kk);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t r0 = video_run[b], r1 = video_run[b + 1];
      std::fill(S + b * T + lens[b], S + (b + 1) * T, neg_inf);
      double M = -std::numeric_limits<double>::infinity();
      for (int64_t r = r0; r < r1; ++r)
        if (part[r].l > 0) M = std::max(M, part[r].m);
      double L = 0;
      std::fill(sum.begin(), sum.end(), acc_t(0));
      for (int64_t r = r0; r < r1; ++r) {
        if (!(part[r].l > 0)) continue;
        const acc_t scale = static_cast<acc_t>(std::exp(part[r].m - M));
        L += part[r].l * static_cast<double>(scale);
        const acc_t* accp = acc.data() + r * F;
#pragma omp simd
        for (int64_t f = 0; f < F; ++f) sum[f] += scale * accp[f];
      }
      const acc_t invL = L > 0 ? static_cast<acc_t>(1.0 / L) : acc_t(0);
      for (int64_t f = 0; f < F; ++f) D[b * F + f] = static_cast<scalar_t>(sum[f] * invL);
      LSE[b] = L > 0 ? static_cast<acc_t>(M + std::log(L)) : neg_inf;

      TopK<acc_t> top{kk, 0, cv.data(), ci.data()};
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t j = 0; j < part[r].n_top; ++j) top.push(kval[r * kk + j], kidx[r * kk + j]);
      for (int64_t j = 0; j < k; ++j) {
        scalar_t* g = G + (b * k + j) * F;
        if (j < top.n) {
          I[b * k + j] = ci[j];
          std::copy(X + (b * T + ci[j]) * F, X + (b * T + ci[j] + 1) * F, g);
        } else {
          I[b * k + j] = -1;
          std::fill(g, g + F, static_cast<scalar_t>(0));
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> frame_score_fwd_cpu(
    const at::Tensor& frames_in, const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias_in,
    const c10::optional<at::Tensor>& lengths_in, const c10::optional<at::Tensor>& W1_in,
    const c10::optional<at::Tensor>& b1_in, int64_t k, double temperature) {
  TORCH_CHECK(frames_in.dim() == 3, "frame_score_fwd: frames must be (batch, T, F)");
  TORCH_CHECK(k >= 1, "frame_score_fwd: k must be >= 1, got ", k);
  TORCH_CHECK(temperature > 0, "frame_score_fwd: temperature must be > 0, got ", temperature);
  TORCH_CHECK(W1_in.has_value() == b1_in.has_value(), "frame_score_fwd: W1 and b1 come together");
  const auto frames = frames_in.contiguous();
  const int64_t B = frames.size(0), T = frames.size(1), F = frames.size(2);
  const auto ct = frames.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto weight = weight_in.contiguous();
  TORCH_CHECK(weight.scalar_type() == ct, "frame_score_fwd: weight must be in the compute dtype ", ct);
  c10::optional<at::Tensor> W1, b1, bias, lengths;
  if (W1_in.has_value()) {
    W1 = W1_in->contiguous();
    b1 = b1_in->contiguous();
    TORCH_CHECK(W1->dim() == 2 && W1->size(0) == F && b1->numel() == W1->size(1) && weight.numel() == W1->size(1),
                "frame_score_fwd: W1 must be (F, H), b1 and weight (H,)");
    TORCH_CHECK(W1->scalar_type() == ct && b1->scalar_type() == ct, "frame_score_fwd: W1/b1 must be in the compute dtype");
  } else {
    TORCH_CHECK(weight.numel() == F, "frame_score_fwd: weight must have F = ", F, " elements");
  }
  if (bias_in.has_value()) {
    bias = bias_in->to(ct);
    TORCH_CHECK(bias->numel() == 1, "frame_score_fwd: bias must be a scalar");
  }
  if (lengths_in.has_value()) {
    lengths = lengths_in->to(at::kLong).contiguous();
    TORCH_CHECK(lengths->numel() == B, "frame_score_fwd: lengths must be (batch,)");
  }
  auto scores = at::empty({B, T}, frames.options().dtype(ct));
  auto dense = at::empty({B, F}, frames.options());
  auto topk_idx = at::empty({B, k}, frames.options().dtype(at::kLong));
  auto topk_frames = at::empty({B, k, F}, frames.options());
  auto lse = at::empty({B}, frames.options().dtype(ct));
  if (B == 0) return {scores, dense, topk_idx, topk_frames, lse};
  const int64_t* len_ptr = lengths.has_value() ? lengths->data_ptr<int64_t>() : nullptr;
  if (len_ptr)
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(len_ptr[b] >= 0 && len_ptr[b] <= T, "frame_score_fwd: lengths must lie in [0, T]");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, frames.scalar_type(), "frame_score_fwd_cpu", [&] {
    frame_score_fwd_impl<scalar_t>(frames, weight, bias, len_ptr, W1, b1, k, temperature, scores, dense, topk_idx,
                                   topk_frames, lse);
  });
  return {scores, dense, topk_idx, topk_frames, lse};
}

// Backward, per video (parallel over the batch):
//   p_t = exp(s_t / tau - lse),  g_t = ddense . f_t,  c = sum_t p_t g_t
//   ds_t = dscores_t + p_t (g_t - c) / tau                    (total gradient of the score)
//   df_t = p_t ddense + ds_t * ds/df_t + [t selected] dtopk_frames_j
// with ds/df_t = weight (linear) or W1 (weight * gelu'(a_t)) (MLP). Parameter gradients are per-video
// partials, summed in Python (deterministic).
template <typename scalar_t>
void frame_score_bwd_impl(const at::Tensor& dscores, const at::Tensor& ddense, const at::Tensor& dtopk,
                          const at::Tensor& frames, const at::Tensor& weight, const c10::optional<at::Tensor>& W1,
                          const c10::optional<at::Tensor>& b1, const int64_t* len_ptr, const at::Tensor& scores,
                          const at::Tensor& lse, const at::Tensor& topk_idx, double temperature, at::Tensor& dframes,
                          at::Tensor& dweight, at::Tensor& dbias, at::Tensor& dW1, at::Tensor& db1) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t B = frames.size(0), T = frames.size(1), F = frames.size(2);
  const int64_t k = topk_idx.size(1);
  const bool mlp = W1.has_value();
  const int64_t H = mlp ? W1->size(1) : 0;
  const scalar_t* X = frames.data_ptr<scalar_t>();
  const acc_t* w = weight.data_ptr<acc_t>();
  const acc_t* W1p = mlp ? W1->data_ptr<acc_t>() : nullptr;
  const acc_t* b1p = mlp ? b1->data_ptr<acc_t>() : nullptr;
  const acc_t* dS = dscores.data_ptr<acc_t>();
  const scalar_t* dD = ddense.data_ptr<scalar_t>();
  const scalar_t* dG = dtopk.data_ptr<scalar_t>();
  const acc_t* S = scores.data_ptr<acc_t>();
  const acc_t* LSE = lse.data_ptr<acc_t>();
  const int64_t* I = topk_idx.data_ptr<int64_t>();
  scalar_t* dX = dframes.data_ptr<scalar_t>();
  acc_t* dw = dweight.data_ptr<acc_t>();
  acc_t* db = dbias.data_ptr<acc_t>();
  acc_t* dW1p = mlp ? dW1.data_ptr<acc_t>() : nullptr;
  acc_t* db1p = mlp ? db1.data_ptr<acc_t>() : nullptr;
  const acc_t inv_tau = acc_t(1.0 / temperature);
  const int64_t wn = mlp ? H : F;

  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> dd(F), g(T), row(F), a(std::max<int64_t>(H, 1)), da(std::max<int64_t>(H, 1));
    for (int64_t b = begin; b < end; ++b) {
      const int64_t len = len_ptr ? len_ptr[b] : T;
      const scalar_t* Xb = X + b * T * F;
      scalar_t* dXb = dX + b * T * F;
      acc_t* dwb = dw + b * wn;
      std::fill(dwb, dwb + wn, acc_t(0));
      if (mlp) {
        std::fill(dW1p + b * F * H, dW1p + (b + 1) * F * H, acc_t(0));
        std::fill(db1p + b * H, db1p + (b + 1) * H, acc_t(0));
      }
      for (int64_t f = 0; f < F; ++f) dd[f] = static_cast<acc_t>(dD[b * F + f]);
      const acc_t lse_b = LSE[b];
      acc_t c = 0;
      for (int64_t t = 0; t < len; ++t) {
        g[t] = dot_row(Xb + t * F, dd.data(), F);
        c += std::exp(S[b * T + t] * inv_tau - lse_b) * g[t];
      }
      acc_t dbias_b = 0;
      for (int64_t t = 0; t < T; ++t) {
        scalar_t* out = dXb + t * F;
        if (t >= len) {
          std::fill(out, out + F, static_cast<scalar_t>(0));
          continue;
        }
        const scalar_t* x = Xb + t * F;
        const acc_t p = std::exp(S[b * T + t] * inv_tau - lse_b);
        const acc_t ds = dS[b * T + t] + p * (g[t] - c) * inv_tau;
        dbias_b += ds;
        if (!mlp) {
#pragma omp simd
          for (int64_t f = 0; f < F; ++f) {
            row[f] = p * dd[f] + ds * w[f];
            dwb[f] += ds * static_cast<acc_t>(x[f]);
          }
        } else {
          for (int64_t h = 0; h < H; ++h) a[h] = b1p[h];
          for (int64_t f = 0; f < F; ++f) {
            const acc_t xv = static_cast<acc_t>(x[f]);
            const acc_t* __restrict__ wrow = W1p + f * H;
#pragma omp simd
            for (int64_t h = 0; h < H; ++h) a[h] += xv * wrow[h];
          }
          for (int64_t h = 0; h < H; ++h) {
            dwb[h] += ds * gelu_exact(a[h]);
            da[h] = ds * w[h] * gelu_exact_grad(a[h]);
            db1p[b * H + h] += da[h];
          }
          acc_t* __restrict__ dW1b = dW1p + b * F * H;
          for (int64_t f = 0; f < F; ++f) {
            const acc_t xv = static_cast<acc_t>(x[f]);
            const acc_t* __restrict__ wrow = W1p + f * H;
            acc_t* __restrict__ drow = dW1b + f * H;
            acc_t s = 0;
#pragma omp simd reduction(+ : s)
            for (int64_t h = 0; h < H; ++h) {
              drow[h] += xv * da[h];
              s += wrow[h] * da[h];
            }
            row[f] = p * dd[f] + s;
          }
        }
        for (int64_t j = 0; j < k; ++j) {
          if (I[b * k + j] != t) continue;
          const scalar_t* gj = dG + (b * k + j) * F;
          for (int64_t f = 0; f < F; ++f) row[f] += static_cast<acc_t>(gj[f]);
        }
        for (int64_t f = 0; f < F; ++f) out[f] = static_cast<scalar_t>(row[f]);
      }
      db[b] = dbias_b;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> frame_score_bwd_cpu(
    const at::Tensor& dscores_in, const at::Tensor& ddense_in, const at::Tensor& dtopk_in, const at::Tensor& frames_in,
    const at::Tensor& weight_in, const c10::optional<at::Tensor>& W1_in, const c10::optional<at::Tensor>& b1_in,
    const c10::optional<at::Tensor>& lengths_in, const at::Tensor& scores_in, const at::Tensor& lse_in,
    const at::Tensor& topk_idx_in, double temperature) {
  const auto frames = frames_in.contiguous();
  const int64_t B = frames.size(0), T = frames.size(1), F = frames.size(2);
  const auto ct = frames.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(temperature > 0, "frame_score_bwd: temperature must be > 0");
  TORCH_CHECK(W1_in.has_value() == b1_in.has_value(), "frame_score_bwd: W1 and b1 come together");
  const auto weight = weight_in.to(ct).contiguous();
  c10::optional<at::Tensor> W1, b1, lengths;
  if (W1_in.has_value()) {
    W1 = W1_in->to(ct).contiguous();
    b1 = b1_in->to(ct).contiguous();
  }
  if (lengths_in.has_value()) lengths = lengths_in->to(at::kLong).contiguous();
  const auto dscores = dscores_in.to(ct).expand({B, T}).contiguous();
  const auto ddense = ddense_in.to(frames.scalar_type()).expand({B, F}).contiguous();
  const auto topk_idx = topk_idx_in.to(at::kLong).contiguous();
  const int64_t k = topk_idx.size(1);
  const auto dtopk = dtopk_in.to(frames.scalar_type()).expand({B, k, F}).contiguous();
  const auto scores = scores_in.to(ct).contiguous();
  const auto lse = lse_in.to(ct).contiguous();
  const bool mlp = W1.has_value();
  const int64_t H = mlp ? W1->size(1) : 0;
  auto dframes = at::empty({B, T, F}, frames.options());
  auto dweight = at::empty({B, mlp ? H : F}, frames.options().dtype(ct));
  auto dbias = at::empty({B}, frames.options().dtype(ct));
  const std::vector<int64_t> dW1_shape = mlp ? std::vector<int64_t>{B, F, H} : std::vector<int64_t>{0};
  const std::vector<int64_t> db1_shape = mlp ? std::vector<int64_t>{B, H} : std::vector<int64_t>{0};
  auto dW1 = at::empty(dW1_shape, frames.options().dtype(ct));
  auto db1 = at::empty(db1_shape, frames.options().dtype(ct));
  if (B == 0) return {dframes, dweight, dbias, dW1, db1};
  const int64_t* len_ptr = lengths.has_value() ? lengths->data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, frames.scalar_type(), "frame_score_bwd_cpu", [&] {
    frame_score_bwd_impl<scalar_t>(dscores, ddense, dtopk, frames, weight, W1, b1, len_ptr, scores, lse, topk_idx,
                                   temperature, dframes, dweight, dbias, dW1, db1);
  });
  return {dframes, dweight, dbias, dW1, db1};
}

}  // namespace

TORCH_LIBRARY_IMPL(mvpp, CPU, m) {
  m.impl("frame_score_fwd", &frame_score_fwd_cpu);
  m.impl("frame_score_bwd", &frame_score_bwd_cpu);
}

}  // namespace mvpp
