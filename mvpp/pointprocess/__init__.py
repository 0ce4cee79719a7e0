"""Point-process toolkit on the fused op: Ogata sampling, next-event prediction, goodness of fit.

Every model here exposes its intensity after the last event of a history in *sum-of-exponentials*
form (data time unit, tau = time since the last event t_n, t_0 = 0)::

    lambda_k(t_n + tau) = mu_k + sum_m a_{k,m} exp(-b_m tau),     mu_k > 0, a >= 0, b >= 0

(`tail(times, marks, lengths) -> (mu (B,K), a (B,K,M), b (B,M))`). Both the classic exponential
Hawkes process (`ExpHawkes`) and the learned MHPEncoder + HawkesHead (`MHPModel`) have this form:
for the MHP, y(t) = C_n . exp(A Delta_n tau) h_n^+ with h_n^+ >= 0 (B u >= 0), C_n >= 0, A < 0,
Delta_n > 0 and W >= 0, so a_{k,(d,n)} = W_{k,d} C_{n,d,n'} h_{d,n'} >= 0 and b = -A Delta_n >= 0.

Why the thinning bound is exact: with a >= 0 and b >= 0 every term is non-increasing in tau, so
between events lambda(s) <= lambda(s0^+) for all s >= s0 (s0 the current proposal time). Ogata's
thinning with that bound (re-taken at every rejected proposal, which is still an upper bound for the
rest of the gap) samples the process exactly; no grid, no MC integral. The compensator over a gap is
closed form: mu_k tau + sum_m a_{k,m} (1 - exp(-b_m tau)) / b_m.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["ExpHawkes", "SelfCorrecting", "MHPModel", "tail_intensity", "tail_compensator", "sample", "SampleResult",
           "predict_next", "gap_compensators", "time_rescaling", "ks_exp1", "gof", "qq_plot"]


# ---------------------------------------------------------------------------------------------
# The sum-of-exponentials tail
# ---------------------------------------------------------------------------------------------
def tail_intensity(mu, a, b, tau):
    """lambda_k(t_n + tau): mu (B,K), a (B,K,M), b (B,M), tau (B,) or (B,Q) -> (B,K) or (B,Q,K)."""
    if tau.dim() == 1:
        return mu + (a * torch.exp(-b * tau[:, None])[:, None, :]).sum(-1)
    e = torch.exp(-b[:, None, :] * tau[:, :, None])  # (B,Q,M)
    return mu[:, None, :] + torch.einsum("bqm,bkm->bqk", e, a)


def _phi(b, t0, t1):
    """integral_{t0}^{t1} exp(-b s) ds, stable as b -> 0 (shapes broadcast)."""
    d = t1 - t0
    x = b * d
    small = x.abs() < 1e-8
    safe_b = torch.where(small, torch.ones_like(b), b)
    val = torch.exp(-b * t0) * (-torch.expm1(-x)) / safe_b
    return torch.where(small, torch.exp(-b * t0) * d * (1 - 0.5 * x), val)


def tail_compensator(mu, a, b, tau0, tau1):
    """Lambda_k over (t_n + tau0, t_n + tau1]: tau (B,) or (B,Q) -> (B,K) or (B,Q,K)."""
    if tau1.dim() == 1:
        return mu * (tau1 - tau0)[:, None] + (a * _phi(b, tau0[:, None], tau1[:, None])[:, None, :]).sum(-1)
    ph = _phi(b[:, None, :], tau0[:, :, None], tau1[:, :, None])  # (B,Q,M)
    return mu[:, None, :] * (tau1 - tau0)[:, :, None] + torch.einsum("bqm,bkm->bqk", ph, a)


def _check_history(times, marks, lengths, K):
    if times.dim() != 2 or marks.shape != times.shape:
        raise ValueError(f"times and marks must both be (batch, L), got {tuple(times.shape)} and {tuple(marks.shape)}")
    if lengths is None:
        lengths = torch.full((times.shape[0],), times.shape[1], dtype=torch.int64)
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    if lengths.shape != (times.shape[0],) or bool((lengths < 0).any() or (lengths > times.shape[1]).any()):
        raise ValueError(f"lengths must be (batch={times.shape[0]},) ints in [0, L={times.shape[1]}]")
    valid = torch.arange(times.shape[1])[None, :] < lengths[:, None]
    tv = torch.where(valid, times.double(), torch.zeros((), dtype=torch.float64))
    gaps = torch.diff(tv, dim=1, prepend=torch.zeros_like(tv[:, :1]))
    if bool((~torch.isfinite(tv)).any()) or bool(((gaps < 0) & valid).any()):
        raise ValueError("times must be finite, >= 0 and sorted (non-decreasing) within each sequence")
    mv = marks[valid]
    if mv.numel() and (int(mv.min()) < 0 or int(mv.max()) >= K):
        raise ValueError(f"marks must lie in [0, K={K}), got values in [{int(mv.min())}, {int(mv.max())}]")
    return lengths, valid, tv, gaps


def _last_time(tv, lengths):
    idx = (lengths - 1).clamp(min=0)
    t = tv.gather(1, idx[:, None]).squeeze(1) if tv.shape[1] else torch.zeros(tv.shape[0], dtype=tv.dtype)
    return torch.where(lengths > 0, t, torch.zeros_like(t))


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
class ExpHawkes:
    """Classic multivariate exponential Hawkes process (the oracle):
    lambda_k(t) = mu_k + sum_{t_j < t} alpha[k, k_j] beta exp(-beta (t - t_j))   (alpha = branching matrix).
    """

    def __init__(self, mu, alpha, beta: float):
        self.mu = torch.as_tensor(mu, dtype=torch.float64)
        self.alpha = torch.as_tensor(alpha, dtype=torch.float64)
        self.beta = float(beta)
        self.K = self.mu.shape[0]
        if self.alpha.shape != (self.K, self.K) or bool((self.mu <= 0).any()) or bool((self.alpha < 0).any()):
            raise ValueError("ExpHawkes needs mu (K,) > 0, alpha (K, K) >= 0")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")

    def tail(self, times, marks, lengths=None):
        lengths, valid, tv, _ = _check_history(times, marks, lengths, self.K)
        tn = _last_time(tv, lengths)
        w = torch.where(valid, torch.exp(-self.beta * (tn[:, None] - tv)), torch.zeros_like(tv))  # (B,L)
        onehot = F.one_hot(marks.clamp(0, self.K - 1).long(), self.K).double() * valid[..., None]
        s = torch.einsum("bl,blj->bj", w, onehot)  # decayed count per source mark at t_n
        a = (self.alpha[None] * s[:, None, :]).sum(-1, keepdim=True) * self.beta  # (B,K,1)
        B = times.shape[0]
        return self.mu.expand(B, self.K), a, torch.full((B, 1), self.beta, dtype=torch.float64)

    def mean_count(self, T: float) -> torch.Tensor:
        """E N_k(T) from an empty history, closed form: lambda_bar' = (alpha beta - beta I) lambda_bar + beta mu."""
        M = self.alpha * self.beta - self.beta * torch.eye(self.K, dtype=torch.float64)
        lam_inf = -torch.linalg.solve(M, self.beta * self.mu)
        E = torch.linalg.matrix_exp(M * T)
        integ = torch.linalg.solve(M, E - torch.eye(self.K, dtype=torch.float64))
        return lam_inf * T + integ @ (self.mu - lam_inf)


