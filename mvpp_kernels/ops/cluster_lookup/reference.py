"""Pure-torch two-level cluster lookup: the float64-capable oracle and the fallback.

Routing and member scoring follow exactly the rule every kernel implements:

1. coarse scores <q, C_c>; keep the top `nprobe_coarse` (ties: lower cluster index first);
2. among the children of those coarse clusters (fine clusters coarse_offsets[c]..coarse_offsets[c+1]),
   keep the top `nprobe_fine` by <q, F_f> (ties: lower fine index first);
3. exact scores <q, member_keys[r]> over every member r of the kept fine clusters; the top-k under
   (score desc, id asc), skipping the member whose id equals exclude[q].
"""
from __future__ import annotations

from typing import Optional

import torch

from ..exact_search.reference import compute_dtype, pad_topk, topk_score_then_id

BLOCK_ELEMS = 1 << 22


def route_ref(
    queries: torch.Tensor,
    coarse_centroids: torch.Tensor,
    coarse_offsets: torch.Tensor,
    fine_centroids: torch.Tensor,
    nprobe_coarse: int,
    nprobe_fine: int,
) -> torch.Tensor:
    """(q, nprobe_fine) int64 fine cluster indices to scan, -1 where fewer children exist."""
    cd = compute_dtype(fine_centroids.dtype)
    qf = queries.to(cd)
    c1, cf = coarse_centroids.shape[0], fine_centroids.shape[0]
    cs = qf @ coarse_centroids.to(cd).T + 0.0
    _, top_c = topk_score_then_id(cs, torch.arange(c1, device=queries.device), nprobe_coarse)
    parent = torch.repeat_interleave(torch.arange(c1, device=queries.device), coarse_offsets.diff(), output_size=cf)
    allowed = (parent[None, :, None] == top_c[:, None, :]).any(-1)  # (q, cf)
    fs = qf @ fine_centroids.to(cd).T + 0.0
    fs = fs.masked_fill(~allowed, float("-inf"))
    _, top_f = topk_score_then_id(fs, torch.arange(cf, device=queries.device), nprobe_fine)
    return top_f


def cluster_lookup_ref(
    queries: torch.Tensor,
    coarse_centroids: torch.Tensor,
    coarse_offsets: torch.Tensor,
    fine_centroids: torch.Tensor,
    fine_offsets: torch.Tensor,
    member_keys: torch.Tensor,
    member_ids: torch.Tensor,
    k: int,
    nprobe_coarse: int,
    nprobe_fine: int,
    exclude: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns scores (q, k) (float32; float64 for float64 keys) and ids (q, k) int64, best first;
    slots with no candidate hold (-inf, -1)."""
    cd = compute_dtype(member_keys.dtype)
    q = queries.shape[0]
    cf, m = fine_centroids.shape[0], member_keys.shape[0]
    dev = queries.device
    out_s = torch.full((q, k), float("-inf"), dtype=cd, device=dev)
    out_i = torch.full((q, k), -1, dtype=torch.int64, device=dev)
    if q == 0:
        return out_s, out_i
    member_cluster = torch.repeat_interleave(torch.arange(cf, device=dev), fine_offsets.diff(), output_size=m)
    keys = member_keys.to(cd)
    qb = max(1, BLOCK_ELEMS // max(m, cf, 1))
    for a in range(0, q, qb):
        qq = queries[a:a + qb].to(cd)
        top_f = route_ref(qq, coarse_centroids, coarse_offsets, fine_centroids, nprobe_coarse, nprobe_fine)
        sel = torch.zeros((qq.shape[0], cf + 1), dtype=torch.bool, device=dev)
        sel.scatter_(1, torch.where(top_f < 0, cf, top_f), True)
        mask = sel[:, :cf][:, member_cluster]  # (qb, m)
        s = qq @ keys.T + 0.0
        s = s.masked_fill(~mask, float("-inf"))
        if exclude is not None:
            s = s.masked_fill(exclude[a:a + qb, None] == member_ids[None, :], float("-inf"))
        bs, bi = topk_score_then_id(s, member_ids, k)
        bs, bi = pad_topk(bs, bi, k)
        out_s[a:a + qb], out_i[a:a + qb] = bs, bi
    return out_s, out_i
