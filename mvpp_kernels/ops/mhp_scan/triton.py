"""Triton kernels for mhp_scan: `mvpp::mhp_scan_fwd_triton` / `mvpp::mhp_scan_bwd_triton`.

Same argument lists and return conventions as the compiled `mvpp::mhp_scan_fwd` / `mhp_scan_bwd`
(see `_library.py` and the kernel contract in `ops/mhp_scan/__init__.py`).

Layout of the work: one program owns R rows (a row = one (batch, channel) pair; R > 1 packs several
short sequences into one program so the GPU is not left idle) and walks L in chunks of BL = chunk_size
events. A chunk is a [R, BL, NP] register tile (NP = N rounded up to a power of two): the linear
recurrence h_k = e_k h_{k-1} + b_k inside a chunk is one `tl.associative_scan` along the event axis,
and the state is carried from chunk to chunk. Every "gap after event k" quantity (the left-limit
readout of event k+1, the integral of the gap, the next decay) is computed at position k from h_k and
Δ_k, so the forward never needs the state of the previous event. The forward saves the state after
each chunk; the backward walks the chunks in reverse, recomputes the chunk's states from the saved
one, and runs the adjoint recurrence G_k = q_k + e_{k+1} G_{k+1} as a reverse scan.

Deterministic: no atomics. Reductions across rows (dA, dD, d(delta_bias), constant dB/dC over the
batch; ddt over channels) leave as per-row partials, as the schema says; variable dB/dC are written
per channel and summed over each group's channels here, in a fixed order.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..._backend import triton_interpret
from . import _bwd_fake, _fwd_fake, _setup_context, make_backward, state_dtype

__all__ = ["mhp_scan_fwd_triton", "mhp_scan_bwd_triton"]

# Elements of one [R, BL, NP] tile a program aims for when packing rows of short sequences. Larger
# tiles spill on sm_90: at 2048 elements and 4 warps the backward needs ~1 KB of stack per thread;
# at 1024 elements and 8 warps it fits in 227 registers (forward: 120; 223 / 118 for four packed fp32
# rows of 16 x 16), with the huge-gap guard (issue 16).
_TILE_TARGET = 1024
# Packing rows only pays for short sequences; long ones have parallelism in the row count already.
_PACK_MAX_L = 256
_MAX_ROWS_PER_PROGRAM = 16


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _combine(a1, b1, a2, b2):
    # (a1, b1) then (a2, b2) for h -> a h + b; used forward (inclusive prefix) and, with reverse=True,
    # for the adjoint G_k = a_k G_{k+1} + b_k.
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _phi(x, TERMS: tl.constexpr):
    # (1 - e^x) / (-x) = expm1(x)/x, phi(0) = 1. |x| < 0.5: Taylor series (no cancellation);
    # otherwise (e^x - 1)/x loses at most a few ulps. x_safe keeps the unused branch finite at 0.
    small = tl.abs(x) < 0.5
    xs = tl.where(small, -1.0, x)
    xt = tl.where(small, x, 0.0)  # the series only sees |x| < 0.5, so it cannot overflow unused
    big = (tl.exp(xs) - 1.0) / xs
    ser = tl.zeros_like(x) + 1.0
    for k in tl.static_range(TERMS, 0, -1):
        ser = 1.0 + xt * (1.0 / (k + 1)) * ser
    return tl.where(small, ser, big)


@triton.jit
def _dphi(x, ph, TERMS: tl.constexpr):
    # phi'(x) = (e^x - phi(x)) / x; near 0 the series sum_m (m+1) x^m / (m+2)! in Horner form
    # 1/2 (1 + x r_1 (1 + x r_2 (...))) with r_m = (m+1) / (m (m+2)).
    small = tl.abs(x) < 0.5
    xs = tl.where(small, -1.0, x)
    xt = tl.where(small, x, 0.0)
    big = (tl.exp(xs) - ph) / xs
    ser = tl.zeros_like(x) + 1.0
    for m in tl.static_range(TERMS, 0, -1):
        ser = 1.0 + xt * ((m + 1) / (m * (m + 2))) * ser
    return tl.where(small, 0.5 * ser, big)


@triton.jit
def _softplus(x):
    # max(x, 0) + log1p(e^-|x|), with log1p(w) = log(v) * w / (v - 1), v = 1 + w (exact to a few ulps
    # without a libdevice call, so it also runs under the interpreter).
    w = tl.exp(-tl.abs(x))
    v = 1.0 + w
    lp = tl.where(v == 1.0, w, tl.log(v) * w / tl.where(v == 1.0, 1.0, v - 1.0))
    return tl.maximum(x, 0.0) + lp


@triton.jit
def _gap_step(dp, dt, MAXV: tl.constexpr):
    # The step s = Δ dt of a gap, saturated at the largest finite value of the compute type (issue 16):
    # Δ dt overflows for finite inputs (a float32-max gap with Δ > 1), and A * inf would be NaN in the
    # zero-padded lanes N..NP and for A = 0. With s finite, x = A s is 0 there and -inf or finite
    # elsewhere. NaN stays NaN (propagate_nan).
    return tl.minimum(dp * dt, MAXV, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _inv_step(dp, dt, sg, TINY: tl.constexpr):
    # q = 1/Δ for the huge-gap closed forms: 1/Δ for a normal Δ, else dt/s (s = Δ dt cannot overflow
    # then, so it is not saturated); 0 for s = 0 (every x is then 0 and takes the series).
    normal = tl.abs(dp) >= TINY
    s_ok = sg != 0.0
    return tl.where(normal, 1.0 / tl.where(normal, dp, 1.0), tl.where(s_ok, dt / tl.where(s_ok, sg, 1.0), 0.0))


@triton.jit
def _dt_phi(x, e, ph, invA, q, dt, huge):
    # dt φ(x) = ∫_0^dt e^{A Δ r} dr. Ordinary gaps: φ(x) dt. Huge gaps with |x| >= 0.5: the closed form
    # (e^x - 1) / (A Δ) = (e - 1) invA q, which needs neither 1/x nor the (saturated) step: φ(-inf) dt
    # would be 0 * dt and lose the integral 1 / (|A| Δ) of a gap past Δ dt = float max.
    return tl.where(huge & (tl.abs(x) >= 0.5), (e - 1.0) * invA * q, ph * dt)


@triton.jit
def _gap_grads(x, e, dph, dtph, invA, A, q, dt, sg, huge, ghe, dIch):
    # d(loss)/dA_n and the lane's d(loss)/dΔ of a gap (x = A s, s = Δ dt), from the state part
    # ghe = d(loss)/dh^- e^x h and the integral part dIch = dintegral C h, whose d(dt φ)/dA and
    # d(dt φ)/dΔ are (dt s) φ' and (A dt) dt φ' (A first: exactly 0 for A = 0 and the padded lanes).
    # A huge gap with |x| >= 0.5 takes the cpu kernel's closed forms (dA_of_int / dD_of_int):
    # (dt e^x - dt φ) / A and that times A / Δ -- no dt^2 (overflows) and no φ' ~ 1/x^2 (underflows).
    closed = huge & (tl.abs(x) >= 0.5)
    dAi = tl.where(closed, invA * (dt * e - dtph), (dt * sg) * dph)
    dDi = tl.where(closed, dAi * q * A, (A * dt) * dt * dph)
    return ghe * sg + dIch * dAi, ghe * dt * A + dIch * dDi


@triton.jit
def _step(delta_ptr, db, off, mask, SOFTPLUS: tl.constexpr, CT: tl.constexpr):
    """Δ at `off` (delta + bias, softplus'ed); 0 where masked. Also returns softplus' (sigmoid)."""
    x = tl.load(delta_ptr + off, mask=mask, other=0.0).to(CT) + db
    if SOFTPLUS:
        d = _softplus(x)
        dd = 1.0 / (1.0 + tl.exp(-x))
    else:
        d = x
        dd = tl.zeros_like(x) + 1.0
    d = tl.where(mask, d, 0.0)
    return d, dd


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _mhp_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, dt_ptr, D_ptr, z_ptr, db_ptr, dtend_ptr, len_ptr, h0_ptr,
    y_ptr, yl_ptr, int_ptr, last_ptr, cs_ptr,
    n_rows, dim, L, N, dpg_B, dpg_C, G_B, G_C, n_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DB: tl.constexpr, HAS_DTEND: tl.constexpr,
    HAS_LEN: tl.constexpr, HAS_H0: tl.constexpr, SOFTPLUS: tl.constexpr,
    B_VAR: tl.constexpr, C_VAR: tl.constexpr,
    R: tl.constexpr, BL: tl.constexpr, NP: tl.constexpr, TERMS: tl.constexpr, CT: tl.constexpr,
    MAXV: tl.constexpr, TINY: tl.constexpr, HUGE: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * R + tl.arange(0, R)  # [R]
    row_ok = rows < n_rows
    rows = tl.where(row_ok, rows, 0).to(tl.int64)  # offsets such as (row * N + n) * L pass 2^31
    b = rows // dim
    d = rows % dim
    nn = tl.arange(0, NP)
    n_ok = nn < N
    r2 = rows[:, None]  # [R, 1]
    rok2 = row_ok[:, None]
    n3 = nn[None, None, :]  # [1, 1, NP]
    nok3 = n_ok[None, None, :]
    mask_rn = rok2 & n_ok[None, :]  # [R, NP]

    if HAS_LEN:
        lens = tl.load(len_ptr + b, mask=row_ok, other=0).to(tl.int32)
    else:
        lens = tl.zeros([R], dtype=tl.int32) + L
    lens = tl.where(row_ok, lens, 0)
    len2 = lens[:, None]
    A3 = tl.load(A_ptr + d[:, None, None] * N + n3, mask=row_ok[:, None, None] & nok3, other=0.0).to(CT)
    invA3 = tl.where(A3 != 0.0, 1.0 / tl.where(A3 != 0.0, A3, 1.0), 0.0)  # 0 for A = 0 (x = 0: the series)
    if HAS_DB:
        db2 = tl.load(db_ptr + d, mask=row_ok, other=0.0).to(CT)[:, None]
    else:
        db2 = tl.zeros([R, 1], dtype=CT)
    if HAS_D:
        D2 = tl.load(D_ptr + d, mask=row_ok, other=0.0).to(CT)[:, None]
    if HAS_DTEND:
        dte2 = tl.load(dtend_ptr + b, mask=row_ok, other=0.0).to(CT)[:, None]
    if B_VAR:
        B_base = (b * G_B + d // dpg_B) * (N * L)  # [R]
    if C_VAR:
        C_base = (b * G_C + d // dpg_C) * (N * L)
    else:
        Cc3 = tl.load(C_ptr + d[:, None, None] * N + n3, mask=row_ok[:, None, None] & nok3, other=0.0).to(CT)
    if not B_VAR:
        Bc3 = tl.load(B_ptr + d[:, None, None] * N + n3, mask=row_ok[:, None, None] & nok3, other=0.0).to(CT)

    # ---- the first gap (0, t_1]: starts from h0 and borrows event 1's Δ and C ----
    has_ev = lens >= 1
    if HAS_H0:
        h = tl.load(h0_ptr + r2 * N + nn[None, :], mask=mask_rn, other=0.0).to(CT)  # [R, NP]
        d0, _d0_sp = _step(delta_ptr, db2, r2 * L, has_ev[:, None], SOFTPLUS, CT)  # [R, 1]
        dt0 = tl.load(dt_ptr + b[:, None] * L, mask=has_ev[:, None], other=0.0).to(CT)
        if C_VAR:
            C0 = tl.load(C_ptr + C_base[:, None] + nn[None, :] * L, mask=mask_rn & has_ev[:, None], other=0.0).to(CT)
        else:
            C0 = tl.sum(Cc3, axis=1)
        A2 = tl.sum(A3, axis=1)
        sg0 = _gap_step(d0, dt0, MAXV)  # [R, 1]
        x0 = A2 * sg0
        e0 = tl.exp(x0)
        huge0 = (sg0 >= HUGE) | (dt0 >= HUGE)
        dtph0 = _dt_phi(x0, e0, _phi(x0, TERMS), tl.sum(invA3, axis=1), _inv_step(d0, dt0, sg0, TINY), dt0, huge0)
        ch0 = C0 * h
        yl0 = tl.sum(ch0 * e0, axis=1)
        acc_int = tl.where(has_ev, tl.sum(ch0 * dtph0, axis=1), 0.0)
    else:
        h = tl.zeros([R, NP], dtype=CT)
        yl0 = tl.zeros([R], dtype=CT)
        acc_int = tl.zeros([R], dtype=CT)
    tl.store(yl_ptr + rows * L, yl0, mask=row_ok & has_ev)

    tloc = tl.arange(0, BL)[None, :]  # [1, BL]
    tloc3 = tloc[:, :, None]
    for c in range(0, n_chunks):
        t2 = c * BL + tloc  # [1, BL]
        valid = (t2 < len2) & rok2  # [R, BL]
        has_next = (t2 + 1 < len2) & rok2
        v3 = valid[:, :, None]
        hn3 = has_next[:, :, None]
        io = r2 * L + t2  # [R, BL]
        u = tl.load(u_ptr + io, mask=valid, other=0.0).to(CT)
        dl, _dl_sp = _step(delta_ptr, db2, io, valid, SOFTPLUS, CT)
        # Δ of the event before (event 1 borrows its own): sets the decay of the gap before event k.
        dlp, _dlp_sp = _step(delta_ptr, db2, r2 * L + tl.maximum(t2 - 1, 0), valid, SOFTPLUS, CT)
        dtk = tl.load(dt_ptr + b[:, None] * L + t2, mask=valid, other=0.0).to(CT)
        dtn = tl.load(dt_ptr + b[:, None] * L + t2 + 1, mask=has_next, other=0.0).to(CT)
        if HAS_DTEND:
            dtn = tl.where(valid & (t2 + 1 == len2), dte2, dtn)
        if B_VAR:
            Bv = tl.load(B_ptr + B_base[:, None, None] + n3 * L + t2[:, :, None], mask=v3 & nok3, other=0.0).to(CT)
        else:
            Bv = Bc3
        if C_VAR:
            Cv = tl.load(C_ptr + C_base[:, None, None] + n3 * L + t2[:, :, None], mask=v3 & nok3, other=0.0).to(CT)
        else:
            Cv = Cc3

        e = tl.where(v3, tl.exp(A3 * _gap_step(dlp, dtk, MAXV)[:, :, None]), 1.0)
        bj = tl.where(v3 & nok3, (dl * u)[:, :, None] * Bv, 0.0)
        acum, hs = tl.associative_scan((e, bj), 1, _combine)
        hc = hs + acum * h[:, None, :]  # [R, BL, NP]: h_k^+ (the carried state past the last event)

        ch = Cv * hc
        y = tl.sum(ch, axis=2)
        if HAS_D:
            y += D2 * u
        if HAS_Z:
            zz = tl.load(z_ptr + io, mask=valid, other=0.0).to(CT)
            y = y * zz / (1.0 + tl.exp(-zz))
        in_L = (t2 < L) & rok2
        tl.store(y_ptr + io, tl.where(valid, y, 0.0), mask=in_L)

        # The gap after event k: its left-limit readout belongs to event k+1, its integral to the sum.
        sg = _gap_step(dl, dtn, MAXV)
        xn = A3 * sg[:, :, None]
        en = tl.exp(xn)
        yl_next = tl.sum(ch * en, axis=2)
        tl.store(yl_ptr + io + 1, yl_next, mask=has_next)
        tl.store(yl_ptr + io, tl.zeros_like(yl_next), mask=in_L & (t2 >= len2))
        # A huge gap (step or length past HUGE) integrates with the closed form (see _dt_phi).
        huge3 = ((sg >= HUGE) | (dtn >= HUGE))[:, :, None]
        dtph = _dt_phi(xn, en, _phi(xn, TERMS), invA3, _inv_step(dl, dtn, sg, TINY)[:, :, None], dtn[:, :, None],
                       huge3)
        gap = tl.sum(ch * dtph, axis=2)
        acc_int += tl.sum(tl.where(valid, gap, 0.0), axis=1)

        h = tl.sum(tl.where(tloc3 == BL - 1, hc, 0.0), axis=1)  # [R, NP]
        tl.store(cs_ptr + (r2 * n_chunks + c) * N + nn[None, :], h, mask=mask_rn)

    tl.store(int_ptr + rows, acc_int, mask=row_ok)
    tl.store(last_ptr + r2 * N + nn[None, :], h, mask=mask_rn)


# ---------------------------------------------------------------------------------------------
# Backward (recomputation from the chunk-boundary states)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _mhp_scan_bwd_kernel(
    dy_ptr, dyl_ptr, dint_ptr, dlast_ptr,
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, dt_ptr, D_ptr, z_ptr, db_ptr, dtend_ptr, len_ptr, h0_ptr, cs_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, ddb_ptr, ddt_ptr, ddtend_ptr, dh0_ptr,
    n_rows, dim, L, N, dpg_B, dpg_C, G_B, G_C, n_chunks,
    HAS_DYL: tl.constexpr, HAS_DINT: tl.constexpr, HAS_DLAST: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DB: tl.constexpr, HAS_DTEND: tl.constexpr,
    HAS_LEN: tl.constexpr, HAS_H0: tl.constexpr, SOFTPLUS: tl.constexpr,
    B_VAR: tl.constexpr, C_VAR: tl.constexpr,
    R: tl.constexpr, BL: tl.constexpr, NP: tl.constexpr, TERMS: tl.constexpr, CT: tl.constexpr,
    MAXV: tl.constexpr, TINY: tl.constexpr, HUGE: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * R + tl.arange(0, R)
    row_ok = rows < n_rows
    rows = tl.where(row_ok, rows, 0).to(tl.int64)  # offsets such as (row * N + n) * L pass 2^31
    b = rows // dim
    d = rows % dim
    nn = tl.arange(0, NP)
    n_ok = nn < N
    r2 = rows[:, None]
    rok2 = row_ok[:, None]
    n3 = nn[None, None, :]
    nok3 = n_ok[None, None, :]
    rok3 = row_ok[:, None, None]
    mask_rn = rok2 & n_ok[None, :]

    if HAS_LEN:
        lens = tl.load(len_ptr + b, mask=row_ok, other=0).to(tl.int32)
    else:
        lens = tl.zeros([R], dtype=tl.int32) + L
    lens = tl.where(row_ok, lens, 0)
    len2 = lens[:, None]
    has_ev = lens >= 1
    A3 = tl.load(A_ptr + d[:, None, None] * N + n3, mask=rok3 & nok3, other=0.0).to(CT)
    invA3 = tl.where(A3 != 0.0, 1.0 / tl.where(A3 != 0.0, A3, 1.0), 0.0)
    if HAS_DB:
        db2 = tl.load(db_ptr + d, mask=row_ok, other=0.0).to(CT)[:, None]
    else:
        db2 = tl.zeros([R, 1], dtype=CT)
    if HAS_D:
        D2 = tl.load(D_ptr + d, mask=row_ok, other=0.0).to(CT)[:, None]
    else:
        D2 = tl.zeros([R, 1], dtype=CT)
    if HAS_DTEND:
        dte2 = tl.load(dtend_ptr + b, mask=row_ok, other=0.0).to(CT)[:, None]
    if HAS_DINT:
        dI2 = tl.load(dint_ptr + rows, mask=row_ok, other=0.0).to(CT)[:, None]  # [R, 1]
    else:
        dI2 = tl.zeros([R, 1], dtype=CT)
    dI3 = dI2[:, :, None]
    if B_VAR:
        B_base = (b * G_B + d // dpg_B) * (N * L)
    else:
        Bc3 = tl.load(B_ptr + d[:, None, None] * N + n3, mask=rok3 & nok3, other=0.0).to(CT)
    if C_VAR:
        C_base = (b * G_C + d // dpg_C) * (N * L)
    else:
        Cc3 = tl.load(C_ptr + d[:, None, None] * N + n3, mask=rok3 & nok3, other=0.0).to(CT)
    if HAS_H0:
        h0 = tl.load(h0_ptr + r2 * N + nn[None, :], mask=mask_rn, other=0.0).to(CT)
    else:
        h0 = tl.zeros([R, NP], dtype=CT)
    if HAS_DLAST:
        G = tl.load(dlast_ptr + r2 * N + nn[None, :], mask=mask_rn, other=0.0).to(CT)  # adjoint carry
    else:
        G = tl.zeros([R, NP], dtype=CT)

    dA_acc = tl.zeros([R, NP], dtype=CT)
    dBc_acc = tl.zeros([R, NP], dtype=CT)
    dCc_acc = tl.zeros([R, NP], dtype=CT)
    dD_acc = tl.zeros([R], dtype=CT)
    ddb_acc = tl.zeros([R], dtype=CT)
    ddte_acc = tl.zeros([R], dtype=CT)
    dh0 = tl.zeros([R, NP], dtype=CT)

    tloc = tl.arange(0, BL)[None, :]
    tloc3 = tloc[:, :, None]
    # Index of the next event inside the tile, for the adjoint's one-step shift (the last slot is
    # replaced by the carry from the next chunk).
    nxt3 = tl.minimum(tloc3 + 1, BL - 1) + tl.zeros([R, BL, NP], dtype=tl.int32)
    for ci in range(0, n_chunks):
        c = n_chunks - 1 - ci
        t2 = c * BL + tloc
        valid = (t2 < len2) & rok2
        has_next = (t2 + 1 < len2) & rok2
        is_last = valid & (t2 + 1 == len2)
        first = valid & (t2 == 0)
        v3 = valid[:, :, None]
        hn3 = has_next[:, :, None]
        f3 = first[:, :, None]
        in_L = (t2 < L) & rok2
        io = r2 * L + t2

        # ---- recompute the chunk's states from the saved boundary state ----
        if c > 0:
            hstart = tl.load(cs_ptr + (r2 * n_chunks + c - 1) * N + nn[None, :], mask=mask_rn, other=0.0).to(CT)
        else:
            hstart = h0
        u = tl.load(u_ptr + io, mask=valid, other=0.0).to(CT)
        dl, dsp = _step(delta_ptr, db2, io, valid, SOFTPLUS, CT)
        dlp, _dlp_sp = _step(delta_ptr, db2, r2 * L + tl.maximum(t2 - 1, 0), valid, SOFTPLUS, CT)
        dtk = tl.load(dt_ptr + b[:, None] * L + t2, mask=valid, other=0.0).to(CT)
        dtn = tl.load(dt_ptr + b[:, None] * L + t2 + 1, mask=has_next, other=0.0).to(CT)
        if HAS_DTEND:
            dtn = tl.where(is_last, dte2, dtn)
        if B_VAR:
            Bv = tl.load(B_ptr + B_base[:, None, None] + n3 * L + t2[:, :, None], mask=v3 & nok3, other=0.0).to(CT)
        else:
            Bv = Bc3
        if C_VAR:
            Cv = tl.load(C_ptr + C_base[:, None, None] + n3 * L + t2[:, :, None], mask=v3 & nok3, other=0.0).to(CT)
        else:
            Cv = Cc3
        e = tl.where(v3, tl.exp(A3 * _gap_step(dlp, dtk, MAXV)[:, :, None]), 1.0)
        du_b = dl * u
        bj = tl.where(v3 & nok3, du_b[:, :, None] * Bv, 0.0)
        acum, hs = tl.associative_scan((e, bj), 1, _combine)
        hc = hs + acum * hstart[:, None, :]

        # ---- output gradients at each event ----
        dy = tl.load(dy_ptr + io, mask=valid, other=0.0).to(CT)
        if HAS_Z:
            zz = tl.load(z_ptr + io, mask=valid, other=0.0).to(CT)
            sz = 1.0 / (1.0 + tl.exp(-zz))
            ypre = tl.sum(Cv * hc, axis=2) + D2 * u
            dz = dy * ypre * sz * (1.0 + zz * (1.0 - sz))
            tl.store(dz_ptr + io, tl.where(valid, dz, 0.0), mask=in_L)
            gy = dy * zz * sz
        else:
            gy = dy
        gy = tl.where(valid, gy, 0.0)
        if HAS_DYL:
            dyl_n = tl.load(dyl_ptr + io + 1, mask=has_next, other=0.0).to(CT)
            dyl_0 = tl.load(dyl_ptr + io, mask=first, other=0.0).to(CT)
        else:
            dyl_n = tl.zeros([R, BL], dtype=CT)
            dyl_0 = tl.zeros([R, BL], dtype=CT)
        dyl3 = dyl_n[:, :, None]
        dtn3 = dtn[:, :, None]

        # ---- the gap after event k (decay rate A Δ_k over dtn) ----
        sg = _gap_step(dl, dtn, MAXV)
        sg3 = sg[:, :, None]
        xn = A3 * sg3
        en = tl.exp(xn)
        ph = _phi(xn, TERMS)
        dph = _dphi(xn, ph, TERMS)
        # A huge gap (step, length or integral weight dintegral dt past HUGE, issue 16) takes the closed
        # forms of _dt_phi / _gap_grads; every other gap the direct products (all factors bounded).
        huge3 = ((sg >= HUGE) | (dtn >= HUGE) | ~(tl.abs(dI2 * dtn) < HUGE))[:, :, None]
        qinv3 = _inv_step(dl, dtn, sg, TINY)[:, :, None]
        dtph = _dt_phi(xn, en, ph, invA3, qinv3, dtn3, huge3)  # dt φ(x)
        # Direct gradient on h_k^+ (y_k, y_left_{k+1}, the gap's integral), then the adjoint recurrence.
        q = Cv * (gy[:, :, None] + tl.where(hn3, dyl3 * en, 0.0) + dI3 * dtph)
        q = tl.where(v3 & nok3, q, 0.0)
        a = tl.where(hn3, en, 1.0)
        arev, Gs = tl.associative_scan((a, q), 1, _combine, reverse=True)
        Gk = Gs + arev * G[:, None, :]  # dL/dh_k^+
        Gn = tl.gather(Gk, nxt3, 1)
        Gn = tl.where(tloc3 == BL - 1, G[:, None, :], Gn)  # dL/dh_{k+1}^+
        P = tl.where(hn3, Gn + dyl3 * Cv, 0.0)  # dL/dh_{k+1}^-
        hen = hc * en
        # d(loss)/dA_n and the lane's d(loss)/dΔ_k of the gap (closed forms at a huge one). The padded
        # lanes are selected out of the lane sum (at a huge gap their products need not be finite).
        dA_g, dD_g = _gap_grads(xn, en, dph, dtph, invA3, A3, qinv3, dtn3, sg3, huge3, P * hen, dI3 * Cv * hc)
        dAl = tl.where(v3, dA_g, 0.0)
        dDl = tl.where(v3 & nok3, dD_g, 0.0)
        # d/d dt of the gap: the rate A Δ_k is applied as (P h e^x A) Δ_k, never as a precomputed A Δ_k,
        # which overflows to -inf for finite A and Δ (1e30 each) and meets e^x = 0 (0 * inf, issue 16).
        ddtn = tl.sum(tl.where(v3, P * hen * A3 * dl[:, :, None] + dI3 * Cv * hen, 0.0), axis=2)  # [R, BL]
        dCv = tl.where(v3, gy[:, :, None] * hc + tl.where(hn3, dyl3 * hen, 0.0) + dI3 * hc * dtph, 0.0)

        # ---- the first gap (0, t_1], from h0 with event 1's Δ and C (only the tile holding event 1) ----
        G0 = tl.sum(tl.where(f3, Gk, 0.0), axis=1)  # [R, NP]
        C0 = tl.sum(tl.where(f3, Cv, 0.0), axis=1)
        d0 = tl.sum(tl.where(first, dl, 0.0), axis=1)[:, None]  # [R, 1]
        dt0 = tl.sum(tl.where(first, dtk, 0.0), axis=1)[:, None]
        dyl0 = tl.sum(dyl_0, axis=1)[:, None]
        A2 = tl.sum(A3, axis=1)
        sg0 = _gap_step(d0, dt0, MAXV)
        x0 = A2 * sg0
        e0 = tl.exp(x0)
        ph0 = _phi(x0, TERMS)
        dph0 = _dphi(x0, ph0, TERMS)
        huge0 = (sg0 >= HUGE) | (dt0 >= HUGE) | ~(tl.abs(dI2 * dt0) < HUGE)  # [R, 1]
        invA2 = tl.sum(invA3, axis=1)
        qinv0 = _inv_step(d0, dt0, sg0, TINY)
        dtph0 = _dt_phi(x0, e0, ph0, invA2, qinv0, dt0, huge0)
        P0 = G0 + dyl0 * C0
        dh0_c = P0 * e0 + dI2 * C0 * dtph0
        dA0, dD0 = _gap_grads(x0, e0, dph0, dtph0, invA2, A2, qinv0, dt0, sg0, huge0, P0 * h0 * e0, dI2 * C0 * h0)
        dD0 = tl.where(n_ok[None, :], dD0, 0.0)
        ddt0 = tl.sum(P0 * h0 * e0 * A2 * d0 + dI2 * C0 * h0 * e0, axis=1)  # [R]
        dC0 = dyl0 * e0 * h0 + dI2 * h0 * dtph0
        has_first = tl.sum(first.to(tl.int32), axis=1) > 0  # [R]
        dh0 = tl.where(has_first[:, None], dh0_c, dh0)
        dAl += tl.where(f3, dA0[:, None, :], 0.0)
        dDl += tl.where(f3, dD0[:, None, :], 0.0)
        dCv += tl.where(f3, dC0[:, None, :], 0.0)

        # ---- parameter gradients ----
        GB = tl.sum(Gk * Bv, axis=2)
        du = GB * dl + gy * D2
        dDelta = GB * u + tl.sum(dDl, axis=2)
        ddelta = tl.where(valid, dDelta * dsp, 0.0)
        tl.store(du_ptr + io, tl.where(valid, du, 0.0), mask=in_L)
        tl.store(ddelta_ptr + io, ddelta, mask=in_L)
        dA_acc += tl.sum(dAl, axis=1)
        dD_acc += tl.sum(gy * u, axis=1)
        ddb_acc += tl.sum(ddelta, axis=1)
        dBv = tl.where(v3, Gk * du_b[:, :, None], 0.0)
        if B_VAR:
            tl.store(dB_ptr + (r2[:, :, None] * N + n3) * L + t2[:, :, None], dBv, mask=in_L[:, :, None] & nok3)
        else:
            dBc_acc += tl.sum(dBv, axis=1)
        if C_VAR:
            tl.store(dC_ptr + (r2[:, :, None] * N + n3) * L + t2[:, :, None], dCv, mask=in_L[:, :, None] & nok3)
        else:
            dCc_acc += tl.sum(dCv, axis=1)
        # ddt: the gap after event k is dt_{k+1} (or dt_end after the last event); dt_1 is the first gap.
        tl.store(ddt_ptr + io + 1, ddtn, mask=has_next)
        tl.store(ddt_ptr + io, tl.where(first, ddt0[:, None], 0.0), mask=(first | ~valid) & in_L)
        ddte_acc += tl.sum(tl.where(is_last, ddtn, 0.0), axis=1)

        G = tl.sum(tl.where(tloc3 == 0, Gk, 0.0), axis=1)

    # A sequence with no events passes dlast_state straight to the initial state.
    dh0 = tl.where(has_ev[:, None], dh0, G)
    tl.store(dh0_ptr + r2 * N + nn[None, :], dh0, mask=mask_rn)
    tl.store(dA_ptr + r2 * N + nn[None, :], dA_acc, mask=mask_rn)
    if not B_VAR:
        tl.store(dB_ptr + r2 * N + nn[None, :], dBc_acc, mask=mask_rn)
    if not C_VAR:
        tl.store(dC_ptr + r2 * N + nn[None, :], dCc_acc, mask=mask_rn)
    if HAS_D:
        tl.store(dD_ptr + rows, dD_acc, mask=row_ok)
    else:
        tl.store(dD_ptr + rows, tl.zeros_like(dD_acc), mask=row_ok)
    if HAS_DB:
        tl.store(ddb_ptr + rows, ddb_acc, mask=row_ok)
    else:
        tl.store(ddb_ptr + rows, tl.zeros_like(ddb_acc), mask=row_ok)
    if HAS_DTEND:
        tl.store(ddtend_ptr + rows, ddte_acc, mask=row_ok)
    else:
        tl.store(ddtend_ptr + rows, tl.zeros_like(ddte_acc), mask=row_ok)


# ---------------------------------------------------------------------------------------------
# Launchers (torch.library.triton_op)
# ---------------------------------------------------------------------------------------------
def _geometry(n_rows: int, L: int, N: int, chunk_size: int) -> tuple[int, int, int, int]:
    """(R rows per program, BL events per tile, NP padded state, num_warps) for a problem."""
    if chunk_size < 1 or chunk_size & (chunk_size - 1):
        raise ValueError(f"the triton mhp_scan needs a power-of-two chunk_size, got {chunk_size}")
    BL = min(chunk_size, triton.next_power_of_2(max(L, 1)))
    NP = triton.next_power_of_2(N)
    R = 1
    if L <= _PACK_MAX_L:
        R = max(1, min(_MAX_ROWS_PER_PROGRAM, _TILE_TARGET // (BL * NP), triton.next_power_of_2(n_rows)))
        R = 1 << (R.bit_length() - 1)  # a power of two for tl.arange
    # About 4 tile elements per thread per live tensor (what fits in registers, see _TILE_TARGET).
    num_warps = min(16, max(4, (R * BL * NP) // 128))
    return R, BL, NP, num_warps


def _layout(X: torch.Tensor, dim: int) -> tuple[bool, int, int]:
    """(variable, channels per group, groups) of a B/C argument: (dim, N) or (batch, G, N, L)."""
    if X.dim() == 4:
        return True, dim // X.shape[1], X.shape[1]
    return False, 1, 1


def _terms(ct: torch.dtype) -> int:
    # Series terms for phi / phi' at |x| < 0.5: float32 needs 9, float64 17 (0.5^17 / 18! ~ 1e-21).
    return 17 if ct == torch.float64 else 9


def _limits(ct: torch.dtype) -> dict:
    """The overflow guard's constants for a compute type (issue 16; the cpu kernel's gap_step and
    PhiConst::kHuge): MAXV saturates the step Δ dt, TINY is the smallest normal Δ taken as 1/Δ, and a
    gap with a step, length or integral weight past HUGE takes the closed forms -- far below where dt^2
    or 1/x^2 leave the type's range, far above any time scale a model uses."""
    fi = torch.finfo(ct)
    return dict(MAXV=fi.max, TINY=fi.tiny, HUGE=1e150 if ct == torch.float64 else 1e15)


