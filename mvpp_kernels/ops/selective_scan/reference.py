"""Pure-torch selective scan: the float64-capable oracle and the last-resort fallback.

Vectorised over batch, dim and state; a Python loop over L. Semantics follow mamba-ssm's
`selective_scan_ref` (real A), plus `initial_state` and variable `lengths`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def expand_groups(X: torch.Tensor, dim: int) -> torch.Tensor:
    """(batch, G, N, L) -> (batch, dim, N, L): channel d reads group d // (dim // G) (mamba's layout)."""
    G = X.shape[1]
    return X.repeat_interleave(dim // G, dim=1)


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    initial_state: Optional[torch.Tensor] = None,
    lengths: Optional[torch.Tensor] = None,
):
    """h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t,  y_t = C_t · h_t + D u_t,  out = y * silu(z).

    u, delta, z: (batch, dim, L); A: (dim, N); B, C: (dim, N), (batch, N, L) or (batch, G, N, L);
    D, delta_bias: (dim,); initial_state: (batch, dim, N); lengths: (batch,). Positions at or past a
    sequence's length output 0 and leave the state alone; last_state is the state after the last
    valid position. Computes in float64 for float64 inputs, else float32; `out` has u's dtype and
    `last_state` the compute dtype.
    """
    dtype_in = u.dtype
    ct = compute_dtype(dtype_in)
    batch, dim, L = u.shape
    N = A.shape[1]
    u_ = u.to(ct)
    dt = delta.to(ct)
    if delta_bias is not None:
        dt = dt + delta_bias.to(ct)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    A_ = A.to(ct)
    variable_B, variable_C = B.dim() >= 3, C.dim() >= 3
    B_ = B.to(ct)
    C_ = C.to(ct)
    if variable_B:
        B_ = B_.unsqueeze(1) if B_.dim() == 3 else expand_groups(B_, dim)  # (batch, dim|1, N, L)
    if variable_C:
        C_ = C_.unsqueeze(1) if C_.dim() == 3 else expand_groups(C_, dim)

    if initial_state is not None:
        h = initial_state.to(ct).expand(batch, dim, N).clone()
    else:
        h = u_.new_zeros(batch, dim, N)
    valid = None
    if lengths is not None:
        valid = torch.arange(L, device=u.device)[None, :] < lengths.to(u.device)[:, None]  # (batch, L)
        # Zero every per-position input past the length with `where` (not a multiply), so a NaN/inf in
        # the padded tail reaches neither the valid outputs nor any gradient (issue 16).
        vm = valid[:, None, :]
        u_ = torch.where(vm, u_, 0.0)
        dt = torch.where(vm, dt, 0.0)
        if z is not None:
            z = torch.where(vm, z.to(ct), 0.0)
        if variable_B:
            B_ = torch.where(valid[:, None, None, :], B_, 0.0)
        if variable_C:
            C_ = torch.where(valid[:, None, None, :], C_, 0.0)

    # Per-step views are taken once with unbind: indexing X[..., t] inside the loop would make
    # autograd allocate a full-size zero gradient per step (an O(L^2) backward).
    dt_s, u_s = dt.unbind(-1), u_.unbind(-1)
    B_s = B_.unbind(-1) if variable_B else None
    C_s = C_.unbind(-1) if variable_C else None
    valid_s = valid.unbind(-1) if valid is not None else None
    ys = []
    for t in range(L):
        dA = torch.exp(dt_s[t][..., None] * A_)  # (batch, dim, N)
        Bt = B_s[t] if variable_B else B_
        h_new = dA * h + (dt_s[t] * u_s[t])[..., None] * Bt
        if valid_s is not None:
            h = torch.where(valid_s[t][:, None, None], h_new, h)
        else:
            h = h_new
        Ct = C_s[t] if variable_C else C_
        ys.append((h * Ct).sum(-1))
    y = torch.stack(ys, dim=2) if L > 0 else u_.new_zeros(batch, dim, 0)
    out = y if D is None else y + u_ * D.to(ct)[:, None]
    if z is not None:
        out = out * F.silu(z.to(ct))
    if valid is not None:
        out = torch.where(valid[:, None, :], out, 0.0)
    out = out.to(dtype_in)
    return (out, h) if return_last_state else out
