// frame_score on the CPU: scores, online-softmax pooled frame (dense) and running top-k in one pass
// over the frames, plus the backward. Schemas are defined in mvpp_kernels/_library.py.
//
// Forward work is split into (video, chunk of frames) items run by at::parallel_for, so a small
// batch still uses every core; each item keeps its own (max, denominator, weighted sum, top-k) and a
// cheap per-video merge combines them. Frames are read once, in blocks of kBlockT rows: a block's
// scores are computed first (so the running max is rescaled once per block, not once per frame),
// then its rows -- still in L1/L2 -- are added into the weighted sum.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace mvpp {
namespace {

constexpr int64_t kBlockT = 16;
// Frames per work item when a video is split across threads: large enough that the per-item
// partial (F floats) is small next to the frames it summarises.
constexpr int64_t kMinChunkT = 256;

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

// Four rows against one vector: w is loaded once for four independent accumulator chains.
template <typename scalar_t, typename acc_t>
inline void dot_rows4(const scalar_t* __restrict__ x, int64_t F, const acc_t* __restrict__ w, acc_t* out) {
  const scalar_t* __restrict__ x0 = x;
  const scalar_t* __restrict__ x1 = x + F;
  const scalar_t* __restrict__ x2 = x + 2 * F;
  const scalar_t* __restrict__ x3 = x + 3 * F;
  acc_t a0[kLanes] = {}, a1[kLanes] = {}, a2[kLanes] = {}, a3[kLanes] = {};
  int64_t f = 0;
  for (; f + kLanes <= F; f += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {
      const acc_t wj = w[f + j];
      a0[j] += static_cast<acc_t>(x0[f + j]) * wj;
      a1[j] += static_cast<acc_t>(x1[f + j]) * wj;
      a2[j] += static_cast<acc_t>(x2[f + j]) * wj;
      a3[j] += static_cast<acc_t>(x3[f + j]) * wj;
    }
  }
  acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (int64_t j = 0; j < kLanes; ++j) {
    s0 += a0[j];
    s1 += a1[j];
    s2 += a2[j];
    s3 += a3[j];
  }
  for (; f < F; ++f) {
    const acc_t wj = w[f];
    s0 += static_cast<acc_t>(x0[f]) * wj;
    s1 += static_cast<acc_t>(x1[f]) * wj;
    s2 += static_cast<acc_t>(x2[f]) * wj;
    s3 += static_cast<acc_t>(x3[f]) * wj;
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
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

struct Partial {
  double m, l;  // running max of s / temperature, and sum of exp(s / temperature - m)
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

  const int64_t threads = at::get_num_threads();
  int64_t n_split = 1;
  if (B < 2 * threads) n_split = std::max<int64_t>(1, std::min<int64_t>((2 * threads + B - 1) / B, T / kMinChunkT));
  const int64_t chunk = (T + n_split - 1) / n_split;
  const int64_t items = B * n_split;
  std::vector<acc_t> acc(items * F);
  std::vector<Partial> part(items);
  std::vector<acc_t> kval(items * k);
  std::vector<int64_t> kidx(items * k);
  std::vector<int64_t> kcount(items);

  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> a(std::max<int64_t>(H, 1));
    acc_t zs[kBlockT];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / n_split, sp = item % n_split;
      const int64_t len = len_ptr ? len_ptr[b] : T;
      const int64_t t0 = sp * chunk, t1 = std::min(T, t0 + chunk);
      const scalar_t* Xb = X + b * T * F;
      acc_t* accp = acc.data() + item * F;
      std::fill(accp, accp + F, acc_t(0));
      TopK<acc_t> top{k, 0, kval.data() + item * k, kidx.data() + item * k};
      acc_t m = neg_inf, l = 0;
      const int64_t v1 = std::min(t1, len);
      for (int64_t tb = t0; tb < v1; tb += kBlockT) {
        const int64_t te = std::min(v1, tb + kBlockT);
        acc_t bmax = neg_inf;
        acc_t ss[kBlockT];
        int64_t t = tb;
        if (W1p == nullptr)
          for (; t + 4 <= te; t += 4) dot_rows4(Xb + t * F, F, w, ss + (t - tb));
        for (; t < te; ++t) ss[t - tb] = score_row(Xb + t * F, w, W1p, b1p, F, H, a.data());
        for (t = tb; t < te; ++t) {
          const acc_t s = ss[t - tb] + bias_v;
          S[b * T + t] = s;
          zs[t - tb] = s * inv_tau;
          bmax = std::max(bmax, zs[t - tb]);
          top.push(s, t);
        }
        if (bmax > m) {
          if (l > 0) {
            const acc_t scale = std::exp(m - bmax);
            l *= scale;
#pragma omp simd
            for (int64_t f = 0; f < F; ++f) accp[f] *= scale;
          }
          m = bmax;
        }
        acc_t ps[kBlockT];
        for (t = tb; t < te; ++t) {
          ps[t - tb] = std::exp(zs[t - tb] - m);
          l += ps[t - tb];
        }
        // Four rows per sweep over the accumulator: a quarter of its loads/stores.
        for (t = tb; t + 4 <= te; t += 4) {
          const scalar_t* __restrict__ x0 = Xb + t * F;
          const scalar_t* __restrict__ x1 = x0 + F;
          const scalar_t* __restrict__ x2 = x0 + 2 * F;
          const scalar_t* __restrict__ x3 = x0 + 3 * F;
          const acc_t p0 = ps[t - tb], p1 = ps[t - tb + 1], p2 = ps[t - tb + 2], p3 = ps[t - tb + 3];
#pragma omp simd
          for (int64_t f = 0; f < F; ++f)
            accp[f] += p0 * static_cast<acc_t>(x0[f]) + p1 * static_cast<acc_t>(x1[f]) +
                       p2 * static_cast<acc_t>(x2[f]) + p3 * static_cast<acc_t>(x3[f]);
        }
        for (; t < te; ++t) {
          const acc_t p = ps[t - tb];
          const scalar_t* __restrict__ x = Xb + t * F;
#pragma omp simd
          for (int64_t f = 0; f < F; ++f) accp[f] += p * static_cast<acc_t>(x[f]);
        }
      }
      for (int64_t t = std::max(t0, len); t < t1; ++t) S[b * T + t] = neg_inf;
      part[item] = Partial{static_cast<double>(m), static_cast<double>(l)};
      kcount[item] = top.n;
    }
  });