class MHPModel:
    """Wraps a trained `mvpp.models.MHPEncoder` (with its HawkesHead) in the tail interface, data time unit."""

    def __init__(self, encoder):
        self.enc = encoder
        self.K = encoder.n_marks

    def _scan(self, times, marks, lengths):
        from mvpp_kernels import mhp_scan

        lengths, valid, tv, gaps = _check_history(times, marks, lengths, self.K)
        enc = self.enc
        dt = gaps.float()
        u, delta, A, B, C, g, s_dt, _ = enc._scan_inputs(dt, marks.clamp(0, self.K - 1).long(), lengths)
        return lengths, valid, tv, gaps, u, delta, A, B, C, s_dt

    @torch.no_grad()
    def tail(self, times, marks, lengths=None):
        from mvpp_kernels import mhp_scan

        enc = self.enc
        s = enc.time_scale
        Bsz = times.shape[0]
        mu = (enc.mu.double() * s).expand(Bsz, self.K)
        if times.shape[1] == 0:
            return mu, torch.zeros(Bsz, self.K, 1, dtype=torch.float64), torch.zeros(Bsz, 1, dtype=torch.float64)
        lengths, valid, tv, gaps, u, delta, A, B, C, s_dt = self._scan(times, marks, lengths)
        out = mhp_scan(u, delta, A, B, C, s_dt, delta_bias=enc.dt_proj.bias, delta_softplus=True,
                       dt_end=torch.zeros(Bsz), lengths=lengths, return_last_state=True, backend=enc.backend)
        h = out.last_state.double()  # (B, dim, N), zero for an empty history
        last = (lengths - 1).clamp(min=0)
        d_last = F.softplus(delta.gather(2, last[:, None, None].expand(-1, delta.shape[1], 1)).squeeze(2)
                            + enc.dt_proj.bias).double()  # (B, dim)
        C_last = C.gather(2, last[:, None, None].expand(-1, C.shape[1], 1)).squeeze(2).double()  # (B, N)
        coef = C_last[:, None, :] * h  # (B, dim, N)
        a = enc.W.double()[None, :, :, None] * coef[:, None]  # (B, K, dim, N)
        b = (-A.double())[None] * d_last[:, :, None]  # (B, dim, N)
        a = a.flatten(2) * s
        b = b.flatten(1) * s
        return mu, a, b

    @torch.no_grad()
    def prefix_compensators(self, times, marks, lengths, T, chunk_rows: int = 4096):
        """(B, L+1, K): Lambda_k over gap i (t_{i-1}, t_i] at index i-1 and (t_n, T] at index n, from
        mhp_scan's fused integral on every prefix (the sequence replicated with lengths = 1..n, dt_end = 0).
        The integral is in scaled time and so is W . integral: it is already a count, no rescaling."""
        from mvpp_kernels import mhp_scan

        enc = self.enc
        s = enc.time_scale
        lengths, valid, tv, gaps, u, delta, A, B, C, s_dt = self._scan(times, marks, lengths)
        Bsz, L = times.shape
        T = torch.as_tensor(T, dtype=torch.float64).expand(Bsz)
        tn = _last_time(tv, lengths)
        if bool((T < tn).any()):
            raise ValueError("T must be >= the last event time of every sequence")
        # rows (b, j), j = 1..n: the prefix of j events of sequence b, window [0, t_j] (dt_end = 0)
        J = torch.arange(1, L + 1)
        rb = torch.arange(Bsz).repeat_interleave(L)
        rj = J.repeat(Bsz)
        keep = rj <= lengths[rb]
        rb, rj = rb[keep], rj[keep]
        tj = tv[rb, rj - 1]
        integ = torch.empty(len(rb), enc.d_model, dtype=torch.float64)
        for lo in range(0, len(rb), chunk_rows):
            sl = slice(lo, lo + chunk_rows)
            b_, j_ = rb[sl], rj[sl]
            o = mhp_scan(u[b_], delta[b_], A, B[b_], C[b_], s_dt[b_], delta_bias=enc.dt_proj.bias,
                         delta_softplus=True, dt_end=torch.zeros(len(b_)), lengths=j_, backend=enc.backend)
            integ[sl] = o.integral.double()
        cum = torch.zeros(Bsz, L + 1, self.K, dtype=torch.float64)  # cum[b, j] = Lambda_k(0, t_j)
        cum[rb, rj] = integ @ enc.W.double().T + (enc.mu.double() * s)[None] * tj[:, None]
        out = torch.zeros(Bsz, L + 1, self.K, dtype=torch.float64)
        out[:, :L] = cum[:, 1:] - cum[:, :-1]
        out[:, :L] *= (torch.arange(L)[None, :] < lengths[:, None])[..., None]
        mu, a, b = self.tail(times, marks, lengths)
        last = tail_compensator(mu, a, b, torch.zeros(Bsz, dtype=torch.float64), T - tn)
        out[torch.arange(Bsz), lengths] = last
        return out


