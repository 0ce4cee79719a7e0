"""mhp_scan: the continuous-time selective scan fused with the exact integral of its readout.

Order, as in Liger: fakes and autograd glue for the compiled op pair (also used by the Triton op
pair: `make_backward`, `_setup_context`, `_fwd_fake`, `_bwd_fake`), validation, backend dispatch,
the public function. Kernels live in csrc/cpu/mhp_scan.cpp, csrc/cuda/mhp_scan*.cu and triton.py.

Kernel contract (every backend's mhp_scan_fwd / mhp_scan_bwd, see `_library.py` for the schema):
- u, delta, z: (batch, dim, L), any float dtype (float64 only on CPU); B, C: (dim, N) or
  (batch, G, N, L) -- the public wrapper turns (batch, N, L) into G = 1; A: (dim, N) float32/64.
- dt: (batch, L) and dt_end: (batch,) arrive already converted to the state dtype (float32, or
  float64 for float64 u), validated finite and >= 0 on valid positions; lengths int64 in [0, L].
- The wrapper handles L == 0 itself: kernels always see L >= 1 (a row may still have length 0).
- Positions at or past lengths[b] must not be read (they may hold NaN); y / y_left / every
  per-position gradient must be written as 0 there.
- chunk_states: (batch, dim, ceil(L / chunk_size) * N) ([b][d][chunk][n] flattened), the state h^+ after each chunk's last
  valid event (each backend reads back only what it wrote).
"""
from __future__ import annotations

from collections import namedtuple
from typing import Optional

import torch

from ... import _library  # noqa: F401  (defines the mvpp::mhp_scan_* schemas)
from ..._backend import register_op_info, resolve_backend
from ..._checks import FLOAT_DTYPES, check_finite, check_lengths, check_same_device, check_tensor
from ..selective_scan import MAX_DSTATE, deterministic_requested, state_dtype  # noqa: F401  (state_dtype: used by triton.py)
from ..selective_scan import _bwd_fake as _ss_bwd_fake
from ..selective_scan import reduce_partials
from ..selective_scan import _fwd_fake as _ss_fwd_fake
from .reference import mhp_scan_ref, phi
from .hawkes import HawkesHead, _masked_stats, hawkes_intensity, hawkes_loglik

__all__ = ["mhp_scan", "mhp_scan_ref", "MhpScanOutput", "CHUNK_SIZE", "phi", "hawkes_loglik", "hawkes_intensity",
           "HawkesHead"]

MhpScanOutput = namedtuple("MhpScanOutput", ["y", "y_left", "integral", "last_state"])
MhpScanOutput.__doc__ = """mhp_scan's result.

y: (batch, dim, L) in u's dtype, the scan output at each event (with D and z);
y_left: (batch, dim, L), the left-limit readout C_{i-1} · h_i^- at each event (no D, no z);
integral: (batch, dim), the exact integral of the readout over the window [0, T];
last_state: (batch, dim, N), h^+ after each sequence's last valid event, or None unless
return_last_state. y_left, integral and last_state are float32 (float64 for float64 u).
"""

# Steps per saved chunk-boundary state, per backend (the backward recomputes each chunk from it).
# cuda: 64 = the CUDA backward's per-thread history (kHist in mhp_scan.cuh), so each chunk is
# recomputed once; triton: the event tile of one scan (a power of two).
CHUNK_SIZE = {"cpu": 64, "cuda": 64, "triton": 64}

_KERNEL_NAME = "mhp_scan_fwd"
register_op_info("mhp_scan", _KERNEL_NAME, ("cuda", "triton", "cpu", "reference"))


