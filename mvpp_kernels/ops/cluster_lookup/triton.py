"""Triton path of cluster_lookup: routing (two small GEMMs over the centroids, exactly the
reference's `route_ref`), then the fused member scan with the top-k on chip, one program per
(query, probed fine cluster) -- the same `_scan_topk_kernel` as exact_search -- and an exact merge of
the per-cluster lists (see exact_search/triton.py for the packed sort keys).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..exact_search.triton import scan_topk
from . import _fake
from .reference import route_ref


@torch.library.triton_op("mvpp::cluster_lookup_triton", mutates_args=())
def cluster_lookup_triton(
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
    exclude: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    top_f = route_ref(queries, coarse_centroids, coarse_offsets, fine_centroids, nprobe_coarse, nprobe_fine)
    ok = top_f >= 0
    f = top_f.clamp_min(0)
    start = torch.where(ok, fine_offsets[f], 0).contiguous()
    end = torch.where(ok, fine_offsets[f + 1], 0).contiguous()
    return scan_topk(queries, member_keys, member_ids, start, end, exclude, k)


cluster_lookup_triton.register_fake(_fake)