def _tl_dtype(ct: torch.dtype):
    return tl.float64 if ct == torch.float64 else tl.float32


def _c(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t.contiguous() if t is not None else None


@triton_op("mvpp::mhp_scan_fwd_triton", mutates_args=())
def mhp_scan_fwd_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    dt: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
    dt_end: Optional[torch.Tensor],
    lengths: Optional[torch.Tensor],
    initial_state: Optional[torch.Tensor],
    delta_softplus: bool,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, dim, L = u.shape
    N = A.shape[1]
    sd = state_dtype(u.dtype)
    n_chunks = (L + chunk_size - 1) // chunk_size
    y = u.new_empty((batch, dim, L))
    y_left = u.new_empty((batch, dim, L), dtype=sd)
    integral = u.new_empty((batch, dim), dtype=sd)
    last_state = u.new_empty((batch, dim, N), dtype=sd)
    chunk_states = u.new_empty((batch, dim, n_chunks * N), dtype=sd)  # [b][d][chunk][n], flat
    n_rows = batch * dim
    if n_rows == 0 or L == 0:
        # The public wrapper never sends L == 0; keep the op total anyway (nothing to scan).
        y_left.zero_()
        y.zero_()
        integral.zero_()
        if initial_state is not None:
            last_state.copy_(initial_state)
        else:
            last_state.zero_()
        return y, y_left, integral, last_state, chunk_states
    R, BL, NP, num_warps = _geometry(n_rows, L, N, chunk_size)
    u, delta, A, B, C, dt = (t.contiguous() for t in (u, delta, A, B, C, dt))
    D, z, delta_bias, dt_end, lengths, initial_state = map(_c, (D, z, delta_bias, dt_end, lengths, initial_state))
    B_var, dpg_B, G_B = _layout(B, dim)
    C_var, dpg_C, G_C = _layout(C, dim)
    dummy = u
    grid = (triton.cdiv(n_rows, R),)
    wrap_triton(_mhp_scan_fwd_kernel)[grid](
        u, delta, A, B, C, dt,
        D if D is not None else dummy, z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy, dt_end if dt_end is not None else dummy,
        lengths if lengths is not None else dummy, initial_state if initial_state is not None else dummy,
        y, y_left, integral, last_state, chunk_states,
        n_rows, dim, L, N, dpg_B, dpg_C, G_B, G_C, n_chunks,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DB=delta_bias is not None, HAS_DTEND=dt_end is not None,
        HAS_LEN=lengths is not None, HAS_H0=initial_state is not None, SOFTPLUS=bool(delta_softplus),
        B_VAR=B_var, C_VAR=C_var, R=R, BL=BL, NP=NP, TERMS=_terms(sd), CT=_tl_dtype(sd), **_limits(sd),
        num_warps=num_warps,
    )
    return y, y_left, integral, last_state, chunk_states


@triton_op("mvpp::mhp_scan_bwd_triton", mutates_args=())
def mhp_scan_bwd_triton(
    dy: torch.Tensor,
    dy_left: Optional[torch.Tensor],
    dintegral: Optional[torch.Tensor],
    dlast_state: Optional[torch.Tensor],
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    dt: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
    dt_end: Optional[torch.Tensor],
    lengths: Optional[torch.Tensor],
    initial_state: Optional[torch.Tensor],
    chunk_states: torch.Tensor,
    delta_softplus: bool,
    chunk_size: int,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # `deterministic` is accepted for the schema; this backward is always deterministic (no atomics).
    batch, dim, L = u.shape
    N = A.shape[1]
    sd = state_dtype(u.dtype)
    n_chunks = (L + chunk_size - 1) // chunk_size
    n_rows = batch * dim
    B_var, dpg_B, G_B = _layout(B, dim)
    C_var, dpg_C, G_C = _layout(C, dim)
    du = torch.empty_like(u, memory_format=torch.contiguous_format)
    ddelta = torch.empty_like(delta, memory_format=torch.contiguous_format)
    dA = u.new_empty((batch, dim, N), dtype=sd)
    # Variable B/C: one partial per channel, summed over each group's channels below.
    dB_k = u.new_empty((batch, dim, N, L) if B_var else (batch, dim, N), dtype=sd)
    dC_k = u.new_empty((batch, dim, N, L) if C_var else (batch, dim, N), dtype=sd)
    dD = u.new_empty((batch, dim), dtype=sd)
    dz = torch.empty_like(z, memory_format=torch.contiguous_format) if z is not None else u.new_empty((0,))
    ddb = u.new_empty((batch, dim), dtype=sd)
    ddt = u.new_empty((batch, dim, L), dtype=sd)
    ddt_end = u.new_empty((batch, dim), dtype=sd)
    dh0 = u.new_empty((batch, dim, N), dtype=sd)
    if n_rows == 0 or L == 0:
        for t in (du, ddelta, dA, dB_k, dC_k, dD, dz, ddb, ddt, ddt_end):
            t.zero_()
        if dlast_state is not None:
            dh0.copy_(dlast_state)
        else:
            dh0.zero_()
    else:
        R, BL, NP, num_warps = _geometry(n_rows, L, N, chunk_size)
        u, delta, A, B, C, dt, dy, chunk_states = (
            t.contiguous() for t in (u, delta, A, B, C, dt, dy, chunk_states))
        D, z, delta_bias, dt_end, lengths, initial_state, dy_left, dintegral, dlast_state = map(
            _c, (D, z, delta_bias, dt_end, lengths, initial_state, dy_left, dintegral, dlast_state))
        dummy = u
        grid = (triton.cdiv(n_rows, R),)
        wrap_triton(_mhp_scan_bwd_kernel)[grid](
            dy, dy_left if dy_left is not None else dummy, dintegral if dintegral is not None else dummy,
            dlast_state if dlast_state is not None else dummy,
            u, delta, A, B, C, dt,
            D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy, dt_end if dt_end is not None else dummy,
            lengths if lengths is not None else dummy, initial_state if initial_state is not None else dummy,
            chunk_states,
            du, ddelta, dA, dB_k, dC_k, dD, dz if z is not None else dummy, ddb, ddt, ddt_end, dh0,
            n_rows, dim, L, N, dpg_B, dpg_C, G_B, G_C, n_chunks,
            HAS_DYL=dy_left is not None, HAS_DINT=dintegral is not None, HAS_DLAST=dlast_state is not None,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_DB=delta_bias is not None,
            HAS_DTEND=dt_end is not None, HAS_LEN=lengths is not None, HAS_H0=initial_state is not None,
            SOFTPLUS=bool(delta_softplus), B_VAR=B_var, C_VAR=C_var,
            R=R, BL=BL, NP=NP, TERMS=_terms(sd), CT=_tl_dtype(sd), **_limits(sd),
            num_warps=num_warps,
        )
    dB = dB_k.view(batch, G_B, dpg_B, N, L).sum(2) if B_var else dB_k
    dC = dC_k.view(batch, G_C, dpg_C, N, L).sum(2) if C_var else dC_k
    return du, ddelta, dA, dB, dC, dD, dz, ddb, ddt, ddt_end, dh0


mhp_scan_fwd_triton.register_autograd(make_backward(mhp_scan_bwd_triton), setup_context=_setup_context)

if triton_interpret():
    # Under the interpreter a launch reads its arguments' data pointers, so the triton_op's default
    # fake (running the body on FakeTensors) fails; shape-only fakes keep fake tracing working there.
    # On a GPU the default is kept, so torch.compile can see into the kernels.
    mhp_scan_fwd_triton.register_fake(_fwd_fake)
    mhp_scan_bwd_triton.register_fake(_bwd_fake)