# ---------------------------------------------------------------------------------------------
# Fakes (shapes only) shared by the compiled op pair and the Triton op pair: selective_scan's
# outputs and gradients plus what the point-process form adds (y_left, the integral, ddt, ddt_end).
# ---------------------------------------------------------------------------------------------
def _fwd_fake(u, delta, A, B, C, dt, D, z, delta_bias, dt_end, lengths, initial_state, delta_softplus, chunk_size):
    y, last_state, chunk_states = _ss_fwd_fake(u, delta, A, B, C, D, z, delta_bias, initial_state, lengths,
                                               delta_softplus, chunk_size)
    batch, dim, L = u.shape
    sd = last_state.dtype
    return y, u.new_empty((batch, dim, L), dtype=sd), u.new_empty((batch, dim), dtype=sd), last_state, chunk_states


def _bwd_fake(dy, dy_left, dintegral, dlast_state, u, delta, A, B, C, dt, D, z, delta_bias, dt_end, lengths,
              initial_state, chunk_states, delta_softplus, chunk_size, deterministic):
    du, ddelta, dA, dB, dC, dD, dz, ddb, dinit = _ss_bwd_fake(
        dy, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, lengths, chunk_states,
        delta_softplus, chunk_size, deterministic)
    batch, dim, L = u.shape
    sd = dA.dtype
    return (du, ddelta, dA, dB, dC, dD, dz, ddb, u.new_empty((batch, dim, L), dtype=sd),
            u.new_empty((batch, dim), dtype=sd), dinit)


torch.library.register_fake("mvpp::mhp_scan_fwd")(_fwd_fake)
torch.library.register_fake("mvpp::mhp_scan_bwd")(_bwd_fake)


def _setup_context(ctx, inputs, output):
    (u, delta, A, B, C, dt, D, z, delta_bias, dt_end, lengths, initial_state, delta_softplus, chunk_size) = inputs
    ctx.save_for_backward(u, delta, A, B, C, dt, D, z, delta_bias, dt_end, lengths, initial_state, output[4])
    ctx.delta_softplus = delta_softplus
    ctx.chunk_size = chunk_size


def make_backward(bwd_op):
    """Autograd for a fwd op with mhp_scan_fwd's schema, given its bwd op (mhp_scan_bwd's schema)."""

    def backward(ctx, dy, dy_left, dintegral, dlast_state, _dchunk_states):
        (u, delta, A, B, C, dt, D, z, delta_bias, dt_end, lengths, initial_state, chunk_states) = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, dz, ddb, ddt, ddt_end, dinit = bwd_op(
            dy.contiguous(),
            dy_left.contiguous() if dy_left is not None else None,
            dintegral.contiguous() if dintegral is not None else None,
            dlast_state.contiguous() if dlast_state is not None else None,
            u, delta, A, B, C, dt, D, z, delta_bias, dt_end, lengths, initial_state,
            chunk_states, ctx.delta_softplus, ctx.chunk_size, deterministic_requested(),
        )
        # Partials -> totals in a fixed order (deterministic, no atomics): selective_scan's over the
        # batch, plus ddt and ddt_end over the channels sharing the clock.
        dA, dB, dC, dD, ddb = reduce_partials(A, B, C, D, delta_bias, dA, dB, dC, dD, ddb)
        return (
            du,
            ddelta,
            dA,
            dB,
            dC,
            ddt.sum(1).to(dt.dtype),
            dD,
            dz if z is not None else None,
            ddb,
            ddt_end.sum(1).to(dt_end.dtype) if dt_end is not None else None,
            None,
            dinit.to(initial_state.dtype) if initial_state is not None else None,
            None,
            None,
        )

    return backward


torch.library.register_autograd(
    "mvpp::mhp_scan_fwd", make_backward(torch.ops.mvpp.mhp_scan_bwd), setup_context=_setup_context
)


# ---------------------------------------------------------------------------------------------
# Validation and dispatch
# ---------------------------------------------------------------------------------------------
def _check_gaps(name: str, x: torch.Tensor, lengths: Optional[torch.Tensor]) -> None:
    """Gaps are durations: finite and >= 0 (0 = tied events). Padding (past lengths) is not checked.
    One pass over the valid gaps (_masked_stats); the detail for the message only on error."""
    if x.numel() == 0:
        return
    lo, _, n_bad = _masked_stats(x, lengths)
    if n_bad:
        raise ValueError(f"{name} must be finite (gaps between event times); it has {n_bad} NaN/inf value(s) "
                         "on valid events")
    if lo < 0:
        vals = x.detach()
        if lengths is not None:
            vals = vals[torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]]
        raise ValueError(f"{name} must be >= 0 (event times must be non-decreasing and inside the window); "
                         f"it has {int((vals < 0).sum())} negative value(s), the smallest {lo}")


