// CPU kernels of the memory bank's search ops: exact_search and cluster_lookup.
//
// exact_search: the keys in ranges, each range read once per chunk of queries and scored with one BLAS
// GEMM per (query chunk x key block) tile; the running top-k of every query is merged right after each
// tile (at most kQChunk x kKBlock scores, so no (q, n) score matrix ever exists); each (query, split)
// keeps its own top-k and a final pass merges them per query.
// cluster_lookup: small per-cluster products, where a BLAS call would spend more time packing its
// operands than multiplying: a register-tiled AVX-512 dot-product kernel instead (see "cluster_lookup"
// below for the threading).
// The order (score desc, id asc) is total, so no answer depends on the tiling or the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#include "mvpp/check_offsets.h"
#include "mvpp/topk_select.h"

#include <omp.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define MVPP_CL_AVX512 1
#else
#define MVPP_CL_AVX512 0
#endif

extern "C" {
// Fortran BLAS, provided by the BLAS torch links (MKL on x86 wheels). Called directly, without a
// tensor per tile.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}

namespace mvpp {
namespace {

constexpr int64_t kQChunk = 256;   // queries per tile
constexpr int64_t kKBlock = 512;   // keys per tile

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
        int64_t j = 0;
#if MVPP_CL_AVX512
        if constexpr (std::is_same<acc_t, float>::value) {
          // 16 scores per compare with the k-th: almost no block holds a candidate for the running top-k
          for (; j + 16 <= nb; j += 16) {
            __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + j), _mm512_set1_ps(s[k - 1]), _CMP_NLT_UQ);
            while (m) {
              const int l = __builtin_ctz(m);
              m &= m - 1;
              const acc_t v = row[j + l] + acc_t(0);
              if (v < s[k - 1]) continue;  // the k-th moved up since the compare
              const int64_t gid = ids ? ids[b0 + j + l] : b0 + j + l;
              if (gid == ex) continue;
              topk_insert(s, id, (int)k, v, gid);
            }
          }
        }
#endif
        for (; j < nb; ++j) {
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
  TORCH_CHECK(keys.size(1) >= 1, "mvpp: the feature dimension d must be >= 1, got d = 0");
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

// ---------------------------------------------------------------------------------------------
// cluster_lookup
//
// One OpenMP region per batch of queries, in three phases (ordered by completion counts, not barriers:
// see Phase); inside each phase threads claim work items from an atomic counter, so a thread the OS
// deschedules (the machine is shared) delays the others by at most the item it holds, never by a
// static share of the phase:
//   1. routing, per chunk of queries: coarse scores -> top-p1; the children of those coarse clusters
//      (grouped by coarse cluster within the chunk) -> top-p2 fine clusters ("probes");
//   (the thread that finishes the last routing chunk inverts the probes: per fine cluster, its queries)
//   2. scan, cluster-major: one item = a block of a probed fine cluster's members x a block of the
//      queries that probe it. The member keys are read once per batch of queries and scored by a
//      register-tiled kernel (below) straight from their storage (float32/bf16/fp16, converted in
//      registers); each thread keeps its own top-k list per query (no races, thresholds tighten as
//      the thread sees more of a query's clusters, and a candidate below the k-th score is rejected
//      by one vector compare per 16 scores);
//   3. merge the threads' lists per query.
// ---------------------------------------------------------------------------------------------

// 16 dot products per tile: accumulator a holds <query a / NK, key a % NK> (MQ * NK = 16). Every dot
// product is accumulated lane-wise over d in chunks of 16 (lane l: elements l, l + 16, ...) and the 16
// lanes are summed by one fixed tree, so its bits do not depend on the tile shape or position: a
// query's result does not depend on which other queries share its batch, nor on the thread count.
// Lane L of a tile's result holds accumulator kLaneAcc(L).
constexpr int lane_acc(int L) { return 4 * (L & 3) + (L >> 2); }

// The same tree for one dot product (float64 keys, and builds without AVX-512).
template <typename acc_t, typename kt>
inline acc_t dot_tree(const acc_t* q, const kt* key, int64_t d) {
  acc_t p[16] = {};
  int64_t c = 0;
  for (; c + 16 <= d; c += 16)
    for (int l = 0; l < 16; ++l) p[l] += q[c + l] * static_cast<acc_t>(key[c + l]);
  for (int l = 0; c + l < d; ++l) p[l] += q[c + l] * static_cast<acc_t>(key[c + l]);
  acc_t e[4];
  for (int l = 0; l < 4; ++l) e[l] = (p[l] + p[l + 8]) + (p[l + 4] + p[l + 12]);
  return (e[0] + e[2]) + (e[1] + e[3]);
}

#if MVPP_CL_AVX512
template <typename kt>
struct KeyLoad;
template <>
struct KeyLoad<float> {
  static __m512 full(const float* p) { return _mm512_loadu_ps(p); }
  static __m512 part(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
};
template <>
struct KeyLoad<c10::Half> {
  static __m512 full(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
  static __m512 part(const c10::Half* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
};
template <>
struct KeyLoad<c10::BFloat16> {  // bf16 -> f32 is exact: the bits shifted into the high half
  static __m512 widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
  static __m512 full(const c10::BFloat16* p) { return widen(_mm256_loadu_si256((const __m256i*)p)); }
  static __m512 part(const c10::BFloat16* p, __mmask16 m) { return widen(_mm256_maskz_loadu_epi16(m, p)); }
};

// Lane L of the result = the lane sum of acc[lane_acc(L)], by dot_tree's tree.
__attribute__((always_inline)) inline __m512 reduce16(const __m512* acc) {
  __m512 s[8], t[4];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)  // 512 -> 256 bits: [A lanes 0-3 + 8-11, A 4-7 + 12-15, B ..., B ...]
    s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(acc[2 * i], acc[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(acc[2 * i], acc[2 * i + 1], 0xEE));
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)  // -> 128 bits: block j of t[i] = 4 partial sums of acc[4 i + j]
    t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0xDD));
  const __m512 u01 = _mm512_add_ps(_mm512_unpacklo_ps(t[0], t[1]), _mm512_unpackhi_ps(t[0], t[1]));
  const __m512 u23 = _mm512_add_ps(_mm512_unpacklo_ps(t[2], t[3]), _mm512_unpackhi_ps(t[2], t[3]));
  return _mm512_add_ps(_mm512_shuffle_ps(u01, u23, 0x44), _mm512_shuffle_ps(u01, u23, 0xEE));
}

template <int MQ, typename kt>
inline __m512 dot_tile(const float* const* q, const kt* const* key, int64_t d) {
  constexpr int NK = 16 / MQ;
  __m512 acc[16];
#pragma GCC unroll 16
  for (int a = 0; a < 16; ++a) acc[a] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= d; c += 16) {
    __m512 qv[MQ], kv[NK];
    // Both operands are pinned in registers (the empty asm): folded into each FMA as a memory operand
    // a query or key would be loaded NK or MQ times, and the loads, not the FMAs, would bound the loop.
#pragma GCC unroll 4
    for (int i = 0; i < MQ; ++i) {
      qv[i] = _mm512_loadu_ps(q[i] + c);
      asm("" : "+v"(qv[i]));
    }
#pragma GCC unroll 16
    for (int j = 0; j < NK; ++j) {
      kv[j] = KeyLoad<kt>::full(key[j] + c);
      asm("" : "+v"(kv[j]));
    }
#pragma GCC unroll 16
    for (int a = 0; a < 16; ++a) acc[a] = _mm512_fmadd_ps(qv[a / NK], kv[a % NK], acc[a]);
  }
  if (c < d) {
    const __mmask16 m = (__mmask16)((1u << (d - c)) - 1);
    __m512 qv[MQ], kv[NK];
    for (int i = 0; i < MQ; ++i) qv[i] = _mm512_maskz_loadu_ps(m, q[i] + c);
    for (int j = 0; j < NK; ++j) kv[j] = KeyLoad<kt>::part(key[j] + c, m);
    for (int a = 0; a < 16; ++a) acc[a] = _mm512_fmadd_ps(qv[a / NK], kv[a % NK], acc[a]);
  }
  return reduce16(acc);
}

// MQ queries against keys [0, nk) (rows of `keys`, ids ids[j] or base + j) into their top-k lists.
template <int MQ, typename kt>
void scan_group(const float* const* q, float* const* ls, int64_t* const* li, const int64_t* ex, const kt* keys,
                int64_t nk, int64_t d, const int64_t* ids, int64_t base, int k, bool prefetch) {
  constexpr int NK = 16 / MQ;
  alignas(64) int32_t lane_q[16];
  alignas(64) float thr[16] = {};
  for (int L = 0; L < 16; ++L) lane_q[L] = lane_acc(L) / NK;
  const __m512i lq = _mm512_load_si512(lane_q);
  for (int i = 0; i < MQ; ++i) thr[i] = ls[i][k - 1];
  __m512 tv = _mm512_permutexvar_ps(lq, _mm512_load_ps(thr));
  const __m512 zero = _mm512_setzero_ps();
  const kt* kp[NK];
  for (int64_t j0 = 0; j0 < nk; j0 += NK) {
    const int64_t nv = std::min<int64_t>(NK, nk - j0);
    for (int j = 0; j < NK; ++j) kp[j] = keys + (j0 + std::min<int64_t>(j, nv - 1)) * d;
    if (prefetch && j0 + 3 * NK <= nk) {
      const char* nx = reinterpret_cast<const char*>(keys + (j0 + 2 * NK) * d);
      for (int64_t b = 0; b < NK * d * (int64_t)sizeof(kt); b += 64) _mm_prefetch(nx + b, _MM_HINT_T0);
    }
    // + 0: -0 -> +0, the sign of zero never decides a tie
    const __m512 f = _mm512_add_ps(dot_tile<MQ, kt>(q, kp, d), zero);
    // not-less-than: candidates equal to the k-th score may still win on id; NaN goes on to be refused
    __mmask16 m = _mm512_cmp_ps_mask(f, tv, _CMP_NLT_UQ);
    if (nv < NK) {
      __mmask16 valid = 0;
      for (int L = 0; L < 16; ++L)
        if (lane_acc(L) % NK < nv) valid |= (__mmask16)(1u << L);
      m &= valid;
    }
    if (!m) continue;
    alignas(64) float fs[16];
    _mm512_store_ps(fs, f);
    do {
      const int L = __builtin_ctz(m);
      m &= m - 1;
      const int i = lane_acc(L) / NK;
      const int64_t j = j0 + lane_acc(L) % NK;
      const int64_t gid = ids ? ids[j] : base + j;
      if (gid == ex[i]) continue;
      topk_insert(ls[i], li[i], k, fs[L], gid);
      thr[i] = ls[i][k - 1];
    } while (m);
    tv = _mm512_permutexvar_ps(lq, _mm512_load_ps(thr));
  }
}
#endif

// Scores the queries q[0..nq) against keys [0, nk) (rows of `keys`, ids ids[j] or base + j; query i
// skips id ex[i]) and inserts them into the top-k lists ls[i]/li[i].
template <typename acc_t, typename kt>
void scan_keys(const acc_t* const* q, acc_t* const* ls, int64_t* const* li, const int64_t* ex, int64_t nq,
               const kt* keys, int64_t nk, int64_t d, const int64_t* ids, int64_t base, int k) {
#if MVPP_CL_AVX512
  if constexpr (std::is_same<acc_t, float>::value) {
    // the first pass over the keys brings them from memory: prefetch the next tile's rows
    int64_t i = 0;
    for (; i + 4 <= nq; i += 4) scan_group<4, kt>(q + i, ls + i, li + i, ex + i, keys, nk, d, ids, base, k, i == 0);
    for (; i + 2 <= nq; i += 2) scan_group<2, kt>(q + i, ls + i, li + i, ex + i, keys, nk, d, ids, base, k, i == 0);
    for (; i < nq; ++i) scan_group<1, kt>(q + i, ls + i, li + i, ex + i, keys, nk, d, ids, base, k, i == 0);
    return;
  }
#endif
  for (int64_t j = 0; j < nk; ++j) {
    const int64_t gid = ids ? ids[j] : base + j;
    for (int64_t i = 0; i < nq; ++i) {
      const acc_t v = dot_tree(q[i], keys + j * d, d) + acc_t(0);
      if (v < ls[i][k - 1] || gid == ex[i]) continue;
      topk_insert(ls[i], li[i], k, v, gid);
    }
  }
}

// out[i][j] = <q[i], keys[j]> for i < nq, j < nk, by the same tiles (so the same bits) as scan_keys.
template <typename acc_t>
void score_rows(const acc_t* const* q, int64_t nq, const acc_t* keys, int64_t nk, int64_t d, acc_t* const* out) {
#if MVPP_CL_AVX512
  if constexpr (std::is_same<acc_t, float>::value) {
    alignas(64) float f[16];
    const float* kp[4];
    for (int64_t i0 = 0; i0 < nq; i0 += 4) {
      const float* qp[4];
      const int64_t mq = std::min<int64_t>(4, nq - i0);
      for (int i = 0; i < 4; ++i) qp[i] = q[i0 + std::min<int64_t>(i, mq - 1)];
      for (int64_t j0 = 0; j0 < nk; j0 += 4) {
        const int64_t nv = std::min<int64_t>(4, nk - j0);
        for (int j = 0; j < 4; ++j) kp[j] = keys + (j0 + std::min<int64_t>(j, nv - 1)) * d;
        _mm512_store_ps(f, dot_tile<4, float>(qp, kp, d));
        for (int L = 0; L < 16; ++L) {
          const int i = lane_acc(L) / 4, j = lane_acc(L) % 4;
          if (i < mq && j < nv) out[i0 + i][j0 + j] = f[L];
        }
      }
    }
    return;
  }
#endif
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t j = 0; j < nk; ++j) out[i][j] = dot_tree(q[i], keys + j * d, d);
}

