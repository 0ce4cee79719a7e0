"""selective_scan: a drop-in for mamba-ssm's `selective_scan_fn` (real A), on every backend.

Order, as in Liger: fakes and autograd glue for the compiled op pair, backend dispatch, the public
function. Kernels live in csrc/cpu/selective_scan.cpp, csrc/cuda/selective_scan*.cu and triton.py.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ... import _library  # noqa: F401  (defines the mvpp::selective_scan_* schemas)
from ..._backend import register_op_info, resolve_backend
from ..._checks import FLOAT_DTYPES, check_finite, check_lengths, check_same_device, check_tensor
from .reference import selective_scan_ref

__all__ = ["selective_scan", "selective_scan_ref", "MAX_DSTATE"]

# The compiled and Triton kernels keep the state of one channel on chip; N above this is refused
# by the public wrapper (the reference has no limit and is used when backend="reference").
MAX_DSTATE = 256

# Steps per saved chunk-boundary state, per backend: the forward saves (batch, dim, ceil(L/chunk), N)
# states and the backward recomputes each chunk from its start.
CHUNK_SIZE = {"cpu": 64, "cuda": 2048, "triton": 64}

_KERNEL_NAME = "selective_scan_fwd"
register_op_info("selective_scan", _KERNEL_NAME, ("cuda", "triton", "cpu", "reference"))


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def deterministic_requested() -> bool:
    return torch.are_deterministic_algorithms_enabled() or os.environ.get("MVPP_DETERMINISTIC", "0") == "1"


# ---------------------------------------------------------------------------------------------
# Fakes (shapes only) shared by the compiled op pair and the Triton op pair.
# ---------------------------------------------------------------------------------------------
def _fwd_fake(u, delta, A, B, C, D, z, delta_bias, initial_state, lengths, delta_softplus, chunk_size):
    batch, dim, L = u.shape
    N = A.shape[1]
    sd = state_dtype(u.dtype)
    n_chunks = (L + chunk_size - 1) // chunk_size
    out = u.new_empty((batch, dim, L))
    last_state = u.new_empty((batch, dim, N), dtype=sd)
    # Flat (batch, dim, n_chunks * N), not 4-D: a 4-D fake's channels-last contiguity probe guards on
    # n_chunks != 1, which breaks torch.export with a dynamic L range spanning chunk_size.
    chunk_states = u.new_empty((batch, dim, n_chunks * N), dtype=sd)
    return out, last_state, chunk_states


def _bwd_fake(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, lengths, chunk_states,
              delta_softplus, chunk_size, deterministic):
    batch, dim, L = u.shape
    N = A.shape[1]
    sd = state_dtype(u.dtype)

    def dBC(X):
        return u.new_empty(X.shape, dtype=sd) if X.dim() == 4 else u.new_empty((batch, dim, N), dtype=sd)

    return (
        torch.empty_like(u, memory_format=torch.contiguous_format),
        torch.empty_like(delta, memory_format=torch.contiguous_format),
        u.new_empty((batch, dim, N), dtype=sd),
        dBC(B),
        dBC(C),
        u.new_empty((batch, dim), dtype=sd),
        torch.empty_like(z, memory_format=torch.contiguous_format) if z is not None else u.new_empty((0,)),
        u.new_empty((batch, dim), dtype=sd),
        u.new_empty((batch, dim, N), dtype=sd),
    )


torch.library.register_fake("mvpp::selective_scan_fwd")(_fwd_fake)
torch.library.register_fake("mvpp::selective_scan_bwd")(_bwd_fake)


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, initial_state, lengths, delta_softplus, chunk_size = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, lengths, output[2])
    ctx.delta_softplus = delta_softplus
    ctx.chunk_size = chunk_size


def reduce_partials(A, B, C, D, delta_bias, dA, dB, dC, dD, ddb):
    """Per-batch partials -> totals in a fixed order (deterministic: no atomics), each cast to its
    input's dtype: dA, dD, d(delta_bias) and constant (dim, N) dB/dC are summed over the batch;
    variable dB/dC pass through. Absent D / delta_bias give None."""
    return (
        dA.sum(0).to(A.dtype),
        (dB if B.dim() == 4 else dB.sum(0)).to(B.dtype),
        (dC if C.dim() == 4 else dC.sum(0)).to(C.dtype),
        dD.sum(0).to(D.dtype) if D is not None else None,
        ddb.sum(0).to(delta_bias.dtype) if delta_bias is not None else None,
    )


def make_backward(bwd_op):
    """Autograd for a fwd op with selective_scan_fwd's schema, given its bwd op."""

    def backward(ctx, dout, dlast_state, _dchunk_states):
        u, delta, A, B, C, D, z, delta_bias, initial_state, lengths, chunk_states = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, dz, ddb, dinit = bwd_op(
            dout.contiguous(), dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, lengths,
            chunk_states, ctx.delta_softplus, ctx.chunk_size, deterministic_requested(),
        )
        dA, dB, dC, dD, ddb = reduce_partials(A, B, C, D, delta_bias, dA, dB, dC, dD, ddb)
        return (
            du,
            ddelta,
            dA,
            dB,
            dC,
            dD,
            dz if z is not None else None,
            ddb,
            dinit.to(initial_state.dtype) if initial_state is not None else None,
            None,
            None,
            None,
        )

    return backward