def _validate(u, delta, A, B, C, dt, D, z, delta_bias, dt_end, lengths, initial_state, delta_softplus,
              check_inputs, backend):
    check_tensor("u", u, ndim=3, dims="(batch, dim, L)", dtypes=FLOAT_DTYPES)
    batch, dim, L = u.shape
    dev = u.device
    check_tensor("delta", delta, shape=(batch, dim, L), dims="(batch, dim, L) like u", dtypes=FLOAT_DTYPES)
    check_tensor("A", A, ndim=2, dims="(dim, N)", dtypes=(torch.float32, torch.float64))
    if A.shape[0] != dim:
        raise ValueError(f"A must have shape (dim={dim}, N), got {tuple(A.shape)}")
    N = A.shape[1]
    if N < 1:
        raise ValueError(f"A must have at least one state (N >= 1), got shape {tuple(A.shape)}")
    for name, X in (("B", B), ("C", C)):
        check_tensor(name, X, ndim=(2, 3, 4), dims="(dim, N), (batch, N, L) or (batch, G, N, L)", dtypes=FLOAT_DTYPES)
        if X.dim() == 2 and tuple(X.shape) != (dim, N):
            raise ValueError(f"{name} must have shape (dim={dim}, N={N}) when constant, got {tuple(X.shape)}")
        if X.dim() == 3 and tuple(X.shape) != (batch, N, L):
            raise ValueError(f"{name} must have shape (batch={batch}, N={N}, L={L}), got {tuple(X.shape)}")
        if X.dim() == 4:
            G = X.shape[1]
            if tuple(X.shape) != (batch, G, N, L) or G < 1 or dim % G != 0:
                raise ValueError(
                    f"{name} must have shape (batch={batch}, G, N={N}, L={L}) with G dividing dim={dim}, "
                    f"got {tuple(X.shape)}"
                )
    check_tensor("dt", dt, shape=(batch, L), dims="(batch, L): gaps between consecutive event times",
                 dtypes=(torch.float32, torch.float64))
    if dt_end is not None:
        check_tensor("dt_end", dt_end, shape=(batch,), dims="(batch,): gap from the last event to the window end",
                     dtypes=(torch.float32, torch.float64))
    if D is not None:
        check_tensor("D", D, shape=(dim,), dims="(dim,)", dtypes=FLOAT_DTYPES)
    if delta_bias is not None:
        check_tensor("delta_bias", delta_bias, shape=(dim,), dims="(dim,)", dtypes=FLOAT_DTYPES)
    if z is not None:
        check_tensor("z", z, shape=(batch, dim, L), dims="(batch, dim, L) like u", dtypes=FLOAT_DTYPES)
    if initial_state is not None:
        check_tensor("initial_state", initial_state, shape=(batch, dim, N), dims="(batch, dim, N)", dtypes=FLOAT_DTYPES)
    check_same_device("u", u, delta=delta, A=A, B=B, C=C, dt=dt, D=D, z=z, delta_bias=delta_bias, dt_end=dt_end,
                      initial_state=initial_state)
    if backend != "reference" and N > MAX_DSTATE:
        raise ValueError(f"N (A.shape[1]) = {N} exceeds the kernels' maximum state size {MAX_DSTATE}; "
                         "use backend='reference' for larger states")
    if torch.compiler.is_compiling():
        # Data-dependent checks would break the graph; shapes were checked above.
        if lengths is not None:
            check_tensor("lengths", lengths, shape=(batch,), dims="(batch,)")
            lengths = lengths.to(device=dev, dtype=torch.int64)
        return lengths
    lengths = check_lengths("lengths", lengths, batch, L, dev)
    _check_gaps("dt", dt, lengths)
    if dt_end is not None:
        _check_gaps("dt_end", dt_end, None)
    # The state must decay, never grow: exp(A Δ dt) with A <= 0 (and Δ >= 0) is what keeps every
    # exponent argument <= 0, so gaps of any length cannot overflow.
    # _masked_stats reports the largest *finite* value, so +inf and NaN are counted among the
    # non-finite ones and checked separately: +inf grows the state like any positive A, and a NaN
    # rate poisons every output of its channel silently (issue 16). -inf (instant decay) is allowed.
    if A.numel() and ((st := _masked_stats(A))[1] > 0 or st[2]):
        Ad = A.detach()
        n_pos, n_nan = int((Ad > 0).sum()), int(Ad.isnan().sum())
        if n_pos or n_nan:
            raise ValueError("A must be <= 0 and not NaN (a decaying state; parametrise it as -exp(A_log)); "
                             f"it has {n_pos} positive value(s) and {n_nan} NaN value(s)")
    if check_inputs:
        valid = None if lengths is None else torch.arange(L, device=dev)[None, :] < lengths[:, None]

        def events_only(X):
            # Per-event inputs are checked on valid events only: padding is never read.
            if X is None or valid is None or X.dim() < 3:
                return X
            mask = valid.view(batch, *([1] * (X.dim() - 2)), L).expand_as(X)
            return X.detach()[mask]

        for name, X in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                        ("delta_bias", delta_bias), ("initial_state", None)):
            check_finite(name, events_only(X))
        check_finite("initial_state", initial_state)
        if not delta_softplus:
            step = delta.detach() if delta_bias is None else delta.detach() + delta_bias.detach()[:, None]
            if valid is not None:
                step = step[valid[:, None, :].expand_as(step)]
            if bool((step < 0).any()):
                raise ValueError("delta + delta_bias must be >= 0 when delta_softplus=False (a negative step "
                                 "makes the state grow between events); pass delta_softplus=True")
    return lengths