def gap_compensators(model, times, marks, lengths, T) -> torch.Tensor:
    """(B, L+1, K): exact Lambda_k over gap i (t_{i-1}, t_i], i = 1..n, then (t_n, T] at index n; 0 after.
    Columns index i-1 for gap i. MHPModel: from the fused mhp_scan integral; otherwise from the tail."""
    if hasattr(model, "prefix_compensators"):
        return model.prefix_compensators(times, marks, lengths, T)
    lengths, valid, tv, gaps = _check_history(times, marks, lengths, model.K)
    Bsz, L = times.shape
    T = torch.as_tensor(T, dtype=torch.float64).expand(Bsz)
    out = torch.zeros(Bsz, L + 1, model.K, dtype=torch.float64)
    for i in range(L + 1):  # history of i events -> gap i+1 (or the last window)
        mu, a, b = model.tail(times[:, :i], marks[:, :i], lengths.clamp(max=i))
        tn = _last_time(tv[:, :i], lengths.clamp(max=i))
        nxt = torch.where(lengths > i, tv[:, min(i, L - 1)] if L else T, T)
        comp = tail_compensator(mu, a, b, torch.zeros(Bsz, dtype=torch.float64), nxt - tn)
        out[:, i] = torch.where((lengths >= i)[:, None], comp, torch.zeros_like(comp))
    return out


