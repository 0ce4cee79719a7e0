"""Regression tests for issue 16 follow-ups: the cpu selective_scan against float64 in overflow corners.

The shared fast exp (csrc/include/mvpp/scan_cpu_common.h) floored at e^-87 ~ 1.6e-38 instead of
underflowing to 0. A decay exp(Δ A) with |A| near float32's max is 0 in float64, but the floor times
A in the backward's dΔ = Σ_n g_n e^{Δ A_n} h_n A_n gave an O(1) term: ddelta (and ddelta_bias) off by
0.65-2.2x relative, up to 1e3x where the true gradient is small.

Every corner: the cpu backend on float32 / bfloat16 inputs against backend="reference" on float64
copies of the same inputs, forward outputs and every gradient.
"""
from __future__ import annotations

import pytest
import torch

from mvpp_kernels import selective_scan
from mvpp_kernels.testing import assert_close

F32_MAX = torch.finfo(torch.float32).max
GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def _inputs(N, dtype, seed=16, batch=2, dim=3, L=7):
    g = torch.Generator().manual_seed(seed)
    return dict(
        u=torch.randn(batch, dim, L, generator=g).to(dtype),
        delta=(torch.rand(batch, dim, L, generator=g) + 0.5).to(dtype),
        A=-(torch.rand(dim, N, generator=g) + 0.5),
        B=torch.randn(batch, N, L, generator=g).to(dtype),
        C=torch.randn(batch, N, L, generator=g).to(dtype),
        D=torch.randn(dim, generator=g),
        z=torch.randn(batch, dim, L, generator=g).to(dtype),
        delta_bias=torch.rand(dim, generator=g) * 0.1,
        initial_state=torch.randn(batch, dim, N, generator=g),
    )


def _run(kw, backend, delta_softplus, as_dtype=None):
    """Outputs and the gradients of a fixed weighted sum of them; `as_dtype` converts the inputs first."""
    t = {n: (v.to(as_dtype) if as_dtype is not None else v).detach().clone().requires_grad_(True)
         for n, v in kw.items()}
    out, last = selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"],
                               delta_bias=t["delta_bias"], delta_softplus=delta_softplus, return_last_state=True,
                               initial_state=t["initial_state"], backend=backend)
    outs = dict(out=out, last_state=last)
    loss = out.double().sum() + 2 * last.double().sum()
    loss.backward()
    outs.update({"d" + n: t[n].grad for n in GRAD_NAMES})
    return outs


# name -> (edit of the inputs, delta_softplus)
def _corner(name, N, dtype):
    kw = _inputs(N, dtype)
    sp = False
    if name == "A -3e38":
        kw["A"][0, 0] = -3e38
    elif name == "A -1e38, last state":
        kw["A"][1, N - 1] = -1e38
    elif name == "A float32 max":
        kw["A"][0, 0] = -F32_MAX
        kw["A"][2, N - 1] = -F32_MAX
    elif name == "A -1e38, softplus":
        kw["A"][0, 0] = -1e38
        sp = True
    elif name == "A -1e30, delta 1e10":  # Δ A overflows to -inf in float32: decay 0 either way
        kw["A"][0, 0] = -1e30
        kw["delta"][0, 0, 2] = 1e10
    elif name == "A -1e20, delta 1e-17":  # Δ A ~ -1e3: far below log(FLT_MIN), finite
        kw["A"][1, 0] = -1e20
        kw["delta"][:, 1, 1:4] = 1e-17
    elif name == "delta 1e30":  # huge step, modest A: the decay is 0, the input term huge but finite
        kw["delta"][0, 1, 3] = 1e30
    elif name == "delta 1e30, softplus":
        kw["delta"][0, 1, 3] = 1e30
        sp = True
    else:
        raise KeyError(name)
    return kw, sp


CORNERS = ["A -3e38", "A -1e38, last state", "A float32 max", "A -1e38, softplus", "A -1e30, delta 1e10",
           "A -1e20, delta 1e-17", "delta 1e30", "delta 1e30, softplus"]


