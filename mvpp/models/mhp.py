"""MHPEncoder: a Mamba-style block on `mvpp_kernels.mhp_scan` with a Hawkes head (M3TR's MHP).

Per event i (mark k_i, gap dt_i) the block computes, as a Mamba block does,

    x_i = mark_emb[k_i] + time_proj(log1p(dt_i * s))       (s: a fixed time scale)
    (xs, g) = in_proj(x)                                    (value path, gate path)
    xc = silu(causal depthwise conv1d(xs))                  (causal-conv1d on CUDA if installed)
    u = softplus(xc) >= 0;  delta, B, C from x_proj(xc)  with B = softplus(.) >= 0, C = softplus(.) >= 0
    A = -exp(A_log) < 0

and runs the continuous-time selective scan `mhp_scan(u, delta, A, B, C, dt, D, z=g, ...)`, whose
state decays between events at rate A*Delta and jumps by Delta*B*u at each event. Because u, B and C
are non-negative by construction, the left-limit readout y^- = C . h^- and its integral are
non-negative too, so the Hawkes intensity

    lambda_k(t) = mu_k + W_k . y(t),   mu = softplus(mu_raw) > 0,  W = softplus(W_raw) >= 0

is a valid (positive) intensity and `mvpp_kernels.hawkes_loglik` gives the exact log-likelihood of
the observed engagement stream (no Monte Carlo integral). The representation for prediction is
out_proj(masked mean of y over events, y at the last event) together with the log event count and
the intensity integral per unit time (the "trajectory" M3TR retrieves with).

The convolution mixes an event with earlier events only (left padding), so the intensity before
event i still depends on events < i only: mhp_scan reads gap i with event i-1's state and C.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._ops import op

__all__ = ["MHPEncoder", "causal_depthwise_conv1d"]


def causal_depthwise_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (batch, dim, L), weight (dim, width): out_t = sum_j w_j x_{t - width + 1 + j} (+ bias)."""
    if x.is_cuda:
        try:  # the fused kernel when present; same math
            from causal_conv1d import causal_conv1d_fn  # type: ignore

            return causal_conv1d_fn(x, weight, bias, activation=None)
        except ImportError:
            pass
    width = weight.shape[1]
    return F.conv1d(F.pad(x, (width - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])


class MHPEncoder(nn.Module):
    """Encode padded engagement event streams; return a representation and the Hawkes log-likelihood.

    Args:
        n_marks: number of event types (3: likes, comments, shares).
        d_model: width of the block (the scan's `dim`).
        d_state: N, the scan's state size per channel.
        d_out: size of the returned representation.
        conv_width: causal depthwise convolution width.
        time_scale: gaps are multiplied by it before the scan (choose ~1 / typical gap), so the
            learned decay rates start in a useful range. The likelihood is in the scaled time unit.
        backend: mvpp_kernels backend for mhp_scan / hawkes ops (None: $MVPP_BACKEND or auto).
    """

    def __init__(self, n_marks: int = 3, d_model: int = 32, d_state: int = 8, d_out: int = 32,
                 conv_width: int = 4, time_scale: float = 10.0, backend: str | None = None):
        super().__init__()
        self.n_marks, self.d_model, self.d_state = n_marks, d_model, d_state
        self.time_scale = float(time_scale)
        self.backend = backend
        self.mark_emb = nn.Embedding(n_marks, d_model)
        self.time_proj = nn.Linear(2, d_model)
        self.in_proj = nn.Linear(d_model, 2 * d_model)
        self.conv_weight = nn.Parameter(torch.randn(d_model, conv_width) / math.sqrt(conv_width))
        self.conv_bias = nn.Parameter(torch.zeros(d_model))
        self.dt_rank = max(1, d_model // 8)
        self.x_proj = nn.Linear(d_model, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_model)
        # Mamba's S4D-real initialisation: A_n = -(n + 1), and Delta initialised in [1e-2, 1e-1]
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_model, 1)
        self.A_log = nn.Parameter(torch.log(A))
        dt0 = torch.exp(torch.rand(d_model) * (math.log(0.5) - math.log(0.05)) + math.log(0.05))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt0 + torch.log(-torch.expm1(-dt0)))  # softplus^-1
        self.D = nn.Parameter(torch.ones(d_model))
        self.out_proj = nn.Linear(2 * d_model + 2, d_out)
        # Hawkes head (mvpp_kernels.HawkesHead): lambda_k = mu_k + W_k . y, mu = softplus(.) > 0, W = softplus(.) >= 0
        self.head = op("HawkesHead", "MHPEncoder")(n_marks, d_model, init_mu=0.5, init_w=0.05)

    @property
    def mu(self) -> torch.Tensor:
        return self.head.mu

    @property
    def W(self) -> torch.Tensor:
        return self.head.W

    def _scan_inputs(self, dt, marks, lengths):
        batch, L = dt.shape
        valid = torch.arange(L, device=dt.device)[None, :] < lengths[:, None]
        s_dt = torch.where(valid, dt, torch.zeros_like(dt)) * self.time_scale
        tf = torch.stack([torch.log1p(s_dt), (valid.float())], dim=-1)
        x = self.mark_emb(marks.clamp(0, self.n_marks - 1)) + self.time_proj(tf)
        x = x * valid.unsqueeze(-1)
        xz = self.in_proj(x).transpose(1, 2)  # (batch, 2*dim, L)
        xs, g = xz.chunk(2, dim=1)
        xc = F.silu(causal_depthwise_conv1d(xs, self.conv_weight, self.conv_bias))
        proj = self.x_proj(xc.transpose(1, 2))  # (batch, L, r + 2N)
        d_raw, B_raw, C_raw = proj.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = self.dt_proj.weight @ d_raw.transpose(1, 2)  # (batch, dim, L); bias goes to delta_bias
        u = F.softplus(xc)
        B = F.softplus(B_raw).transpose(1, 2).contiguous()  # (batch, N, L) >= 0
        C = F.softplus(C_raw).transpose(1, 2).contiguous()
        A = -torch.exp(self.A_log)
        return u, delta, A, B, C, g, s_dt, valid

    def forward(self, event_dt, event_marks, event_lengths, dt_end, window=None):
        """event_dt (batch, L) gaps, event_marks (batch, L) int, event_lengths (batch,), dt_end (batch,).

        Returns dict: rep (batch, d_out), loglik (batch,) Hawkes log-likelihood of each stream (in the
        scaled time unit), traj (batch, 2 * d_model + 2) the trajectory descriptor used for retrieval,
        scan (the MhpScanOutput).
        """
        mhp_scan = op("mhp_scan", "MHPEncoder")
        lengths = event_lengths.to(torch.int64)
        u, delta, A, B, C, g, s_dt, valid = self._scan_inputs(event_dt, event_marks, lengths)
        s_end = dt_end * self.time_scale
        out = mhp_scan(u, delta, A, B, C, s_dt, D=self.D, z=g, delta_bias=self.dt_proj.bias,
                       delta_softplus=True, dt_end=s_end, lengths=lengths, backend=self.backend)
        T = (s_dt * valid).sum(1) + s_end  # padding may hold anything
        ll = self.head(out, event_marks, T, lengths)
        y = out.y.float()  # (batch, dim, L)
        vm = valid.unsqueeze(1).float()
        n = lengths.clamp(min=1).float()
        mean_y = (y * vm).sum(-1) / n[:, None]
        last = y.gather(2, (lengths - 1).clamp(min=0)[:, None, None].expand(-1, y.shape[1], 1)).squeeze(2)
        last = last * (lengths > 0).float()[:, None]
        rate = (out.integral.float() * self.W.float().sum(0)[None, :]).sum(1, keepdim=True) / T.clamp(min=1e-6)[:, None]
        traj = torch.cat([mean_y, last, torch.log1p(lengths.float())[:, None], torch.log1p(rate)], dim=1)
        return {"rep": self.out_proj(traj), "loglik": ll, "traj": traj, "scan": out, "T": T}

    def intensity(self, event_dt, event_marks, event_lengths, dt_end, query_times):
        """(batch, Q, K) intensities at `query_times` (batch, Q) (data time unit; the rates are per
        scaled time unit), via mvpp_kernels.hawkes_intensity."""
        op("hawkes_intensity", "MHPEncoder.intensity")
        lengths = event_lengths.to(torch.int64)
        u, delta, A, B, C, g, s_dt, valid = self._scan_inputs(event_dt, event_marks, lengths)
        return self.head.intensity(query_times * self.time_scale, u=u, delta=delta, A=A, B=B, C=C, dt=s_dt,
                                   delta_bias=self.dt_proj.bias, delta_softplus=True, lengths=lengths)
