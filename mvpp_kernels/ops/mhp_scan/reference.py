"""Pure-torch mhp_scan: the float64-capable oracle and the last-resort fallback.

Vectorised over batch, dim and state; a Python loop over the events. Every other backend is
tested against this file, so it favours clarity and exactness over speed.

Conventions (also in docs/mhp_scan.md and `mvpp_kernels.mhp_scan`'s docstring), events 1-based as in
DESIGN.md, stored 0-based along L:

- gap i (t_{i-1}, t_i] decays at rate A*Delta_{i-1} and is read out with C_{i-1} (causal).
- The first gap (0, t_1] has no event before it: it starts from h_0^+ = initial_state (0 if None)
  and uses Delta_1 and C_1, the first event's own step and readout. With initial_state None the
  state is 0 on that gap, so y_left_1 = 0 and its integral is 0 whatever the convention. With an
  initial state, event 1's inputs set the decay and readout of the gap before it -- the only place
  where an event's own inputs reach the intensity before it. To continue a split sequence exactly,
  prepend the previous segment's last event again (same delta, B, C), with u = 0 and dt = 0: it
  adds no jump and no time, and the real first gap then decays with that event's Delta and C.
- The last gap (t_n, T] of a sequence with n = lengths[b] >= 1 events lasts dt_end[b] and uses
  Delta_n, C_n and h_n^+. No last gap when dt_end is None.
- A sequence with no events (length 0, or L = 0) has no step or readout to define its intensity
  with: its integral is 0 and its last state is initial_state (or 0).
- Events at or past a sequence's length are ignored: y = y_left = 0 there, the state, the integral
  and every gradient are untouched by whatever the padding holds (NaN included).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..selective_scan.reference import compute_dtype, expand_groups

# |x| below the threshold uses the Taylor series of (1 - e^x)/(-x), above it expm1(x)/x. float32:
# 0.5 keeps autograd's derivative of expm1(x)/x (a difference of two ~1/x^2 terms) free of
# cancellation, and 9 terms are exact to float32 rounding there (0.5^9/10! ~ 5e-10); float64: 0.1
# and 10 terms (0.1^10/11! ~ 3e-18).
_PHI_SERIES = {torch.float64: (0.1, 10)}
_PHI_SERIES_DEFAULT = (0.5, 9)


def phi(x: torch.Tensor) -> torch.Tensor:
    """(1 - e^x) / (-x) = expm1(x) / x for x <= 0, with phi(0) = 1; stable and differentiable at 0.

    dt * phi(a * dt) = integral_0^dt e^{a s} ds, the exact integral of a decaying state over a gap.
    """
    thr, terms = _PHI_SERIES.get(x.dtype, _PHI_SERIES_DEFAULT)
    small = x.abs() < thr
    # Each branch gets inputs only from its own domain: an unused branch that is non-finite (0/0 at
    # x = 0, or the series overflowing at x = -1e4 in float32) would leak NaN through torch.where's
    # gradient.
    x_big = torch.where(small, torch.full_like(x, -1.0), x)
    x_ser = torch.where(small, x, torch.zeros_like(x))
    big = torch.expm1(x_big) / x_big
    # sum_{k>=0} x^k / (k+1)!  in Horner form: 1 + x/2 (1 + x/3 (1 + x/4 (...)))
    ser = torch.ones_like(x)
    for k in range(terms, 0, -1):
        ser = torch.addcmul(torch.ones_like(x), x_ser, ser, value=1.0 / (k + 1))
    return torch.where(small, ser, big)


def mhp_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    dt: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    dt_end: Optional[torch.Tensor] = None,
    lengths: Optional[torch.Tensor] = None,
    initial_state: Optional[torch.Tensor] = None,
    return_last_state: bool = False,
):
    """The continuous-time selective scan with the exact integral of its readout (DESIGN.md, op 1).

    With Δ = softplus(delta + delta_bias) (or delta + delta_bias), events i = 1..n, h_0^+ =
    initial_state (or 0), Δ_0 := Δ_1 and C_0 := C_1 (see the module docstring)::

        h_i^-  = exp(A Δ_{i-1} dt_i) ⊙ h_{i-1}^+
        y_left_i = C_{i-1} · h_i^-
        I_i    = Σ_n C_{i-1,n} h_{i-1,n}^+ (1 − exp(A_n Δ_{i-1} dt_i)) / (−A_n Δ_{i-1})
        h_i^+  = h_i^- + Δ_i B_i u_i
        y_i    = (C_i · h_i^+ + D u_i) ⊙ silu(z_i)
        integral = Σ_i I_i + Σ_n C_{n,·} h_n^+ (1 − exp(A Δ_n dt_end)) / (−A Δ_n)

    Shapes: u, delta, z (batch, dim, L); A (dim, N); B, C (dim, N), (batch, N, L) or
    (batch, G, N, L); dt (batch, L); dt_end, lengths (batch,); D, delta_bias (dim,);
    initial_state (batch, dim, N). Computes in float64 whatever the input dtype (see below).

    Returns (y, y_left, integral, last_state): y (batch, dim, L) in u's dtype; y_left
    (batch, dim, L), integral (batch, dim) and last_state h_n^+ (batch, dim, N) in float64 for
    float64 u, else float32. last_state is None unless `return_last_state`.
    """
    dtype_in = u.dtype
    # The oracle computes in float64 for every input dtype and rounds only its results (issue 16):
    # in float32, A Δ or Δ dt overflow to inf for finite inputs (inf * 0 = NaN at a tied event,
    # 0 * inf in the gradient of exp(x) at x = -inf) and the 1/x^2 terms of phi's derivative
    # underflow, so a float32 oracle was NaN or wrong where the exact answer is finite. float64
    # holds any product of three float32 values (A Δ dt) without overflow.
    out_dt = compute_dtype(dtype_in)
    ct = torch.float64
    batch, dim, L = u.shape
    N = A.shape[1]
    dev = u.device

    if lengths is None:
        lens = torch.full((batch,), L, dtype=torch.int64, device=dev)
    else:
        lens = lengths.to(device=dev, dtype=torch.int64)
    valid = torch.arange(L, device=dev)[None, :] < lens[:, None]  # (batch, L)
    v3 = valid[:, None, :]  # (batch, 1, L)

    def masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # where (not multiply) so padding holding NaN/inf neither propagates nor poisons gradients.
        return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))

    u_ = masked(u.to(ct), v3)
    # Masked before softplus too: its derivative at a NaN pad times where()'s zero is still NaN.
    d_ = masked(delta.to(ct), v3)
    if delta_bias is not None:
        d_ = d_ + delta_bias.to(ct)[:, None]
    if delta_softplus:
        d_ = F.softplus(d_)
    d_ = masked(d_, v3)
    A_ = A.to(ct)
    dt_ = masked(dt.to(ct), valid)
    variable_B, variable_C = B.dim() >= 3, C.dim() >= 3
    B_, C_ = B.to(ct), C.to(ct)
    if variable_B:
        B_ = B_.unsqueeze(1) if B_.dim() == 3 else expand_groups(B_, dim)  # (batch, dim|1, N, L)
        B_ = masked(B_, valid[:, None, None, :])
    if variable_C:
        C_ = C_.unsqueeze(1) if C_.dim() == 3 else expand_groups(C_, dim)
        C_ = masked(C_, valid[:, None, None, :])

    # Per-step views taken once: indexing X[..., i] inside the loop would make autograd allocate a
    # full-size zero gradient per step (an O(L^2) backward).
    d_s, u_s, dt_s, valid_s = d_.unbind(-1), u_.unbind(-1), dt_.unbind(-1), valid.unbind(-1)
    B_s = B_.unbind(-1) if variable_B else None
    C_s = C_.unbind(-1) if variable_C else None

    def C_at(i: int) -> torch.Tensor:
        return C_s[i] if variable_C else C_

    if initial_state is not None:
        h = initial_state.to(ct).expand(batch, dim, N).clone()
    else:
        h = u_.new_zeros(batch, dim, N)
    integral = u_.new_zeros(batch, dim)
    if L == 0:
        y = u_.new_zeros(batch, dim, 0).to(dtype_in)
        return (y, u_.new_zeros(batch, dim, 0, dtype=out_dt), integral.to(out_dt),
                (h.to(out_dt) if return_last_state else None))

    # Step and readout of the event before the current gap; the first gap borrows event 1's.
    d_prev = d_s[0]
    C_prev = C_at(0)
    ys, yls = [], []
    for i in range(L):
        vi = valid_s[i][:, None]  # (batch, 1)
        rate = A_ * d_prev[..., None]  # (batch, dim, N), <= 0
        x = rate * dt_s[i][:, None, None]
        decay = torch.exp(x)
        gap_int = (C_prev * h * phi(x)).sum(-1) * dt_s[i][:, None]
        integral = integral + masked(gap_int, vi)
        h_minus = decay * h
        yls.append(masked((C_prev * h_minus).sum(-1), vi))
        Bi = B_s[i] if variable_B else B_
        h_new = h_minus + (d_s[i] * u_s[i])[..., None] * Bi
        h = torch.where(vi[..., None], h_new, h)
        Ci = C_at(i)
        ys.append((h * Ci).sum(-1))
        d_prev = torch.where(vi, d_s[i], d_prev)
        C_prev = torch.where(vi[..., None], Ci, C_prev) if variable_C else C_
    y = torch.stack(ys, dim=2)
    y_left = torch.stack(yls, dim=2)

    if dt_end is not None:
        has_events = (lens > 0)[:, None]  # (batch, 1)
        de = masked(dt_end.to(ct), lens > 0)
        x = A_ * d_prev[..., None] * de[:, None, None]
        gap_int = (C_prev * h * phi(x)).sum(-1) * de[:, None]
        integral = integral + masked(gap_int, has_events)

    if D is not None:
        y = y + u_ * D.to(ct)[:, None]
    if z is not None:
        y = y * F.silu(masked(z.to(ct), v3))
    y = masked(y, v3).to(dtype_in)
    return y, y_left.to(out_dt), integral.to(out_dt), (h.to(out_dt) if return_last_state else None)