def mhp_scan(
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
    *,
    backend: Optional[str] = None,
    check_inputs: bool = False,
) -> MhpScanOutput:
    """Continuous-time selective scan over event sequences, fused with the exact integral of its readout.

    Events i = 1..n of a sequence arrive at t_1 <= ... <= t_n inside a window [0, T]; dt_i = t_i − t_{i−1}
    (t_0 = 0), dt_end = T − t_n. With Δ = softplus(delta + delta_bias) if `delta_softplus` else
    delta + delta_bias, the state jumps at events and decays between them; the gap (t_{i−1}, t_i]
    decays at rate A Δ_{i−1} and is read out with C_{i−1} (causal: event i does not reach its own
    intensity)::

        h_i^-    = exp(A Δ_{i-1} dt_i) ⊙ h_{i-1}^+                      (h_0^+ = initial_state or 0)
        y_left_i = C_{i-1} · h_i^-                                       (left limit at t_i)
        I_i      = Σ_n C_{i-1,n} h_{i-1,n}^+ (1 − exp(A_n Δ_{i-1} dt_i)) / (−A_n Δ_{i-1})
        h_i^+    = h_i^- + Δ_i B_i u_i
        y_i      = (C_i · h_i^+ + D u_i) ⊙ silu(z_i)
        integral = Σ_i I_i + (the same closed form over the last gap (t_n, T] with Δ_n, C_n, h_n^+)

    i.e. `integral` is exactly ∫_0^T C(t)·h(t) dt for the piecewise readout; (1 − e^x)/(−x) is
    evaluated through expm1 with a series near x = 0 (A Δ → 0 gives dt), and every exponent is <= 0.

    Conventions: the first gap (0, t_1] uses Δ_1 and C_1 (no earlier event exists); it only matters
    with an `initial_state`, and then event 1's inputs shape the intensity before t_1 (see
    docs/mhp_scan.md for an exact way to continue a split sequence). Events at or past
    `lengths[b]` are ignored (y = y_left = 0 there, whatever the padding holds); the last gap
    follows event lengths[b]. A sequence with no events has integral 0 and last state
    initial_state (or 0). Tied events (dt = 0) are allowed.

    Args:
        u, delta: (batch, dim, L), float32/float16/bfloat16 (float64 on CPU backends).
        A: (dim, N) real, <= 0, float32 (float64 on CPU); N <= MAX_DSTATE except on the reference.
        B, C: (dim, N) constant, (batch, N, L), or grouped (batch, G, N, L) with G dividing dim.
        dt: (batch, L) float32/float64 gaps, finite and >= 0 on valid events; dt[:, 0] is the time
            of the first event from the window start.
        D, delta_bias: optional (dim,). z: optional (batch, dim, L) gate.
        delta_softplus: apply softplus to delta + delta_bias.
        dt_end: optional (batch,) gap from each sequence's last valid event to the window end T
            (None: the integral stops at the last event).
        lengths: optional (batch,) ints in [0, L], valid events per sequence.
        initial_state: optional (batch, dim, N) state h_0^+ at the window start (differentiable).
        return_last_state: also return h_n^+ (batch, dim, N).
        backend: "auto" (default: $MVPP_BACKEND or auto), "cuda", "triton", "cpu" or "reference".
        check_inputs: also reject NaN/inf in the other inputs and a negative step (without softplus).
            dt / dt_end / lengths / A are always checked outside torch.compile.

    Returns:
        MhpScanOutput(y, y_left, integral, last_state): y (batch, dim, L) in u's dtype; y_left
        (batch, dim, L), integral (batch, dim), last_state (batch, dim, N) or None, in float32
        (float64 for float64 u).

    Gradients flow to u, delta, A, B, C, D, z, delta_bias, dt, dt_end and initial_state on every
    backend. Inputs may be non-contiguous. With dt ≡ 1 and delta constant along L, y equals
    `selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)`.
    """
    name = resolve_backend(_KERNEL_NAME, u.device, backend, dtype=u.dtype)
    lengths = _validate(u, delta, A, B, C, dt, D, z, delta_bias, dt_end, lengths, initial_state, delta_softplus,
                        check_inputs, name)
    if name == "reference":
        return MhpScanOutput(*mhp_scan_ref(u, delta, A, B, C, dt, D, z, delta_bias, delta_softplus, dt_end, lengths,
                                           initial_state, return_last_state))
    batch, dim, L = u.shape
    sd = state_dtype(u.dtype)
    if L == 0:
        # No events anywhere: nothing for a kernel to do, and no step to define a decay with.
        N = A.shape[1]
        last = (initial_state.to(sd) if initial_state is not None else u.new_zeros((batch, dim, N), dtype=sd))
        return MhpScanOutput(u.new_zeros((batch, dim, 0)), u.new_zeros((batch, dim, 0), dtype=sd),
                             u.new_zeros((batch, dim), dtype=sd), last if return_last_state else None)
    # Kernels take B/C as (dim, N) or (batch, G, N, L); (batch, N, L) is the G = 1 case. Gaps travel
    # in the state dtype (float32 time stamps resolve 1e6-long windows to ~0.06; float64 on request).
    Bk = B.unsqueeze(1) if B.dim() == 3 else B
    Ck = C.unsqueeze(1) if C.dim() == 3 else C
    dtk = dt.to(sd)
    dt_endk = dt_end.to(sd) if dt_end is not None else None
    if name == "triton":
        from . import triton as _triton

        fwd = _triton.mhp_scan_fwd_triton
    else:
        fwd = torch.ops.mvpp.mhp_scan_fwd
    y, y_left, integral, last_state, _ = fwd(u, delta, A, Bk, Ck, dtk, D, z, delta_bias, dt_endk, lengths,
                                             initial_state, bool(delta_softplus), CHUNK_SIZE[name])
    return MhpScanOutput(y, y_left, integral, last_state if return_last_state else None)