# ---------------------------------------------------------------------------------------------
# Sampling (Ogata thinning, exact)
# ---------------------------------------------------------------------------------------------
@dataclass
class SampleResult:
    times: torch.Tensor  # (B, L) float64, padded with 0
    marks: torch.Tensor  # (B, L) int64, padded with 0
    lengths: torch.Tensor  # (B,)
    T: torch.Tensor  # (B,)
    proposals: int  # total thinning proposals (acceptance diagnostics)
    truncated: bool  # some sequence hit max_events before T


@torch.no_grad()
def sample(model, T, batch: Optional[int] = None, *, max_events: int = 10_000,
           generator: Optional[torch.Generator] = None) -> SampleResult:
    """Ogata thinning for `batch` sequences on [0, T_b] (T a scalar or (batch,): variable horizons).
    The bound is the intensity at the current time (exact: the tail is non-increasing, see module doc);
    the tail is recomputed once per accepted event (one fused scan over the history)."""
    T = torch.as_tensor(T, dtype=torch.float64)
    if T.dim() == 0:
        if batch is None:
            raise ValueError("batch is required when T is a scalar")
        T = T.expand(batch).clone()
    if T.dim() != 1 or bool((~torch.isfinite(T)).any() or (T < 0).any()):
        raise ValueError("T must be a finite scalar or (batch,) tensor of horizons >= 0")
    Bsz = T.shape[0]
    cap = 16
    times = torch.zeros(Bsz, cap, dtype=torch.float64)
    marks = torch.zeros(Bsz, cap, dtype=torch.int64)
    lengths = torch.zeros(Bsz, dtype=torch.int64)
    cur = torch.zeros(Bsz, dtype=torch.float64)
    active = T > 0
    proposals, truncated = 0, False
    rand = lambda n: torch.rand(n, dtype=torch.float64, generator=generator)  # noqa: E731
    while bool(active.any()):
        rows = active.nonzero().squeeze(1)
        Lr = int(lengths[rows].max())
        mu, a, b = model.tail(times[rows, :Lr], marks[rows, :Lr], lengths[rows])
        tn = _last_time(times[rows, :Lr], lengths[rows])
        tau = cur[rows] - tn
        pending = torch.ones(len(rows), dtype=torch.bool)
        accepted = torch.zeros(len(rows), dtype=torch.bool)
        while bool(pending.any()):
            p = pending.nonzero().squeeze(1)
            bound = tail_intensity(mu[p], a[p], b[p], tau[p]).sum(-1)
            e = -torch.log1p(-rand(len(p))) / bound
            t_new = tau[p] + e
            proposals += len(p)
            past = tn[p] + t_new >= T[rows[p]]
            lam = tail_intensity(mu[p], a[p], b[p], t_new).sum(-1)
            acc = (~past) & (rand(len(p)) * bound <= lam)
            tau[p] = t_new
            pending[p] = ~(past | acc)
            accepted[p] = acc
            ended = p[past]
            active[rows[ended]] = False
        ar = accepted.nonzero().squeeze(1)
        if len(ar):
            lam_k = tail_intensity(mu[ar], a[ar], b[ar], tau[ar])
            k = torch.multinomial(lam_k, 1, generator=generator).squeeze(1)
            r = rows[ar]
            if int(lengths[r].max()) >= cap:
                grow = cap
                times = torch.cat([times, torch.zeros(Bsz, grow, dtype=torch.float64)], 1)
                marks = torch.cat([marks, torch.zeros(Bsz, grow, dtype=torch.int64)], 1)
                cap += grow
            t_ev = tn[ar] + tau[ar]
            times[r, lengths[r]] = t_ev
            marks[r, lengths[r]] = k
            lengths[r] += 1
            cur[r] = t_ev
            full = r[lengths[r] >= max_events]
            if len(full):
                truncated = True
                active[full] = False
    L = int(lengths.max()) if Bsz else 0
    return SampleResult(times[:, :L], marks[:, :L], lengths, T, proposals, truncated)


