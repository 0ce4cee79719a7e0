// CPU kernels of the memory bank's search ops: exact_search and cluster_lookup.
//
// Both are one "scan": a list of (query, slot) requests per key range, processed range-major so that
// each range's keys are read once per batch of queries and scored with one BLAS GEMM per
// (query chunk x key block) tile; the running top-k of every query is merged right after each tile
// (the tile is at most kQChunk x kKBlock scores, so no (q, n) score matrix ever exists). Each
// (query, slot, split) keeps its own top-k, and a final pass merges them per query. The order
// (score desc, id asc) is total, so the answer does not depend on the tiling or the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <vector>

#include "mvpp/topk_select.h"

extern "C" {
// Fortran BLAS, provided by the BLAS torch links (MKL on x86 wheels). Called directly, without a
// tensor per tile: cluster_lookup issues thousands of small GEMMs per batch.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}

namespace mvpp {
namespace {

constexpr int64_t kQChunk = 128;   // queries per tile
constexpr int64_t kKBlock = 1024;  // keys per tile

// S (nq x nk, row-major) = Q (nq x d, row-major) . K (nk x d, row-major)^T
inline void gemm_qkT(const float* Q, const float* K, float* S, int64_t nq, int64_t nk, int64_t d) {
  const char t = 'T', n = 'N';
  const int m_ = (int)nk, n_ = (int)nq, k_ = (int)d, ld = (int)d, ldc = (int)nk;
  const float one = 1.f, zero = 0.f;
  sgemm_(&t, &n, &m_, &n_, &k_, &one, K, &ld, Q, &ld, &zero, S, &ldc);
}
inline void gemm_qkT(const double* Q, const double* K, double* S, int64_t nq, int64_t nk, int64_t d) {
  const char t = 'T', n = 'N';
  const int m_ = (int)nk, n_ = (int)nq, k_ = (int)d, ld = (int)d, ldc = (int)nk;
  const double one = 1., zero = 0.;
  dgemm_(&t, &n, &m_, &n_, &k_, &one, K, &ld, Q, &ld, &zero, S, &ldc);
}

// Runs fn(item) for item in [0, n) on torch's intra-op threads with dynamic scheduling: work items
// (clusters) have very different sizes, and a static split would leave a thread idle.
template <typename F>
void parallel_dynamic(int64_t n, const F& fn) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
  });
}

// One unit of scan work: the queries qlist[0..nq) (rows of Qf) against keys [k0, k1) of `keys`, whose
// ids are ids[r] (or r itself when ids is null). Writes each query's top-k to out + qslot[i] * k.
template <typename scalar_t, typename acc_t>
void scan_range(const acc_t* Qf, int64_t d, const int64_t* qlist, const int64_t* qslot, int64_t nq,
                const scalar_t* keys, const int64_t* ids, int64_t k0, int64_t k1, const int64_t* exclude,
                int64_t k, acc_t* out_s, int64_t* out_i, std::vector<acc_t>& qbuf, std::vector<acc_t>& kbuf,
                std::vector<acc_t>& sbuf, std::vector<acc_t>& ts, std::vector<int64_t>& ti) {
  for (int64_t q0 = 0; q0 < nq; q0 += kQChunk) {
    const int64_t nqc = std::min(kQChunk, nq - q0);
    qbuf.resize(nqc * d);
    for (int64_t i = 0; i < nqc; ++i) std::memcpy(&qbuf[i * d], Qf + qlist[q0 + i] * d, d * sizeof(acc_t));
    ts.resize(nqc * k);
    ti.resize(nqc * k);
    for (int64_t i = 0; i < nqc; ++i) topk_init(&ts[i * k], &ti[i * k], (int)k);
    for (int64_t b0 = k0; b0 < k1; b0 += kKBlock) {
      const int64_t nb = std::min(kKBlock, k1 - b0);
      const acc_t* kp;
      if constexpr (std::is_same<scalar_t, acc_t>::value) {
        kp = keys + b0 * d;
      } else {
        kbuf.resize(nb * d);
        const scalar_t* src = keys + b0 * d;
        for (int64_t j = 0; j < nb * d; ++j) kbuf[j] = static_cast<acc_t>(src[j]);
        kp = kbuf.data();
      }
      sbuf.resize(nqc * nb);
      gemm_qkT(qbuf.data(), kp, sbuf.data(), nqc, nb, d);
      for (int64_t i = 0; i < nqc; ++i) {
        const int64_t query = qlist[q0 + i];
        const int64_t ex = exclude ? exclude[query] : -1;
        acc_t* s = &ts[i * k];
        int64_t* id = &ti[i * k];
        const acc_t* row = &sbuf[i * nb];
        for (int64_t j = 0; j < nb; ++j) {
          const acc_t v = row[j] + acc_t(0);  // -0 -> +0: the sign of zero never decides a tie
          if (v < s[k - 1]) continue;  // the common case: not in the running top-k
          const int64_t gid = ids ? ids[b0 + j] : b0 + j;
          if (gid == ex) continue;
          topk_insert(s, id, (int)k, v, gid);
        }
      }
    }
    for (int64_t i = 0; i < nqc; ++i) {
      std::memcpy(out_s + qslot[q0 + i] * k, &ts[i * k], k * sizeof(acc_t));
      std::memcpy(out_i + qslot[q0 + i] * k, &ti[i * k], k * sizeof(int64_t));
    }
  }
}

