"""The Hawkes layer on top of mhp_scan: a multivariate point process whose excitation is the scan.

Intensity of mark k at time t (y(t) = C(t) · h(t), mhp_scan's piecewise readout, without D or z)::

    λ_k(t) = μ_k + W_k · y(t),        μ_k > 0,  W_k >= 0 (K marks x dim channels)

and the log-likelihood of a sequence of events (t_i, k_i), i = 1..n, observed on [0, T]::

    log L = Σ_i log λ_{k_i}(t_i^-) − ∫_0^T Σ_k λ_k(t) dt
          = Σ_i log(μ_{k_i} + W_{k_i} · y_left_i) − (T Σ_k μ_k + Σ_k W_k · integral)

which needs exactly mhp_scan's `y_left` and `integral` (so the compensator is exact, not sampled).
λ stays positive when y(t) >= 0, e.g. with B u >= 0 and C >= 0 (the model layer ensures it).
With dim = N = 1, Δ ≡ 1, A = −β, B u ≡ α, C = 1, W = 1 this is the classic exponential-kernel
Hawkes process λ(t) = μ + Σ_{t_j < t} α e^{−β (t − t_j)}.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..._checks import check_lengths, check_tensor
from ..selective_scan.reference import compute_dtype, expand_groups

__all__ = ["hawkes_loglik", "hawkes_intensity", "HawkesHead"]


_STATS_KERNEL: Optional[bool] = None


def _masked_stats(x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> tuple[float, float, int]:
    """(smallest finite value, largest finite value, number of NaN/inf) over x's valid entries: row b
    of a (batch, L) x up to lengths[b] (already validated int64), or every entry without lengths.
    (+inf, -inf, n) when no valid entry is finite. On CPU one C++ pass with no temporaries
    (mvpp::mhp_scan_masked_stats): the public wrappers' data checks would otherwise cost a masked
    copy plus several reductions over every event, more than the classic likelihood's scan itself."""
    global _STATS_KERNEL
    x = x.detach()
    if x.device.type == "cpu":
        if _STATS_KERNEL is None:
            from ..._backend import has_compiled_kernel

            _STATS_KERNEL = has_compiled_kernel("mhp_scan_masked_stats", "CPU")
        if _STATS_KERNEL:
            lo, hi, n_bad = torch.ops.mvpp.mhp_scan_masked_stats(x, lengths)
            return lo, hi, n_bad
    if lengths is not None:
        x = x[torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]]
    n_bad = 0
    if x.is_floating_point():
        finite = torch.isfinite(x)
        n_bad = int((~finite).sum())
        x = x[finite]
    if x.numel() == 0:
        return math.inf, -math.inf, n_bad
    lo, hi = torch.aminmax(x)
    return float(lo), float(hi), n_bad


def _check_mu_W(mu: torch.Tensor, W: torch.Tensor, dim: int) -> int:
    check_tensor("mu", mu, ndim=1, dims="(K,): base rate per mark")
    K = mu.shape[0]
    check_tensor("W", W, shape=(K, dim), dims=f"(K={K}, dim={dim}): channel weights per mark")
    if not (mu.is_floating_point() and W.is_floating_point()):
        raise TypeError("mu and W must be floating-point tensors")
    if not torch.compiler.is_compiling():
        mu_lo, _, mu_bad = _masked_stats(mu)
        w_lo, _, w_bad = _masked_stats(W)
        if mu_lo <= 0:
            raise ValueError(f"mu must be > 0 (a base rate; parametrise it with softplus, see HawkesHead); "
                             f"min is {mu_lo}")
        if w_lo < 0:
            raise ValueError(f"W must be >= 0 so the intensity stays positive; min is {w_lo}")
        if mu_bad or w_bad:
            raise ValueError("mu and W must be finite")
    return K


def _window(T: Union[float, torch.Tensor], batch: int, like: torch.Tensor) -> torch.Tensor:
    T = torch.as_tensor(T, dtype=like.dtype, device=like.device)
    if T.dim() == 0:
        T = T.expand(batch)
    check_tensor("T", T, shape=(batch,), dims="(batch,) or a scalar: the window end per sequence")
    if not torch.compiler.is_compiling():
        if not bool(torch.isfinite(T.detach()).all() and (T.detach() >= 0).all()):
            raise ValueError("T (the window end) must be finite and >= 0")
    return T


