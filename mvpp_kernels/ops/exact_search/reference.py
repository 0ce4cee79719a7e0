"""Pure-torch exact (brute-force) top-k search: the float64-capable oracle and the fallback.

Blocked over keys, so it never holds the (q, n) score matrix: each block's scores are merged into a
running top-k. Ties are broken deterministically: among equal scores the lower id wins, on every
backend (the order is "score descending, then id ascending", a total order, so the result does not
depend on the order in which blocks are visited).
"""
from __future__ import annotations

from typing import Optional

import torch

# Score matrices larger than this many elements are computed block by block.
BLOCK_ELEMS = 1 << 22
INVALID_ID = -1


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32/bf16/fp16 keys are scored in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def topk_score_then_id(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise top-k of (q, m) `scores` under the order (score desc, id asc).

    `ids` is (q, m) or (m,). Entries with score -inf are invalid: they come out as (-inf, -1).
    Returns (q, min(k, m)) scores and ids, best first.
    """
    q, m = scores.shape
    ids = ids.expand(q, m)
    # Invalid entries sort after every valid one (a huge id), whatever their nominal id.
    big = torch.iinfo(torch.int64).max
    ids = torch.where(torch.isneginf(scores), torch.full_like(ids, big), ids)
    # Sort by id first, then a *stable* sort by score keeps ids ascending within equal scores.
    o1 = torch.argsort(ids, dim=1, stable=True)
    s1, i1 = scores.gather(1, o1), ids.gather(1, o1)
    o2 = torch.argsort(s1, dim=1, descending=True, stable=True)[:, :k]
    s, i = s1.gather(1, o2), i1.gather(1, o2)
    i = torch.where(torch.isneginf(s), torch.full_like(i, INVALID_ID), i)
    return s, i


def pad_topk(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (q, m<k) results to k columns with (-inf, -1)."""
    q, m = scores.shape
    if m >= k:
        return scores, ids
    ps = scores.new_full((q, k - m), float("-inf"))
    pi = ids.new_full((q, k - m), INVALID_ID)
    return torch.cat([scores, ps], 1), torch.cat([ids, pi], 1)


def exact_search_ref(
    keys: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    exclude: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """scores[i, j] = <queries[i], keys[ids[i, j]]>, the k largest per query (inner product).

    keys (n, d), queries (q, d) (cast to keys' dtype's compute dtype), exclude (q,) int64 ids to skip
    (negative: none). Returns scores (q, k) in float32 (float64 for float64 keys) and ids (q, k) int64;
    slots with no candidate (k > n - excluded) hold (-inf, -1).
    """
    cd = compute_dtype(keys.dtype)
    n, q = keys.shape[0], queries.shape[0]
    qf = queries.to(cd)
    best_s = qf.new_full((q, 0), float("-inf"))
    best_i = torch.zeros((q, 0), dtype=torch.int64, device=keys.device)
    block = max(1, BLOCK_ELEMS // max(q, 1))
    for start in range(0, n, block):
        kb = keys[start:start + block].to(cd)
        s = qf @ kb.T
        s = s + 0.0  # -0.0 -> +0.0 so sign-of-zero never decides a tie
        ids = torch.arange(start, start + kb.shape[0], device=keys.device)
        if exclude is not None:
            s = s.masked_fill(exclude[:, None] == ids[None, :], float("-inf"))
        s = torch.cat([best_s, s], 1)
        ids = torch.cat([best_i, ids.expand(q, -1)], 1)
        best_s, best_i = topk_score_then_id(s, ids, k)
    return pad_topk(best_s, best_i, k)