// Merges `ncand` candidate lists of length k per query (cand_s/cand_i: (q, ncand * k)) into (q, k).
template <typename acc_t>
void merge_candidates(const acc_t* cand_s, const int64_t* cand_i, int64_t q, int64_t ncand, int64_t k, acc_t* out_s,
                      int64_t* out_i) {
  at::parallel_for(0, q, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      acc_t* s = out_s + i * k;
      int64_t* id = out_i + i * k;
      topk_init(s, id, (int)k);
      const acc_t* cs = cand_s + i * ncand * k;
      const int64_t* ci = cand_i + i * ncand * k;
      for (int64_t j = 0; j < ncand * k; ++j) topk_insert(s, id, (int)k, cs[j], ci[j]);
      for (int64_t j = 0; j < k; ++j)
        if (id[j] == kNoId) id[j] = -1;
    }
  });
}

// A contiguous tensor's data in the accumulation type: the tensor's own memory when it already is
// (float32/float64: no copy, no parallel region), else a converted copy held in `buf`.
template <typename scalar_t, typename acc_t>
const acc_t* as_acc(const at::Tensor& t, std::vector<acc_t>& buf) {
  const scalar_t* p = t.data_ptr<scalar_t>();
  if constexpr (std::is_same<scalar_t, acc_t>::value) {
    return p;
  } else {
    const int64_t n = t.numel();
    buf.resize(n);
    at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) buf[i] = static_cast<acc_t>(p[i]);
    });
    return buf.data();
  }
}

void check_common(const at::Tensor& keys, const at::Tensor& queries, int64_t k) {
  TORCH_CHECK(keys.dim() == 2 && queries.dim() == 2 && keys.size(1) == queries.size(1),
              "mvpp: keys (n, d) and queries (q, d) must share d");
  TORCH_CHECK(keys.scalar_type() == queries.scalar_type(), "mvpp: queries must have keys' dtype");
  TORCH_CHECK(k >= 1, "mvpp: k must be >= 1");
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> exact_search_cpu(const at::Tensor& keys_, const at::Tensor& queries_, int64_t k,
                                                    const std::optional<at::Tensor>& exclude_) {
  check_common(keys_, queries_, k);
  const auto keys = keys_.contiguous();
  const auto queries = queries_.contiguous();
  const int64_t n = keys.size(0), d = keys.size(1), q = queries.size(0);
  at::Tensor exclude;
  if (exclude_.has_value()) exclude = exclude_->to(at::kLong).contiguous();
  auto out_s = at::empty({q, k}, keys.options().dtype(acc_type(keys.scalar_type())));
  auto out_i = at::empty({q, k}, keys.options().dtype(at::kLong));
  if (q == 0) return {out_s, out_i};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, keys.scalar_type(), "exact_search_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    std::vector<acc_t> qconv;
    const acc_t* Qf = as_acc<scalar_t, acc_t>(queries, qconv);
    // Split the keys too when there are few query chunks, so every thread has work.
    const int64_t nchunks = (q + kQChunk - 1) / kQChunk;
    const int64_t nblocks = (n + kKBlock - 1) / kKBlock;
    const int64_t nt = at::get_num_threads();
    const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(nblocks, (4 * nt + nchunks - 1) / nchunks));
    const int64_t per = ((nblocks + splits - 1) / splits) * kKBlock;
    std::vector<acc_t> cand_s(q * splits * k);
    std::vector<int64_t> cand_i(q * splits * k);
    std::vector<int64_t> qlist(q), qslot_all(q * splits);
    for (int64_t i = 0; i < q; ++i) qlist[i] = i;
    for (int64_t i = 0; i < q; ++i)
      for (int64_t s = 0; s < splits; ++s) qslot_all[s * q + i] = i * splits + s;
    const int64_t* ex = exclude.defined() ? exclude.data_ptr<int64_t>() : nullptr;
    const scalar_t* kp = keys.data_ptr<scalar_t>();
    parallel_dynamic(nchunks * splits, [&](int64_t w) {
      thread_local std::vector<acc_t> qbuf, kbuf, sbuf, ts;
      thread_local std::vector<int64_t> ti;
      const int64_t c = w / splits, s = w % splits;
      const int64_t q0 = c * kQChunk, nq = std::min(kQChunk, q - q0);
      const int64_t k0 = std::min(n, s * per), k1 = std::min(n, (s + 1) * per);
      if (k0 >= k1) {
        for (int64_t i = q0; i < q0 + nq; ++i) topk_init(&cand_s[(i * splits + s) * k], &cand_i[(i * splits + s) * k], (int)k);
        return;
      }
      scan_range<scalar_t, acc_t>(Qf, d, qlist.data() + q0, qslot_all.data() + s * q + q0, nq, kp, nullptr, k0,
                                  k1, ex, k, cand_s.data(), cand_i.data(), qbuf, kbuf, sbuf, ts, ti);
    });
    merge_candidates(cand_s.data(), cand_i.data(), q, splits, k, out_s.data_ptr<acc_t>(), out_i.data_ptr<int64_t>());
  });
  return {out_s, out_i};
}

