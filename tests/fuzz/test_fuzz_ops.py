"""Property-based fuzzing (hypothesis) of every op's cpu (C++) and Triton backends against the
float64 reference, forward and gradients.

Each example draws small shapes, an input dtype, the optional inputs/flags, variable lengths
(0, 1 and full-length rows included) and a non-contiguous layout; tensors come from a seeded
torch.Generator (the seed is drawn too), so a failing example is reproducible from hypothesis'
printout alone. The reference is the same public op with backend="reference" on float64 copies;
tolerances are mvpp_kernels.testing's per-dtype tables. Triton runs under TRITON_INTERPRET=1 on a
CPU-only machine (set by the root conftest before triton is imported).

Budget: the "ci" profile (tests/fuzz/conftest.py) keeps this file well under 60 s on 2 cores;
HYPOTHESIS_PROFILE=long runs 50x more, randomized examples.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import assume, given, strategies as st

from mvpp_kernels import _library
from mvpp_kernels._backend import has_compiled_kernel, triton_status
from mvpp_kernels.ops.cluster_lookup import cluster_lookup
from mvpp_kernels.ops.exact_search import exact_search
from mvpp_kernels.ops.frame_score import frame_score
from mvpp_kernels.ops.mhp_scan import mhp_scan
from mvpp_kernels.ops.selective_scan import selective_scan
from mvpp_kernels.testing import (assert_close, make_frame_score_inputs, make_memory_bank_data,
                                  make_selective_scan_inputs, poisoned_allocations, to_reference)

# frame_score's forward checker (scores, dense, top-k with the tie rule) lives in tests/ops.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "ops"))
from test_frame_score import check_forward as frame_score_check_forward  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
TRITON_OK = triton_status()[0]


def backend_param(name):
    if name == "triton":
        return pytest.param("triton", marks=[pytest.mark.triton, pytest.mark.skipif(not TRITON_OK, reason="triton is not importable")])
    return pytest.param("cpu", marks=pytest.mark.cpp)


BACKENDS = [backend_param("cpu"), backend_param("triton")]


def require(op: str, backend: str) -> str:
    """The device to run `backend` on. A missing C++ build fails (it is the product), not skips."""
    if backend == "cpu":
        if not _library.compiled_loaded():
            pytest.fail(f"the compiled extension is not loaded ({_library.compiled_status()})")
        if not has_compiled_kernel(op, "CPU"):
            pytest.fail(f"the compiled extension registers no CPU kernel for mvpp::{op}")
        return "cpu"
    return "cuda" if HAS_CUDA else "cpu"


# Dtypes each backend takes for activations (float64 only on cpu/reference; the interpreter runs
# float32 and float16 through numpy).
DTYPES = {"cpu": [torch.float32, torch.float64, torch.bfloat16], "triton": [torch.float32, torch.float16]}


def strided(x: torch.Tensor) -> torch.Tensor:
    """Same values, non-contiguous (last two dims stored transposed); autograd flows back to x."""
    if x.dim() < 2:
        return x
    return x.transpose(-1, -2).contiguous().transpose(-1, -2)


def lengths_for(draw, batch: int, L: int) -> torch.Tensor:
    lens = draw(st.lists(st.integers(0, L), min_size=batch, max_size=batch))
    lens[0] = L  # one full row always
    return torch.tensor(lens, dtype=torch.int64)


def weighted_loss(tensors, seed=3):
    """Fixed random weights on every output so every gradient path is exercised; NaN/-inf (padding) -> 0."""
    g = torch.Generator().manual_seed(seed)
    total = 0
    for t in tensors:
        if t is None or not t.is_floating_point():
            continue
        w = torch.randn(t.shape, generator=g, dtype=torch.float64)
        v = t.double().cpu()
        total = total + (torch.where(torch.isfinite(v), v, torch.zeros_like(v)) * w).sum()
    return total


def grads_close(names, mine, theirs, out_mine, out_ref, dtype, backend, scale=1.0):
    with poisoned_allocations():
        got = torch.autograd.grad(weighted_loss(out_mine), mine, allow_unused=True)
    want = torch.autograd.grad(weighted_loss(out_ref), theirs, allow_unused=True)
    for n, a, e, x in zip(names, got, want, mine):
        if e is None:
            continue
        assert a is not None, f"{backend}: no gradient for {n}"
        assert a.shape == x.shape, n
        assert_close(a, e, dtype, grad=True, name=f"{backend} d{n}", scale=scale)


# ---------------------------------------------------------------------------------------------
# selective_scan
# ---------------------------------------------------------------------------------------------
@st.composite
def scan_cases(draw, backend, with_dt=False):
    c = dict(
        batch=draw(st.integers(1, 3)), dim=draw(st.integers(1, 5)), N=draw(st.integers(1, 6)),
        L=draw(st.sampled_from([1, 2, 3, 7, 16, 33])),
        dtype=draw(st.sampled_from(DTYPES[backend])),
        layout=draw(st.sampled_from(["constant", "variable", "grouped"])),
        with_D=draw(st.booleans()), with_z=draw(st.booleans()), with_delta_bias=draw(st.booleans()),
        with_initial_state=draw(st.booleans()), softplus=draw(st.booleans()), last=draw(st.booleans()),
        noncontig=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
    )
    c["groups"] = draw(st.sampled_from([g for g in range(1, c["dim"] + 1) if c["dim"] % g == 0]))
    c["lengths"] = lengths_for(draw, c["batch"], c["L"]) if draw(st.booleans()) else None
    if with_dt:
        c["gaps"] = draw(st.lists(st.sampled_from([0.0, 1e-6, 0.3, 1.0, 2.0, 50.0]), min_size=c["L"], max_size=c["L"]))
        c["with_dt_end"] = draw(st.booleans())
    return c


def build_scan(c, device, with_dt=False):
    inp = make_selective_scan_inputs(c["batch"], c["dim"], c["N"], c["L"], dtype=c["dtype"], B_layout=c["layout"],
                                     groups=c["groups"], with_D=c["with_D"], with_z=c["with_z"], with_delta_bias=c["with_delta_bias"],
                                     with_initial_state=c["with_initial_state"], seed=c["seed"])
    if not c["softplus"]:
        # without softplus the step delta + delta_bias must stay positive (a decaying scan)
        inp["delta"] = inp["delta"].abs() + 0.05
        if inp["delta_bias"] is not None:
            inp["delta_bias"] = inp["delta_bias"].abs()
    if with_dt:
        sd = torch.float64 if c["dtype"] == torch.float64 else torch.float32
        g = torch.Generator().manual_seed(c["seed"] + 1)
        jitter = 0.5 + torch.rand(c["batch"], c["L"], generator=g, dtype=torch.float64)
        inp["dt"] = (torch.tensor(c["gaps"], dtype=torch.float64) * jitter).to(sd)
        inp["dt_end"] = (torch.rand(c["batch"], generator=g, dtype=torch.float64) * 2).to(sd) if c["with_dt_end"] else None
    inp["lengths"] = c["lengths"]
    out = {}
    for k, v in inp.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            if v.is_floating_point():
                v = v.detach().requires_grad_(True)
        out[k] = v
    return out


def _scan_inputs(inp, noncontig):
    f = strided if noncontig else (lambda x: x)
    return {k: (f(v) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inp.items()}


def run_selective_scan(inp, c, backend):
    x = _scan_inputs(inp, c["noncontig"])
    res = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"],
                         c["softplus"], c["last"], initial_state=x["initial_state"], lengths=x["lengths"],
                         backend=backend)
    return list(res) if isinstance(res, tuple) else [res]


SCAN_GRADS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_fuzz_selective_scan(backend, data):
    c = data.draw(scan_cases(backend))
    device = require("selective_scan_fwd", backend)
    inp = build_scan(c, device)
    ref_in = to_reference(inp)
    with poisoned_allocations():
        out = run_selective_scan(inp, c, backend)
    ref = run_selective_scan(ref_in, c, "reference")
    assert len(out) == len(ref)
    for i, (a, e) in enumerate(zip(out, ref)):
        assert_close(a, e, c["dtype"], name=f"{backend} output[{i}]")
    names = [k for k in SCAN_GRADS if inp.get(k) is not None]
    grads_close(names, [inp[k] for k in names], [ref_in[k] for k in names], out, ref, c["dtype"], backend)


# ---------------------------------------------------------------------------------------------
# mhp_scan
# ---------------------------------------------------------------------------------------------
def run_mhp_scan(inp, c, backend):
    x = _scan_inputs(inp, c["noncontig"])
    res = mhp_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["dt"], x["D"], x["z"], x["delta_bias"],
                   c["softplus"], x["dt_end"], x["lengths"], x["initial_state"], c["last"], backend=backend)
    return [res.y, res.y_left, res.integral, res.last_state]


MHP_GRADS = SCAN_GRADS + ("dt", "dt_end")


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_fuzz_mhp_scan(backend, data):
    c = data.draw(scan_cases(backend, with_dt=True))
    device = require("mhp_scan_fwd", backend)
    inp = build_scan(c, device, with_dt=True)
    ref_in = to_reference(inp)
    with poisoned_allocations():
        out = run_mhp_scan(inp, c, backend)
    ref = run_mhp_scan(ref_in, c, "reference")
    for name, a, e in zip(("y", "y_left", "integral", "last_state"), out, ref):
        assert (a is None) == (e is None), name
        if e is not None:
            assert_close(a, e, c["dtype"], name=f"{backend} {name}")
    names = [k for k in MHP_GRADS if inp.get(k) is not None]
    grads_close(names, [inp[k] for k in names], [ref_in[k] for k in names], out, ref, c["dtype"], backend)


# ---------------------------------------------------------------------------------------------
# frame_score
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_fuzz_frame_score(backend, data):
    batch = data.draw(st.integers(1, 4))
    T = data.draw(st.sampled_from([1, 2, 5, 9, 31, 64]))
    F = data.draw(st.sampled_from([1, 3, 8, 17, 64]))
    H = data.draw(st.sampled_from([None, None, 4, 16]))
    k = data.draw(st.integers(1, 10))
    dtype = data.draw(st.sampled_from(DTYPES[backend]))
    ties, with_bias, noncontig = data.draw(st.booleans()), data.draw(st.booleans()), data.draw(st.booleans())
    padded = data.draw(st.booleans())
    temperature = data.draw(st.sampled_from([0.3, 0.8, 1.0, 2.5]))
    seed = data.draw(st.integers(0, 2**16))
    device = require("frame_score_fwd", backend)
    inp = make_frame_score_inputs(batch, T, F, H=H, dtype=dtype, padded=padded, ties=ties, with_bias=with_bias,
                                  seed=seed, requires_grad=True, device=device)
    x = dict(inp)
    if noncontig:
        x["frames"] = strided(inp["frames"])
    with poisoned_allocations():
        out = frame_score(x["frames"], x["weight"], x["bias"], x["lengths"], k, temperature, x["hidden"], backend=backend)
    low = dtype in (torch.float16, torch.bfloat16)
    # scores of low-precision frames are float32 sums of rounded products: judge the top-k's
    # near-ties by the input dtype's table (as tests/ops does for half inputs)
    frame_score_check_forward(out, inp, k, temperature, dtype=dtype, score_dtype=dtype if low else None)
    ref_in = to_reference(inp)
    ref_in["hidden"] = tuple(to_reference({"a": t})["a"] for t in inp["hidden"]) if H else None
    ref = frame_score(ref_in["frames"], ref_in["weight"], ref_in["bias"], ref_in["lengths"], k, temperature,
                      ref_in["hidden"], backend="reference")
    # Only compare gradients where both picked the same frames (near-ties in low precision may
    # legitimately pick different frames, and the top-k frames' gradient follows the pick).
    if not torch.equal(out[2].cpu(), ref[2]):
        assume(False)
    names = ["frames", "weight"] + (["bias"] if with_bias else []) + (["W1", "b1"] if H else [])
    mine = [inp["frames"], inp["weight"]] + ([inp["bias"]] if with_bias else []) + (list(inp["hidden"]) if H else [])
    theirs = [ref_in["frames"], ref_in["weight"]] + ([ref_in["bias"]] if with_bias else []) + (list(ref_in["hidden"]) if H else [])
    sel = [0, 1, 3]  # scores, dense, topk_frames (topk_idx is integer)
    grads_close(names, mine, theirs, [out[i] for i in sel], [ref[i] for i in sel], dtype, backend)


# ---------------------------------------------------------------------------------------------
# exact_search (forward only: it has no gradient). Integer-valued keys make every score exact in
# every dtype, so ids must match the reference exactly, ties (-> lower id) included.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_fuzz_exact_search(backend, data):
    n = data.draw(st.integers(1, 70))
    d = data.draw(st.sampled_from([1, 2, 5, 16, 33]))
    nq = data.draw(st.integers(1, 6))
    k = data.draw(st.integers(1, n))
    kind = data.draw(st.sampled_from(["integer", "clustered"]))
    metric = data.draw(st.sampled_from(["ip", "cosine"])) if kind == "clustered" else "ip"
    dtype = data.draw(st.sampled_from(DTYPES[backend]))
    with_exclude = data.draw(st.booleans())
    seed = data.draw(st.integers(0, 2**16))
    device = require("exact_search", backend)
    keys, queries = make_memory_bank_data(n, d, nq, kind, seed=seed, dtype=dtype)
    exclude = None
    if with_exclude:
        g = torch.Generator().manual_seed(seed)
        exclude = torch.randint(-1, n, (nq,), generator=g)
    with poisoned_allocations():
        s, i = exact_search(keys.to(device), queries.to(device), k, metric,
                            exclude.to(device) if exclude is not None else None, backend=backend)
    rs, ri = exact_search(keys.double(), queries.double(), k, metric, exclude, backend="reference")
    assert s.shape == rs.shape and i.shape == ri.shape
    if kind == "integer":
        assert torch.equal(i.cpu(), ri), f"{backend} ids differ:\n{i}\n{ri}"
        assert torch.equal(s.cpu().double(), rs), f"{backend} scores differ"
    else:
        assert_close(s, rs, dtype, name=f"{backend} scores")
        # ids may differ from the reference's only between near-equal scores: the float64 score of
        # each returned id must match the reference's score at that rank
        kk, qq = keys.double(), queries.double()
        if metric == "cosine":
            kk = kk / kk.norm(dim=1, keepdim=True).clamp_min(1e-300)
            qq = qq / qq.norm(dim=1, keepdim=True).clamp_min(1e-300)
        full = qq @ kk.T
        ic = i.cpu()
        valid = ic >= 0
        assert torch.equal(valid, ri >= 0), "padding differs"
        picked = torch.where(valid, torch.gather(full, 1, ic.clamp_min(0)), rs)
        assert_close(picked, rs, dtype, name=f"{backend} score of the returned ids")
        for row in ic:
            r = row[row >= 0].tolist()
            assert len(set(r)) == len(r), f"repeated ids {r}"
        if exclude is not None:
            assert not bool(((ic == exclude[:, None]) & (exclude[:, None] >= 0)).any()), "returned an excluded id"


# ---------------------------------------------------------------------------------------------
# cluster_lookup (forward only). Integer-valued member keys and queries make every member score
# exact, so the backends must return the reference backend's result bit for bit (routing included:
# the reference routes with the same centroid dtype).
# ---------------------------------------------------------------------------------------------
from test_cluster_lookup import make_tree, tree_args  # noqa: E402


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_fuzz_cluster_lookup(backend, data):
    n = data.draw(st.integers(8, 120))
    d = data.draw(st.sampled_from([1, 3, 8, 17]))
    c1 = data.draw(st.integers(1, 4))
    cf = data.draw(st.integers(3 * c1, 3 * c1 + 4))  # make_tree needs >= 3 fine clusters per coarse one
    nq = data.draw(st.integers(1, 5))
    k = data.draw(st.integers(1, 8))
    nprobe = (data.draw(st.integers(1, c1)), data.draw(st.integers(1, cf)))
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16] if backend == "triton" else DTYPES["cpu"]))
    with_exclude = data.draw(st.booleans())
    seed = data.draw(st.integers(0, 2**16))
    device = require("cluster_lookup", backend)
    t = make_tree(n, d, c1, cf, seed=seed, dtype=dtype)
    _, queries = make_memory_bank_data(0, d, nq, "integer", seed=seed + 1, dtype=dtype)
    exclude = None
    if with_exclude:
        exclude = t["member_ids"][torch.randint(0, n, (nq,), generator=torch.Generator().manual_seed(seed))].clone()
        exclude[0] = -1
    want = cluster_lookup(queries, *tree_args(t), k, nprobe, exclude=exclude, backend="reference")
    with poisoned_allocations():
        got = cluster_lookup(queries.to(device), *(x.to(device) for x in tree_args(t)), k, nprobe,
                             exclude=exclude.to(device) if exclude is not None else None, backend=backend)
    assert torch.equal(got[1].cpu(), want[1]), f"{backend} ids differ\n{got[1]}\n{want[1]}"
    assert torch.equal(got[0].cpu().double(), want[0].double()), f"{backend} scores differ"