@pytest.mark.parametrize("corner", CORNERS)
@pytest.mark.parametrize("N", [1, 3, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_selective_scan_matches_float64_in_huge_A_and_delta_corners(dtype, N, corner):
    kw, sp = _corner(corner, N, dtype)
    want = _run(kw, "reference", sp, as_dtype=torch.float64)
    for name, w in want.items():
        # assert_close's tolerance grows with the tensor's magnitude: an inf there would accept anything.
        assert torch.isfinite(w).all(), f"the float64 reference {name} must be finite in corner {corner}"
    got = _run(kw, "cpu", sp)
    for name, w in want.items():
        a = got[name]
        assert_close(a, w.to(a.dtype), grad=name.startswith("d"), name=f"cpu {dtype} N={N} {corner}: {name}")


def test_cpu_selective_scan_decay_below_float32_min_is_exactly_zero():
    # One state, h_0 = 1, B = 0: the state after one step is the decay itself, exp(Δ A). Below
    # log(FLT_MIN) it must be within FLT_MIN of float64's (0 from Δ A <= -88 on), not floored at
    # e^-87 ~ 1.6e-38; in the normal range it keeps the fast exp's accuracy (~2 ulp).
    tiny = torch.finfo(torch.float32).tiny
    for x in [-80.0, -87.0, -87.3, -87.5, -87.7, -88.0, -90.0, -1e3, -3e38, -F32_MAX]:
        out, last = selective_scan(torch.zeros(1, 1, 1), torch.ones(1, 1, 1), torch.tensor([[x]]),
                                   torch.zeros(1, 1, 1), torch.ones(1, 1, 1), return_last_state=True,
                                   initial_state=torch.ones(1, 1, 1), backend="cpu")
        got, want = last.item(), torch.tensor(x).double().exp().item()  # of float32(x)
        if want >= tiny:
            assert abs(got - want) <= 4e-7 * want, (x, got, want)
        else:
            assert 0.0 <= got <= want + tiny, (x, got, want)
        if x <= -88.0:
            assert got == 0.0, (x, got)
        assert out.item() == got  # y = C h with C = 1



# A step, input u or B so large that Δ u B overflows float32: the state and some outputs are past
# float32's range (inf in both), the rest finite. The float32 kernel gave NaN (inf - inf) for out,
# ddelta, dA, dz, ...; now a float32 call whose bound (|Δ| + 1) |u| |B| |C| passes 1e15 runs in
# float64 and rounds its results.
def _run_masked(kw, backend, delta_softplus, as_dtype=None, mask=None):
    t = {n: (v.to(as_dtype) if as_dtype is not None else v).detach().clone().requires_grad_(True)
         for n, v in kw.items()}
    out, last = selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"],
                               delta_bias=t["delta_bias"], delta_softplus=delta_softplus, return_last_state=True,
                               initial_state=t["initial_state"], backend=backend)
    # the loss weights only what is finite in float32 (`mask`, the same for both runs): a weight on
    # an inf output would make every gradient inf or NaN
    if mask is None:
        mask = (torch.isfinite(out.detach().float()), torch.isfinite(last.detach().float()))
    loss = torch.where(mask[0], out.double(), 0.0).sum() + 2 * torch.where(mask[1], last.double(), 0.0).sum()
    loss.backward()
    outs = dict(out=out, last_state=last)
    outs.update({"d" + n: t[n].grad for n in GRAD_NAMES})
    return outs, mask


def _assert_matches_with_infinities(got, want, what):
    for name, w in want.items():
        a = got[name]
        w = w.to(a.dtype)  # past float32's range: inf in both
        # assert_close's tolerance grows with the tensor's magnitude (an inf would accept anything):
        # the non-finite elements must match exactly, the finite ones within tolerance.
        fin = torch.isfinite(w)
        assert torch.equal(torch.isfinite(a), fin), f"{what} {name}: non-finite where the reference is not, or not where it is"
        torch.testing.assert_close(a[~fin].double(), w[~fin].double(), rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m: f"{what} {name}: wrong non-finite values: {m}")
        assert_close(a[fin], w[fin], grad=name.startswith("d"), name=f"{what} {name}")


# Corners where a step Δ, an input u or a B entry is so large that Δ u (B) overflows float32, as
# (tensor, index, value) edits of the random inputs plus delta_softplus; shared by both ops below (the
# last-step/event index differs with L). Float32's max itself rounds to inf in bfloat16, hence 3e38.
_OVERFLOW_EDITS = {
    "delta 3e38, u 2": ([("delta", (0, 0, 1), 3e38), ("u", (0, 0, 1), 2.0)], False),
    "delta 1e38, u 8, softplus": ([("delta", (0, 0, 1), 1e38), ("u", (0, 0, 1), 8.0)], True),
    # a modest step, a huge input: Δ u overflows all the same
    "u 3e38, delta 2": ([("u", (0, 0, 1), 3e38), ("delta", (0, 0, 1), 2.0)], False),
    "B 3e38, u 3": ([("B", (0, -1, 1), 3e38), ("u", (0, 0, 1), 3.0), ("delta", (0, 0, 1), 1.5)], False),
}


def _apply_edits(kw, edits):
    for name, index, value in edits:
        kw[name][index] = value
    return kw


SS_OVERFLOW_EDITS = dict(_OVERFLOW_EDITS, **{
    "delta 3e38 at the last step": ([("delta", (0, 1, 6), 3e38), ("u", (0, 1, 6), 4.0)], False)})
SS_OVERFLOW = ["delta 3e38, u 2", "delta 1e38, u 8, softplus", "delta 3e38 at the last step", "u 3e38, delta 2",
               "B 3e38, u 3"]


@pytest.mark.parametrize("corner", SS_OVERFLOW)
@pytest.mark.parametrize("N", [1, 3, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_selective_scan_matches_float64_when_delta_u_overflows_float32(dtype, N, corner):
    edits, sp = SS_OVERFLOW_EDITS[corner]
    kw = _apply_edits(_inputs(N, dtype), edits)
    want, mask = _run_masked(kw, "reference", sp, as_dtype=torch.float64)
    assert not any(torch.isnan(w).any() for w in want.values()), "the corner must have a NaN-free reference"
    assert any(w.abs().max() > 1e36 for w in want.values()), "the corner must reach float32's top"
    got, _ = _run_masked(kw, "cpu", sp, mask=mask)
    _assert_matches_with_infinities(got, want, f"cpu {dtype} N={N} {corner}:")


# ---------------------------------------------------------------------------------------------
# cpu mhp_scan: a step Δ, u or B so large that Δ u B overflows float32 (the state and some readouts
# are past float32's range, others finite), and huge gaps with degenerate steps. The float32 kernel
# gave NaN for y, the integral, the state and every gradient of the channel (inf - inf); now a
# float32 call with a gap or a step/input bound past 1e15 runs in float64 and rounds its results.
# ---------------------------------------------------------------------------------------------
MHP_GRADS = ("u", "delta", "A", "B", "C", "dt", "dt_end")


def _mhp_inputs(N, dtype, seed=16, batch=2, dim=3, L=5):
    g = torch.Generator().manual_seed(seed)
    return dict(
        u=torch.rand(batch, dim, L, generator=g).to(dtype),
        delta=(torch.rand(batch, dim, L, generator=g) + 0.5).to(dtype),
        A=-(torch.rand(dim, N, generator=g) + 0.5),
        B=torch.rand(batch, N, L, generator=g).to(dtype),
        C=torch.rand(batch, N, L, generator=g).to(dtype),
        dt=torch.rand(batch, L, generator=g),
        dt_end=torch.rand(batch, generator=g),
    )


def _mhp_run(kw, backend, delta_softplus, as_dtype=None, ymask=None):
    from mvpp_kernels import mhp_scan

    t = {n: (v.to(as_dtype) if as_dtype is not None else v).detach().clone().requires_grad_(True)
         for n, v in kw.items()}
    o = mhp_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], t["dt"], dt_end=t["dt_end"],
                 delta_softplus=delta_softplus, return_last_state=True, backend=backend)
    outs = dict(y=o.y, y_left=o.y_left, integral=o.integral, last_state=o.last_state)
    # y is past float32's range at the overflowing event: the loss weights only the y that are
    # finite in float32 (`ymask`, the same for both runs), so the gradients are finite
    if ymask is None:
        ymask = torch.isfinite(o.y.detach().float())
    loss = (o.y_left.double().sum() + 3 * o.integral.double().sum()
            + torch.where(ymask, o.y.double(), 0.0).sum())
    loss.backward()
    outs.update({"d" + n: t[n].grad for n in MHP_GRADS})
    return outs, ymask


MHP_CORNER_EDITS = dict(_OVERFLOW_EDITS, **{
    "delta 3e38 at the last event": ([("delta", (0, 1, 4), 3e38), ("u", (0, 1, 4), 4.0)], False),
    "delta 1e38, u 8, dt float32 max": ([("delta", (1, 2, 1), 1e38), ("u", (1, 2, 1), 8.0),
                                         ("dt", (1, 2), F32_MAX)], False),
    "delta 1e-30, dt float32 max": ([("delta", (0, 0, 1), 1e-30), ("dt", (0, 2), F32_MAX)], False),
    "delta 0, dt_end float32 max": ([("delta", (0, 2, 4), 0.0), ("dt_end", (0,), F32_MAX)], False),
})


def _mhp_corner(name, N, dtype):
    edits, sp = MHP_CORNER_EDITS[name]
    return _apply_edits(_mhp_inputs(N, dtype), edits), sp


MHP_CORNERS = ["delta 3e38, u 2", "delta 1e38, u 8, softplus", "delta 3e38 at the last event",
               "delta 1e38, u 8, dt float32 max", "delta 1e-30, dt float32 max", "delta 0, dt_end float32 max",
               "u 3e38, delta 2", "B 3e38, u 3"]


@pytest.mark.parametrize("corner", MHP_CORNERS)
@pytest.mark.parametrize("N", [1, 3, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_mhp_scan_matches_float64_when_delta_u_or_the_gap_overflows_float32(dtype, N, corner):
    kw, sp = _mhp_corner(corner, N, dtype)
    want, ymask = _mhp_run(kw, "reference", sp, as_dtype=torch.float64)
    got, _ = _mhp_run(kw, "cpu", sp, ymask=ymask)
    _assert_matches_with_infinities(got, want, f"cpu {dtype} N={N} {corner}:")
