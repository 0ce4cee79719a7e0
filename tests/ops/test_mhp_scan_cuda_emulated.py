"""The CUDA mhp_scan kernels, run on the CPU.

g++ compiles the very kernel functions of csrc/include/mvpp/mhp_scan.cuh for the host, with host
stand-ins for the CUDA headers (tests/ops/cuda_emulation/): each warp's 32 threads run as OS threads
and a warp shuffle is an exchange between two barriers, so the row groups of lanes, their
shuffle reductions, the state-per-lane indexing and the chunked backward all run as on the GPU. This
test drives them through ctypes and compares forward and backward with the float64 reference. What
it cannot check: fp16/bf16 loads, GPU memory/launch behaviour and the torch binding -- covered by
tests/ops/test_mhp_scan_cuda.py on a GPU.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import pytest
import torch

from mvpp_kernels.ops.mhp_scan import mhp_scan
from mvpp_kernels.testing import assert_close, make_selective_scan_inputs, to_reference

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
GRAD_NAMES = ("u", "delta", "A", "B", "C", "dt", "D", "z", "delta_bias", "dt_end", "initial_state")

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the host emulation")


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    out = tmp_path_factory.mktemp("mhp_emul") / "libmhp_emul.so"
    cmd = ["g++", "-O2", "-std=c++20", "-pthread", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas", "-Werror",
           "-I", os.path.join(HERE, "cuda_emulation"), "-I", os.path.join(ROOT, "csrc", "include"),
           os.path.join(HERE, "cuda_emulation", "mhp_scan_emul.cpp"), "-o", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    so = ctypes.CDLL(str(out))
    for f in (so.mhp_emul_fwd, so.mhp_emul_bwd):
        f.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_void_p)]
        f.restype = ctypes.c_int
    return so


def _ptr(t):
    return None if t is None else t.data_ptr()


def _prep(inp):
    """What the torch binding does: contiguous float32 tensors, B/C as (dim, N) or (batch, G, N, L)."""
    f = lambda t: None if t is None else t.detach().to(torch.float32).contiguous()  # noqa: E731
    B, C = inp["B"], inp["C"]
    B = B.unsqueeze(1) if B.dim() == 3 else B
    C = C.unsqueeze(1) if C.dim() == 3 else C
    lengths = inp["lengths"].to(torch.int64).contiguous() if inp["lengths"] is not None else None
    return dict(u=f(inp["u"]), delta=f(inp["delta"]), z=f(inp["z"]), B=f(B), C=f(C), A=f(inp["A"]), D=f(inp["D"]),
                delta_bias=f(inp["delta_bias"]), dt=f(inp["dt"]), dt_end=f(inp["dt_end"]), lengths=lengths,
                h0=f(inp["initial_state"]))


def run_emulated(lib, inp, cot, chunk_size, deterministic=True, softplus=True, max_lanes=32):
    """Forward, then backward with cotangents `cot`, through the host-compiled CUDA kernels. Returns
    the forward outputs and the gradients reduced exactly as the autograd glue reduces them."""
    p = _prep(inp)
    batch, dim, L = p["u"].shape
    N = p["A"].shape[1]
    GB = p["B"].shape[1] if p["B"].dim() == 4 else 0
    GC = p["C"].shape[1] if p["C"].dim() == 4 else 0
    n_chunks = (L + chunk_size - 1) // chunk_size
    ints = (ctypes.c_int64 * 10)(batch, dim, L, N, GB, GC, chunk_size, int(softplus), int(deterministic), max_lanes)
    base = [p[k] for k in ("u", "delta", "z", "B", "C", "A", "D", "delta_bias", "dt", "dt_end", "lengths", "h0")]
    nan = lambda *s: torch.full(s, float("nan"))  # noqa: E731  (unwritten outputs show)
    cs = nan(batch, dim, n_chunks, N)
    y, yl, integral, last = nan(batch, dim, L), nan(batch, dim, L), nan(batch, dim), nan(batch, dim, N)
    ptrs = (ctypes.c_void_p * 17)(*[_ptr(t) for t in base + [cs, y, yl, integral, last]])
    assert lib.mhp_emul_fwd(ints, ptrs) == 0

    dy, dyl, dint, dlast = (c.to(torch.float32).contiguous() for c in cot)
    du, ddelta, dz = nan(batch, dim, L), nan(batch, dim, L), nan(batch, dim, L)
    dA, dD, ddb, ddt, ddte, dh0 = (nan(batch, dim, N), nan(batch, dim), nan(batch, dim), nan(batch, dim, L),
                                   nan(batch, dim), nan(batch, dim, N))

    def dbc(G):
        if G == 0:
            return nan(batch, dim, N)
        return nan(batch, dim, N, L) if deterministic else torch.zeros(batch, G, N, L)

    dB, dC = dbc(GB), dbc(GC)
    outs = [dy, dyl, dint, dlast, du, ddelta, dz, dA, dB, dC, dD, ddb, ddt, ddte, dh0]
    ptrs = (ctypes.c_void_p * 28)(*[_ptr(t) for t in base + [cs] + outs])
    assert lib.mhp_emul_bwd(ints, ptrs) == 0
    if GB and deterministic:
        dB = dB.view(batch, GB, dim // GB, N, L).sum(2)
    if GC and deterministic:
        dC = dC.view(batch, GC, dim // GC, N, L).sum(2)
    squeeze = lambda X, orig: X.squeeze(1) if orig.dim() == 3 else X  # noqa: E731
    grads = dict(
        u=du, delta=ddelta, A=dA.sum(0), B=squeeze(dB, inp["B"]) if GB else dB.sum(0),
        C=squeeze(dC, inp["C"]) if GC else dC.sum(0), dt=ddt.sum(1), D=dD.sum(0), z=dz, delta_bias=ddb.sum(0),
        dt_end=ddte.sum(1), initial_state=dh0,
    )
    return (y, yl, integral, last), grads


def make_inputs(batch, dim, N, L, *, layout="variable", lengths=None, with_h0=True, with_dt_end=True, seed=0,
                gaps="mixed"):
    inp = make_selective_scan_inputs(batch, dim, N, L, B_layout=layout, with_initial_state=with_h0, seed=seed)
    g = torch.Generator().manual_seed(seed + 1000)
    dt = torch.rand(batch, L, generator=g, dtype=torch.float64) * 2
    if gaps == "mixed" and L >= 4:
        dt[:, 1], dt[:, 2], dt[:, 3] = 0.0, 1e-6, 1e4
    elif gaps == "huge":
        dt = dt * 1e6
    inp["dt"] = dt.float()
    inp["dt_end"] = (torch.rand(batch, generator=g, dtype=torch.float64) * 3).float() if with_dt_end else None
    inp["lengths"] = torch.tensor(lengths) if lengths is not None else None
    return inp


def check(lib, inp, chunk_size, deterministic=True, softplus=True, max_lanes=32):
    ref_in = to_reference({k: (v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor)
                                and v.is_floating_point() else v) for k, v in inp.items()})
    ref = tuple(mhp_scan(ref_in["u"], ref_in["delta"], ref_in["A"], ref_in["B"], ref_in["C"], ref_in["dt"],
                         ref_in["D"], ref_in["z"], ref_in["delta_bias"], softplus, ref_in["dt_end"],
                         ref_in["lengths"], ref_in["initial_state"], True, backend="reference"))
    gen = torch.Generator().manual_seed(5)
    cot = [torch.randn(e.shape, generator=gen, dtype=torch.float64) for e in ref]
    out, grads = run_emulated(lib, inp, cot, chunk_size, deterministic, softplus, max_lanes)
    for name, a, e in zip(("y", "y_left", "integral", "last_state"), out, ref):
        assert_close(a, e, torch.float32, name=name)
    names = [k for k in GRAD_NAMES if isinstance(inp.get(k), torch.Tensor)]
    want = torch.autograd.grad(ref, [ref_in[k] for k in names], cot)
    for k, e in zip(names, want):
        assert_close(grads[k], e, torch.float32, grad=True, name=f"d{k}")


@pytest.mark.parametrize("layout, chunk_size", [("variable", 1), ("variable", 100), ("grouped", 5),
                                                ("grouped", 64), ("constant", 100), ("constant", 7)])
def test_emulated_kernels_match_reference(lib, layout, chunk_size):
    # chunk 100 > kHist = 64: the backward recomputes the chunk's history in two sub-blocks.
    # N = 5: 8 lanes per row (3 idle), 16 rows per forward block, 8 per backward block.
    inp = make_inputs(3, 4, 5, 130, layout=layout, lengths=[130, 0, 71])
    check(lib, inp, chunk_size)


@pytest.mark.parametrize("N", [1, 16, 48])
def test_emulated_state_sizes(lib, N):
    # 1 lane per row; 16 lanes (two rows per warp); a full warp holding 2 states per lane (kMaxK = 8)
    # with lanes 16..31 idle for the second. 5 rows leave the last block partly empty. (Each shuffle
    # is two barriers of 32 OS threads, so the shapes stay small.)
    inp = make_inputs(1, 5, N, 40, lengths=[33])
    check(lib, inp, 16)


@pytest.mark.parametrize("N, max_lanes", [(16, 4), (48, 2), (5, 1)])
def test_emulated_fewer_lanes_per_row(lib, N, max_lanes):
    # MVPP_MHP_SCAN_LANES caps the lanes: 4 lanes x 4 states; 2 asked, raised to 8 lanes x 6 states
    # (at most 8 per lane); 1 lane x 5 states.
    inp = make_inputs(2, 3, N, 40, lengths=[40, 21])
    check(lib, inp, 16, max_lanes=max_lanes)


@pytest.mark.parametrize("lengths", [[1, 2, 130], [130, 130, 129]])
def test_emulated_lengths_and_optionals(lib, lengths):
    inp = make_inputs(3, 2, 8, 130, with_h0=False, with_dt_end=False, lengths=lengths)
    inp.update(D=None, z=None, delta_bias=None)
    inp["delta"] = inp["delta"].abs()  # no softplus: the step must be >= 0
    check(lib, inp, 64, softplus=False)


def test_emulated_huge_gaps_and_atomic_path(lib):
    inp = make_inputs(2, 4, 3, 40, layout="grouped", lengths=[40, 33], gaps="huge")
    check(lib, inp, 16, deterministic=False)


def test_emulated_padding_is_never_read(lib):
    inp = make_inputs(2, 2, 4, 20, lengths=[9, 20])
    clean = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    for k in ("u", "delta", "z"):
        inp[k][0, :, 9:] = float("nan")
    for k in ("B", "C"):
        inp[k][0, ..., 9:] = float("nan")
    inp["dt"][0, 9:] = float("nan")
    cot = [torch.randn(2, 2, 20), torch.randn(2, 2, 20), torch.randn(2, 2), torch.randn(2, 2, 4)]
    out, grads = run_emulated(lib, inp, cot, 8)
    out_clean, grads_clean = run_emulated(lib, clean, cot, 8)
    for a, b in zip(out, out_clean):
        assert torch.equal(a, b)
    for k in grads:
        assert torch.equal(grads[k], grads_clean[k]), f"NaN padding changed d{k}"
