"""CUDA-only checks of the compiled selective_scan kernel (csrc/include/mvpp/selective_scan.cuh).

The shared grid in test_selective_scan.py runs the cuda backend against the float64 reference on
mamba's test grid. This file adds what only the CUDA kernel has: half-precision inputs, the
deterministic and the atomic backward, 16-byte vector loads on misaligned and strided views, several
kernel chunks (long L and small chunk_size), lengths with chunks wholly past a sequence's end, and
the op's own input checks. Everything here needs a GPU and is skipped without one.
"""
from __future__ import annotations

import pytest
import torch

from mvpp_kernels import _library
from mvpp_kernels.ops.selective_scan import selective_scan, selective_scan_ref
from mvpp_kernels.testing import assert_close, make_selective_scan_inputs, poisoned_allocations, to_reference

pytestmark = pytest.mark.cuda

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


@pytest.fixture(autouse=True)
def _cuda_kernel_built():
    # On a GPU machine the CUDA extension is the thing under test: not built is a failure, not a skip.
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not (_library.compiled_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key("mvpp::selective_scan_fwd",
                                                                                        "CUDA")):
        pytest.fail(f"the CUDA kernel of mvpp::selective_scan_fwd is not registered ({_library.compiled_status()}); "
                    "build with a CUDA torch: pip install --no-build-isolation -e .")


def cuda_inputs(batch, dim, N, L, *, dtype=torch.float32, layout="grouped", groups=2, seed=0, initial_state=True,
                softplus=True, **kw):
    x = make_selective_scan_inputs(batch, dim, N, L, dtype=dtype, B_layout=layout, groups=groups, seed=seed,
                                   with_initial_state=initial_state, **kw)
    if not softplus:  # without softplus keep Δ positive so exp(Δ A) decays over long sequences
        for k in ("delta", "delta_bias"):
            if x[k] is not None:
                x[k] = x[k].abs()
    return {k: (v.cuda().requires_grad_(True) if v is not None else None) for k, v in x.items()}


def run(x, *, backend="cuda", lengths=None, softplus=True, seed=1, poison=True):
    """out, last_state and input grads under random cotangents (dlast_state included). Allocations
    are NaN-poisoned (which also turns on torch's deterministic mode: the deterministic backward)."""

    def ctx():
        return poisoned_allocations("cuda") if poison else torch.enable_grad()

    with ctx():
        out, last = selective_scan(**x, delta_softplus=softplus, return_last_state=True, lengths=lengths,
                                   backend=backend)
    g = torch.Generator().manual_seed(seed)
    gout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    glast = torch.randn(last.shape, generator=g, dtype=torch.float64)
    loss = (out.float() * gout.to(out.device, torch.float32)).sum() + (last * glast.to(last.device, last.dtype)).sum()
    names = [k for k in GRAD_NAMES if x.get(k) is not None]
    with ctx():
        grads = torch.autograd.grad(loss, [x[k] for k in names])
    return out, last, dict(zip(names, grads))


def reference(x, *, lengths=None, softplus=True, seed=1):
    r = to_reference(x)
    out, last = selective_scan_ref(**r, delta_softplus=softplus, return_last_state=True,
                                   lengths=lengths.cpu() if lengths is not None else None)
    g = torch.Generator().manual_seed(seed)
    gout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    glast = torch.randn(last.shape, generator=g, dtype=torch.float64)
    loss = (out * gout).sum() + (last * glast).sum()
    names = [k for k in GRAD_NAMES if r.get(k) is not None]
    grads = torch.autograd.grad(loss, [r[k] for k in names])
    return out, last, dict(zip(names, grads))


def check(x, *, dtype, lengths=None, softplus=True, scale=1.0, grad_scale=1.0, **kw):
    out, last, grads = run(x, lengths=lengths, softplus=softplus, **kw)
    r_out, r_last, r_grads = reference(x, lengths=lengths, softplus=softplus)
    assert out.dtype == x["u"].dtype and last.dtype == torch.float32
    assert_close(out, r_out, dtype, name="out", scale=scale)
    assert_close(last, r_last, dtype, name="last_state", scale=scale)
    for k, gr in grads.items():
        assert gr.shape == x[k].shape and gr.dtype == x[k].dtype, k
        assert_close(gr, r_grads[k], dtype, grad=True, name=f"d{k}", scale=grad_scale)
    return out, last, grads


# ---------------------------------------------------------------------------------------------
# Precision: fp16/bf16 inputs (float32 accumulation) against the float64 reference on the same values
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["constant", "variable", "grouped"])
@pytest.mark.parametrize("L", [1, 63, 300, 2049])
def test_dtypes_against_float64(dtype, layout, L):
    x = cuda_inputs(2, 8, 16, L, dtype=dtype, layout=layout)
    # Long reductions over L (dA, dD, dB/dC constant) accumulate more rounding of the half inputs.
    check(x, dtype=dtype, grad_scale=2.0 if dtype != torch.float32 else 1.0)


