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
#ifdef __linux__
#include <sys/mman.h>
#endif
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

// (value, index) order of the top-k, torch.sort's (descending, stable): NaN above +inf above every
// other score, lower frame index first among equals (NaNs included; -0.0 ties with 0.0).
template <typename acc_t>
inline bool beats(acc_t v, int64_t i, acc_t v2, int64_t i2) {
  const bool n1 = std::isnan(v), n2 = std::isnan(v2);
  if (n1 || n2) return n1 && (!n2 || i < i2);
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

// A run is the frames [t0, t1) of video b that one thread processes; a video is cut into several runs
// only where a thread's share of the batch's valid frames starts or ends.
struct Run {
  int64_t b, t0, t1;
};

struct RunPartial {
  // Running max m of the scores (score units: (s - m) / temperature never overflows where the float64
  // softmax is finite), l = sum of exp((s - m) / temperature), and `bad`: a NaN or +inf score was seen
  // (the video's dense output is then NaN: docs/frame_score.md, "Non-finite inputs").
  double m, l;
  int64_t n_top;
  bool bad;
};

// The batch's valid frames cut into one equal share ("piece") per thread (videos have different
// lengths, so a split by video would leave one thread idle while another finishes the long ones).
// Piece p owns runs [piece_begin[p], piece_begin[p + 1]); the runs are in video order and video b
// owns runs [video_run[b], video_run[b + 1]) (none when its length is 0).
struct WorkSplit {
  std::vector<int64_t> lens;
  std::vector<Run> runs;
  std::vector<int64_t> piece_begin, video_run;
  int64_t pieces = 1;
};

inline WorkSplit split_valid_frames(const int64_t* len_ptr, int64_t B, int64_t T) {
  WorkSplit w;
  w.lens.resize(B);
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) total += w.lens[b] = len_ptr ? len_ptr[b] : T;
  w.pieces = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total / kMinPieceT));
  w.piece_begin.resize(w.pieces + 1);
  w.video_run.resize(B + 1);
  int64_t b = 0, t = 0, done = 0;
  for (int64_t p = 0; p < w.pieces; ++p) {
    w.piece_begin[p] = static_cast<int64_t>(w.runs.size());
    const int64_t stop = total * (p + 1) / w.pieces;
    while (done < stop) {
      while (t >= w.lens[b]) ++b, t = 0;
      const int64_t t1 = std::min(w.lens[b], t + (stop - done));
      w.runs.push_back(Run{b, t, t1});
      done += t1 - t;
      t = t1;
    }
  }
  w.piece_begin[w.pieces] = static_cast<int64_t>(w.runs.size());
  int64_t r = 0;
  for (int64_t v = 0; v <= B; ++v) {
    while (r < static_cast<int64_t>(w.runs.size()) && w.runs[r].b < v) ++r;
    w.video_run[v] = r;
  }
  return w;
}

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

  const WorkSplit split = split_valid_frames(len_ptr, B, T);
  const std::vector<Run>& runs = split.runs;
  const std::vector<int64_t>& lens = split.lens;
  const std::vector<int64_t>& piece_begin = split.piece_begin;
  const std::vector<int64_t>& video_run = split.video_run;
  const int64_t pieces = split.pieces;
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
      // accp holds the running weighted *mean* sum_t p_t f_t / l (not the unnormalised sum, which can
      // overflow float32: e.g. 20 equal frames of 3e37), rescaled by l_old * scale / l_new per block.
      acc_t m = neg_inf, l = 0;
      bool bad = false;
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
          ps[i] = s;
          bad |= !(s < std::numeric_limits<acc_t>::infinity());  // NaN or +inf
          bmax = std::max(bmax, s);
          top.push(s, tb + i);
        }
        if (bad) continue;  // the video's dense is NaN whatever follows; its scores and top-k still count
        acc_t scale = 1;
        if (bmax > m) {
          if (l > 0) scale = std::exp((m - bmax) * inv_tau);
          m = bmax;
        }
        // While every score is -inf the weights are 0 (exp(-inf - -inf) would be NaN); such frames are
        // still added with weight 0, so their non-finite features give NaN as in torch's sum_t p_t f_t.
        acc_t lb = 0;
        for (i = 0; i < n; ++i) {
          ps[i] = m == neg_inf ? acc_t(0) : std::exp((ps[i] - m) * inv_tau);
          lb += ps[i];
        }
        const acc_t l_new = l * scale + lb, inv_l = l_new > 0 ? acc_t(1) / l_new : acc_t(0);
        for (i = 0; i < n; ++i) ps[i] *= inv_l;
        axpy_block(accp, l_new > 0 ? l * scale * inv_l : acc_t(1), ps, xb, n, F);
        l = l_new;
      }
      part[r] = RunPartial{static_cast<double>(m), static_cast<double>(l), top.n, bad};
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
      bool bad = false;
      for (int64_t r = r0; r < r1; ++r) {
        bad |= part[r].bad;
        if (part[r].l > 0) M = std::max(M, part[r].m);
      }
      double L = 0;
      for (int64_t r = r0; r < r1; ++r)
        if (part[r].l > 0) L += part[r].l * std::exp((part[r].m - M) * static_cast<double>(inv_tau));
      // Poisoned (NaN dense, NaN lse): a NaN or +inf valid score, or valid frames whose scores are all
      // -inf -- torch.softmax's non-finite behaviour. A length-0 video: dense 0, lse -inf.
      bad |= lens[b] > 0 && !(L > 0);
      std::fill(sum.begin(), sum.end(), acc_t(0));
      for (int64_t r = r0; r < r1 && !bad; ++r) {
        if (!(part[r].l > 0)) continue;
        // Each run's accumulator is its weighted mean; its share of the video is l_r e^((m_r - M)/tau) / L.
        const acc_t w_r = static_cast<acc_t>(part[r].l * std::exp((part[r].m - M) * static_cast<double>(inv_tau)) / L);
        const acc_t* accp = acc.data() + r * F;
#pragma omp simd
        for (int64_t f = 0; f < F; ++f) sum[f] += w_r * accp[f];
      }
      const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
      for (int64_t f = 0; f < F; ++f) D[b * F + f] = static_cast<scalar_t>(bad ? nan : sum[f]);
      // lse = log sum_t exp((s_t - max s) / tau): p_t = exp((s_t - max s) / tau - lse) in the backward,
      // with max s taken again from the scores (no overflow of s / tau).
      LSE[b] = bad ? nan : L > 0 ? static_cast<acc_t>(std::log(L)) : neg_inf;

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

