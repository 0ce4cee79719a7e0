"""mamba-ssm's own selective-scan test grid, run against mvpp's op.

Ported from the parametrisation of mamba-ssm's tests/ops/test_selective_scan.py::test_selective_scan
(v2.3): itype float32/float16/bfloat16, seqlen 128..4096, varBC_groups 1/2, with D, z, delta_bias,
delta_softplus and return_last_state on, input-dependent B and C, batch 2, dim 4, dstate 8, A = -0.5 *
rand, delta = 0.5 * rand, and its tolerances ((6e-4, 2e-3) for float32, (3e-3, 5e-3) for float16,
(3e-2, 5e-2) for bfloat16). Its oracle is mamba-ssm's `selective_scan_ref` on the same inputs, as
there. mamba-ssm's test asserts outputs and the last state only (its gradient asserts are commented
out); here the gradients of every input are also compared, against mvpp's float64 reference with
mvpp's gradient tolerance table. Its `wtype=complex64` case (commented out upstream) is refused by our
op with a clear error (tested below). The cpu backend runs the whole grid, the reference backend two of its lengths; the Triton
interpreter runs four seqlen-128 rows (the interpreter executes every program in Python).
"""
from __future__ import annotations

import pytest
import torch

from mvpp_kernels import selective_scan
from mvpp_kernels.ops.selective_scan import selective_scan_ref
from mvpp_kernels.testing import assert_close, load_mamba_selective_scan_ref

from integration_helpers import require_backend

MAMBA_REF = load_mamba_selective_scan_ref()
pytestmark = pytest.mark.skipif(MAMBA_REF is None, reason="mamba-ssm is not installed (scripts/setup.sh installs it)")

ITYPES = [torch.float32, torch.float16, torch.bfloat16]
SEQLENS = [128, 256, 512, 1024, 2048, 4096]
GROUPS = [1, 2]


def mamba_tolerance(itype):
    """mamba-ssm's (rtol, atol) for the output and the state."""
    if itype == torch.bfloat16:
        return 3e-2, 5e-2
    return (6e-4, 2e-3) if itype == torch.float32 else (3e-3, 5e-3)


def mamba_inputs(seqlen, itype, groups, seed=0):
    """The inputs of mamba-ssm's test, drawn from a fixed generator (upstream seeds the global RNG with 0)."""
    g = torch.Generator().manual_seed(seed)
    batch, dim, dstate = 2, 4, 8
    bc_shape = (batch, dstate, seqlen) if groups == 1 else (batch, groups, dstate, seqlen)
    return dict(
        u=torch.randn(batch, dim, seqlen, generator=g).to(itype),
        delta=(0.5 * torch.rand(batch, dim, seqlen, generator=g)).to(itype),
        A=-0.5 * torch.rand(dim, dstate, generator=g),
        B=torch.randn(*bc_shape, generator=g).to(itype),
        C=torch.randn(*bc_shape, generator=g).to(itype),
        D=torch.randn(dim, generator=g),
        z=torch.randn(batch, dim, seqlen, generator=g).to(itype),
        delta_bias=0.5 * torch.rand(dim, generator=g),
    )


def run(fn, x, **kw):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in x.items()}
    out, last = fn(**leaves, delta_softplus=True, return_last_state=True, **kw)
    g = torch.Generator().manual_seed(1)
    gout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (out.double() * gout).sum().backward()
    return out.detach(), last.detach(), {k: v.grad for k, v in leaves.items()}


def check(backend, seqlen, itype, groups):
    require_backend(backend)
    x = mamba_inputs(seqlen, itype, groups)
    out, last, grads = run(lambda **kw: selective_scan(**kw, backend=backend), x)
    theirs_out, theirs_last = MAMBA_REF(**x, delta_softplus=True, return_last_state=True)
    rtol, atol = mamba_tolerance(itype)
    assert out.dtype == itype and out.shape == x["u"].shape
    torch.testing.assert_close(out.float(), theirs_out.float(), rtol=rtol, atol=atol)
    torch.testing.assert_close(last.float(), theirs_last.float(), rtol=rtol, atol=atol)
    # Gradients: against the float64 reference (same half-precision inputs, upcast). In a half-precision
    # run the float32 weights' gradients (dA, dD, ddelta_bias) are sums over L of terms computed from
    # half-precision values, so they get the itype's tolerance too (as mamba-ssm's own commented-out
    # weight tolerances do: rtolw = max(rtolw, rtol)).
    x64 = {k: v.double() for k, v in x.items()}
    _, _, ref_grads = run(selective_scan_ref, x64)
    for k, gr in ref_grads.items():
        assert_close(grads[k], gr, itype, grad=True, name=f"d{k}", scale=2.0)


@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("seqlen", SEQLENS)
@pytest.mark.parametrize("itype", ITYPES, ids=str)
def test_mamba_grid_cpu(itype, seqlen, groups):
    """The whole upstream grid on the cpu backend (the one CPU users get)."""
    check("cpu", seqlen, itype, groups)


@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("seqlen", [128, 1024])
@pytest.mark.parametrize("itype", ITYPES, ids=str)
def test_mamba_grid_reference(itype, seqlen, groups):
    """Our float64-capable oracle on the same grid (two lengths: it loops over L in Python)."""
    check("reference", seqlen, itype, groups)


@pytest.mark.triton
@pytest.mark.parametrize("itype,groups", [(torch.float32, 1), (torch.float32, 2), (torch.bfloat16, 2),
                                          (torch.float16, 1)], ids=str)
def test_mamba_grid_triton(itype, groups):
    check("triton", 128, itype, groups)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_complex_A_refused(backend):
    """mamba-ssm's wtype=complex64 rows: refused with an error naming A and the dtypes accepted."""
    x = mamba_inputs(128, torch.float32, 1)
    x["A"] = x["A"].to(torch.complex64)
    with pytest.raises(TypeError, match=r"A must have dtype in \(float32, float64\), got complex64"):
        selective_scan(**x, delta_softplus=True, backend=backend)
