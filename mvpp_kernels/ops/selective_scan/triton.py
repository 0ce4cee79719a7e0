"""Triton backend of selective_scan: `mvpp::selective_scan_fwd_triton` / `mvpp::selective_scan_bwd_triton`.

Same argument lists, outputs, shapes and dtypes as the compiled pair `mvpp::selective_scan_fwd/_bwd`
(schemas in `mvpp_kernels/_library.py`), so the autograd glue in `__init__.py` serves both.

Algorithm (chunked, as in mamba's CUDA kernel):
- forward: one program per (batch, channel). The N-wide state is a register tile; L is walked in chunks
  of `chunk_size` steps, each chunk a (N, chunk) tile scanned in parallel along L with
  `tl.associative_scan` over the pairs (exp(Δ_t A), Δ_t B_t u_t) -- the linear recurrence
  h_t = a_t h_{t-1} + b_t is associative as (a1, b1) ∘ (a2, b2) = (a1 a2, a2 b1 + b2). The state is
  carried across chunks, and saved at every chunk boundary (`chunk_states`) for the backward.
- backward: reverse over chunks; each chunk's states are recomputed from its saved start state, then
  the adjoint g_t = dL/dh_t = a_{t+1} g_{t+1} + C_t dy_t runs as a reverse associative scan with the
  same combine. Nothing of size (batch, dim, N, L) is allocated.
- Determinism (no float atomics anywhere): per-channel reductions over L (dA, dD, d(delta_bias),
  constant dB/dC) are accumulated by the one program that owns the channel. For variable B/C, several
  channels share one (batch, group) slice of dB/dC; a backward program therefore owns a contiguous
  range of `R` channels inside one group, loops over them (chunk outer, channel inner) and sums their
  contributions in registers; ranges of the same group are then summed by torch in a fixed order. The
  partial buffer is (batch, dim / R, N, L): R is the whole group on CPU (no partials at all) and, on a
  GPU, as large as still gives a few programs per SM, so it is bounded by ~(4 · #SM) · N · L, not by
  batch · dim · N · L.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from . import CHUNK_SIZE, _bwd_fake, _fwd_fake, _setup_context, make_backward, state_dtype  # noqa: F401

__all__ = ["selective_scan_fwd_triton", "selective_scan_bwd_triton"]

# Softplus switches to the identity above this, like torch.nn.functional.softplus (beta 1).
_SOFTPLUS_THRESHOLD = 20.0


@triton.jit
def _linear_recurrence_combine(a1, b1, a2, b2):
    # (a1, b1) is the earlier segment: applying it then (a2, b2) maps h -> a2 (a1 h + b1) + b2.
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _softplus(x):
    # log1p(exp(x)) without a log1p intrinsic (not available in every backend nor the interpreter):
    # log(w) * e / (w - 1) with w = 1 + e is accurate to a few ulps even where 1 + e rounds (Goldberg).
    e = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + e
    lp = tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))
    return tl.where(x <= 20.0, lp, x)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _last_column(X, offs_t, T: tl.constexpr):
    # Registers cannot be indexed by position: select the column and reduce it out.
    return tl.sum(tl.where(offs_t[None, :] == T - 1, X, 0.0), axis=1)


@triton.jit
def _first_column(X, offs_t):
    return tl.sum(tl.where(offs_t[None, :] == 0, X, 0.0), axis=1)


@triton.jit
def _selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, db_ptr, h0_ptr, len_ptr,
    out_ptr, last_ptr, cs_ptr,
    dim, L, N, n_chunks, dpg_B, dpg_C,
    s_u_b, s_u_d, s_u_l,
    s_dl_b, s_dl_d, s_dl_l,
    s_A_d, s_A_n,
    s_B_b, s_B_g, s_B_n, s_B_l,
    s_C_b, s_C_g, s_C_n, s_C_l,
    s_D, s_db,
    s_z_b, s_z_d, s_z_l,
    s_h0_b, s_h0_d, s_h0_n,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DB: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_LEN: tl.constexpr, SOFTPLUS: tl.constexpr, VAR_B: tl.constexpr, VAR_C: tl.constexpr,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // dim
    d = pid % dim
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_t = tl.arange(0, T)

    seq_len = L
    if HAS_LEN:
        seq_len = tl.minimum(tl.maximum(tl.load(len_ptr + b), 0), L)

    A = tl.load(A_ptr + d * s_A_d + offs_n * s_A_n, mask=mask_n, other=0.0).to(ACC)
    if HAS_D:
        Dv = tl.load(D_ptr + d * s_D).to(ACC)
    if HAS_DB:
        bias = tl.load(db_ptr + d * s_db).to(ACC)
    if HAS_H0:
        h = tl.load(h0_ptr + b * s_h0_b + d * s_h0_d + offs_n * s_h0_n, mask=mask_n, other=0.0).to(ACC)
    else:
        h = tl.zeros([BLOCK_N], dtype=ACC)
    # Constant B/C are (dim, N): the launcher passes their strides as (group, n) with group = channel.
    if not VAR_B:
        Bc = tl.load(B_ptr + d * s_B_g + offs_n * s_B_n, mask=mask_n, other=0.0).to(ACC)
    if not VAR_C:
        Cc = tl.load(C_ptr + d * s_C_g + offs_n * s_C_n, mask=mask_n, other=0.0).to(ACC)
    B_base = B_ptr + b * s_B_b + (d // dpg_B) * s_B_g
    C_base = C_ptr + b * s_C_b + (d // dpg_C) * s_C_g
    u_base = u_ptr + b * s_u_b + d * s_u_d
    dl_base = delta_ptr + b * s_dl_b + d * s_dl_d
    z_base = z_ptr + b * s_z_b + d * s_z_d
    out_base = out_ptr + (b * dim + d) * L
    cs_base = cs_ptr + (b * dim + d) * n_chunks * N

    for c in range(0, n_chunks):
        t = c * T + offs_t.to(tl.int64)
        valid = t < seq_len
        in_range = t < L
        u = tl.load(u_base + t * s_u_l, mask=valid, other=0.0).to(ACC)
        dt = tl.load(dl_base + t * s_dl_l, mask=valid, other=0.0).to(ACC)
        if HAS_DB:
            dt = dt + bias
        if SOFTPLUS:
            dt = _softplus(dt)
        # Past a sequence's end: a = exp(0) = 1 and b = 0, so the state is carried unchanged.
        dt = tl.where(valid, dt, 0.0)
        dA = tl.exp(dt[None, :] * A[:, None])
        m2 = mask_n[:, None] & valid[None, :]
        if VAR_B:
            Bt = tl.load(B_base + offs_n[:, None] * s_B_n + t[None, :] * s_B_l, mask=m2, other=0.0).to(ACC)
        else:
            Bt = Bc[:, None]
        bu = Bt * (dt * u)[None, :]
        aa, bb = tl.associative_scan((dA, bu), 1, _linear_recurrence_combine)
        H = aa * h[:, None] + bb
        if VAR_C:
            Ct = tl.load(C_base + offs_n[:, None] * s_C_n + t[None, :] * s_C_l, mask=m2, other=0.0).to(ACC)
        else:
            Ct = Cc[:, None]
        y = tl.sum(Ct * H, axis=0)
        if HAS_D:
            y = y + Dv * u
        if HAS_Z:
            zv = tl.load(z_base + t * s_z_l, mask=valid, other=0.0).to(ACC)
            y = y * zv * _sigmoid(zv)
        y = tl.where(valid, y, 0.0)
        tl.store(out_base + t, y, mask=in_range)
        h = _last_column(H, offs_t, T)
        tl.store(cs_base + c * N + offs_n, h, mask=mask_n)
    tl.store(last_ptr + (b * dim + d) * N + offs_n, h, mask=mask_n)


@triton.jit
def _selective_scan_bwd_kernel(
    dout_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, db_ptr, h0_ptr, len_ptr, cs_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dBp_ptr, dCp_ptr, dD_ptr, dz_ptr, ddb_ptr, g_ptr,
    dim, L, N, n_chunks, dpg_B, dpg_C, R, n_ranges,
    s_do_b, s_do_d, s_do_l,
    s_u_b, s_u_d, s_u_l,
    s_dl_b, s_dl_d, s_dl_l,
    s_A_d, s_A_n,
    s_B_b, s_B_g, s_B_n, s_B_l,
    s_C_b, s_C_g, s_C_n, s_C_l,
    s_D, s_db,
    s_z_b, s_z_d, s_z_l,
    s_h0_b, s_h0_d, s_h0_n,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DB: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_LEN: tl.constexpr, SOFTPLUS: tl.constexpr, VAR_B: tl.constexpr, VAR_C: tl.constexpr,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr,
):
    # One program per (batch, range of R channels inside one group of B and of C).
    # g_ptr (batch, dim, N) carries each channel's adjoint g across chunks; it starts as dlast_state
    # and ends as dinitial_state. dA/dD/ddb/constant-dB/dC accumulate in their outputs (zero-filled by
    # the launcher); only this program touches its channels' entries, so the read-modify-writes race
    # with nothing (debug_barrier orders them between the threads of the program).
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_ranges
    rng = pid % n_ranges
    d0 = rng * R
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_t = tl.arange(0, T)

    seq_len = L
    if HAS_LEN:
        seq_len = tl.minimum(tl.maximum(tl.load(len_ptr + b), 0), L)

    B_base = B_ptr + b * s_B_b + (d0 // dpg_B) * s_B_g
    C_base = C_ptr + b * s_C_b + (d0 // dpg_C) * s_C_g

    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc
        t = c * T + offs_t.to(tl.int64)
        valid = t < seq_len
        valid_next = (t + 1) < seq_len
        in_range = t < L
        m2 = mask_n[:, None] & valid[None, :]
        # All R channels read the same group's B/C: load the tiles once per chunk.
        if VAR_B:
            Bt = tl.load(B_base + offs_n[:, None] * s_B_n + t[None, :] * s_B_l, mask=m2, other=0.0).to(ACC)
            dB_acc = tl.zeros([BLOCK_N, T], dtype=ACC)
        if VAR_C:
            Ct = tl.load(C_base + offs_n[:, None] * s_C_n + t[None, :] * s_C_l, mask=m2, other=0.0).to(ACC)
            dC_acc = tl.zeros([BLOCK_N, T], dtype=ACC)
        for i in range(0, R):
            d = d0 + i
            bd = b * dim + d
            A = tl.load(A_ptr + d * s_A_d + offs_n * s_A_n, mask=mask_n, other=0.0).to(ACC)
            if not VAR_B:
                Bt = tl.load(B_ptr + d * s_B_g + offs_n * s_B_n, mask=mask_n, other=0.0).to(ACC)[:, None]
            if not VAR_C:
                Ct = tl.load(C_ptr + d * s_C_g + offs_n * s_C_n, mask=mask_n, other=0.0).to(ACC)[:, None]
            u = tl.load(u_ptr + b * s_u_b + d * s_u_d + t * s_u_l, mask=valid, other=0.0).to(ACC)
            dl_base = delta_ptr + b * s_dl_b + d * s_dl_d
            x = tl.load(dl_base + t * s_dl_l, mask=valid, other=0.0).to(ACC)
            x_next = tl.load(dl_base + (t + 1) * s_dl_l, mask=valid_next, other=0.0).to(ACC)
            if HAS_DB:
                bias = tl.load(db_ptr + d * s_db).to(ACC)
                x = x + bias
                x_next = x_next + bias
            if SOFTPLUS:
                dt = _softplus(x)
                dt_next = _softplus(x_next)
            else:
                dt = x
                dt_next = x_next
            dt = tl.where(valid, dt, 0.0)
            dt_next = tl.where(valid_next, dt_next, 0.0)

            # Recompute the chunk's states from its saved start state.
            # Scalar conditions are broadcast to the lane vector first: the interpreter mishandles a
            # scalar comparison and'ed into a vector mask.
            c_n = offs_n * 0 + c
            h_start = tl.load(cs_ptr + (bd * n_chunks + c - 1) * N + offs_n, mask=mask_n & (c_n > 0), other=0.0)
            h_start = h_start.to(ACC)
            if HAS_H0:
                h_start += tl.load(h0_ptr + b * s_h0_b + d * s_h0_d + offs_n * s_h0_n, mask=mask_n & (c_n == 0),
                                   other=0.0).to(ACC)
            dA = tl.exp(dt[None, :] * A[:, None])
            bu = Bt * (dt * u)[None, :]
            aa, bb = tl.associative_scan((dA, bu), 1, _linear_recurrence_combine)
            H = aa * h_start[:, None] + bb

            dout = tl.load(dout_ptr + b * s_do_b + d * s_do_d + t * s_do_l, mask=valid, other=0.0).to(ACC)
            if HAS_D:
                Dv = tl.load(D_ptr + d * s_D).to(ACC)
            if HAS_Z:
                zv = tl.load(z_ptr + b * s_z_b + d * s_z_d + t * s_z_l, mask=valid, other=0.0).to(ACC)
                sz = _sigmoid(zv)
                y = tl.sum(Ct * H, axis=0)
                if HAS_D:
                    y = y + Dv * u
                dz = dout * y * sz * (1.0 + zv * (1.0 - sz))
                tl.store(dz_ptr + bd * L + t, tl.where(valid, dz, 0.0), mask=in_range)
                dy = dout * zv * sz
            else:
                dy = dout
            dy = tl.where(valid, dy, 0.0)

            # Reverse adjoint over the chunk: g_t = a_{t+1} g_{t+1} + C_t dy_t, entered with the carry
            # g at the next chunk's first step (dlast_state for the last chunk).
            a_next = tl.exp(dt_next[None, :] * A[:, None])
            ga, gb = tl.associative_scan((a_next, Ct * dy[None, :]), 1, _linear_recurrence_combine, reverse=True)
            g_carry = tl.load(g_ptr + bd * N + offs_n, mask=mask_n, other=0.0).to(ACC)
            g_full = ga * g_carry[:, None] + gb
            # The carry passes unchanged through steps past the sequence's end (a = 1, no readout)
            # and so must be taken before masking; the gradients below use the masked adjoint.
            g_next_carry = _first_column(g_full, offs_t)
            g = tl.where(m2, g_full, 0.0)

            # a_t h_{t-1} as h_t - Δ_t B_t u_t (the previous state is not in registers; mamba does the same).
            ah_prev = H - bu
            gB = tl.sum(g * Bt, axis=0)
            du = dt * gB
            if HAS_D:
                du = du + Dv * dy
            tl.store(du_ptr + bd * L + t, tl.where(valid, du, 0.0), mask=in_range)
            ddt = tl.sum(g * ah_prev * A[:, None], axis=0) + gB * u
            if SOFTPLUS:
                ex = tl.exp(tl.minimum(x, 20.0))
                ddt = tl.where(x <= 20.0, ddt * (ex / (1.0 + ex)), ddt)
            ddt = tl.where(valid, ddt, 0.0)
            tl.store(ddelta_ptr + bd * L + t, ddt, mask=in_range)

            dBt = g * (dt * u)[None, :]
            dCt = tl.where(m2, dy[None, :] * H, 0.0)
            dA_c = tl.sum(g * dt[None, :] * ah_prev, axis=1)
            tl.debug_barrier()
            tl.store(g_ptr + bd * N + offs_n, g_next_carry, mask=mask_n)
            acc_dA = tl.load(dA_ptr + bd * N + offs_n, mask=mask_n, other=0.0)
            tl.store(dA_ptr + bd * N + offs_n, acc_dA + dA_c, mask=mask_n)
            if HAS_D:
                tl.store(dD_ptr + bd, tl.load(dD_ptr + bd) + tl.sum(dy * u, axis=0))
            if HAS_DB:
                tl.store(ddb_ptr + bd, tl.load(ddb_ptr + bd) + tl.sum(ddt, axis=0))
            if VAR_B:
                dB_acc += dBt
            else:
                acc = tl.load(dBp_ptr + bd * N + offs_n, mask=mask_n, other=0.0)
                tl.store(dBp_ptr + bd * N + offs_n, acc + tl.sum(dBt, axis=1), mask=mask_n)
            if VAR_C:
                dC_acc += dCt
            else:
                acc = tl.load(dCp_ptr + bd * N + offs_n, mask=mask_n, other=0.0)
                tl.store(dCp_ptr + bd * N + offs_n, acc + tl.sum(dCt, axis=1), mask=mask_n)
            tl.debug_barrier()
        m_store = mask_n[:, None] & in_range[None, :]
        part = (b * n_ranges + rng) * N * L
        if VAR_B:
            tl.store(dBp_ptr + part + offs_n[:, None] * L + t[None, :], dB_acc, mask=m_store)
        if VAR_C:
            tl.store(dCp_ptr + part + offs_n[:, None] * L + t[None, :], dC_acc, mask=m_store)

    # dinitial_state = a_0 g_0 (the adjoint one step before the sequence; a_0 = 1 for an empty one).
    for i in range(0, R):
        d = d0 + i
        bd = b * dim + d
        A = tl.load(A_ptr + d * s_A_d + offs_n * s_A_n, mask=mask_n, other=0.0).to(ACC)
        nonempty = (offs_n * 0 + seq_len) > 0
        x0 = tl.load(delta_ptr + b * s_dl_b + d * s_dl_d + offs_n * 0, mask=nonempty, other=0.0).to(ACC)
        if HAS_DB:
            x0 = x0 + tl.load(db_ptr + d * s_db).to(ACC)
        if SOFTPLUS:
            x0 = _softplus(x0)
        dt0 = tl.where(nonempty, x0, 0.0)
        g0 = tl.load(g_ptr + bd * N + offs_n, mask=mask_n, other=0.0).to(ACC)
        tl.debug_barrier()
        tl.store(g_ptr + bd * N + offs_n, tl.exp(dt0 * A) * g0, mask=mask_n)


# ---------------------------------------------------------------------------------------------
# Launchers: torch.library.triton_op, so torch.compile sees the kernels and Inductor can fuse around
# them. Same schema as mvpp::selective_scan_fwd/_bwd (see _library.py for the conventions).
# ---------------------------------------------------------------------------------------------
def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _num_warps(block_n: int, T: int, backward: bool = False) -> int:
    # From register counts of the sm_90 cubins (compiled without a GPU, not timed): the backward keeps
    # about twice as many (N, chunk) tiles live and spills at N=16, chunk=64 with 4 warps; 8 warps fit.
    return 4 if block_n * T <= (512 if backward else 2048) else 8


def _check_chunk_size(chunk_size: int) -> None:
    # The chunk is one register tile along L: tl.arange needs a power of two.
    if chunk_size < 1 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two for the triton backend, got {chunk_size}")


def _bc_layout(X: torch.Tensor, dim: int):
    """(variable, channels per group, strides as (batch, group, n, l)); constant (dim, N) is read as
    group = channel, with no batch or L stride."""
    if X.dim() == 4:
        return True, dim // X.shape[1], tuple(X.stride())
    return False, 1, (0, X.stride(0), X.stride(1), 0)


def _vec_stride(X: Optional[torch.Tensor]) -> int:
    return X.stride(0) if X is not None else 0


def _bdl_strides(X: Optional[torch.Tensor]):
    return tuple(X.stride()) if X is not None else (0, 0, 0)


def _channels_per_program(batch: int, dim: int, var_B: bool, dpg_B: int, var_C: bool, dpg_C: int,
                          device: torch.device) -> int:
    """R: how many consecutive channels (all in one group of B and of C) one backward program owns."""
    common = math.gcd(dpg_B if var_B else 0, dpg_C if var_C else 0)
    if common == 0:  # both constant: no cross-channel reduction, so one channel per program
        return 1
    if device.type != "cuda":
        # The interpreter runs programs one after another: fewest programs, and no partial buffers.
        return common
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    best = 1
    for r in range(1, common + 1):
        if common % r == 0 and batch * (dim // r) >= target:
            best = r
    return best


@torch.library.triton_op("mvpp::selective_scan_fwd_triton", mutates_args=())
def selective_scan_fwd_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
    initial_state: Optional[torch.Tensor],
    lengths: Optional[torch.Tensor],
    delta_softplus: bool,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward: (out (batch, dim, L) in u's dtype, last_state (batch, dim, N), chunk_states
    (batch, dim, ceil(L / chunk_size), N)); states in float32 (float64 for float64 u)."""
    _check_chunk_size(chunk_size)
    batch, dim, L = u.shape
    N = A.shape[1]
    sd = state_dtype(u.dtype)
    n_chunks = (L + chunk_size - 1) // chunk_size
    out = u.new_empty((batch, dim, L))
    last_state = u.new_empty((batch, dim, N), dtype=sd)
    chunk_states = u.new_empty((batch, dim, n_chunks * N), dtype=sd)  # [b][d][chunk][n], flat
    if batch * dim == 0:
        return out, last_state, chunk_states
    var_B, dpg_B, sB = _bc_layout(B, dim)
    var_C, dpg_C, sC = _bc_layout(C, dim)
    dummy = u
    block_n = triton.next_power_of_2(N)
    torch.library.wrap_triton(_selective_scan_fwd_kernel)[(batch * dim,)](
        u, delta, A, B, C,
        D if D is not None else dummy, z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy,
        initial_state if initial_state is not None else dummy,
        lengths if lengths is not None else dummy,
        out, last_state, chunk_states,
        dim, L, N, n_chunks, dpg_B, dpg_C,
        *u.stride(), *delta.stride(), *A.stride(), *sB, *sC,
        _vec_stride(D), _vec_stride(delta_bias), *_bdl_strides(z), *_bdl_strides(initial_state),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DB=delta_bias is not None,
        HAS_H0=initial_state is not None, HAS_LEN=lengths is not None, SOFTPLUS=bool(delta_softplus),
        VAR_B=var_B, VAR_C=var_C, ACC=_acc(u.dtype), BLOCK_N=block_n, T=chunk_size,
        num_warps=_num_warps(block_n, chunk_size),
    )
    return out, last_state, chunk_states


