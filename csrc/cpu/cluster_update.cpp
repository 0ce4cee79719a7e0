// CPU kernel of mvpp::cluster_update: greedy routing of new items down the two-level tree (float64
// scores) and the per-cluster running-mean fold, sequential per cluster in input order.
//
// The fold must give the same bytes as the reference and the other backends, so every update is the
// same sequence of IEEE float64 operations: no fused multiply-add (x*x - sq would otherwise be
// contracted) and no reassociation.
#pragma GCC optimize("fp-contract=off")
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>

#include "mvpp/check_offsets.h"
#include <vector>

namespace mvpp {
namespace {

double dot64(const double* a, const double* b, int64_t d) {
  double s = 0;
  for (int64_t j = 0; j < d; ++j) s += a[j] * b[j];
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cluster_update_cpu(
    const at::Tensor& new_keys, const at::Tensor& new_values, const at::Tensor& coarse, const at::Tensor& coarse_off_,
    const at::Tensor& fine, const at::Tensor& fine_mean, const at::Tensor& fine_sq, const at::Tensor& fine_vmean,
    const at::Tensor& fine_counts) {
  TORCH_CHECK(new_keys.dim() == 2 && new_values.dim() == 2 && new_values.size(0) == new_keys.size(0),
              "mvpp::cluster_update: new_keys (m, d), new_values (m, dv)");
  const int64_t m = new_keys.size(0), d = new_keys.size(1), dv = new_values.size(1);
  const int64_t c1 = coarse.size(0), cf = fine.size(0);
  const auto x = new_keys.to(at::kDouble).contiguous();
  const auto v = new_values.to(at::kDouble).contiguous();
  const auto C = coarse.to(at::kDouble).contiguous();
  const auto F = fine.to(at::kDouble).contiguous();
  const auto coff = coarse_off_.to(at::kLong).contiguous();
  for (const at::Tensor* t : {&new_keys, &new_values, &coarse, &coarse_off_, &fine, &fine_mean, &fine_sq, &fine_vmean,
                              &fine_counts})
    TORCH_CHECK(t->device().is_cpu(), "mvpp::cluster_update (cpu): every input must be on cpu, got one on ",
                t->device());
  TORCH_CHECK(d >= 1, "mvpp::cluster_update: the feature dimension d must be >= 1, got d = 0");
  TORCH_CHECK(coarse.dim() == 2 && fine.dim() == 2 && coarse.size(1) == d && fine.size(1) == d,
              "mvpp::cluster_update: centroids must be (c, d) like new_keys");
  TORCH_CHECK(fine_mean.size(0) == cf && fine_sq.size(0) == cf && fine_vmean.size(0) == cf &&
                  fine_counts.numel() == cf && fine_vmean.size(1) == dv,
              "mvpp::cluster_update: fine statistics must have one row per fine centroid");
  check_csr_offsets(coff, c1, cf, "mvpp::cluster_update", "coarse_offsets");
  auto assign = at::empty({m}, new_keys.options().dtype(at::kLong));
  auto mean = fine_mean.to(at::kDouble).contiguous().clone();
  auto sq = fine_sq.to(at::kDouble).contiguous().clone();
  auto vmean = fine_vmean.to(at::kDouble).contiguous().clone();
  auto counts = fine_counts.to(at::kLong).contiguous().clone();
  const double* xp = x.data_ptr<double>();
  const double* vp = v.data_ptr<double>();
  const double* Cp = C.data_ptr<double>();
  const double* Fp = F.data_ptr<double>();
  const int64_t* co = coff.data_ptr<int64_t>();
  int64_t* ap = assign.data_ptr<int64_t>();
  // Routing: independent per item. Strict '>' keeps the lower index on a tie.
  at::parallel_for(0, m, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const double* xi = xp + i * d;
      int64_t bc = -1;
      double best = -std::numeric_limits<double>::infinity();
      for (int64_t c = 0; c < c1; ++c) {
        if (co[c + 1] <= co[c]) continue;
        const double s = dot64(xi, Cp + c * d, d);
        if (bc < 0 || s > best) best = s, bc = c;
      }
      int64_t bf = -1;
      best = -std::numeric_limits<double>::infinity();
      for (int64_t f = co[bc]; f < co[bc + 1]; ++f) {
        const double s = dot64(xi, Fp + f * d, d);
        if (bf < 0 || s > best) best = s, bf = f;
      }
      ap[i] = bf;
    }
  });
  // Fold: bucket the items by cluster (stable, so input order is kept within a cluster), then each
  // cluster is folded by one thread, item by item.
  std::vector<int64_t> start(cf + 1, 0);
  for (int64_t i = 0; i < m; ++i) ++start[ap[i] + 1];
  for (int64_t f = 0; f < cf; ++f) start[f + 1] += start[f];
  std::vector<int64_t> fill(start.begin(), start.end() - 1), items(m);
  for (int64_t i = 0; i < m; ++i) items[fill[ap[i]]++] = i;
  double* mp = mean.data_ptr<double>();
  double* sp = sq.data_ptr<double>();
  double* vmp = vmean.data_ptr<double>();
  int64_t* cp = counts.data_ptr<int64_t>();
  at::parallel_for(0, cf, 1, [&](int64_t b, int64_t e) {
    for (int64_t f = b; f < e; ++f) {
      double* mf = mp + f * d;
      double* sf = sp + f * d;
      double* vf = vmp + f * dv;
      for (int64_t t = start[f]; t < start[f + 1]; ++t) {
        const int64_t i = items[t];
        const double n1 = static_cast<double>(cp[f] + 1);
        const double* xi = xp + i * d;
        for (int64_t j = 0; j < d; ++j) {
          const double xm = xi[j] - mf[j];
          mf[j] = mf[j] + xm / n1;
          const double x2 = xi[j] * xi[j];
          sf[j] = sf[j] + (x2 - sf[j]) / n1;
        }
        const double* vi = vp + i * dv;
        for (int64_t j = 0; j < dv; ++j) vf[j] = vf[j] + (vi[j] - vf[j]) / n1;
        cp[f] += 1;
      }
    }
  });
  return {assign, mean, sq, vmean, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(mvpp, CPU, m) { m.impl("cluster_update", &cluster_update_cpu); }

}  // namespace mvpp