  // Per-video merge of the items' partial states (cheap: n_split * (F + k) values per video).
  scalar_t* D = dense.data_ptr<scalar_t>();
  int64_t* I = topk_idx.data_ptr<int64_t>();
  scalar_t* G = topk_frames.data_ptr<scalar_t>();
  acc_t* LSE = lse.data_ptr<acc_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> cv(k), sum(F);
    std::vector<int64_t> ci(k);
    for (int64_t b = begin; b < end; ++b) {
      double M = -std::numeric_limits<double>::infinity();
      for (int64_t sp = 0; sp < n_split; ++sp)
        if (part[b * n_split + sp].l > 0) M = std::max(M, part[b * n_split + sp].m);
      double L = 0;
      std::fill(sum.begin(), sum.end(), acc_t(0));
      for (int64_t sp = 0; sp < n_split; ++sp) {
        const Partial& pp = part[b * n_split + sp];
        if (!(pp.l > 0)) continue;
        const acc_t scale = static_cast<acc_t>(std::exp(pp.m - M));
        L += pp.l * static_cast<double>(scale);
        const acc_t* accp = acc.data() + (b * n_split + sp) * F;
#pragma omp simd
        for (int64_t f = 0; f < F; ++f) sum[f] += scale * accp[f];
      }
      const acc_t invL = L > 0 ? static_cast<acc_t>(1.0 / L) : acc_t(0);
      for (int64_t f = 0; f < F; ++f) D[b * F + f] = static_cast<scalar_t>(sum[f] * invL);
      LSE[b] = L > 0 ? static_cast<acc_t>(M + std::log(L)) : neg_inf;

      TopK<acc_t> top{k, 0, cv.data(), ci.data()};
      for (int64_t sp = 0; sp < n_split; ++sp) {
        const int64_t item = b * n_split + sp;
        for (int64_t j = 0; j < kcount[item]; ++j) top.push(kval[item * k + j], kidx[item * k + j]);
      }
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