torch.library.register_autograd(
    "mvpp::selective_scan_fwd", make_backward(torch.ops.mvpp.selective_scan_bwd), setup_context=_setup_context
)


# ---------------------------------------------------------------------------------------------
# Validation and dispatch
# ---------------------------------------------------------------------------------------------
def _validate(u, delta, A, B, C, D, z, delta_bias, initial_state, lengths, check_inputs, backend):
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
    if A.is_complex():
        raise TypeError("A must be real; complex A is not supported")
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
    if D is not None:
        check_tensor("D", D, shape=(dim,), dims="(dim,)", dtypes=FLOAT_DTYPES)
    if delta_bias is not None:
        check_tensor("delta_bias", delta_bias, shape=(dim,), dims="(dim,)", dtypes=FLOAT_DTYPES)
    if z is not None:
        check_tensor("z", z, shape=(batch, dim, L), dims="(batch, dim, L) like u", dtypes=FLOAT_DTYPES)
    if initial_state is not None:
        check_tensor("initial_state", initial_state, shape=(batch, dim, N), dims="(batch, dim, N)", dtypes=FLOAT_DTYPES)
    check_same_device("u", u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, initial_state=initial_state)
    if backend not in ("reference",) and N > MAX_DSTATE:
        raise ValueError(f"N (A.shape[1]) = {N} exceeds the kernels' maximum state size {MAX_DSTATE}; "
                         "use backend='reference' for larger states")
    compiling = torch.compiler.is_compiling()
    if lengths is not None:
        if compiling:
            check_tensor("lengths", lengths, shape=(batch,), dims="(batch,)")
            lengths = lengths.to(device=dev, dtype=torch.int64)
        else:
            lengths = check_lengths("lengths", lengths, batch, L, dev)
    if check_inputs and not compiling:
        for name, X in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                        ("delta_bias", delta_bias), ("initial_state", initial_state)):
            check_finite(name, X)
    return lengths


def selective_scan(
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
    backend: Optional[str] = None,
    check_inputs: bool = False,
):
    """Selective scan (Mamba's S6 recurrence), a drop-in for mamba-ssm's `selective_scan_fn` with real A.

    With Δ = softplus(delta + delta_bias) if `delta_softplus` else delta + delta_bias::

        h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t        (h_0 = initial_state, default 0)
        y_t = C_t · h_t + D u_t
        out = y ⊙ silu(z)                                (when z is given)

    Args:
        u, delta: (batch, dim, L), float32/float16/bfloat16 (float64 on CPU).
        A: (dim, N) real, float32 (float64 on CPU); N <= MAX_DSTATE except on the reference.
        B, C: (dim, N) constant, (batch, N, L), or grouped (batch, G, N, L) with G dividing dim
            (channel d reads group d // (dim // G)).
        D, delta_bias: optional (dim,). z: optional (batch, dim, L).
        delta_softplus: apply softplus to delta + delta_bias.
        return_last_state: also return the final state h_L, (batch, dim, N) in float32
            (float64 for float64 inputs).
        initial_state: optional (batch, dim, N) starting state (differentiable).
        lengths: optional (batch,) ints; positions at or past a sequence's length produce 0 and do
            not change the state; last_state is taken at each sequence's own end.
        backend: "auto" (default: $MVPP_BACKEND or auto), "cuda", "triton", "cpu" or "reference".
        check_inputs: also reject NaN/inf inputs (costs a pass over the inputs).

    Returns:
        out (batch, dim, L) in u's dtype, or (out, last_state) if return_last_state.

    Gradients flow to u, delta, A, B, C, D, z, delta_bias and initial_state on every backend.
    Inputs may be non-contiguous.
    """
    name = resolve_backend(_KERNEL_NAME, u.device, backend)
    lengths = _validate(u, delta, A, B, C, D, z, delta_bias, initial_state, lengths, check_inputs, name)
    if name == "reference":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                  initial_state=initial_state, lengths=lengths)
    # Kernels take B/C as (dim, N) or (batch, G, N, L); (batch, N, L) is the G = 1 case.
    Bk = B.unsqueeze(1) if B.dim() == 3 else B
    Ck = C.unsqueeze(1) if C.dim() == 3 else C
    if name == "triton":
        from . import triton as _triton

        fwd = _triton.selective_scan_fwd_triton
    else:
        fwd = torch.ops.mvpp.selective_scan_fwd
    out, last_state, _ = fwd(u, delta, A, Bk, Ck, D, z, delta_bias, initial_state, lengths, bool(delta_softplus),
                             CHUNK_SIZE[name])
    return (out, last_state) if return_last_state else out