// The ids of the top p of (s[j], ids[j]) for j < n under (score desc, id asc), in no particular order
// (a set: the scan does not care in which order it visits clusters). -0 counts as +0 and NaN as -inf,
// so the order is total.
template <typename acc_t>
int64_t select_top_ids(const acc_t* s, const int64_t* ids, int64_t n, int64_t p, int64_t* out,
                       std::vector<std::pair<acc_t, int64_t>>& buf) {
  buf.resize(n);
  for (int64_t j = 0; j < n; ++j) {
    const acc_t v = s[j] + acc_t(0);
    buf[j] = {v == v ? v : -std::numeric_limits<acc_t>::infinity(), ids[j]};
  }
  const int64_t m = std::min(p, n);
  if (m < n)
    std::nth_element(buf.begin(), buf.begin() + m, buf.end(), [](const auto& a, const auto& b) {
      return topk_better(a.first, a.second, b.first, b.second);
    });
  for (int64_t j = 0; j < m; ++j) out[j] = buf[j].second;
  return m;
}

// Claims items [0, n) from `next` until none is left.
template <typename F>
inline void claim_items(std::atomic<int64_t>& next, int64_t n, const F& fn) {
  for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n; i = next.fetch_add(1, std::memory_order_relaxed))
    fn(i);
}

