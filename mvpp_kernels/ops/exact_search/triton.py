"""Triton kernels of the memory bank's search ops: a fused "scan" -- inner products of one query
against a range of keys, block by block, with the running top-k kept on chip -- used by exact_search
(ranges = key splits) and cluster_lookup (ranges = the probed fine clusters).

The top-k never compares floats and ids separately: each candidate is packed into one int64 sort key,
(order-preserving int32 of the float32 score) << 32 | (2**32 - 1 - id), so "larger key" means "higher
score, then lower id" -- the same total order as every other backend -- and the k largest keys are
taken by k rounds of max-and-remove over the running set and the new tile. A tile whose best key cannot
enter the running top-k is skipped. Each (query, range) program writes its k best keys; the partial
lists are merged with torch.topk over int64 keys (exact: keys are unique), then unpacked.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _fake

INT64_MIN = -(2**63)


@triton.jit
def _pack(score, ids):
    # order-preserving int32 of a float32: positive floats keep their bits, negative ones flip the
    # magnitude bits; -0.0 is made +0.0 first so the sign of zero never decides a tie.
    score = tl.where(score == 0.0, 0.0, score)
    bits = score.to(tl.int32, bitcast=True)
    key32 = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (key32.to(tl.int64) << 32) + (4294967295 - ids)


@triton.jit
def _scan_topk_kernel(
    Q, K, IDS, START, END, EXCLUDE, OUT,
    d, R,
    stride_q, stride_k,
    HAS_IDS: tl.constexpr, HAS_EXCLUDE: tl.constexpr,
    K_TOP: tl.constexpr, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pq = tl.program_id(0)
    pr = tl.program_id(1)
    start = tl.load(START + pq * R + pr)
    end = tl.load(END + pq * R + pr)
    if HAS_EXCLUDE:
        ex = tl.load(EXCLUDE + pq)
    else:
        ex = -1
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    slot = tl.arange(0, K_PAD)
    best = tl.full((K_PAD,), INT64_MIN, tl.int64)
    kth = tl.full((), INT64_MIN, tl.int64)
    for n0 in range(start, end, BLOCK_N):
        rows = n0 + offs_n
        rmask = rows < end
        acc = tl.zeros((BLOCK_N,), tl.float32)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + offs_d
            cmask = cols < d
            qv = tl.load(Q + pq * stride_q + cols, mask=cmask, other=0.0).to(tl.float32)
            kv = tl.load(K + rows[:, None].to(tl.int64) * stride_k + cols[None, :],
                         mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(kv * qv[None, :], axis=1)
        if HAS_IDS:
            ids = tl.load(IDS + rows, mask=rmask, other=0)
        else:
            ids = rows.to(tl.int64)
        cand = _pack(acc, ids)
        cand = tl.where(rmask & (ids != ex), cand, INT64_MIN)
        if tl.max(cand, axis=0) > kth:
            new = tl.full((K_PAD,), INT64_MIN, tl.int64)
            for i in tl.static_range(K_TOP):
                m = tl.maximum(tl.max(best, axis=0), tl.max(cand, axis=0))
                new = tl.where(slot == i, m, new)
                best = tl.where(best == m, INT64_MIN, best)
                cand = tl.where(cand == m, INT64_MIN, cand)
            best = new
            kth = tl.max(tl.where(slot == K_TOP - 1, best, INT64_MIN), axis=0)
    tl.store(OUT + (pq * R + pr) * K_PAD + slot, best)


def unpack(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 sort keys -> (float32 scores, int64 ids); INT64_MIN -> (-inf, -1)."""
    empty = keys == INT64_MIN
    key32 = (keys >> 32).to(torch.int32)
    bits = torch.where(key32 >= 0, key32, key32 ^ 0x7FFFFFFF)
    scores = bits.view(torch.float32)
    ids = 4294967295 - (keys & 0xFFFFFFFF)
    scores = torch.where(empty, torch.full_like(scores, float("-inf")), scores)
    ids = torch.where(empty, torch.full_like(ids, -1), ids)
    return scores, ids


def k_pad(k: int) -> int:
    return max(2, triton.next_power_of_2(k))


def scan_topk(queries, keys, ids, start, end, exclude, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over, for each query i, the union of key rows [start[i, r], end[i, r]) (r < R)."""
    q, d = queries.shape
    R = start.shape[1]
    kp = k_pad(k)
    out = torch.empty((q, R, kp), dtype=torch.int64, device=queries.device)
    if q and R:
        block_d = min(128, triton.next_power_of_2(max(d, 16)))
        torch.library.wrap_triton(_scan_topk_kernel)[(q, R)](
            queries, keys, ids if ids is not None else start, start, end,
            exclude if exclude is not None else start, out,
            d, R, queries.stride(0), keys.stride(0),
            HAS_IDS=ids is not None, HAS_EXCLUDE=exclude is not None,
            K_TOP=k, K_PAD=kp, BLOCK_N=64, BLOCK_D=block_d,
        )
    flat = out.view(q, R * kp)
    top = torch.topk(flat, k, dim=1, sorted=True).values if R * kp >= k else flat
    return unpack(top)


def _splits(n: int, q: int, device) -> int:
    # enough (query, split) programs to fill the device, each split at least a few key blocks long
    target = 4 * (torch.cuda.get_device_properties(device).multi_processor_count
                  if device.type == "cuda" else 2)
    return max(1, min(triton.cdiv(n, 256), triton.cdiv(target, max(q, 1))))


@torch.library.triton_op("mvpp::exact_search_triton", mutates_args=())
def exact_search_triton(keys: torch.Tensor, queries: torch.Tensor, k: int,
                        exclude: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    n = keys.shape[0]
    q = queries.shape[0]
    S = _splits(n, q, keys.device)
    per = triton.cdiv(n, S)
    bounds = torch.arange(S + 1, device=keys.device, dtype=torch.int64).mul_(per).clamp_(max=n)
    start = bounds[:-1].expand(q, S).contiguous()
    end = bounds[1:].expand(q, S).contiguous()
    return scan_topk(queries, keys, None, start, end, exclude, k)


# See selective_scan/triton.py: under TRITON_INTERPRET=1 the Python body cannot run on fake tensors.
exact_search_triton.register_fake(_fake)