// dframes is as large as frames and freshly allocated on every backward: the allocator maps new pages,
// and first-touching them 4 KB at a time costs more than the arithmetic (measured on the 2-core dev VM:
// 40-57 ms to allocate and fill 100 MB vs 3-4 ms to refill it). Asking for transparent huge pages on a
// large buffer (honoured when THP is in "madvise" or "always" mode; a harmless hint otherwise) cuts the
// page faults 512-fold: the backward at (16, 2048, 768) float32 went from ~65 to ~42 ms on one thread.
inline void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (bytes >= (size_t(16) << 20) && hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// Store W computed values into frames' dtype (bf16/fp16 round to nearest even through c10's casts).
template <typename scalar_t, typename acc_t>
inline void storew(scalar_t* p, typename Vec<acc_t>::type v) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    __builtin_memcpy(p, &v, sizeof(v));
  } else {
    for (int64_t j = 0; j < Vec<acc_t>::W; ++j) p[j] = static_cast<scalar_t>(v[j]);
  }
}

// Backward:
//   p_t = exp((s_t - max s) / tau - lse),  g_t = ddense . f_t,  c = sum_t p_t g_t
//   ds_t = dscores_t + p_t (g_t - c) / tau                    (total gradient of the score)
//   df_t = p_t ddense + ds_t * ds/df_t + [t selected] dtopk_frames_j
// with ds/df_t = weight (linear) or W1 (weight * gelu'(a_t)) (MLP). Two sweeps over the valid frames,
// both split like the forward (equal shares of valid frames per thread): g_t and per-run parts of c,
// then dframes and the parameter partials; padded rows of dframes are zero-filled per video.
// Parameter gradients are per-video partials, summed in Python (deterministic): a video's first run
// writes its video's slot, a continuation run (at most one per thread boundary) its own buffer, added
// to the video's slot in run order afterwards.
template <typename scalar_t>
void frame_score_bwd_impl(const at::Tensor& dscores, const at::Tensor& ddense, const at::Tensor& dtopk,
                          const at::Tensor& frames, const at::Tensor& weight, const c10::optional<at::Tensor>& W1,
                          const c10::optional<at::Tensor>& b1, const int64_t* len_ptr, const at::Tensor& scores,
                          const at::Tensor& lse, const at::Tensor& topk_idx, double temperature, at::Tensor& dframes,
                          at::Tensor& dweight, at::Tensor& dbias, at::Tensor& dW1, at::Tensor& db1) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  using vt = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::W;
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
  const int64_t pf = kPrefetchBytes;

  const WorkSplit split = split_valid_frames(len_ptr, B, T);
  const std::vector<Run>& runs = split.runs;
  const int64_t n_runs = static_cast<int64_t>(runs.size());

  std::vector<acc_t> dd(B * F);
  for (int64_t i = 0; i < B * F; ++i) dd[i] = static_cast<acc_t>(dD[i]);
  // Which top-k slot (if any) selected frame t of video b: -1 or j.
  std::vector<int32_t> sel(B * T, -1);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < k; ++j) {
      const int64_t t = I[b * k + j];
      if (t >= 0 && t < split.lens[b]) sel[b * T + t] = static_cast<int32_t>(j);
    }

  // The forward's softmax shift: the max of each video's valid scores (NaN if any is NaN; a poisoned
  // video's lse is NaN anyway, so every p_t of it is NaN, as in the reference's autograd).
  std::vector<acc_t> smax(B, -std::numeric_limits<acc_t>::infinity());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < split.lens[b]; ++t) {
      const acc_t v = S[b * T + t];
      if (std::isnan(v) || v > smax[b]) smax[b] = v;
      if (std::isnan(v)) break;
    }

  // Sweep 1: g_t and each run's part of c.
  std::vector<acc_t> g(B * T);
  std::vector<double> c_run(n_runs);
  at::parallel_for(0, split.pieces, 1, [&](int64_t pbegin, int64_t pend) {
    for (int64_t r = split.piece_begin[pbegin]; r < split.piece_begin[pend]; ++r) {
      const Run run = runs[r];
      const scalar_t* Xb = X + run.b * T * F;
      const acc_t* ddb = dd.data() + run.b * F;
      acc_t* gb = g.data() + run.b * T;
      int64_t t = run.t0;
      for (; t + 8 <= run.t1; t += 8) dot_rows<8>(Xb + t * F, F, ddb, gb + t, pf);
      for (; t < run.t1; ++t) dot_rows<1>(Xb + t * F, F, ddb, gb + t, pf);
      const acc_t lse_b = LSE[run.b], smax_b = smax[run.b];
      acc_t c = 0;
      for (t = run.t0; t < run.t1; ++t) c += std::exp((S[run.b * T + t] - smax_b) * inv_tau - lse_b) * gb[t];
      c_run[r] = static_cast<double>(c);
    }
  });
  std::vector<acc_t> c_video(B, acc_t(0));
  for (int64_t b = 0; b < B; ++b) {
    double c = 0;
    for (int64_t r = split.video_run[b]; r < split.video_run[b + 1]; ++r) c += c_run[r];
    c_video[b] = static_cast<acc_t>(c);
  }

  // Parameter-partial slots: the video's own for its first run, an extra buffer for later runs.
  std::vector<int64_t> extra_of(n_runs, -1);
  int64_t n_extra = 0;
  for (int64_t r = 0; r < n_runs; ++r)
    if (r != split.video_run[runs[r].b]) extra_of[r] = n_extra++;
  std::vector<acc_t> x_dw(n_extra * wn), x_db(n_extra), x_dW1(mlp ? n_extra * F * H : 0), x_db1(mlp ? n_extra * H : 0);

  // Sweep 2: dframes rows and the parameter partials.
  at::parallel_for(0, split.pieces, 1, [&](int64_t pbegin, int64_t pend) {
    std::vector<acc_t> row(F), a(std::max<int64_t>(H, 1)), da(std::max<int64_t>(H, 1));
    for (int64_t r = split.piece_begin[pbegin]; r < split.piece_begin[pend]; ++r) {
      const Run run = runs[r];
      const int64_t b = run.b, e = extra_of[r];
      acc_t* dwr = e < 0 ? dw + b * wn : x_dw.data() + e * wn;
      acc_t* dbr = e < 0 ? db + b : x_db.data() + e;
      acc_t* dW1r = !mlp ? nullptr : e < 0 ? dW1p + b * F * H : x_dW1.data() + e * F * H;
      acc_t* db1r = !mlp ? nullptr : e < 0 ? db1p + b * H : x_db1.data() + e * H;
      std::fill(dwr, dwr + wn, acc_t(0));
      if (mlp) {
        std::fill(dW1r, dW1r + F * H, acc_t(0));
        std::fill(db1r, db1r + H, acc_t(0));
      }
      const scalar_t* Xb = X + b * T * F;
      scalar_t* dXb = dX + b * T * F;
      const acc_t* ddb = dd.data() + b * F;
      const acc_t* gb = g.data() + b * T;
      const int32_t* selb = sel.data() + b * T;
      const acc_t lse_b = LSE[b], c = c_video[b], smax_b = smax[b];
      acc_t dbias_r = 0;
      for (int64_t tb = run.t0; tb < run.t1; tb += kBlockT) {
        const int64_t n = std::min(run.t1, tb + kBlockT) - tb;
        acc_t ps[kBlockT], dss[kBlockT];
        const scalar_t* gsel[kBlockT];
        for (int64_t i = 0; i < n; ++i) {
          const int64_t t = tb + i;
          ps[i] = std::exp((S[b * T + t] - smax_b) * inv_tau - lse_b);
          dss[i] = dS[b * T + t] + ps[i] * (gb[t] - c) * inv_tau;
          dbias_r += dss[i];
          gsel[i] = selb[t] >= 0 ? dG + (b * k + selb[t]) * F : nullptr;
        }
        if (!mlp) {
          // Row t of dframes = p_t ddense + ds_t weight (+ dtopk_j); dweight += ds_t f_t, with the
          // dweight tile held in registers across the block's rows.
          const scalar_t* xb = Xb + tb * F;
          scalar_t* ob = dXb + tb * F;
          int64_t f = 0;
          for (; f + kTile * W <= F; f += kTile * W) {
            vt acc[kTile], ddv[kTile], wv[kTile];
#pragma GCC unroll 8
            for (int j = 0; j < kTile; ++j) {
              acc[j] = loadw<acc_t, acc_t>(dwr + f + j * W);
              ddv[j] = loadw<acc_t, acc_t>(ddb + f + j * W);
              wv[j] = loadw<acc_t, acc_t>(w + f + j * W);
            }
            for (int64_t i = 0; i < n; ++i) {
              const scalar_t* xr = xb + i * F + f;
              scalar_t* orow = ob + i * F + f;
#pragma GCC unroll 8
              for (int j = 0; j < kTile; ++j) {
                acc[j] += loadw<scalar_t, acc_t>(xr + j * W) * dss[i];
                vt o = ddv[j] * ps[i] + wv[j] * dss[i];
                if (gsel[i] != nullptr) o += loadw<scalar_t, acc_t>(gsel[i] + f + j * W);
                storew<scalar_t, acc_t>(orow + j * W, o);
              }
            }
#pragma GCC unroll 8
            for (int j = 0; j < kTile; ++j) __builtin_memcpy(dwr + f + j * W, &acc[j], sizeof(vt));
          }
          for (; f < F; ++f) {
            acc_t accf = dwr[f];
            for (int64_t i = 0; i < n; ++i) {
              accf += static_cast<acc_t>(xb[i * F + f]) * dss[i];
              acc_t o = ddb[f] * ps[i] + w[f] * dss[i];
              if (gsel[i] != nullptr) o += static_cast<acc_t>(gsel[i][f]);
              ob[i * F + f] = static_cast<scalar_t>(o);
            }
            dwr[f] = accf;
          }
          continue;
        }
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t* x = Xb + (tb + i) * F;
          const acc_t ds = dss[i], p = ps[i];
          for (int64_t h = 0; h < H; ++h) a[h] = b1p[h];
          for (int64_t f = 0; f < F; ++f) {
            const acc_t xv = static_cast<acc_t>(x[f]);
            const acc_t* __restrict__ wrow = W1p + f * H;
#pragma omp simd
            for (int64_t h = 0; h < H; ++h) a[h] += xv * wrow[h];
          }
          for (int64_t h = 0; h < H; ++h) {
            dwr[h] += ds * gelu_exact(a[h]);
            da[h] = ds * w[h] * gelu_exact_grad(a[h]);
            db1r[h] += da[h];
          }
          for (int64_t f = 0; f < F; ++f) {
            const acc_t xv = static_cast<acc_t>(x[f]);
            const acc_t* __restrict__ wrow = W1p + f * H;
            acc_t* __restrict__ drow = dW1r + f * H;
            acc_t s = 0;
#pragma omp simd reduction(+ : s)
            for (int64_t h = 0; h < H; ++h) {
              drow[h] += xv * da[h];
              s += wrow[h] * da[h];
            }
            row[f] = p * ddb[f] + s;
          }
          if (gsel[i] != nullptr)
            for (int64_t f = 0; f < F; ++f) row[f] += static_cast<acc_t>(gsel[i][f]);
          scalar_t* out = dXb + (tb + i) * F;
          for (int64_t f = 0; f < F; ++f) out[f] = static_cast<scalar_t>(row[f]);
        }
      }
      *dbr = dbias_r;
    }
  });

  // Padded rows of dframes, and the partial slots of videos with no valid frame (no run wrote them).
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      std::fill(dX + (b * T + split.lens[b]) * F, dX + (b + 1) * T * F, static_cast<scalar_t>(0));
      if (split.video_run[b] == split.video_run[b + 1]) {
        std::fill(dw + b * wn, dw + (b + 1) * wn, acc_t(0));
        db[b] = 0;
        if (mlp) {
          std::fill(dW1p + b * F * H, dW1p + (b + 1) * F * H, acc_t(0));
          std::fill(db1p + b * H, db1p + (b + 1) * H, acc_t(0));
        }
      }
    }
  });
  // Continuation runs into their video's slot, in run order (deterministic for a given thread count).
  for (int64_t r = 0; r < n_runs; ++r) {
    const int64_t e = extra_of[r], b = runs[r].b;
    if (e < 0) continue;
    for (int64_t i = 0; i < wn; ++i) dw[b * wn + i] += x_dw[e * wn + i];
    db[b] += x_db[e];
    if (mlp) {
      for (int64_t i = 0; i < F * H; ++i) dW1p[b * F * H + i] += x_dW1[e * F * H + i];
      for (int64_t i = 0; i < H; ++i) db1p[b * H + i] += x_db1[e * H + i];
    }
  }
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
  advise_huge_pages(dframes.data_ptr(), dframes.nbytes());
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
