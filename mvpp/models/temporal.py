"""TemporalEnlargement (seed 000): frame scoring with a sparse and a dense path, fused by a gate.

One `mvpp_kernels.frame_score` call reads every frame once and returns the frame scores s_t (a
small MLP scorer), the dense path p = sum_t softmax(s / tau)_t f_t and the top-k highlight frames.
The sparse path re-weights the k highlight frames by the softmax of their own scores (so the
scorer also learns through it), and a learned gate mixes the two:

    sparse = sum_j softmax(s[topk])_j relu(W_s f_{topk_j}),  dense = relu(W_d p)
    g = sigmoid(W_g [sparse, dense]),  out = g * sparse + (1 - g) * dense

`UniformFramePooling` is what the ablation "without frame scoring" uses instead: MMRA's uniform
10-frame `linspace` sampling and a mean of the sampled frames.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._ops import op

__all__ = ["TemporalEnlargement", "UniformFramePooling", "uniform_frame_indices"]


def uniform_frame_indices(lengths: torch.Tensor, samples: int = 10) -> torch.Tensor:
    """(batch, samples) frame indices round(linspace(0, len - 1, samples)) per video (0 for len 0)."""
    steps = torch.linspace(0, 1, samples, device=lengths.device)
    idx = torch.round(steps[None, :] * (lengths.clamp(min=1) - 1).float()[:, None]).long()
    return idx


class UniformFramePooling(nn.Module):
    def __init__(self, frame_dim: int, d_out: int, samples: int = 10):
        super().__init__()
        self.samples = samples
        self.proj = nn.Linear(frame_dim, d_out)

    def forward(self, frames, frame_lengths):
        idx = uniform_frame_indices(frame_lengths, self.samples)
        picked = frames.gather(1, idx[:, :, None].expand(-1, -1, frames.shape[-1]))
        return {"rep": F.relu(self.proj(picked.mean(1)))}


class TemporalEnlargement(nn.Module):
    """frames (batch, T, F) + lengths -> (batch, d_out) via `mvpp_kernels.frame_score`.

    Args: frame_dim F, d_out, k highlight frames, hidden H of the MLP scorer (0: linear scorer),
    temperature tau of the dense softmax, backend for frame_score.
    """

    def __init__(self, frame_dim: int, d_out: int = 32, k: int = 4, hidden: int = 16, temperature: float = 1.0,
                 backend: str | None = None):
        super().__init__()
        self.k, self.temperature, self.backend = k, float(temperature), backend
        self.score_w = nn.Parameter(torch.randn(hidden if hidden else frame_dim) * 0.1)
        self.score_b = nn.Parameter(torch.zeros(()))
        if hidden:
            self.W1 = nn.Parameter(torch.randn(frame_dim, hidden) / frame_dim ** 0.5)
            self.b1 = nn.Parameter(torch.zeros(hidden))
        else:
            self.register_parameter("W1", None)
            self.register_parameter("b1", None)
        self.sparse_proj = nn.Linear(frame_dim, d_out)
        self.dense_proj = nn.Linear(frame_dim, d_out)
        self.gate = nn.Linear(2 * d_out, d_out)

    def forward(self, frames, frame_lengths):
        frame_score = op("frame_score", "TemporalEnlargement")
        hidden = (self.W1, self.b1) if self.W1 is not None else None
        scores, dense, topk_idx, topk_frames = frame_score(
            frames, self.score_w, self.score_b, lengths=frame_lengths, k=self.k, temperature=self.temperature,
            hidden=hidden, backend=self.backend)
        valid = topk_idx >= 0
        s_top = scores.gather(1, topk_idx.clamp(min=0)).float()
        s_top = torch.where(valid, s_top / self.temperature, torch.full_like(s_top, -1e9))
        w = torch.softmax(s_top, dim=1) * valid
        sparse = (w.unsqueeze(-1) * F.relu(self.sparse_proj(topk_frames.float()))).sum(1)
        dense_r = F.relu(self.dense_proj(dense.float()))
        g = torch.sigmoid(self.gate(torch.cat([sparse, dense_r], dim=1)))
        return {"rep": g * sparse + (1 - g) * dense_r, "scores": scores, "topk_idx": topk_idx, "gate": g}