// A phase of work items claimed by whichever threads are running. Phases are ordered by completion
// counts, not by barriers: a barrier also waits for a thread that the OS has not scheduled yet (on a
// shared machine, for a whole time slice, several times per call), while here a late thread finds
// the finished phases done and joins wherever the others are, and the running threads never wait for
// it. They only wait for items in progress.
struct Phase {
  std::atomic<int64_t> next{0}, done{0};
  // Runs claimed items; on_last() runs once, in the thread that completes the last item.
  template <typename F, typename G>
  void run(int64_t n, const F& fn, const G& on_last) {
    claim_items(next, n, [&](int64_t i) {
      fn(i);
      if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == n) on_last();
    });
  }
  template <typename F>
  void run(int64_t n, const F& fn) {
    run(n, fn, [] {});
  }
  void wait(int64_t n) const {
    while (done.load(std::memory_order_acquire) < n) std::this_thread::yield();
  }
};

struct ScanItem {
  int64_t r0, r1, q0, q1;  // member rows [r0, r1) x the queries inv_q[q0, q1) that probe their cluster
};

// The body of cluster_lookup_cpu for one key dtype (a function, not the dispatch lambda: OpenMP pragmas
// cannot sit inside a macro argument).
template <typename scalar_t>
void cluster_lookup_impl(const at::Tensor& queries, const at::Tensor& coarse_, const at::Tensor& coarse_off,
                         const at::Tensor& fine_, const at::Tensor& fine_off, const at::Tensor& mkeys,
                         const at::Tensor& mids, const at::Tensor& exclude, int64_t P1, int64_t P2, int K,
                         at::Tensor& out_s, at::Tensor& out_i) {
  const int64_t q = queries.size(0), d = queries.size(1);
  const int64_t c1 = coarse_.size(0), cf = fine_.size(0);
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
  acc_t* os = out_s.data_ptr<acc_t>();
  int64_t* oi = out_i.data_ptr<int64_t>();
  const int nt = std::max(1, at::get_num_threads());
  // Queries in batches so that the probe lists and the threads' top-k lists stay bounded for any q
  // and k; within a batch a probed cluster's members are read once.
  const int64_t qb = std::min(q, std::max<int64_t>(64, std::min((int64_t(1) << 20) / P2, (int64_t(1) << 18) / K)));
  constexpr int64_t kRouteChunk = 32, kMergeChunk = 64, kScanQueries = 128;
  // Member rows per scan item: the block stays in L2 while every query group of the item reads it.
  const int64_t scan_rows = std::max<int64_t>(16, ((int64_t(1) << 18) / (d * (int64_t)sizeof(scalar_t))) / 16 * 16);
  std::vector<int64_t> probes(qb * P2), inv_off(cf + 1), inv_q(qb * P2), no_ex(qb, -1);
  std::vector<acc_t> lists_s((size_t)nt * qb * K);
  std::vector<int64_t> lists_i((size_t)nt * qb * K);
  std::vector<ScanItem> items;
  for (int64_t qa = 0; qa < q; qa += qb) {
    const int64_t qn = std::min(qb, q - qa);
    const acc_t* Qb = Qf + qa * d;
    const int64_t* ex = ex_all ? ex_all + qa : no_ex.data();
    // every thread's lists, before the region: a thread that never gets to run still has valid ones
    for (int64_t i = 0; i < nt * qn; ++i) topk_init(lists_s.data() + i * K, lists_i.data() + i * K, K);
    Phase route, scan, merge;
    std::atomic<int> inverted{0};
#pragma omp parallel num_threads(nt)
    {
      const int tid = omp_get_thread_num();
      acc_t* my_s = lists_s.data() + (size_t)tid * qn * K;
      int64_t* my_i = lists_i.data() + (size_t)tid * qn * K;
      std::vector<const acc_t*> qrow(std::max<int64_t>(kRouteChunk * P1, kScanQueries));
      std::vector<acc_t*> lsp(qrow.size());
      std::vector<int64_t*> lip(qrow.size());
      std::vector<int64_t> exq(qrow.size(), -1);
      // 1. routing
      {
        std::vector<acc_t> cbuf(kRouteChunk * c1), fbuf;
        std::vector<acc_t*> orow(kRouteChunk * P1);
        std::vector<int64_t> iota_c(c1), topc(kRouteChunk * P1), ntop(kRouteChunk), cnt(c1 + 1), fidx,
            pair_q(kRouteChunk * P1), pair_pos(kRouteChunk * P1), pos(kRouteChunk * P1), qoff(kRouteChunk + 1);
        std::vector<std::pair<acc_t, int64_t>> sel;
        for (int64_t c = 0; c < c1; ++c) iota_c[c] = c;
        const auto invert = [&] {
          // per fine cluster, the queries that probe it (in query order), cut into scan items
          std::fill(inv_off.begin(), inv_off.end(), 0);
          for (int64_t j = 0; j < qn * P2; ++j)
            if (probes[j] >= 0) ++inv_off[probes[j] + 1];
          for (int64_t f = 0; f < cf; ++f) inv_off[f + 1] += inv_off[f];
          std::vector<int64_t> fill(inv_off.begin(), inv_off.end() - 1);
          for (int64_t j = 0; j < qn * P2; ++j)
            if (probes[j] >= 0) inv_q[fill[probes[j]]++] = j / P2;
          items.clear();
          for (int64_t f = 0; f < cf; ++f) {
            if (inv_off[f + 1] == inv_off[f]) continue;
            for (int64_t r = foff[f]; r < foff[f + 1]; r += scan_rows)
              for (int64_t j = inv_off[f]; j < inv_off[f + 1]; j += kScanQueries)
                items.push_back({r, std::min(foff[f + 1], r + scan_rows), j, std::min(inv_off[f + 1], j + kScanQueries)});
          }
          // largest first: the last items to be claimed are small, so threads finish together
          std::stable_sort(items.begin(), items.end(), [](const ScanItem& x, const ScanItem& y) {
            return (x.r1 - x.r0) * (x.q1 - x.q0) > (y.r1 - y.r0) * (y.q1 - y.q0);
          });
          inverted.store(1, std::memory_order_release);
        };
        route.run((qn + kRouteChunk - 1) / kRouteChunk, [&](int64_t chunk) {
          const int64_t i0 = chunk * kRouteChunk, nc = std::min(kRouteChunk, qn - i0);
          for (int64_t i = 0; i < nc; ++i) {
            qrow[i] = Qb + (i0 + i) * d;
            orow[i] = &cbuf[i * c1];
          }
          score_rows<acc_t>(qrow.data(), nc, Cf, c1, d, orow.data());
          // top-p1 coarse clusters per query, and where each one's children go in the query's buffer
          qoff[0] = 0;
          for (int64_t i = 0; i < nc; ++i) {
            ntop[i] = select_top_ids(&cbuf[i * c1], iota_c.data(), c1, P1, &topc[i * P1], sel);
            int64_t o = qoff[i];
            for (int64_t t = 0; t < ntop[i]; ++t) {
              const int64_t c = topc[i * P1 + t];
              pos[i * P1 + t] = o;
              o += coff[c + 1] - coff[c];
            }
            qoff[i + 1] = o;
          }
          fbuf.resize(qoff[nc]);
          fidx.resize(qoff[nc]);
          // the chunk's (query, coarse cluster) pairs grouped by coarse cluster: one tile pass each
          std::fill(cnt.begin(), cnt.end(), 0);
          for (int64_t i = 0; i < nc; ++i)
            for (int64_t t = 0; t < ntop[i]; ++t) ++cnt[topc[i * P1 + t] + 1];
          for (int64_t c = 0; c < c1; ++c) cnt[c + 1] += cnt[c];
          for (int64_t i = 0; i < nc; ++i)
            for (int64_t t = 0; t < ntop[i]; ++t) {
              const int64_t c = topc[i * P1 + t], j = cnt[c]++;
              pair_q[j] = i;
              pair_pos[j] = pos[i * P1 + t];
              for (int64_t f = coff[c]; f < coff[c + 1]; ++f) fidx[pos[i * P1 + t] + f - coff[c]] = f;
            }
          int64_t begin = 0;  // cnt[c] is now the end of coarse cluster c's pairs
          for (int64_t c = 0; c < c1; ++c) {
            const int64_t end = cnt[c];
            if (end > begin && coff[c + 1] > coff[c]) {
              for (int64_t j = begin; j < end; ++j) {
                qrow[j - begin] = Qb + (i0 + pair_q[j]) * d;
                orow[j - begin] = fbuf.data() + pair_pos[j];
              }
              score_rows<acc_t>(qrow.data(), end - begin, Ff + coff[c] * d, coff[c + 1] - coff[c], d, orow.data());
            }
            begin = end;
          }
          for (int64_t i = 0; i < nc; ++i) {
            int64_t* pr = &probes[(i0 + i) * P2];
            const int64_t m = select_top_ids(fbuf.data() + qoff[i], fidx.data() + qoff[i], qoff[i + 1] - qoff[i], P2,
                                             pr, sel);
            for (int64_t t = m; t < P2; ++t) pr[t] = -1;
          }
        }, invert);
      }
      while (!inverted.load(std::memory_order_acquire)) std::this_thread::yield();
      // 2. scan
      const int64_t n_items = (int64_t)items.size();
      scan.run(n_items, [&](int64_t w) {
        const ScanItem& it = items[w];
        const int64_t nq = it.q1 - it.q0;
        for (int64_t j = 0; j < nq; ++j) {
          const int64_t i = inv_q[it.q0 + j];
          qrow[j] = Qb + i * d;
          lsp[j] = my_s + i * K;
          lip[j] = my_i + i * K;
          exq[j] = ex[i];
        }
        scan_keys<acc_t, scalar_t>(qrow.data(), lsp.data(), lip.data(), exq.data(), nq, kp + it.r0 * d,
                                   it.r1 - it.r0, d, ip + it.r0, 0, K);
      });
      scan.wait(n_items);
      // 3. merge the threads' lists
      merge.run((qn + kMergeChunk - 1) / kMergeChunk, [&](int64_t chunk) {
        for (int64_t i = chunk * kMergeChunk; i < std::min(qn, (chunk + 1) * kMergeChunk); ++i) {
          acc_t* s = os + (qa + i) * K;
          int64_t* id = oi + (qa + i) * K;
          std::memcpy(s, lists_s.data() + i * K, K * sizeof(acc_t));
          std::memcpy(id, lists_i.data() + i * K, K * sizeof(int64_t));
          for (int t = 1; t < nt; ++t) {
            const acc_t* ts = lists_s.data() + ((size_t)t * qn + i) * K;
            const int64_t* ti = lists_i.data() + ((size_t)t * qn + i) * K;
            for (int j = 0; j < K && ti[j] != kNoId; ++j) topk_insert(s, id, K, ts[j], ti[j]);
          }
          for (int j = 0; j < K; ++j)
            if (id[j] == kNoId) id[j] = -1;
        }
      });
    }
  }
}