@torch.library.triton_op("mvpp::selective_scan_bwd_triton", mutates_args=())
def selective_scan_bwd_triton(
    dout: torch.Tensor,
    dlast_state: Optional[torch.Tensor],
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
    initial_state: Optional[torch.Tensor],
    lengths: Optional[torch.Tensor],
    chunk_states: torch.Tensor,
    delta_softplus: bool,
    chunk_size: int,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """Backward by recomputation from `chunk_states`. Always deterministic (`deterministic` is
    accepted for schema parity with the compiled op). Returns du, ddelta, dA (batch, dim, N) partials,
    dB, dC (B's/C's shape when variable, (batch, dim, N) partials when constant), dD and ddelta_bias
    (batch, dim) partials (zeros when absent), dz (z's shape, or (0,)), dinitial_state (batch, dim, N)."""
    del deterministic  # no float atomics anywhere: every sum has a fixed order
    _check_chunk_size(chunk_size)
    batch, dim, L = u.shape
    N = A.shape[1]
    sd = state_dtype(u.dtype)
    n_chunks = (L + chunk_size - 1) // chunk_size
    var_B, dpg_B, sB = _bc_layout(B, dim)
    var_C, dpg_C, sC = _bc_layout(C, dim)
    R = _channels_per_program(batch, dim, var_B, dpg_B, var_C, dpg_C, u.device)
    n_ranges = dim // R if dim > 0 else 0

    du = torch.empty_like(u, memory_format=torch.contiguous_format)
    ddelta = torch.empty_like(delta, memory_format=torch.contiguous_format)
    dz = torch.empty_like(z, memory_format=torch.contiguous_format) if z is not None else u.new_empty((0,))
    dA = u.new_zeros((batch, dim, N), dtype=sd)
    dD = u.new_zeros((batch, dim), dtype=sd)
    ddb = u.new_zeros((batch, dim), dtype=sd)
    # Variable B/C: (batch, dim / R, N, L) per-range partials (exactly dB/dC when R is the group size);
    # constant: (batch, dim, N) accumulators.
    dBp = u.new_empty((batch, n_ranges, N, L), dtype=sd) if var_B else u.new_zeros((batch, dim, N), dtype=sd)
    dCp = u.new_empty((batch, n_ranges, N, L), dtype=sd) if var_C else u.new_zeros((batch, dim, N), dtype=sd)
    # The adjoint carried across chunks: dlast_state in, dinitial_state out.
    g = u.new_empty((batch, dim, N), dtype=sd)
    if dlast_state is not None:
        g.copy_(dlast_state)
    else:
        g.zero_()

    if batch * dim > 0:
        dummy = u
        block_n = triton.next_power_of_2(N)
        torch.library.wrap_triton(_selective_scan_bwd_kernel)[(batch * n_ranges,)](
            dout, u, delta, A, B, C,
            D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy,
            initial_state if initial_state is not None else dummy,
            lengths if lengths is not None else dummy,
            chunk_states,
            du, ddelta, dA, dBp, dCp, dD, dz if z is not None else dummy, ddb, g,
            dim, L, N, n_chunks, dpg_B, dpg_C, R, n_ranges,
            *dout.stride(), *u.stride(), *delta.stride(), *A.stride(), *sB, *sC,
            _vec_stride(D), _vec_stride(delta_bias), *_bdl_strides(z), *_bdl_strides(initial_state),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_DB=delta_bias is not None,
            HAS_H0=initial_state is not None, HAS_LEN=lengths is not None, SOFTPLUS=bool(delta_softplus),
            VAR_B=var_B, VAR_C=var_C, ACC=_acc(u.dtype), BLOCK_N=block_n, T=chunk_size,
            num_warps=_num_warps(block_n, chunk_size, backward=True),
        )

    def finish(part, X, var, dpg):
        if not var or R == dpg:
            return part
        # Ranges of one group, summed in a fixed order (deterministic).
        return part.view(batch, X.shape[1], dpg // R, N, L).sum(2)

    dB = finish(dBp, B, var_B, dpg_B)
    dC = finish(dCp, C, var_C, dpg_C)
    return du, ddelta, dA, dB, dC, dD, dz, ddb, g


# triton_op would use the Python body as the fake, but under TRITON_INTERPRET=1 `wrap_triton` hands
# back the plain interpreted kernel, which then runs on fake tensors and fails. The shape-only fakes
# shared with the compiled op pair work everywhere; on a GPU, torch.compile still decomposes the op
# into its kernels (triton_op's functional decomposition), so Inductor sees them.
selective_scan_fwd_triton.register_fake(_fwd_fake)
selective_scan_bwd_triton.register_fake(_bwd_fake)

torch.library.register_autograd(
    "mvpp::selective_scan_fwd_triton",
    make_backward(torch.ops.mvpp.selective_scan_bwd_triton),
    setup_context=_setup_context,
)
