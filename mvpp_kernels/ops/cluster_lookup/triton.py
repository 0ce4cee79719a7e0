"""Triton path of cluster_lookup: routing (two small GEMMs over the centroids, exactly the
reference's `route_ref`), then the fused member scan with the top-k on chip, one program per
(query, probed fine cluster) -- the same `_scan_topk_kernel` as exact_search -- and an exact merge of
the per-cluster lists (see exact_search/triton.py for the packed sort keys).

The packed keys carry an id in 32 bits, so ids outside [0, KERNEL_ID_LIMIT) would come back wrong.
That check lives in an opaque custom op (`mvpp::cluster_lookup_check_ids`) called from the
triton_op's body, not in the Python wrapper: torch.compile traces a triton_op's body with fake
tensors (a data-dependent check there cannot run), but keeps an opaque op in the graph and runs its
real implementation at run time. Its output (a zero) is added to the scan's start offsets, so the
graph depends on it and dead-code elimination cannot drop it (issue 16).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..exact_search.triton import scan_topk
from . import _fake, check_kernel_ids
from .reference import route_ref


@torch.library.custom_op("mvpp::cluster_lookup_check_ids", mutates_args=())
def cluster_lookup_check_ids(member_ids: torch.Tensor) -> torch.Tensor:
    """Raise unless every id lies in [0, KERNEL_ID_LIMIT); return an int64 zero (see the module docstring)."""
    check_kernel_ids(member_ids, "triton")
    return member_ids.new_zeros((), dtype=torch.int64)


@cluster_lookup_check_ids.register_fake
def _check_ids_fake(member_ids):
    return member_ids.new_zeros((), dtype=torch.int64)


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
    zero = torch.ops.mvpp.cluster_lookup_check_ids(member_ids)
    start = (torch.where(ok, fine_offsets[f], 0) + zero).contiguous()
    end = torch.where(ok, fine_offsets[f + 1], 0).contiguous()
    return scan_topk(queries, member_keys, member_ids, start, end, exclude, k)


cluster_lookup_triton.register_fake(_fake)