# ---------------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def _gauss_legendre_panels(n_panels: int, order: int = 16):
    """Nodes and weights of composite Gauss-Legendre on [0, 1] (n_panels panels of `order` nodes)."""
    import numpy as np

    xg, wg = np.polynomial.legendre.leggauss(order)
    edges = np.linspace(0.0, 1.0, n_panels + 1)
    x = ((edges[:-1, None] + edges[1:, None]) / 2 + (edges[1:, None] - edges[:-1, None]) / 2 * xg[None]).ravel()
    w = ((edges[1:, None] - edges[:-1, None]) / 2 * wg[None]).ravel()
    return torch.from_numpy(x), torch.from_numpy(w)


def predict_next(model, times, marks, lengths=None, *, quantiles=(0.1, 0.5, 0.9), grid: int = 16):
    """Next event after each history: expected gap E[tau], gap quantiles, next-mark distribution.

    Survival S(tau) = exp(-Lambda(tau)) with the exact compensator; quantiles solve Lambda(tau) =
    -log(1-q) by bisection (bracket [0, -log(1-q)/sum mu] since Lambda >= sum(mu) tau); E[tau] =
    int S and P(k) = int lambda_k S by composite Gauss-Legendre (`grid` panels of 16 nodes) in x with
    tau = h x^3 (dense near 0), h the 1 - 1e-12 quantile (the neglected tail mass is < 1e-12 h). Returns a dict of float64 tensors:
    mean (B,), quantiles (B, Q), mark_probs (B, K), last_time (B,), expected_time (B,) (absolute)."""
    Bsz = times.shape[0]
    mu, a, b = model.tail(times, marks, lengths)
    lengths_ = torch.as_tensor(lengths if lengths is not None else [times.shape[1]] * Bsz, dtype=torch.int64)
    tn = _last_time(times.double(), lengths_)
    mtot = mu.sum(-1)

    def quant(q):
        target = -math.log1p(-q)
        lo = torch.zeros(Bsz, dtype=torch.float64)
        hi = target / mtot
        z = torch.zeros(Bsz, dtype=torch.float64)
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            big = tail_compensator(mu, a, b, z, mid).sum(-1) >= target
            hi = torch.where(big, mid, hi)
            lo = torch.where(big, lo, mid)
        return 0.5 * (lo + hi)

    qs = torch.stack([quant(float(q)) for q in quantiles], dim=1) if len(quantiles) else torch.zeros(Bsz, 0)
    horizon = quant(1 - 1e-12)
    x, w = _gauss_legendre_panels(grid)
    tau = horizon[:, None] * x[None] ** 3  # (B, G): dense near 0, where fast decays live
    wt = w[None] * 3 * x[None] ** 2 * horizon[:, None]  # d tau = 3 h x^2 dx
    z = torch.zeros_like(tau)
    S = torch.exp(-tail_compensator(mu, a, b, z, tau).sum(-1))  # (B, G)
    lam = tail_intensity(mu, a, b, tau)  # (B, G, K)
    mean = (S * wt).sum(1)
    pk = (lam * (S * wt)[..., None]).sum(1)
    pk = pk / pk.sum(-1, keepdim=True)
    return {"mean": mean, "quantiles": qs, "mark_probs": pk, "last_time": tn, "expected_time": tn + mean}


