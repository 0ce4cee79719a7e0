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
    pos = torch.arange(T, device=frames.device)
    if lengths is None:
        valid = torch.ones(batch, T, dtype=torch.bool, device=frames.device)
    else:
        valid = pos[None, :] < lengths.to(frames.device, torch.int64)[:, None]
    # Frames past a video's length are replaced (torch.where, not a product: 0 * NaN is NaN) before
    # they enter any product, so whatever they hold (NaN, inf) reaches neither an output nor a gradient.
    f = torch.where(valid.unsqueeze(-1), frames.to(ct), torch.zeros((), dtype=ct, device=frames.device))
    if hidden is not None:
        W1, b1 = hidden
        a = f @ W1.to(ct) + b1.to(ct)
        s = F.gelu(a) @ weight.to(ct)
    else:
        s = f @ weight.to(ct)
    if bias is not None:
        s = s + (bias.to(ct).reshape(()) if isinstance(bias, torch.Tensor) else float(bias))
    neg_inf = torch.full_like(s, float("-inf"))
    scores = torch.where(valid, s, neg_inf)

    # Masked softmax, max-subtracted in score units: z_t - max z = (s_t - max s) / tau, so a large
    # score over a small temperature never overflows (s / tau can be inf in float32 where the float64
    # result is finite). The shift is the plain max of the valid scores, NaN-propagating: a NaN or
    # +inf score, or a video whose valid scores are all -inf, gives a NaN shift and so NaN softmax
    # weights -- torch.softmax's behaviour, the rule every backend shares (docs/frame_score.md).
    # A length-0 video gets p = 0 (dense 0).
    n_valid = valid.sum(dim=1, keepdim=True)
    shift = torch.where(n_valid > 0, scores.detach().amax(dim=1, keepdim=True), torch.zeros_like(s[:, :1]))
    z = torch.where(valid, (s - shift) / temperature, neg_inf)
    e = torch.where(valid, torch.exp(z), torch.zeros_like(z))
    denom = e.sum(dim=1, keepdim=True)
    p = e / torch.where(n_valid > 0, denom, torch.ones_like(denom))
    dense = (p.unsqueeze(-1) * f).sum(dim=1).to(frames.dtype)

    # Top-k: a stable descending sort keeps the lower index first among equal scores (and -0.0 ties
    # with 0.0); torch sorts NaN above +inf, and a valid -inf frame sorts before the padding (which
    # has higher indices), so the order is (NaN, +inf, finite, -inf), ties -> lower index.
    order = torch.sort(scores.detach(), dim=1, descending=True, stable=True).indices
    kk = min(k, T)
    idx = order[:, :kk]
    if kk < k:
        idx = torch.cat([idx, idx.new_full((batch, k - kk), -1)], dim=1)
    rank = torch.arange(k, device=frames.device)
    idx = torch.where(rank[None, :] < n_valid, idx, torch.full_like(idx, -1))
    safe = idx.clamp_min(0)
    gathered = torch.gather(frames, 1, safe.unsqueeze(-1).expand(batch, k, Fdim))
    topk_frames = torch.where((idx >= 0).unsqueeze(-1), gathered, torch.zeros_like(gathered))
    return scores, dense, idx, topk_frames
