"""Pure-torch frame_score: the float64-capable oracle and the last-resort fallback.

Fully vectorised (no Python loop over frames); differentiable by autograd, so it is also the
gradient oracle for the kernels' hand-written backward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other input dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def frame_score_ref(
    frames: torch.Tensor,
    weight: torch.Tensor,
    bias=None,
    lengths: Optional[torch.Tensor] = None,
    k: int = 8,
    temperature: float = 1.0,
    hidden: Optional[tuple] = None,
):
    """(scores, dense, topk_idx, topk_frames) -- see `mvpp_kernels.frame_score` for the contract.

    Computes in float64 for float64 frames, else float32. `scores` is in the compute dtype,
    `dense` and `topk_frames` in frames' dtype, `topk_idx` int64.
    """
    batch, T, Fdim = frames.shape
    ct = compute_dtype(frames.dtype)
    f = frames.to(ct)
    if hidden is not None:
        W1, b1 = hidden
        a = f @ W1.to(ct) + b1.to(ct)
        s = F.gelu(a) @ weight.to(ct)
    else:
        s = f @ weight.to(ct)
    if bias is not None:
        s = s + (bias.to(ct).reshape(()) if isinstance(bias, torch.Tensor) else float(bias))
    pos = torch.arange(T, device=frames.device)
    if lengths is None:
        valid = torch.ones(batch, T, dtype=torch.bool, device=frames.device)
    else:
        valid = pos[None, :] < lengths.to(frames.device, torch.int64)[:, None]
    neg_inf = torch.full_like(s, float("-inf"))
    scores = torch.where(valid, s, neg_inf)

    # Masked softmax written so that a length-0 row gives p = 0 (not NaN) and invalid positions
    # never put inf/NaN into the autograd graph.
    z = torch.where(valid, s / temperature, torch.zeros_like(s))
    m = torch.where(valid, z, neg_inf).amax(dim=1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    e = torch.where(valid, torch.exp(z - m), torch.zeros_like(z))
    denom = e.sum(dim=1, keepdim=True)
    p = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    dense = (p.unsqueeze(-1) * f).sum(dim=1).to(frames.dtype)

    # Top-k: a stable descending sort keeps the lower index first among equal scores.
    order = torch.sort(scores.detach(), dim=1, descending=True, stable=True).indices
    kk = min(k, T)
    idx = order[:, :kk]
    if kk < k:
        idx = torch.cat([idx, idx.new_full((batch, k - kk), -1)], dim=1)
    rank = torch.arange(k, device=frames.device)
    n_valid = valid.sum(dim=1)
    idx = torch.where(rank[None, :] < n_valid[:, None], idx, torch.full_like(idx, -1))
    safe = idx.clamp_min(0)
    gathered = torch.gather(frames, 1, safe.unsqueeze(-1).expand(batch, k, Fdim))
    topk_frames = torch.where((idx >= 0).unsqueeze(-1), gathered, torch.zeros_like(gathered))
    return scores, dense, idx, topk_frames
