"""Pure-torch cluster_update: route new items down the tree and fold them into their fine cluster's
running statistics. The float64 oracle, and bit-for-bit the rule every backend implements.

Routing: the coarse cluster with the largest <x, C_c> (ties: lower index), then the fine cluster with
the largest <x, F_f> among its children (ties: lower index), both scored in float64.

Fold, per fine cluster f, over its new items in input order (n = count before the item, then n+1):

    mean_f     += (x - mean_f) / (n + 1)           (d,)   float64
    sq_f       += (x * x - sq_f) / (n + 1)         (d,)   float64  per-dimension second moment
    vmean_f    += (v - vmean_f) / (n + 1)          (dv,)  float64
    count_f    += 1

Every step is an elementwise IEEE float64 operation in a fixed order (no reductions), so every backend
produces the same bytes for the same input order.
"""
from __future__ import annotations

import torch


def route_greedy_ref(
    keys: torch.Tensor,
    coarse_centroids: torch.Tensor,
    coarse_offsets: torch.Tensor,
    fine_centroids: torch.Tensor,
) -> torch.Tensor:
    """(m,) int64: the fine cluster each key is routed to (top-1 coarse, then top-1 child)."""
    m = keys.shape[0]
    dev = keys.device
    c1, cf = coarse_centroids.shape[0], fine_centroids.shape[0]
    if m == 0:
        return torch.zeros((0,), dtype=torch.int64, device=dev)
    x = keys.to(torch.float64)
    cs = x @ coarse_centroids.to(torch.float64).T
    # Empty coarse clusters (no children) are never chosen.
    nchild = coarse_offsets.diff()
    cs = cs.masked_fill((nchild == 0)[None, :], float("-inf"))
    top_c = _argmax_low_index(cs)
    parent = torch.repeat_interleave(torch.arange(c1, device=dev), nchild, output_size=cf)
    fs = x @ fine_centroids.to(torch.float64).T
    fs = fs.masked_fill(parent[None, :] != top_c[:, None], float("-inf"))
    return _argmax_low_index(fs)


def _argmax_low_index(s: torch.Tensor) -> torch.Tensor:
    best = s.max(dim=1, keepdim=True).values
    idx = torch.arange(s.shape[1], device=s.device).expand_as(s)
    big = torch.iinfo(torch.int64).max
    return torch.where(s == best, idx, torch.full_like(idx, big)).min(dim=1).values


def fold_ref(
    assign: torch.Tensor,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    fine_mean: torch.Tensor,
    fine_sq: torch.Tensor,
    fine_value_mean: torch.Tensor,
    fine_counts: torch.Tensor,
):
    mean = fine_mean.clone()
    sq = fine_sq.clone()
    vmean = fine_value_mean.clone()
    counts = fine_counts.clone()
    m = assign.shape[0]
    if m == 0:
        return mean, sq, vmean, counts
    x = new_keys.to(torch.float64)
    v = new_values.to(torch.float64)
    order = torch.argsort(assign, stable=True)
    a_sorted = assign[order]
    # occurrence index of each item within its cluster, in input order
    first = torch.searchsorted(a_sorted, a_sorted, right=False)
    occ_sorted = torch.arange(m, device=assign.device) - first
    occ = torch.empty_like(occ_sorted)
    occ[order] = occ_sorted
    for r in range(int(occ.max()) + 1):
        items = (occ == r).nonzero().squeeze(1)
        c = assign[items]
        n1 = (counts[c] + 1).to(torch.float64)[:, None]
        xi = x[items]
        mean[c] = mean[c] + (xi - mean[c]) / n1
        sq[c] = sq[c] + (xi * xi - sq[c]) / n1
        if v.shape[1]:
            vmean[c] = vmean[c] + (v[items] - vmean[c]) / n1
        counts[c] = counts[c] + 1
    return mean, sq, vmean, counts


def cluster_update_ref(
    new_keys,
    new_values,
    coarse_centroids,
    coarse_offsets,
    fine_centroids,
    fine_mean,
    fine_sq,
    fine_value_mean,
    fine_counts,
):
    """Returns (assign (m,) int64, fine_mean, fine_sq, fine_value_mean (f64), fine_counts (int64))."""
    assign = route_greedy_ref(new_keys, coarse_centroids, coarse_offsets, fine_centroids)
    return (assign,) + fold_ref(assign, new_keys, new_values, fine_mean, fine_sq, fine_value_mean, fine_counts)
