"""mhp_scan and the Hawkes layer: the reference against exact quadrature and two independent Hawkes
libraries, every backend against the float64 reference, gradients, opcheck, torch.compile, bad input.

Backends: reference (float32 against float64), cpu (C++; must be built -- a missing extension fails
here, it does not skip), triton (tiny shapes: the interpreter is slow on CPU; the long grid is in
test_mhp_scan_triton.py) and cuda (GPU only). The big sizes (L = 2049) run on reference/cpu only.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

import mvpp_kernels
from mvpp_kernels import HawkesHead, hawkes_intensity, hawkes_loglik, mhp_scan, selective_scan
from mvpp_kernels._backend import has_compiled_kernel
from mvpp_kernels.ops import mhp_scan as mhp_mod
from mvpp_kernels.testing import assert_close, make_selective_scan_inputs, poisoned_allocations, to_reference

HAS_CUDA = torch.cuda.is_available()
TRITON_FILE = os.path.join(os.path.dirname(mhp_mod.__file__), "triton.py")

BACKENDS = [
    "reference",
    pytest.param("cpu", marks=pytest.mark.cpp),
    pytest.param("triton", marks=[pytest.mark.triton, pytest.mark.skipif(
        not os.path.exists(TRITON_FILE), reason="ops/mhp_scan/triton.py does not exist yet")]),
    pytest.param("cuda", marks=pytest.mark.cuda),
]
GRAD_NAMES = ("u", "delta", "A", "B", "C", "dt", "D", "z", "delta_bias", "dt_end", "initial_state")


def device_of(backend: str) -> str:
    return "cuda" if backend == "cuda" or (backend == "triton" and HAS_CUDA) else "cpu"


def require(backend: str) -> None:
    """The cpu backend must be built (a failure, not a skip); the others skip when unavailable."""
    if backend == "cpu":
        assert has_compiled_kernel("mhp_scan_fwd", "CPU") and has_compiled_kernel("mhp_scan_bwd", "CPU"), (
            "the C++ extension has no mhp_scan kernels: " + mvpp_kernels._library.compiled_status()
            + " (build: python setup.py build_ext --inplace)")
    if backend == "triton":
        pytest.importorskip("triton")


def make_inputs(batch=3, dim=4, N=5, L=9, *, dtype=torch.float32, layout="variable", lengths=None, gaps="mixed",
                with_h0=True, with_dt_end=True, with_D=True, with_z=True, seed=0, device="cpu",
                poison_padding=True):
    """Random inputs (never zero) with tied, tiny, long and very long gaps; padding holds NaN."""
    inp = make_selective_scan_inputs(batch, dim, N, L, dtype=dtype, B_layout=layout, with_initial_state=with_h0,
                                     with_D=with_D, with_z=with_z, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    dt = torch.rand(batch, L, generator=g, dtype=torch.float64) * 2
    if gaps == "mixed":
        for pos, val in ((1, 0.0), (2, 1e-6), (3, 1e4), (5, 0.0), (6, 1e6)):
            if pos < L:
                dt[:, pos] = val
    inp["dt"] = dt.to(sd)
    inp["dt_end"] = (torch.rand(batch, generator=g, dtype=torch.float64) * 3).to(sd) if with_dt_end else None
    if lengths is not None:
        lengths = torch.as_tensor(lengths, dtype=torch.int64)
        if poison_padding:
            for b, n in enumerate(lengths.tolist()):
                for key in ("u", "delta", "z"):
                    if inp[key] is not None:
                        inp[key][b, :, n:] = float("nan")
                inp["dt"][b, n:] = float("nan")
                for key in ("B", "C"):
                    if inp[key].dim() >= 3:
                        inp[key][b, ..., n:] = float("nan")
    inp["lengths"] = lengths
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}


def with_grad(inp: dict) -> dict:
    return {k: (v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point()
                else v) for k, v in inp.items()}


def call(inp: dict, backend: str, softplus: bool = True, last: bool = True):
    return mhp_scan(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], inp["dt"], inp["D"], inp["z"],
                    inp["delta_bias"], softplus, inp["dt_end"], inp["lengths"], inp["initial_state"], last,
                    backend=backend)


def loss_of(out, seed=3):
    """A loss that weights every output (so every gradient path is exercised) with fixed random weights."""
    g = torch.Generator().manual_seed(seed)
    total = 0
    for t in (out.y, out.y_left, out.integral, out.last_state):
        w = torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device, t.dtype)
        total = total + (torch.nan_to_num(t) * w).sum()  # padding of y must be 0 anyway
    return total


def check_against_reference(inp, backend, dtype, *, grads=True, grad_scale=1.0):
    kin = with_grad(inp)
    with poisoned_allocations():
        out = call(kin, backend)
    ref_in = to_reference(with_grad(inp))
    ref = call(ref_in, "reference")
    for name in ("y", "y_left", "integral", "last_state"):
        assert_close(getattr(out, name), getattr(ref, name), dtype, name=f"{backend} {name}")
    if not grads:
        return
    names = [k for k in GRAD_NAMES if kin.get(k) is not None]
    with poisoned_allocations():
        got = torch.autograd.grad(loss_of(out), [kin[k] for k in names])
    want = torch.autograd.grad(loss_of(ref), [ref_in[k] for k in names])
    for k, a, e in zip(names, got, want):
        assert a.shape == kin[k].shape, k
        assert_close(a, e, dtype, grad=True, name=f"{backend} d{k}", scale=grad_scale)


# ---------------------------------------------------------------------------------------------
# 1. The reference against exact quadrature of the piecewise readout (independent numpy states)
# ---------------------------------------------------------------------------------------------
def _numpy_readout_pieces(inp):
    """Per (b, d): the list of gaps (length, c_p * h_p^+ per state, rate a_p per state), from a
    plain float64 numpy loop written from DESIGN.md (independent of the torch reference)."""
    u = inp["u"].double().numpy()
    delta = inp["delta"].double().numpy() + inp["delta_bias"].double().numpy()[:, None]
    step = np.log1p(np.exp(delta))  # softplus (delta is small here)
    A = inp["A"].double().numpy()
    B = inp["B"].double().numpy()  # (batch, N, L)
    C = inp["C"].double().numpy()
    dt = inp["dt"].double().numpy()
    dte = inp["dt_end"].double().numpy()
    h0 = inp["initial_state"].double().numpy()
    lens = inp["lengths"].numpy()
    batch, dim, L = u.shape
    pieces, yleft = {}, np.zeros((batch, dim, L))
    for b in range(batch):
        for d in range(dim):
            h = h0[b, d].copy()
            gaps = []
            n = lens[b]
            for i in range(n):
                p = max(i - 1, 0)
                a = A[d] * step[b, d, p]
                gaps.append((dt[b, i], C[b, :, p] * h, a))
                h = np.exp(a * dt[b, i]) * h
                yleft[b, d, i] = C[b, :, p] @ h
                h = h + step[b, d, i] * u[b, d, i] * B[b, :, i]
            if n > 0:
                gaps.append((dte[b], C[b, :, n - 1] * h, A[d] * step[b, d, n - 1]))
            pieces[b, d] = gaps
    return pieces, yleft


def test_reference_integral_matches_quadrature():
    from scipy.integrate import quad

    inp = make_inputs(3, 2, 3, 7, dtype=torch.float64, lengths=[7, 4, 0], gaps="none", poison_padding=False)
    inp["dt"][0, 2] = 0.0  # a tie
    inp["dt"][1, 1] = 5.0  # a long gap
    out = call(inp, "reference")
    pieces, yleft = _numpy_readout_pieces(inp)
    for (b, d), gaps in pieces.items():
        total = 0.0
        for length, ch, a in gaps:
            if length > 0:
                val, err = quad(lambda s: float(ch @ np.exp(a * s)), 0.0, float(length), epsabs=0, epsrel=1e-13,
                                limit=200)
                total += val
        got = float(out.integral[b, d])
        assert abs(got - total) <= 1e-9 * max(abs(total), 1e-300) + 1e-300, (b, d, got, total)
    np.testing.assert_allclose(out.y_left.numpy(), yleft, rtol=1e-12, atol=1e-12)
    assert float(out.integral[2].abs().max()) == 0.0  # no events: no readout, integral 0
    torch.testing.assert_close(out.last_state[2], inp["initial_state"][2])


def test_phi_stable_and_smooth():
    for dtype, rtol in ((torch.float64, 1e-14), (torch.float32, 1e-6)):
        x = torch.tensor([0.0, -1e-30, -1e-12, -1e-4, -0.0999, -0.1001, -0.4999, -0.5001, -3.0, -1e4, -1e12],
                         dtype=dtype, requires_grad=True)
        p = mhp_mod.phi(x)
        exact = [1.0] + [float(-math.expm1(v) / -v) for v in x.tolist()[1:]]
        torch.testing.assert_close(p.detach(), torch.tensor(exact, dtype=dtype), rtol=rtol, atol=0)
        (g,) = torch.autograd.grad(p.sum(), x)
        # phi'(x) = (e^x (x - 1) + 1) / x^2, evaluated in float64 away from 0; 1/2 at 0.
        want = [0.5] + [float((math.exp(v) * (v - 1) + 1) / v**2) if abs(v) > 1e-3 else 0.5 + v / 3
                        for v in x.tolist()[1:]]
        torch.testing.assert_close(g, torch.tensor(want, dtype=dtype), rtol=max(rtol, 1e-9) * 100, atol=0)


# ---------------------------------------------------------------------------------------------
# 2. The classic exponential-kernel Hawkes process: hawkesbook and tick agree with us
# ---------------------------------------------------------------------------------------------
def _simulate_classic(mu, alpha, beta, T, seeds):
    from tick.hawkes import SimuHawkesExpKernels

    seqs = []
    for s in seeds:
        # tick's kernel is adjacency * decay * exp(-decay t): adjacency = alpha / beta.
        sim = SimuHawkesExpKernels(adjacency=np.array([[alpha / beta]]), decays=np.array([[beta]]),
                                   baseline=np.array([mu]), end_time=T, seed=s, verbose=False)
        sim.simulate()
        seqs.append(np.asarray(sim.timestamps[0], dtype=np.float64))
    return seqs


def _classic_inputs(seqs, T, alpha, beta, dtype=torch.float64):
    """dim = N = 1, Δ ≡ 1, A = −β, B u = α, C = 1, padded to the longest sequence."""
    batch, L = len(seqs), max(len(s) for s in seqs)
    times = torch.zeros(batch, L, dtype=dtype)
    lens = torch.tensor([len(s) for s in seqs])
    for b, s in enumerate(seqs):
        times[b, : len(s)] = torch.from_numpy(s)
    dt = torch.diff(times, dim=1, prepend=torch.zeros(batch, 1, dtype=dtype))
    dt_end = torch.tensor([T - (s[-1] if len(s) else 0.0) for s in seqs], dtype=dtype)
    dt = torch.where(torch.arange(L)[None] < lens[:, None], dt, torch.full_like(dt, float("nan")))
    inp = dict(u=torch.full((batch, 1, L), alpha, dtype=dtype), delta=torch.ones(batch, 1, L, dtype=dtype),
               A=torch.tensor([[-beta]], dtype=dtype), B=torch.ones(1, 1, dtype=dtype),
               C=torch.ones(1, 1, dtype=dtype), dt=dt, D=None, z=None, delta_bias=None, dt_end=dt_end,
               lengths=lens, initial_state=None)
    return inp, times


@pytest.mark.parametrize("backend", BACKENDS)
def test_classic_hawkes_loglik_matches_hawkesbook_and_tick(backend):
    require(backend)
    from hawkesbook import exp_log_likelihood

    mu, alpha, beta, T = 0.8, 1.2, 2.5, 15.0
    seeds = [1, 2, 3, 4] if backend in ("reference", "cpu") else [1, 2]
    seqs = _simulate_classic(mu, alpha, beta, T, seeds)
    seqs.append(np.zeros(0))  # an empty sequence: log L = -mu T
    seqs.append(seqs[0][:1])  # a single event
    assert len({len(s) for s in seqs}) > 3  # really a padded batch
    inp, _ = _classic_inputs(seqs, T, alpha, beta)
    dev = device_of(backend)
    dtype = torch.float64 if backend in ("reference", "cpu") else torch.float32
    inp = {k: (v.to(dev, dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else
               (v.to(dev) if isinstance(v, torch.Tensor) else v)) for k, v in inp.items()}
    out = call(inp, backend, softplus=False)
    marks = torch.zeros(len(seqs), inp["u"].shape[2], dtype=torch.int64, device=dev)
    ll = hawkes_loglik(out, marks, torch.tensor([mu], dtype=dtype, device=dev),
                       torch.ones(1, 1, dtype=dtype, device=dev), T, inp["lengths"])
    want = [exp_log_likelihood(s, T, np.array([mu, alpha, beta])) if len(s) else -mu * T for s in seqs]
    rtol = 1e-8 if dtype == torch.float64 else 2e-5
    np.testing.assert_allclose(ll.double().cpu().numpy(), want, rtol=rtol)

    # tick's own likelihood (its C++ model; tick's Python wrappers do not run on Python 3.11): its
    # loss is (-log L - T) / n_events (it drops the constant T for one node).
    from tick.hawkes.model.build.hawkes_model import ModelHawkesExpKernLogLik

    for b, s in enumerate(seqs[:2]):
        data, ends = [[np.ascontiguousarray(s)]], np.array([T])
        model = ModelHawkesExpKernLogLik(beta, 1)
        model.set_data(data, ends)
        tick_ll = -(model.loss(np.array([mu, alpha / beta])) * len(s) + T)
        np.testing.assert_allclose(float(ll[b]), tick_ll, rtol=rtol)


def test_hawkes_intensity_classic_and_compensator():
    from hawkesbook import exp_hawkes_intensity
    from scipy.integrate import quad

    mu, alpha, beta, T = 0.5, 0.9, 1.7, 12.0
    seqs = _simulate_classic(mu, alpha, beta, T, [5, 6])
    inp, times = _classic_inputs(seqs, T, alpha, beta)
    g = torch.Generator().manual_seed(0)
    q = torch.rand(2, 40, generator=g, dtype=torch.float64) * T
    q[0, :3] = times[0, :3]  # exactly at events: the left limit
    lam = hawkes_intensity(q, torch.tensor([mu], dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64),
                           inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], inp["dt"],
                           lengths=inp["lengths"])
    for b, s in enumerate(seqs):
        want = [exp_hawkes_intensity(float(t), s[s < float(t)], (mu, alpha, beta)) for t in q[b]]
        np.testing.assert_allclose(lam[b, :, 0].numpy(), want, rtol=1e-12)
    # The compensator hawkes_loglik uses equals the integral of hawkes_intensity over [0, T].
    out = call(inp, "reference", softplus=False)
    for b, s in enumerate(seqs):
        f = lambda t: float(hawkes_intensity(torch.tensor([[t]], dtype=torch.float64),  # noqa: E731
                                             torch.tensor([mu], dtype=torch.float64),
                                             torch.ones(1, 1, dtype=torch.float64),
                                             inp["u"][b:b + 1], inp["delta"][b:b + 1], inp["A"], inp["B"],
                                             inp["C"], inp["dt"][b:b + 1], lengths=inp["lengths"][b:b + 1]))
        pts = np.concatenate([[0.0], s, [T]])
        total = sum(quad(f, lo, hi, epsrel=1e-12, epsabs=0)[0] for lo, hi in zip(pts[:-1], pts[1:]) if hi > lo)
        np.testing.assert_allclose(mu * T + float(out.integral[b, 0]), total, rtol=1e-9)


def test_hawkes_intensity_left_limit_matches_y_left_multimark():
    inp = make_inputs(2, 3, 4, 8, dtype=torch.float64, lengths=[8, 5], gaps="none", with_h0=True)
    out = call(inp, "reference")
    mu = torch.tensor([0.3, 0.7], dtype=torch.float64)
    W = torch.rand(2, 3, dtype=torch.float64)
    times = torch.cumsum(torch.nan_to_num(inp["dt"]), 1)
    lam = hawkes_intensity(times, mu, W, inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], inp["dt"],
                           inp["delta_bias"], True, inp["lengths"], inp["initial_state"])
    want = mu + torch.einsum("bdl,kd->blk", out.y_left, W)
    for b, n in enumerate(inp["lengths"].tolist()):
        torch.testing.assert_close(lam[b, :n], want[b, :n], rtol=1e-12, atol=1e-12)


def test_hawkes_head_and_loglik_gradients():
    inp = make_inputs(2, 3, 2, 6, dtype=torch.float64, lengths=[6, 3], gaps="none", with_z=False, with_D=False)
    # A non-negative readout, as the model layer ensures: B u >= 0, C >= 0, h0 >= 0.
    inp["u"] = inp["u"].abs()
    inp["B"], inp["C"] = inp["B"].abs(), inp["C"].abs()
    inp["initial_state"] = inp["initial_state"].abs()
    head = HawkesHead(num_marks=2, dim=3).double()
    x = with_grad(inp)
    out = call(x, "reference")
    marks = torch.tensor([[0, 1, 1, 0, 1, 0], [1, 0, 1, 5, 7, 9]])  # padding is not read
    ll = head(out, marks, T=torch.tensor([20.0, 9.0], dtype=torch.float64), lengths=inp["lengths"])
    assert ll.shape == (2,) and torch.isfinite(ll).all()
    ll.sum().backward()
    for p in (head.mu_raw, head.W_raw, x["u"], x["dt"], x["A"]):
        assert p.grad is not None and torch.isfinite(torch.nan_to_num(p.grad, nan=0.0)).all()
    assert float(head.W_raw.grad.abs().sum()) > 0
    assert torch.isfinite(x["dt"].grad[0]).all() and torch.isfinite(x["dt"].grad[1, :3]).all()
    assert float(x["dt"].grad[1, 3:].abs().sum()) == 0.0

    mu = torch.tensor([0.4, 0.9], dtype=torch.float64, requires_grad=True)
    W = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    y_left = out.y_left.detach().clone().requires_grad_(True)
    integral = out.integral.detach().clone().requires_grad_(True)
    marks = marks.clamp(max=1)

    def f(mu, W, y_left, integral):
        return hawkes_loglik(mhp_mod.MhpScanOutput(None, y_left, integral, None), marks, mu, W,
                             torch.tensor([20.0, 9.0], dtype=torch.float64), inp["lengths"])

    assert torch.autograd.gradcheck(f, (mu, W, y_left, integral))


@pytest.mark.parametrize("dim,K", [(1, 1), (1, 3), (4, 1), (4, 3)])
def test_hawkes_loglik_matches_event_loop(dim, K):
    """hawkes_loglik's vectorised paths (dim = K = 1 elementwise, dim = 1 broadcast, matmul + gather)
    against a per-event Python loop of the formula; padding holds NaN readouts and out-of-range marks,
    which must not be read; T as a float and as a per-sequence tensor."""
    g = torch.Generator().manual_seed(40 + 10 * dim + K)
    batch, L = 3, 7
    lengths = torch.tensor([7, 4, 0])
    y_left = torch.rand(batch, dim, L, generator=g, dtype=torch.float64)
    integral = torch.rand(batch, dim, generator=g, dtype=torch.float64) * 5
    marks = torch.randint(0, K, (batch, L), generator=g)
    for b, n in enumerate(lengths.tolist()):
        y_left[b, :, n:] = float("nan")
        marks[b, n:] = K + 5
    mu = torch.rand(K, generator=g, dtype=torch.float64) + 0.1
    W = torch.rand(K, dim, generator=g, dtype=torch.float64)
    out = mhp_mod.MhpScanOutput(None, y_left, integral, None)
    for T in (12.5, torch.tensor([12.5, 9.0, 3.0], dtype=torch.float64)):
        got = hawkes_loglik(out, marks, mu, W, T, lengths)
        Tb = T if isinstance(T, torch.Tensor) else torch.full((batch,), T, dtype=torch.float64)
        for b in range(batch):
            want = -(float(Tb[b]) * float(mu.sum()) + float(integral[b] @ W.sum(0)))
            for i in range(int(lengths[b])):
                k = int(marks[b, i])
                want += math.log(float(mu[k] + W[k] @ y_left[b, :, i]))
            assert float(got[b]) == pytest.approx(want, rel=1e-12, abs=1e-12)
    # Gradients through the same paths (padding left finite here: gradcheck perturbs every entry).
    y_ok = torch.nan_to_num(y_left, nan=0.5).requires_grad_(True)
    mu_, W_ = mu.clone().requires_grad_(True), W.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda m, w, y: hawkes_loglik(mhp_mod.MhpScanOutput(None, y, integral, None), marks, m, w, 12.5, lengths),
        (mu_, W_, y_ok))


@pytest.mark.cpp
def test_masked_stats_kernel_matches_torch(monkeypatch):
    """The C++ one-pass check (min / max of the finite valid entries, count of NaN/inf) against torch
    on floats with NaN/inf inside and outside the valid range, on integers, with and without lengths;
    and the torch fallback (other devices) against it."""
    require("cpu")
    from mvpp_kernels.ops.mhp_scan import hawkes as hawkes_mod

    assert has_compiled_kernel("mhp_scan_masked_stats", "CPU")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 37, generator=g, dtype=torch.float64)
    x[0, 3], x[1, 30], x[2, 0], x[4, 36] = float("nan"), float("inf"), -float("inf"), float("nan")
    xi = torch.randint(-4, 9, (5, 37), generator=g, dtype=torch.int32)
    for X in (x, x.float(), xi, xi.long()):
        for lengths in (None, torch.tensor([37, 10, 0, 1, 36]), torch.zeros(5, dtype=torch.int64)):
            got = torch.ops.mvpp.mhp_scan_masked_stats(X, lengths)
            vals = X if lengths is None else X[torch.arange(37)[None, :] < lengths[:, None]]
            vals = vals.flatten().double()
            fin = torch.isfinite(vals)
            want_lo = float(vals[fin].min()) if fin.any() else math.inf
            want_hi = float(vals[fin].max()) if fin.any() else -math.inf
            assert got == (want_lo, want_hi, int((~fin).sum())), (X.dtype, lengths)
            assert hawkes_mod._masked_stats(X, lengths) == got
            with monkeypatch.context() as m:
                m.setattr(hawkes_mod, "_STATS_KERNEL", False)
                assert hawkes_mod._masked_stats(X, lengths) == got
    # Non-contiguous input is read in its logical order.
    assert torch.ops.mvpp.mhp_scan_masked_stats(x.t().contiguous().t(), None)[:2] == (
        float(x[torch.isfinite(x)].min()), float(x[torch.isfinite(x)].max()))


@pytest.mark.cpp
def test_masked_stats_opcheck():
    """opcheck of the eager-only check op. It returns Python scalars that the wrapper turns into
    errors, and the wrappers skip it while compiling (torch.compiler.is_compiling()), so it has no
    fake kernel: the schema (no mutation, no aliasing) and its autograd registration (none, it is a
    check on detached data) are what can be checked."""
    require("cpu")
    x = torch.randn(4, 9, dtype=torch.float64)
    torch.library.opcheck(torch.ops.mvpp.mhp_scan_masked_stats.default, (x, torch.tensor([9, 3, 0, 1])),
                          test_utils=("test_schema", "test_autograd_registration"))
    torch.library.opcheck(torch.ops.mvpp.mhp_scan_masked_stats.default, (x.float(), None),
                          test_utils=("test_schema", "test_autograd_registration"))


# ---------------------------------------------------------------------------------------------
# 3. Every backend against the float64 reference
# ---------------------------------------------------------------------------------------------
def _shape_cases(backend):
    if backend == "triton":
        return [(2, 3, 4, 9, "variable", [9, 0]), (2, 4, 3, 5, "grouped", [1, 5]), (2, 3, 4, 6, "constant", None)]
    return [
        (3, 4, 5, 9, "variable", [9, 0, 1]),
        (3, 4, 5, 63, "grouped", [63, 1, 40]),
        (2, 6, 16, 63, "constant", None),
        (2, 3, 4, 1, "variable", [1, 0]),
        (2, 2, 3, 130, "variable", [130, 65]),  # several chunks, the last one partial
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_reference(backend):
    require(backend)
    dev = device_of(backend)
    for i, (batch, dim, N, L, layout, lengths) in enumerate(_shape_cases(backend)):
        inp = make_inputs(batch, dim, N, L, layout=layout, lengths=lengths, seed=i, device=dev)
        check_against_reference(inp, backend, torch.float32)


@pytest.mark.cpp
def test_long_sequence_2049_cpu():
    require("cpu")
    inp = make_inputs(2, 2, 4, 2049, lengths=[2049, 1500], seed=11)
    check_against_reference(inp, "cpu", torch.float32, grad_scale=4.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_options_off(backend):
    """No D, z, delta_bias, initial state or dt_end; no lengths; softplus off with a positive step."""
    require(backend)
    dev = device_of(backend)
    inp = make_inputs(2, 3, 4, 7, with_h0=False, with_dt_end=False, with_D=False, with_z=False, seed=5, device=dev)
    inp["delta_bias"] = None
    inp["delta"] = inp["delta"].abs() + 0.1
    kin = with_grad(inp)
    with poisoned_allocations():
        out = call(kin, backend, softplus=False)
    ref_in = to_reference(with_grad(inp))
    ref = call(ref_in, "reference", softplus=False)
    for name in ("y", "y_left", "integral", "last_state"):
        assert_close(getattr(out, name), getattr(ref, name), torch.float32, name=name)
    names = ["u", "delta", "A", "B", "C", "dt"]
    got = torch.autograd.grad(loss_of(out), [kin[k] for k in names])
    want = torch.autograd.grad(loss_of(ref), [ref_in[k] for k in names])
    for k, a, e in zip(names, got, want):
        assert_close(a, e, torch.float32, grad=True, name=f"d{k}")


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=pytest.mark.cpp)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(backend, dtype):
    require(backend)
    inp = make_inputs(2, 3, 4, 20, dtype=dtype, lengths=[20, 7], seed=2)
    out = call(inp, backend)
    assert out.y.dtype == dtype and out.y_left.dtype == torch.float32 and out.integral.dtype == torch.float32
    ref = call(to_reference(inp), "reference")
    for name in ("y", "y_left", "integral", "last_state"):
        assert_close(getattr(out, name), getattr(ref, name), dtype, name=name)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=pytest.mark.cpp)])
def test_float64_exact(backend):
    require(backend)
    inp = make_inputs(3, 4, 6, 40, dtype=torch.float64, layout="grouped", lengths=[40, 0, 17], seed=9)
    check_against_reference(inp, backend, torch.float64)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=pytest.mark.cpp)])
def test_gradcheck_float64(backend):
    require(backend)
    for layout, lengths in (("variable", [5, 3]), ("constant", None)):
        inp = make_inputs(2, 2, 3, 5, dtype=torch.float64, layout=layout, lengths=lengths, gaps="none",
                          poison_padding=False)
        inp["dt"][0, 2] = 1e-3  # near-tie (an exact tie sits on the domain's edge: dt - eps < 0 is refused)
        names = list(GRAD_NAMES)
        x = with_grad(inp)

        def f(*args):
            kw = dict(x)
            kw.update(zip(names, args))
            out = call(kw, backend)
            return out.y, out.y_left, out.integral, out.last_state

        assert torch.autograd.gradcheck(f, tuple(x[k] for k in names), atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_length_window_and_empty_sequences(backend):
    require(backend)
    dev = device_of(backend)
    inp = make_inputs(2, 3, 4, 6, lengths=[0, 0], device=dev)
    out = call(inp, backend)
    assert float(out.y.abs().max()) == 0 and float(out.y_left.abs().max()) == 0
    assert float(out.integral.abs().max()) == 0
    torch.testing.assert_close(out.last_state, inp["initial_state"].float())
    # L = 0: handled by the wrapper for every backend, with the initial state passed through.
    x = {k: (v[..., :0] if isinstance(v, torch.Tensor) and k in ("u", "delta", "z", "B", "C", "dt") else v)
         for k, v in make_inputs(2, 3, 4, 6, device=dev).items()}
    x["initial_state"] = x["initial_state"].requires_grad_(True)
    out = call(x, backend)
    assert out.y.shape == (2, 3, 0) and out.y_left.shape == (2, 3, 0)
    assert float(out.integral.abs().max()) == 0
    out.last_state.sum().backward()
    assert float((x["initial_state"].grad - 1).abs().max()) == 0


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=pytest.mark.cpp), "reference"])
def test_selective_scan_equivalence(backend):
    """dt ≡ 1 and delta constant along L: the decay of each gap is the same whichever event sets it."""
    require(backend)
    for layout in ("variable", "grouped", "constant"):
        inp = make_selective_scan_inputs(2, 4, 5, 33, dtype=torch.float64, B_layout=layout, with_initial_state=True,
                                         seed=3)
        inp["delta"] = inp["delta"][..., :1].expand(-1, -1, 33).contiguous()
        out = mhp_scan(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], torch.ones(2, 33, dtype=torch.float64),
                       inp["D"], inp["z"], inp["delta_bias"], True, initial_state=inp["initial_state"],
                       return_last_state=True, backend=backend)
        want, last = selective_scan(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], inp["D"], inp["z"],
                                    inp["delta_bias"], True, True, initial_state=inp["initial_state"],
                                    backend="reference")
        torch.testing.assert_close(out.y, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.last_state, last, rtol=1e-12, atol=1e-12)
    # A varying delta makes them differ (which event's Δ decays each gap is the point).
    inp = make_selective_scan_inputs(1, 2, 3, 8, dtype=torch.float64, seed=4)
    out = mhp_scan(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], torch.ones(1, 8, dtype=torch.float64),
                   delta_softplus=True, backend=backend)
    want = selective_scan(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], delta_softplus=True,
                          backend="reference")
    assert float((out.y - want).abs().max()) > 1e-6


# ---------------------------------------------------------------------------------------------
# opcheck, torch.compile, determinism
# ---------------------------------------------------------------------------------------------
def _kernel_args(inp, chunk_size):
    B = inp["B"].unsqueeze(1) if inp["B"].dim() == 3 else inp["B"]
    C = inp["C"].unsqueeze(1) if inp["C"].dim() == 3 else inp["C"]
    return (inp["u"], inp["delta"], inp["A"], B, C, inp["dt"], inp["D"], inp["z"], inp["delta_bias"], inp["dt_end"],
            inp["lengths"], inp["initial_state"], True, chunk_size)


@pytest.mark.cpp
@pytest.mark.parametrize("layout", ["variable", "constant"])
def test_opcheck_cpu(layout):
    require("cpu")
    inp = make_inputs(2, 3, 4, 11, layout=layout, lengths=[11, 4], poison_padding=False)
    x = with_grad(inp)
    args = _kernel_args(x, 4)
    torch.library.opcheck(torch.ops.mvpp.mhp_scan_fwd.default, args)
    y, y_left, integral, last, chunks = torch.ops.mvpp.mhp_scan_fwd(*[a.detach() if isinstance(a, torch.Tensor) else a
                                                                     for a in args])
    bwd_args = (torch.randn_like(y), torch.randn_like(y_left), torch.randn_like(integral), torch.randn_like(last),
                *[a.detach() if isinstance(a, torch.Tensor) else a for a in args[:12]], chunks, True, 4, True)
    torch.library.opcheck(torch.ops.mvpp.mhp_scan_bwd.default, bwd_args)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=pytest.mark.cpp)])
def test_torch_compile_fullgraph(backend):
    require(backend)
    torch._dynamo.reset()
    # Dynamo unrolls the reference's loop over events: a short sequence keeps compilation quick.
    inp = make_inputs(2, 3, 2, 3, lengths=[3, 2], poison_padding=False)

    def f(u, delta, A, B, C, dt, D, z, delta_bias, dt_end, lengths, h0):
        out = mhp_scan(u, delta, A, B, C, dt, D, z, delta_bias, True, dt_end, lengths, h0, True, backend=backend)
        return out.y.sum() + out.y_left.sum() + out.integral.sum() + out.last_state.sum()

    args = [inp[k] for k in ("u", "delta", "A", "B", "C", "dt", "D", "z", "delta_bias", "dt_end", "lengths",
                             "initial_state")]
    x = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in args]
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*x)
    got.backward()
    x2 = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in args]
    want = f(*x2)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(x, x2):
        if a.is_floating_point():
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.cpp
@pytest.mark.parametrize("N", [1, 2, 8, 16, 33])
@pytest.mark.parametrize("gaps", ["mixed", "long"])
def test_cpu_state_sizes_and_paths(N, gaps):
    """The C++ kernel per padded state size (1 .. 64 lanes: scalar sums, 8-lane sums, the AVX-512
    16-row transpose-sum and its multi-vector rows), L = 70 so a chunk has 64 events (4 blocks of
    16 rows) and the next 6 (the per-row remainder). `long` gaps put nearly every event on the fast
    path (|A Δ dt| >= 0.1 on every state: integral from e^x without φ), `mixed` adds ties, 1e-6 and
    1e6 gaps, so series and fast events alternate."""
    require("cpu")
    inp = make_inputs(3, 3, N, 70, lengths=[70, 17, 0], gaps="mixed" if gaps == "mixed" else "none", seed=20 + N)
    if gaps == "long":
        inp["dt"] = inp["dt"] + 3.0  # gaps >= 3: all but the smallest steps Δ take the fast path
    check_against_reference(inp, "cpu", torch.float32)


@pytest.mark.cpp
def test_cpu_backward_deterministic():
    require("cpu")
    inp = make_inputs(3, 8, 16, 100, layout="grouped", lengths=[100, 50, 7], seed=8)
    grads = []
    for _ in range(2):
        x = with_grad(inp)
        out = call(x, "cpu")
        grads.append(torch.autograd.grad(loss_of(out), [x[k] for k in GRAD_NAMES]))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=pytest.mark.cpp)])
def test_bad_gaps_and_lengths(backend):
    inp = make_inputs(2, 3, 4, 6, lengths=[6, 3])

    def bad(match, **changes):
        x = dict(inp)
        x.update(changes)
        with pytest.raises(ValueError, match=match):
            call(x, backend)

    neg = inp["dt"].clone()
    neg[0, 2] = -0.1
    bad(r"dt must be >= 0", dt=neg)
    nan = inp["dt"].clone()
    nan[1, 0] = float("nan")
    bad(r"dt must be finite", dt=nan)
    inf = inp["dt"].clone()
    inf[0, 5] = float("inf")
    bad(r"dt must be finite", dt=inf)
    bad(r"dt_end must be >= 0", dt_end=torch.tensor([1.0, -2.0]))
    bad(r"dt_end must be finite", dt_end=torch.tensor([float("inf"), 1.0]))
    bad(r"lengths must lie in \[0, 6\]", lengths=torch.tensor([7, 3]))
    bad(r"lengths must lie in \[0, 6\]", lengths=torch.tensor([-1, 3]))
    bad(r"lengths must have shape \(2,\)", lengths=torch.tensor([6, 3, 1]))
    bad(r"dt must have shape \(2, 6\)", dt=inp["dt"][:, :5])
    bad(r"dt_end must have shape \(2\)", dt_end=torch.ones(3))
    bad(r"delta must have shape", delta=inp["delta"][:, :2])
    bad(r"B must have shape", B=inp["B"][:, :3])
    bad(r"initial_state must have shape", initial_state=inp["initial_state"][:, :, :2])
    bad(r"A must be <= 0", A=inp["A"].abs())
    with pytest.raises(TypeError, match=r"lengths must be an integer tensor"):
        call(dict(inp, lengths=torch.tensor([6.0, 3.0])), backend)
    with pytest.raises(TypeError, match=r"dt must have dtype"):
        call(dict(inp, dt=inp["dt"].half()), backend)
    # NaN in padding is fine: it is never read.
    assert torch.isfinite(call(inp, backend).integral).all()
    with pytest.raises(ValueError, match="delta \\+ delta_bias must be >= 0"):
        x = dict(inp)
        mhp_scan(x["u"], -x["delta"].abs() - 1, x["A"], x["B"], x["C"], x["dt"], lengths=x["lengths"],
                 check_inputs=True, backend=backend)
    u = inp["u"].clone()
    u[1, 2, 1] = float("inf")
    with pytest.raises(ValueError, match=r"u has 1 non-finite value"):
        mhp_scan(u, inp["delta"], inp["A"], inp["B"], inp["C"], inp["dt"], lengths=inp["lengths"],
                 delta_softplus=True, check_inputs=True, backend=backend)
    if not HAS_CUDA:
        with pytest.raises(mvpp_kernels.BackendUnavailableError):
            call(inp, "cuda")


def test_bad_hawkes_parameters():
    inp = make_inputs(2, 3, 4, 6, lengths=[6, 3])
    out = call(inp, "reference")
    marks = torch.zeros(2, 6, dtype=torch.int64)
    mu, W = torch.tensor([0.5, 0.2]), torch.rand(2, 3)
    with pytest.raises(ValueError, match="W must be >= 0"):
        hawkes_loglik(out, marks, mu, -W, 5.0, inp["lengths"])
    with pytest.raises(ValueError, match="mu must be > 0"):
        hawkes_loglik(out, marks, torch.tensor([0.5, 0.0]), W, 5.0, inp["lengths"])
    with pytest.raises(ValueError, match=r"W must have shape \(2, 3\)"):
        hawkes_loglik(out, marks, mu, W[:, :2], 5.0, inp["lengths"])
    with pytest.raises(ValueError, match=r"marks must lie in \[0, K=2\)"):
        hawkes_loglik(out, marks + 2, mu, W, 5.0, inp["lengths"])
    with pytest.raises(ValueError, match=r"marks must have shape"):
        hawkes_loglik(out, marks[:, :3], mu, W, 5.0, inp["lengths"])
    with pytest.raises(TypeError, match="marks must be an integer tensor"):
        hawkes_loglik(out, marks.float(), mu, W, 5.0, inp["lengths"])
    with pytest.raises(ValueError, match="T .* must be finite and >= 0"):
        hawkes_loglik(out, marks, mu, W, -1.0, inp["lengths"])
    with pytest.raises(ValueError, match="query_times must be finite and >= 0"):
        hawkes_intensity(torch.full((2, 3), -1.0), mu, W, inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"],
                         inp["dt"], lengths=inp["lengths"])
