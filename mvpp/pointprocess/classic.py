"""A non-Hawkes classic process for benchmarks no Hawkes-family model gets for free.

Self-correcting (stress-release) process with independent marks::

    lambda(t) = exp(mu t - alpha N(t-)),        lambda_k(t) = p_k lambda(t)

Each event lowers the intensity by a factor exp(-alpha); between events it grows exponentially. It is
not of the sum-of-exponentials *decaying* form the toolkit's thinning sampler needs (the intensity
grows between events), so it has its own exact sampler by inversion of the closed-form compensator::

    Lambda(t0, t) = exp(-alpha n) (exp(mu t) - exp(mu t0)) / mu     on a gap with n events before it,

i.e. with E ~ Exp(1) the next event after t0 is t0 + log1p(mu E exp(alpha n - mu t0)) / mu.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["SelfCorrecting"]


class SelfCorrecting:
    """lambda(t) = exp(mu t - alpha N(t-)), marks i.i.d. with probabilities `p` (K = len(p))."""

    def __init__(self, mu: float, alpha: float, p=(1.0,)):
        self.mu, self.alpha = float(mu), float(alpha)
        self.p = torch.as_tensor(p, dtype=torch.float64)
        if not (self.mu > 0 and math.isfinite(self.mu)):
            raise ValueError(f"mu must be a finite number > 0, got {mu}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
        if self.p.dim() != 1 or len(self.p) == 0 or bool((self.p < 0).any()) or abs(float(self.p.sum()) - 1) > 1e-9:
            raise ValueError(f"p must be a probability vector (K,), got {p}")
        self.K = len(self.p)

    def _gap_comp(self, t0, t1, n):
        """Lambda over (t0, t1] with n events before it, computed as exp(mu t1 - a n) * (1 - exp(-mu (t1 - t0))) / mu."""
        return torch.exp(self.mu * t1 - self.alpha * n) * (-torch.expm1(-self.mu * (t1 - t0))) / self.mu

    @torch.no_grad()
    def sample(self, T: float, batch: int, *, max_events: int = 100_000,
               generator: Optional[torch.Generator] = None):
        """Exact samples on [0, T]: returns (times (B, L) float64 padded with 0, marks (B, L), lengths (B,))."""
        if not (T > 0 and math.isfinite(T)):
            raise ValueError(f"T must be a finite number > 0, got {T}")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        t = torch.zeros(batch, dtype=torch.float64)
        n = torch.zeros(batch, dtype=torch.float64)
        alive = torch.ones(batch, dtype=torch.bool)
        times, marks = [], []
        while bool(alive.any()):
            if len(times) >= max_events:
                raise RuntimeError(f"a sequence reached max_events={max_events} before T={T}")
            e = torch.empty(batch, dtype=torch.float64).exponential_(1.0, generator=generator)
            nxt = t + torch.log1p(self.mu * e * torch.exp(self.alpha * n - self.mu * t)) / self.mu
            k = torch.multinomial(self.p.expand(batch, self.K), 1, replacement=True, generator=generator).squeeze(1)
            alive = alive & (nxt <= T)
            times.append(torch.where(alive, nxt, torch.zeros_like(nxt)))
            marks.append(torch.where(alive, k, torch.zeros_like(k)))
            t = torch.where(alive, nxt, t)
            n = n + alive.double()
        times = torch.stack(times[:-1], 1) if len(times) > 1 else torch.zeros(batch, 0, dtype=torch.float64)
        marks = torch.stack(marks[:-1], 1) if len(marks) > 1 else torch.zeros(batch, 0, dtype=torch.int64)
        return times, marks, n.long()

    def event_log_intensities(self, times, marks, lengths):
        """(B, L): log lambda_{k_i}(t_i) for each real event (0 in the padding)."""
        L = times.shape[1]
        i = torch.arange(L, dtype=torch.float64)[None, :]
        valid = torch.arange(L)[None, :] < lengths[:, None]
        ll = self.p.log()[marks.clamp(0, self.K - 1)] + self.mu * times - self.alpha * i
        return torch.where(valid, ll, torch.zeros_like(ll))

    def gap_compensators(self, times, marks, lengths, T) -> torch.Tensor:
        """(B, L+1): Lambda (summed over marks) over (t_{i-1}, t_i] for i = 0..n-1 (t_{-1} = 0), then (t_{n-1}, T]
        at index n, 0 after; the same layout as `mvpp.pointprocess.gap_compensators(...).sum(-1)`."""
        B, L = times.shape
        T = torch.as_tensor(T, dtype=torch.float64).expand(B)
        idx = torch.arange(L + 1)[None, :]
        valid = idx < lengths[:, None]
        ends = torch.cat([times, torch.zeros(B, 1, dtype=torch.float64)], 1)
        ends = torch.where(valid, ends, T[:, None].expand(B, L + 1))
        starts = torch.cat([torch.zeros(B, 1, dtype=torch.float64), times], 1)
        out = self._gap_comp(starts, ends, idx.double())
        return torch.where(idx <= lengths[:, None], out, torch.zeros_like(out))

    def loglik(self, times, marks, lengths, T) -> torch.Tensor:
        """(B,): exact log-likelihood of each sequence on [0, T]."""
        return (self.event_log_intensities(times, marks, lengths).sum(1)
                - self.gap_compensators(times, marks, lengths, T).sum(1))