def hawkes_loglik(
    out,
    marks: torch.Tensor,
    mu: torch.Tensor,
    W: torch.Tensor,
    T: Union[float, torch.Tensor],
    lengths: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-sequence log-likelihood of a marked Hawkes process driven by mhp_scan (see module doc).

    Args:
        out: mhp_scan's result (MhpScanOutput, or any object with `y_left` (batch, dim, L) and
            `integral` (batch, dim)); run mhp_scan with the same `lengths` and with
            `dt_end = T - t_n` so the integral covers [0, T].
        marks: (batch, L) integer marks k_i in [0, K) (padding is not checked or read).
        mu: (K,) base rates, > 0.  W: (K, dim) channel weights, >= 0.
        T: the window end, a scalar or (batch,).
        lengths: optional (batch,) valid events per sequence (padded events are ignored).

    Returns:
        (batch,) log-likelihoods in the dtype of `out.y_left`; differentiable with respect to
        out.y_left, out.integral, mu, W and T.
    """
    y_left, integral = out.y_left, out.integral
    check_tensor("out.y_left", y_left, ndim=3, dims="(batch, dim, L)")
    batch, dim, L = y_left.shape
    check_tensor("out.integral", integral, shape=(batch, dim), dims="(batch, dim)")
    check_tensor("marks", marks, shape=(batch, L), dims="(batch, L) integer marks")
    if marks.is_floating_point() or marks.is_complex() or marks.dtype == torch.bool:
        raise TypeError(f"marks must be an integer tensor, got {marks.dtype}")
    K = _check_mu_W(mu, W, dim)
    compiling = torch.compiler.is_compiling()
    if lengths is not None:
        if compiling:
            lengths = lengths.to(device=y_left.device, dtype=torch.int64)
        else:
            lengths = check_lengths("lengths", lengths, batch, L, y_left.device)
    if not compiling and marks.numel():
        lo, hi, _ = _masked_stats(marks, lengths)
        if lo < 0 or hi >= K:
            raise ValueError(f"marks must lie in [0, K={K}) on valid events, got values in [{int(lo)}, {int(hi)}]")
    ct = y_left.dtype
    mu_, W_ = mu.to(ct), W.to(ct)
    # Few (batch, L) temporaries: on CPU each costs about as much as the classic scan itself.
    invalid = None if lengths is None else torch.arange(L, device=y_left.device)[None, :] >= lengths[:, None]
    # λ_{k_i}(t_i^-) = μ_{k_i} + W_{k_i} · y_left_i: every mark's W_k · y_left by one matmul, then the
    # event's own mark (padding may hold any mark: read mark 0 there). One channel: elementwise (a
    # batched matmul of 1 x 1 matrices costs several times more).
    if dim == 1 and K == 1:
        lam = torch.addcmul(mu_, y_left[:, 0], W_[0, 0])
    else:
        WY = y_left * W_.view(1, K, 1) if dim == 1 else torch.matmul(W_, y_left)  # (batch, K, L)
        if K == 1:
            lam = WY.squeeze(1) + mu_
        else:
            idx = marks.to(torch.int64)
            if invalid is not None:
                idx = idx.masked_fill(invalid, 0)
            lam = WY.gather(1, idx.unsqueeze(1)).squeeze(1) + mu_[idx]
    if invalid is not None:
        lam = lam.masked_fill_(invalid, 1.0)  # log 1 = 0 on padding (no gradient reaches it)
    log_term = torch.log(lam).sum(-1)
    if isinstance(T, (int, float)):
        if not compiling and not (math.isfinite(T) and T >= 0):
            raise ValueError("T (the window end) must be finite and >= 0")
        window_mu = mu_.sum() * T
    else:
        window_mu = _window(T, batch, y_left) * mu_.sum()
    compensator = window_mu + integral @ W_.sum(0)
    return log_term - compensator


def _event_states(u, delta, A, B, C, dt, delta_bias, delta_softplus, lengths, initial_state):
    """h_i^+, Δ_i and C_i at every event (batch, dim, N, L), plus h_0^+: reference speed, for queries."""
    ct = compute_dtype(u.dtype)
    batch, dim, L = u.shape
    N = A.shape[1]
    d_ = delta.to(ct) + (delta_bias.to(ct)[:, None] if delta_bias is not None else 0)
    if delta_softplus:
        d_ = F.softplus(d_)
    u_ = u.to(ct)

    def full(X):
        X = X.to(ct)
        if X.dim() == 2:
            return X[None, :, :, None].expand(batch, dim, N, L)
        if X.dim() == 3:
            X = X.unsqueeze(1)
        return expand_groups(X, dim)

    valid = torch.arange(L, device=u.device)[None, :] < lengths[:, None]
    zero = torch.zeros((), dtype=ct, device=u.device)
    # Padding may hold anything (NaN included): keep it out of the values and their gradients.
    v4 = valid[:, None, None, :]
    B_, C_ = torch.where(v4, full(B), zero), torch.where(v4, full(C), zero)
    u_ = torch.where(valid[:, None, :], u_, zero)
    d_ = torch.where(valid[:, None, :], d_, zero)
    dt = torch.where(valid, dt.to(ct), zero)
    h0 = initial_state.to(ct) if initial_state is not None else u_.new_zeros(batch, dim, N)
    h, hs = h0, []
    d_prev = d_[:, :, 0] if L else None
    for i in range(L):
        vi = valid[:, i, None, None]
        x = A.to(ct) * (d_prev * dt[:, i, None].to(ct))[..., None]
        h_new = torch.exp(x) * h + (d_[:, :, i] * u_[:, :, i])[..., None] * B_[..., i]
        h = torch.where(vi, h_new, h)
        hs.append(h)
        d_prev = torch.where(valid[:, i, None], d_[:, :, i], d_prev)
    H = torch.stack(hs, dim=-1) if L else u_.new_zeros(batch, dim, N, 0)
    return h0, H, d_, C_


def hawkes_intensity(
    query_times: torch.Tensor,
    mu: torch.Tensor,
    W: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    dt: torch.Tensor,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    lengths: Optional[torch.Tensor] = None,
    initial_state: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """λ_k(q) = μ_k + W_k · y(q) at arbitrary times q, from the same inputs as mhp_scan.

    For q in (t_j, t_{j+1}] (t_0 = 0) the readout is C_j · exp(A Δ_j (q − t_j)) h_j^+ (the first
    gap uses Δ_1, C_1 and h_0^+ = initial_state, as mhp_scan); so λ(t_i) equals the left limit
    mhp_scan evaluates in `y_left`, and a query past the last valid event decays from it. Queries
    may be unsorted; times are absolute (t_i = cumsum(dt)).

    This is a reference-speed implementation (it materialises the (batch, dim, N, L) states and
    loops over events in Python): for plots, diagnostics and next-event sampling, not training.

    Args:
        query_times: (batch, Q) times in [0, T] (finite, >= 0).
        mu (K,) > 0, W (K, dim) >= 0; the rest as mhp_scan (D and z do not enter the intensity).

    Returns:
        (batch, Q, K) intensities in float32 (float64 for float64 u); differentiable.
    """
    check_tensor("u", u, ndim=3, dims="(batch, dim, L)")
    batch, dim, L = u.shape
    N = A.shape[1]
    K = _check_mu_W(mu, W, dim)
    check_tensor("query_times", query_times, ndim=2, dims="(batch, Q)")
    if query_times.shape[0] != batch:
        raise ValueError(f"query_times must have shape (batch={batch}, Q), got {tuple(query_times.shape)}")
    check_tensor("dt", dt, shape=(batch, L), dims="(batch, L)")
    if not bool(torch.isfinite(query_times).all() and (query_times >= 0).all()):
        raise ValueError("query_times must be finite and >= 0")
    lengths = check_lengths("lengths", lengths, batch, L, u.device)
    if lengths is None:
        lengths = torch.full((batch,), L, dtype=torch.int64, device=u.device)
    dt_valid = dt.detach()[torch.arange(L, device=u.device)[None, :] < lengths[:, None]]
    if not bool(torch.isfinite(dt_valid).all() and (dt_valid >= 0).all()):
        raise ValueError("dt must be finite and >= 0 on valid events")
    ct = compute_dtype(u.dtype)
    h0, H, d_, C_ = _event_states(u, delta, A, B, C, dt, delta_bias, delta_softplus, lengths, initial_state)
    valid = torch.arange(L, device=u.device)[None, :] < lengths[:, None]
    times = torch.cumsum(torch.where(valid, dt.to(ct), torch.zeros((), dtype=ct, device=u.device)), dim=1)
    times = torch.where(valid, times, torch.full_like(times, float("inf")))
    q = query_times.to(ct)
    # j = number of valid events strictly before q; the state is that of event j (0: the start).
    j = torch.searchsorted(times.detach().contiguous(), q.detach().contiguous(), side="left")  # (batch, Q)
    Q = q.shape[1]
    jm1 = (j - 1).clamp(min=0)  # event index whose state/step/readout applies (first gap: event 1's)
    idx = jm1[:, None, None, :]
    H_all = torch.cat([h0[..., None], H], dim=-1)  # (batch, dim, N, L+1): state after j events
    h_at = torch.gather(H_all, 3, j[:, None, None, :].expand(batch, dim, N, Q))
    if L:
        d_at = torch.gather(d_, 2, jm1[:, None, :].expand(batch, dim, Q))  # (batch, dim, Q)
        C_at = torch.gather(C_, 3, idx.expand(batch, dim, N, Q))
        t_at = torch.where(j > 0, torch.gather(times, 1, jm1), torch.zeros_like(q))
        since = (q - t_at).clamp(min=0)
        decay = torch.exp(A.to(ct)[None, :, :, None] * (d_at * since[:, None, :])[:, :, None, :])
        y = (C_at * decay * h_at).sum(2)  # (batch, dim, Q)
    else:
        y = q.new_zeros(batch, dim, Q)
    return mu.to(ct) + torch.einsum("bdq,kd->bqk", y, W.to(ct))


class HawkesHead(nn.Module):
    """K-mark Hawkes head on mhp_scan's output with positivity built in.

    μ = softplus(mu_raw) + eps > 0 and W = softplus(W_raw) >= 0, so any parameter values give a
    valid process. `forward(out, marks, T, lengths)` returns the per-sequence log-likelihood.
    """

    def __init__(self, num_marks: int, dim: int, *, init_mu: float = 0.1, init_w: float = 0.1, eps: float = 1e-6):
        super().__init__()
        if num_marks < 1 or dim < 1:
            raise ValueError(f"num_marks and dim must be >= 1, got {num_marks}, {dim}")
        if init_mu <= eps or init_w <= 0:
            raise ValueError("init_mu must exceed eps and init_w must be > 0")
        self.eps = eps
        inv = lambda v: float(torch.log(torch.expm1(torch.tensor(float(v)))))  # noqa: E731  (softplus^-1)
        self.mu_raw = nn.Parameter(torch.full((num_marks,), inv(init_mu - eps)))
        self.W_raw = nn.Parameter(torch.full((num_marks, dim), inv(init_w)))

    @property
    def mu(self) -> torch.Tensor:
        return F.softplus(self.mu_raw) + self.eps

    @property
    def W(self) -> torch.Tensor:
        return F.softplus(self.W_raw)

    def forward(self, out, marks: torch.Tensor, T, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        return hawkes_loglik(out, marks, self.mu, self.W, T, lengths)

    def intensity(self, query_times: torch.Tensor, **scan_inputs) -> torch.Tensor:
        """λ at `query_times` (batch, Q) -> (batch, Q, K); `scan_inputs` as hawkes_intensity's."""
        return hawkes_intensity(query_times, self.mu, self.W, **scan_inputs)