std::tuple<at::Tensor, at::Tensor> cluster_lookup_cpu(const at::Tensor& queries_, const at::Tensor& coarse_,
                                                      const at::Tensor& coarse_off_, const at::Tensor& fine_,
                                                      const at::Tensor& fine_off_, const at::Tensor& mkeys_,
                                                      const at::Tensor& mids_, int64_t k, int64_t p1, int64_t p2,
                                                      const std::optional<at::Tensor>& exclude_) {
  check_common(mkeys_, queries_, k);
  TORCH_CHECK(p1 >= 1 && p2 >= 1, "mvpp::cluster_lookup: nprobe must be >= 1");
  TORCH_CHECK(k <= std::numeric_limits<int>::max(), "mvpp::cluster_lookup: k too large");
  const auto queries = queries_.contiguous();
  const auto mkeys = mkeys_.contiguous();
  const auto coarse_off = coarse_off_.to(at::kLong).contiguous();
  const auto fine_off = fine_off_.to(at::kLong).contiguous();
  const auto mids = mids_.to(at::kLong).contiguous();
  const int64_t q = queries.size(0), d = queries.size(1);
  TORCH_CHECK(coarse_.dim() == 2 && fine_.dim() == 2 && coarse_.size(1) == d && fine_.size(1) == d,
              "mvpp::cluster_lookup: centroids must be (c, d) like the queries");
  TORCH_CHECK(mids.numel() == mkeys.size(0), "mvpp::cluster_lookup: one member id per member key");
  const int64_t c1 = coarse_.size(0), cf = fine_.size(0);
  TORCH_CHECK(coarse_off.numel() == c1 + 1 && fine_off.numel() == cf + 1, "mvpp::cluster_lookup: bad offsets");
  check_csr_offsets(coarse_off, c1, cf, "mvpp::cluster_lookup", "coarse_offsets");
  check_csr_offsets(fine_off, cf, mkeys.size(0), "mvpp::cluster_lookup", "fine_offsets");
  at::Tensor exclude;
  if (exclude_.has_value()) exclude = exclude_->to(at::kLong).contiguous();
  const at::ScalarType at_acc = acc_type(mkeys.scalar_type());
  auto out_s = at::empty({q, k}, mkeys.options().dtype(at_acc));
  auto out_i = at::empty({q, k}, mkeys.options().dtype(at::kLong));
  if (q == 0) return {out_s, out_i};
  const int64_t P1 = std::min(p1, c1), P2 = std::min(p2, cf);
  const int K = (int)k;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mkeys.scalar_type(), "cluster_lookup_cpu", [&] {
    cluster_lookup_impl<scalar_t>(queries, coarse_, coarse_off, fine_, fine_off, mkeys, mids, exclude, P1, P2, K, out_s,
                                  out_i);
  });
  return {out_s, out_i};
}

}  // namespace

TORCH_LIBRARY_IMPL(mvpp, CPU, m) {
  m.impl("exact_search", &exact_search_cpu);
  m.impl("cluster_lookup", &cluster_lookup_cpu);
}

}  // namespace mvpp