# ---------------------------------------------------------------------------------------------
# Goodness of fit (time rescaling)
# ---------------------------------------------------------------------------------------------
def time_rescaling(model, times, marks, lengths, T):
    """Residuals that are iid Exp(1) under the model (time-rescaling theorem), exact compensators.

    Each sequence's rescaled points Lambda(t_i) form a unit Poisson process on [0, Lambda(T)]; the
    sequences' rescaled axes are laid end to end (independent pieces stopped at their window ends, so
    by the strong Markov property the concatenation is one unit Poisson process) and the residuals are
    the gaps between consecutive points of that one axis. This avoids the short-window bias of pooling
    within-window gaps (on [0, T] with few events those are conditioned spacings, not Exp(1)); only the
    final censored gap is dropped. 'overall' uses Lambda summed over marks; key k uses Lambda_k and the
    events of mark k (the marginal processes rescale to independent unit Poisson processes).
    Returns {'overall': tensor, 0: tensor, ..., K-1: tensor} (float64)."""
    lengths, valid, tv, gaps = _check_history(times, marks, lengths, model.K)
    G = gap_compensators(model, times, marks, lengths, T)  # (B, L+1, K)
    L = times.shape[1]
    total = G.sum(1)  # (B, K) Lambda_k(0, T)
    offset = torch.cumsum(total, 0) - total  # start of each sequence on the concatenated axis
    cum = torch.cumsum(G[:, :L], dim=1) + offset[:, None, :]  # Lambda_k(0, t_i) + offset

    def gaps_of(points):
        return torch.diff(points, prepend=points.new_zeros(1)) if points.numel() else points

    res = {"overall": gaps_of(cum.sum(-1)[valid])}  # row-major order = sequence order, time order
    for k in range(model.K):
        res[k] = gaps_of(cum[..., k][valid & (marks == k)])
    return res


def ks_exp1(x: torch.Tensor):
    """One-sample KS statistic of x against Exp(1) and its p-value (Kolmogorov limit with Stephens'
    small-sample correction, p = Q_KS((sqrt(n) + 0.12 + 0.11 / sqrt(n)) D); accurate to ~1e-3 for n >= 5)."""
    if x.numel() == 0:
        return float("nan"), float("nan")
    xs = torch.sort(x.double().flatten()).values
    n = xs.numel()
    cdf = -torch.expm1(-xs.clamp(min=0))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    D = float(torch.maximum(i / n - cdf, cdf - (i - 1) / n).max())
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * D
    if lam < 0.2:
        return D, 1.0
    p = 2 * sum((-1) ** (j - 1) * math.exp(-2 * j * j * lam * lam) for j in range(1, 101))
    return D, float(min(max(p, 0.0), 1.0))


def gof(model, times, marks, lengths, T):
    """{'overall': (n, KS, p), k: (n, KS, p), ...} plus the residuals under 'residuals'."""
    res = time_rescaling(model, times, marks, lengths, T)
    out = {key: (int(v.numel()),) + ks_exp1(v) for key, v in res.items()}
    out["residuals"] = res
    return out


def qq_plot(residuals: dict, path: str, title: str = "time-rescaling QQ vs Exp(1)") -> str:
    """QQ plot of each residual set against Exp(1) quantiles, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    top = 0.0
    for key, v in residuals.items():
        x = np.sort(v.double().numpy())
        n = len(x)
        if n == 0:
            continue
        q = -np.log1p(-(np.arange(1, n + 1) - 0.5) / n)
        ax.plot(q, x, ".", ms=3, label=f"{'all marks' if key == 'overall' else 'mark ' + str(key)} (n={n})")
        top = max(top, float(q[-1]), float(x[-1]))
    ax.plot([0, top], [0, top], "k--", lw=1)
    ax.set_xlabel("Exp(1) quantile")
    ax.set_ylabel("rescaled gap")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


from .classic import SelfCorrecting  # noqa: E402  (no dependency on the rest of this module)