// Top-p of `scores[0..n)` (indices into `idx` if given) under (score desc, index asc), into out.
template <typename acc_t>
int64_t select_top(const acc_t* scores, const int64_t* idx, int64_t n, int64_t p, int64_t* out,
                   std::vector<acc_t>& s_buf, std::vector<int64_t>& i_buf) {
  const int64_t kk = std::min(p, n);
  if (kk <= 0) return 0;
  s_buf.resize(kk);
  i_buf.resize(kk);
  topk_init(s_buf.data(), i_buf.data(), (int)kk);
  for (int64_t j = 0; j < n; ++j) topk_insert(s_buf.data(), i_buf.data(), (int)kk, scores[j] + acc_t(0), idx ? idx[j] : j);
  for (int64_t j = 0; j < kk; ++j) out[j] = i_buf[j];
  return kk;
}

std::tuple<at::Tensor, at::Tensor> cluster_lookup_cpu(const at::Tensor& queries_, const at::Tensor& coarse_,
                                                      const at::Tensor& coarse_off_, const at::Tensor& fine_,
                                                      const at::Tensor& fine_off_, const at::Tensor& mkeys_,
                                                      const at::Tensor& mids_, int64_t k, int64_t p1, int64_t p2,
                                                      const std::optional<at::Tensor>& exclude_) {
  check_common(mkeys_, queries_, k);
  TORCH_CHECK(p1 >= 1 && p2 >= 1, "mvpp::cluster_lookup: nprobe must be >= 1");
  const auto queries = queries_.contiguous();
  const auto mkeys = mkeys_.contiguous();
  const auto coarse_off = coarse_off_.to(at::kLong).contiguous();
  const auto fine_off = fine_off_.to(at::kLong).contiguous();
  const auto mids = mids_.to(at::kLong).contiguous();
  const int64_t q = queries.size(0), d = queries.size(1);
  const int64_t c1 = coarse_.size(0), cf = fine_.size(0);
  TORCH_CHECK(coarse_off.numel() == c1 + 1 && fine_off.numel() == cf + 1, "mvpp::cluster_lookup: bad offsets");
  at::Tensor exclude;
  if (exclude_.has_value()) exclude = exclude_->to(at::kLong).contiguous();
  const at::ScalarType at_acc = acc_type(mkeys.scalar_type());
  auto out_s = at::empty({q, k}, mkeys.options().dtype(at_acc));
  auto out_i = at::empty({q, k}, mkeys.options().dtype(at::kLong));
  if (q == 0) return {out_s, out_i};
  const int64_t P1 = std::min(p1, c1), P2 = std::min(p2, cf);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mkeys.scalar_type(), "cluster_lookup_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    const at::Tensor coarse = coarse_.to(mkeys.scalar_type()).contiguous();
    const at::Tensor fine = fine_.to(mkeys.scalar_type()).contiguous();
    std::vector<acc_t> qconv, cconv, fconv;
    const acc_t* Qf = as_acc<scalar_t, acc_t>(queries, qconv);
    const acc_t* Cf = as_acc<scalar_t, acc_t>(coarse, cconv);
    const acc_t* Ff = as_acc<scalar_t, acc_t>(fine, fconv);
    const int64_t* coff = coarse_off.data_ptr<int64_t>();
    const int64_t* foff = fine_off.data_ptr<int64_t>();
    const int64_t* ex_all = exclude.defined() ? exclude.data_ptr<int64_t>() : nullptr;
    const scalar_t* kp = mkeys.data_ptr<scalar_t>();
    const int64_t* ip = mids.data_ptr<int64_t>();
    // Queries in batches, so the (batch, P2, k) candidate lists stay bounded (~48 MB) for any q.
    const int64_t qb = std::max<int64_t>(256, (int64_t(1) << 22) / std::max<int64_t>(1, P2 * k));
    const int64_t qb_route = std::max<int64_t>(64, (int64_t(1) << 23) / std::max<int64_t>(1, cf));  // fine scores
    for (int64_t qa = 0; qa < q; qa += std::min(qb, qb_route)) {
      const int64_t qn = std::min(std::min(qb, qb_route), q - qa);
      const acc_t* Qb = Qf + qa * d;
      const int64_t* ex = ex_all ? ex_all + qa : nullptr;
      // Routing: (qn, P2) fine clusters per query, -1 where a query has fewer candidates. The centroid
      // scores of the whole batch come from two GEMMs (a per-query dot loop would not vectorise: float
      // reductions are not reassociated without -ffast-math).
      std::vector<acc_t> cs_all(qn * c1), fs_all(qn * cf);
      gemm_qkT(Qb, Cf, cs_all.data(), qn, c1, d);
      gemm_qkT(Qb, Ff, fs_all.data(), qn, cf, d);
      std::vector<int64_t> probes(qn * P2, -1);
      at::parallel_for(0, qn, 8, [&](int64_t b, int64_t e) {
        std::vector<acc_t> fs, sb;
        std::vector<int64_t> top_c(P1), child, ib;
        for (int64_t i = b; i < e; ++i) {
          const int64_t nc = select_top(&cs_all[i * c1], nullptr, c1, P1, top_c.data(), sb, ib);
          child.clear();
          for (int64_t j = 0; j < nc; ++j)
            for (int64_t f = coff[top_c[j]]; f < coff[top_c[j] + 1]; ++f) child.push_back(f);
          fs.resize(child.size());
          for (size_t j = 0; j < child.size(); ++j) fs[j] = fs_all[i * cf + child[j]];
          select_top(fs.data(), child.data(), (int64_t)child.size(), P2, &probes[i * P2], sb, ib);
        }
      });
      // Invert: per fine cluster, the (query, slot) pairs that probe it, in query order.
      std::vector<int64_t> cnt(cf + 1, 0);
      for (int64_t j = 0; j < qn * P2; ++j)
        if (probes[j] >= 0) ++cnt[probes[j] + 1];
      for (int64_t f = 0; f < cf; ++f) cnt[f + 1] += cnt[f];
      std::vector<int64_t> fill(cnt.begin(), cnt.end() - 1), qlist(cnt[cf]), qslot(cnt[cf]);
      for (int64_t j = 0; j < qn * P2; ++j)
        if (probes[j] >= 0) {
          const int64_t f = probes[j], pos = fill[f]++;
          qlist[pos] = j / P2;
          qslot[pos] = j;
        }
      std::vector<acc_t> cand_s(qn * P2 * k);
      std::vector<int64_t> cand_i(qn * P2 * k);
      for (int64_t j = 0; j < qn * P2; ++j)
        if (probes[j] < 0) topk_init(&cand_s[j * k], &cand_i[j * k], (int)k);
      // Work items: the probed fine clusters, largest (members x queries) first for load balance.
      std::vector<int64_t> work;
      for (int64_t f = 0; f < cf; ++f)
        if (cnt[f + 1] > cnt[f]) work.push_back(f);
      std::stable_sort(work.begin(), work.end(), [&](int64_t x, int64_t y) {
        return (foff[x + 1] - foff[x]) * (cnt[x + 1] - cnt[x]) > (foff[y + 1] - foff[y]) * (cnt[y + 1] - cnt[y]);
      });
      parallel_dynamic((int64_t)work.size(), [&](int64_t w) {
        thread_local std::vector<acc_t> qbuf, kbuf, sbuf, ts;
        thread_local std::vector<int64_t> ti;
        const int64_t f = work[w];
        const int64_t nq = cnt[f + 1] - cnt[f];
        if (foff[f + 1] <= foff[f]) {  // an empty cluster: its slots stay empty
          for (int64_t j = cnt[f]; j < cnt[f + 1]; ++j) topk_init(&cand_s[qslot[j] * k], &cand_i[qslot[j] * k], (int)k);
          return;
        }
        scan_range<scalar_t, acc_t>(Qb, d, qlist.data() + cnt[f], qslot.data() + cnt[f], nq, kp, ip, foff[f],
                                    foff[f + 1], ex, k, cand_s.data(), cand_i.data(), qbuf, kbuf, sbuf, ts, ti);
      });
      merge_candidates(cand_s.data(), cand_i.data(), qn, P2, k, out_s.data_ptr<acc_t>() + qa * k,
                       out_i.data_ptr<int64_t>() + qa * k);
    }
  });
  return {out_s, out_i};
}

}  // namespace

TORCH_LIBRARY_IMPL(mvpp, CPU, m) {
  m.impl("exact_search", &exact_search_cpu);
  m.impl("cluster_lookup", &cluster_lookup_cpu);
}

}  // namespace mvpp
