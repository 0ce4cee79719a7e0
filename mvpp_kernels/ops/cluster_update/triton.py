"""Triton path of cluster_update: routing exactly as the reference (two float64 GEMMs over the
centroids, ties to the lower index), then the fold kernel: one program per fine cluster, walking its
new items in input order and updating the float64 running means in registers, block of dimensions by
block of dimensions (dimensions are independent, so this is the same sequence of IEEE operations per
element as the reference). FMA contraction is switched off so x*x - sq rounds like the reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._backend import triton_interpret
from . import _fake
from .reference import route_greedy_ref


@triton.jit
def _cluster_fold_kernel(X, V, ITEMS, START, MEAN, SQ, VMEAN, COUNTS, d, dv, BLOCK: tl.constexpr):
    f = tl.program_id(0)
    s = tl.load(START + f)
    e = tl.load(START + f + 1)
    n0 = tl.load(COUNTS + f)
    offs = tl.arange(0, BLOCK)
    for c0 in range(0, d, BLOCK):
        cols = c0 + offs
        cm = cols < d
        mean = tl.load(MEAN + f * d + cols, mask=cm, other=0.0)
        sq = tl.load(SQ + f * d + cols, mask=cm, other=0.0)
        for t in range(s, e):
            i = tl.load(ITEMS + t)
            x = tl.load(X + i * d + cols, mask=cm, other=0.0)
            n1 = (n0 + (t - s) + 1).to(tl.float64)
            mean = mean + (x - mean) / n1
            sq = sq + (x * x - sq) / n1
        tl.store(MEAN + f * d + cols, mean, mask=cm)
        tl.store(SQ + f * d + cols, sq, mask=cm)
    for c0 in range(0, dv, BLOCK):
        cols = c0 + offs
        cm = cols < dv
        vm = tl.load(VMEAN + f * dv + cols, mask=cm, other=0.0)
        for t in range(s, e):
            i = tl.load(ITEMS + t)
            v = tl.load(V + i * dv + cols, mask=cm, other=0.0)
            n1 = (n0 + (t - s) + 1).to(tl.float64)
            vm = vm + (v - vm) / n1
        tl.store(VMEAN + f * dv + cols, vm, mask=cm)
    tl.store(COUNTS + f, n0 + (e - s))


@torch.library.triton_op("mvpp::cluster_update_triton", mutates_args=())
def cluster_update_triton(
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    coarse_centroids: torch.Tensor,
    coarse_offsets: torch.Tensor,
    fine_centroids: torch.Tensor,
    fine_mean: torch.Tensor,
    fine_sq: torch.Tensor,
    fine_value_mean: torch.Tensor,
    fine_counts: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    assign = route_greedy_ref(new_keys, coarse_centroids, coarse_offsets, fine_centroids)
    cf, d = fine_mean.shape
    dv = fine_value_mean.shape[1]
    mean = fine_mean.clone()
    sq = fine_sq.clone()
    vmean = fine_value_mean.clone()
    counts = fine_counts.clone()
    m = new_keys.shape[0]
    if m == 0:
        return assign, mean, sq, vmean, counts
    items = torch.argsort(assign, stable=True)  # input order within each cluster
    start = torch.zeros(cf + 1, dtype=torch.int64, device=new_keys.device)
    start[1:] = torch.bincount(assign, minlength=cf).cumsum(0)
    x = new_keys.to(torch.float64).contiguous()
    v = new_values.to(torch.float64).contiguous()
    extra = {} if triton_interpret() else {"enable_fp_fusion": False}
    torch.library.wrap_triton(_cluster_fold_kernel)[(cf,)](
        x, v, items, start, mean, sq, vmean, counts, d, dv, BLOCK=64, **extra)
    return assign, mean, sq, vmean, counts


cluster_update_triton.register_fake(_fake)