@pytest.mark.parametrize("N", [1, 5, 64, 256])
def test_state_sizes(N):
    x = cuda_inputs(1, 4, N, 200, layout="variable")
    check(x, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Deterministic backward: bit-identical twice; the atomic path agrees with it to rounding
# ---------------------------------------------------------------------------------------------
def _fwd_args(x, lengths=None):
    """The op's tensor arguments (u, delta, A, B, C, D, z, delta_bias, initial_state, lengths); B/C
    must already be (dim, N) or (batch, G, N, L)."""
    t = [x[k].detach() if x[k] is not None else None
         for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")]
    return (*t, lengths)


def _bwd_args(x, lengths=None, softplus=True, chunk_size=2048, seed=3):
    fargs = _fwd_args(x, lengths)
    out, last, states = torch.ops.mvpp.selective_scan_fwd(*fargs, softplus, chunk_size)
    g = torch.Generator(device="cuda").manual_seed(seed)
    dout = torch.randn(out.shape, generator=g, device="cuda", dtype=torch.float32).to(out.dtype)
    dlast = torch.randn(last.shape, generator=g, device="cuda", dtype=torch.float32)
    return (dout, dlast, *fargs, states, softplus, chunk_size)


@pytest.mark.parametrize("layout,groups,dim", [("grouped", 2, 64), ("grouped", 1, 48), ("grouped", 4, 8),
                                               ("constant", 1, 16)])
def test_deterministic_backward_is_bitwise_reproducible(layout, groups, dim):
    x = cuda_inputs(3, dim, 16, 1000, layout=layout, groups=groups)
    args = _bwd_args(x, lengths=torch.tensor([1000, 517, 0], device="cuda"), chunk_size=256)
    first = torch.ops.mvpp.selective_scan_bwd(*args, True)
    for _ in range(3):
        again = torch.ops.mvpp.selective_scan_bwd(*args, True)
        for name, a, b in zip(("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias", "dinit"), first, again):
            assert torch.equal(a, b), f"{name} differs between two deterministic runs"
    # The atomic path computes the same sums in another order.
    atomic = torch.ops.mvpp.selective_scan_bwd(*args, False)
    for name, a, b in zip(("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias", "dinit"), first, atomic):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: atomic vs deterministic: {m}")


def test_public_api_deterministic_flag(monkeypatch):
    x = cuda_inputs(2, 32, 8, 300, layout="variable")
    monkeypatch.setenv("MVPP_DETERMINISTIC", "1")
    _, _, g1 = run(x, poison=False)
    _, _, g2 = run(x, poison=False)
    for k in g1:
        assert torch.equal(g1[k], g2[k]), f"d{k} not reproducible with MVPP_DETERMINISTIC=1"
    monkeypatch.setenv("MVPP_DETERMINISTIC", "0")
    _, _, g3 = run(x, poison=False)  # atomic dB/dC
    r = reference(x)[2]
    for k in g3:
        assert_close(g3[k], r[k], torch.float32, grad=True, name=f"d{k} (atomic)")


# ---------------------------------------------------------------------------------------------
# Layouts: non-contiguous views and 16-byte-misaligned storage offsets
# ---------------------------------------------------------------------------------------------
def _misaligned(t: torch.Tensor, offset: int = 1) -> torch.Tensor:
    """The same values in a buffer starting `offset` elements in: data_ptr not 16-byte aligned."""
    flat = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    flat[offset:] = t.detach().reshape(-1)
    return flat[offset:].view(t.shape).requires_grad_(True)


def _transposed(t: torch.Tensor) -> torch.Tensor:
    """Same values, stored with L as the slowest axis (stride along L != 1)."""
    return t.detach().transpose(-1, 0).contiguous().transpose(-1, 0).requires_grad_(True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("how", ["misaligned", "strided", "transposed"])
def test_noncontiguous_and_misaligned(dtype, how):
    L = 257  # rows of odd length: vector loads only where a thread's items are aligned
    x = cuda_inputs(2, 6, 8, L, dtype=dtype, layout="grouped")
    for k in ("u", "delta", "z", "B", "C"):
        if how == "misaligned":
            x[k] = _misaligned(x[k], offset=1 if k != "B" else 3)
            assert x[k].data_ptr() % 16 != 0
        elif how == "strided":
            # every other element of a NaN-interleaved buffer: stride 2 along L
            base = torch.stack([x[k].detach(), torch.full_like(x[k].detach(), float("nan"))], dim=-1).flatten(-2)
            x[k] = base[..., ::2].requires_grad_(True)
        else:
            x[k] = _transposed(x[k])
    check(x, dtype=dtype, grad_scale=2.0 if dtype != torch.float32 else 1.0)


# ---------------------------------------------------------------------------------------------
# Variable lengths and several chunks
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["constant", "grouped"])
def test_lengths(layout):
    L = 2500  # two kernel chunks of 2048; one sequence ends in the first, one is empty
    x = cuda_inputs(4, 4, 16, L, layout=layout)
    lengths = torch.tensor([L, 1, 0, 2047], device="cuda")
    out, last, _ = check(x, dtype=torch.float32, lengths=lengths)
    assert (out[1, :, 1:] == 0).all() and (out[2] == 0).all() and (out[3, :, 2047:] == 0).all()
    torch.testing.assert_close(last[2], x["initial_state"].detach()[2].float(), atol=0, rtol=0)


def test_long_sequence_several_chunks():
    x = cuda_inputs(1, 4, 16, 8192, layout="variable", softplus=True)
    check(x, dtype=torch.float32, scale=2.0, grad_scale=2.0)


@pytest.mark.parametrize("chunk_size", [128, 256, 512, 1024])
def test_chunk_sizes_agree(chunk_size):
    """Smaller chunks than the default: several chunk states even for a short L, same results."""
    x = cuda_inputs(2, 4, 8, 1000, layout="grouped")
    lengths = torch.tensor([1000, 611], device="cuda")
    ref = torch.ops.mvpp.selective_scan_bwd(*_bwd_args(x, lengths, chunk_size=2048), True)
    got = torch.ops.mvpp.selective_scan_bwd(*_bwd_args(x, lengths, chunk_size=chunk_size), True)
    for name, a, b in zip(("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias", "dinit"), ref, got):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3, msg=lambda m: f"{name} (chunk {chunk_size}): {m}")
    fwd_a = torch.ops.mvpp.selective_scan_fwd(*_fwd_args(x, lengths), True, 2048)
    fwd_b = torch.ops.mvpp.selective_scan_fwd(*_fwd_args(x, lengths), True, chunk_size)
    torch.testing.assert_close(fwd_b[0], fwd_a[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fwd_b[1], fwd_a[1], atol=1e-5, rtol=1e-4)
    assert fwd_b[2].shape == (2, 4, -(-1000 // chunk_size), 8)
    # The last saved chunk state is the sequence's final state (frozen past its length).
    torch.testing.assert_close(fwd_b[2][:, :, -1], fwd_b[1], atol=0, rtol=0)


def test_without_softplus_and_options():
    x = cuda_inputs(2, 4, 8, 129, layout="variable", softplus=False, with_z=False, with_D=False,
                    with_delta_bias=False, initial_state=False)
    check(x, dtype=torch.float32, softplus=False)


# ---------------------------------------------------------------------------------------------
# The op's own checks (called directly, past the Python wrapper's validation)
# ---------------------------------------------------------------------------------------------
def test_op_rejects_bad_input():
    x = cuda_inputs(1, 2, 4, 16, layout="grouped", groups=1)
    args = [x[k].detach() for k in ("u", "delta", "A", "B", "C")]
    fwd = torch.ops.mvpp.selective_scan_fwd
    with pytest.raises(RuntimeError, match="chunk_size must be one of"):
        fwd(*args, None, None, None, None, None, False, 64)
    with pytest.raises(RuntimeError, match=r"state size N = A.shape\[1\] must be in \[1, 256\]"):
        A = torch.randn(2, 257, device="cuda")
        B = torch.randn(1, 1, 257, 16, device="cuda")
        fwd(args[0], args[1], A, B, B, None, None, None, None, None, False, 2048)
    with pytest.raises(RuntimeError, match="u must be float32, float16 or bfloat16"):
        fwd(args[0].double(), args[1].double(), *args[2:], None, None, None, None, None, False, 2048)
    with pytest.raises(RuntimeError, match="variable B must have shape"):
        fwd(args[0], args[1], args[2], args[3][..., :8], args[4], None, None, None, None, None, False, 2048)
    with pytest.raises(RuntimeError, match="z must have shape"):
        fwd(*args, None, args[0][..., :8], None, None, None, False, 2048)
    with pytest.raises(RuntimeError, match="lengths must be an integer tensor"):
        fwd(*args, None, None, None, None, torch.ones(1, device="cuda"), False, 2048)
    with pytest.raises(RuntimeError, match="must be on"):
        fwd(args[0], args[1], args[2].cpu(), args[3], args[4], None, None, None, None, None, False, 2048)


@pytest.mark.parametrize("layout", ["constant", "grouped"])
def test_opcheck(layout):
    x = cuda_inputs(2, 4, 8, 40, layout=layout)
    lengths = torch.tensor([40, 17], device="cuda")
    fargs = tuple(t.requires_grad_(True) if t is not None and t.is_floating_point() else t
                  for t in _fwd_args(x, lengths))
    torch.library.opcheck(torch.ops.mvpp.selective_scan_fwd.default, (*fargs, True, 2048))
    for deterministic in (True, False):
        torch.library.opcheck(torch.ops.mvpp.selective_scan_bwd.default, (*_bwd_args(x, lengths), deterministic))
