"""The Triton backend of mhp_scan against the float64 reference.

Without a GPU these run under TRITON_INTERPRET=1 on CPU tensors (the root conftest switches the
interpreter on), which is slow: shapes are tiny, and multi-chunk paths are reached with a small
chunk_size passed to the op directly rather than with long sequences.
"""
from __future__ import annotations

import pytest
import torch

from mvpp_kernels.ops.mhp_scan import CHUNK_SIZE, mhp_scan
from mvpp_kernels.testing import assert_close, make_selective_scan_inputs, poisoned_allocations, to_reference

triton = pytest.importorskip("triton")
from mvpp_kernels.ops.mhp_scan import triton as mhp_triton  # noqa: E402

pytestmark = pytest.mark.triton

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"

GRAD_NAMES = ("u", "delta", "A", "B", "C", "dt", "D", "z", "delta_bias", "dt_end", "initial_state")


def make_inputs(batch=2, dim=3, N=4, L=9, *, dtype=torch.float32, layout="variable", gaps="mixed",
                lengths=None, with_h0=True, with_dt_end=True, seed=0, device=DEV):
    """Random mhp_scan inputs (never zero) with tied, tiny and huge gaps mixed in."""
    inp = make_selective_scan_inputs(batch, dim, N, L, dtype=dtype, B_layout=layout, with_initial_state=with_h0,
                                     seed=seed, device="cpu")
    g = torch.Generator().manual_seed(seed + 1000)
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    dt = torch.rand(batch, L, generator=g, dtype=torch.float64) * 2
    if gaps == "mixed" and L >= 4:
        dt[:, 1] = 0.0  # a tie
        dt[:, 2] = 1e-6
        dt[:, 3] = 1e4
    elif gaps == "huge":
        dt = dt * 1e6
    elif gaps == "tiny":
        dt = dt * 1e-6
    inp["dt"] = dt.to(sd)
    inp["dt_end"] = (torch.rand(batch, generator=g, dtype=torch.float64) * 3).to(sd) if with_dt_end else None
    inp["lengths"] = lengths
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}


def _grad_inputs(inp):
    out = {}
    for k, v in inp.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.detach().clone().requires_grad_(True)
        out[k] = v
    return out


def _run_op(inp, chunk_size, softplus=True):
    """The Triton op directly (so chunk_size can force several chunks), as the public wrapper calls it."""
    B = inp["B"].unsqueeze(1) if inp["B"].dim() == 3 else inp["B"]
    C = inp["C"].unsqueeze(1) if inp["C"].dim() == 3 else inp["C"]
    y, y_left, integral, last, _ = mhp_triton.mhp_scan_fwd_triton(
        inp["u"], inp["delta"], inp["A"], B, C, inp["dt"], inp["D"], inp["z"], inp["delta_bias"], inp["dt_end"],
        inp["lengths"], inp["initial_state"], softplus, chunk_size)
    return y, y_left, integral, last


def _reference(inp, softplus=True):
    ref = to_reference(_grad_inputs(inp))
    out = mhp_scan(ref["u"], ref["delta"], ref["A"], ref["B"], ref["C"], ref["dt"], ref["D"], ref["z"],
                   ref["delta_bias"], softplus, ref["dt_end"], ref["lengths"], ref["initial_state"], True,
                   backend="reference")
    return ref, tuple(out)


def _check(inp, dtype, chunk_size, softplus=True, grad_scale=1.0):
    """Forward and backward of the Triton op vs the float64 reference, outputs NaN-poisoned."""
    kin = _grad_inputs(inp)
    with poisoned_allocations():
        out = _run_op(kin, chunk_size, softplus)
    ref_in, ref = _reference(inp, softplus)
    for name, a, e in zip(("y", "y_left", "integral", "last_state"), out, ref):
        assert_close(a, e, dtype, name=name)
    gens = torch.Generator().manual_seed(7)
    cot = [torch.randn(e.shape, generator=gens, dtype=torch.float64) for e in ref]
    names = [k for k in GRAD_NAMES if isinstance(kin.get(k), torch.Tensor)]
    with poisoned_allocations():
        got = torch.autograd.grad(out, [kin[k] for k in names], [c.to(o.device, o.dtype) for c, o in zip(cot, out)])
    want = torch.autograd.grad(ref, [ref_in[k] for k in names], cot)
    for k, a, e in zip(names, got, want):
        assert a.shape == kin[k].shape and a.dtype == kin[k].dtype, k
        assert_close(a, e, dtype, grad=True, name=f"d{k}", scale=grad_scale)


# ---------------------------------------------------------------------------------------------
# Correctness against the reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["variable", "grouped", "constant"])
@pytest.mark.parametrize("chunk_size", [4, 64])
def test_matches_reference_layouts_and_chunks(layout, chunk_size):
    # L = 13 with chunk 4: four chunks, the last one partial; chunk 64: one tile, rows packed.
    inp = make_inputs(batch=2, dim=4, N=4, L=13, layout=layout, lengths=torch.tensor([13, 6], device=DEV))
    _check(inp, torch.float32, chunk_size)


@pytest.mark.parametrize("lengths", [[0, 1, 11], [11, 11, 11], [1, 0, 4]])
@pytest.mark.parametrize("with_h0", [True, False])
def test_lengths_zero_one_full(lengths, with_h0):
    inp = make_inputs(batch=3, dim=2, N=3, L=11, lengths=torch.tensor(lengths, device=DEV), with_h0=with_h0)
    _check(inp, torch.float32, 4)


@pytest.mark.parametrize("gaps", ["mixed", "huge", "tiny"])
def test_gap_extremes(gaps):
    # Ties, 1e-6 and 1e4 gaps in one sequence; all gaps up to 2e6; all gaps ~1e-6 (the phi series).
    inp = make_inputs(batch=2, dim=2, N=4, L=7, gaps=gaps)
    _check(inp, torch.float32, 4)


def test_zero_rate_uses_the_series():
    # delta_softplus=False with delta + bias ~ 0: A Δ dt -> 0, where (1 - e^x)/(-x) cancels catastrophically
    # unless the series is used; the gap integral must tend to C h dt.
    inp = make_inputs(batch=1, dim=3, N=4, L=6, gaps="mixed")
    inp["delta"] = (inp["delta"].abs() * 1e-7).to(inp["delta"].dtype)
    inp["delta_bias"] = torch.zeros_like(inp["delta_bias"])
    _check(inp, torch.float32, 4, softplus=False)


def test_odd_sizes_and_no_optionals():
    inp = make_inputs(batch=1, dim=5, N=3, L=1, with_h0=False, with_dt_end=False)
    inp.update(D=None, z=None, delta_bias=None)
    _check(inp, torch.float32, 64)
    inp = make_inputs(batch=3, dim=1, N=5, L=17, with_h0=False)
    # Without softplus the step must be >= 0 (the wrapper's contract): a decaying state.
    inp.update(z=None, delta=inp["delta"].abs(), delta_bias=inp["delta_bias"].abs())
    _check(inp, torch.float32, 8, softplus=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    # float32 accumulation; y and du/ddelta/dz are rounded to the input dtype, the rest stay float32.
    inp = make_inputs(batch=2, dim=3, N=4, L=10, dtype=dtype, lengths=torch.tensor([10, 7], device=DEV))
    _check(inp, dtype, 4)


def test_float64_inputs_compute_in_float64():
    inp = make_inputs(batch=2, dim=2, N=3, L=7, dtype=torch.float64, lengths=torch.tensor([7, 3], device=DEV))
    _check(inp, torch.float64, 4)


def test_padding_is_never_read():
    # Kernel contract: positions at or past lengths[b] may hold NaN and must not leak anywhere.
    inp = make_inputs(batch=2, dim=3, N=4, L=9, lengths=torch.tensor([5, 9], device=DEV))
    clean = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    for k in ("u", "delta", "z"):
        inp[k][0, :, 5:] = float("nan")
    for k in ("B", "C"):
        inp[k][0, ..., 5:] = float("nan")
    inp["dt"][0, 5:] = float("nan")
    kin = _grad_inputs(inp)
    out = _run_op(kin, 4)
    _, ref = _reference(clean)
    for name, a, e in zip(("y", "y_left", "integral", "last_state"), out, ref):
        assert_close(a, e, torch.float32, name=name)
    grads = torch.autograd.grad(sum(o.sum() for o in out), [kin[k] for k in GRAD_NAMES])
    for k, gr in zip(GRAD_NAMES, grads):
        assert torch.isfinite(gr).all(), f"NaN padding leaked into d{k}"


def test_public_wrapper_dispatches_to_triton():
    inp = make_inputs(batch=2, dim=2, N=3, L=6, lengths=torch.tensor([6, 2], device=DEV))
    out = mhp_scan(**inp, delta_softplus=True, return_last_state=True, backend="triton")
    _, ref = _reference(inp)
    for a, e in zip(out, ref):
        assert_close(a, e, torch.float32)
    assert CHUNK_SIZE["triton"] & (CHUNK_SIZE["triton"] - 1) == 0


def test_backward_is_deterministic():
    inp = make_inputs(batch=2, dim=4, N=4, L=12, layout="grouped", lengths=torch.tensor([12, 5], device=DEV))
    runs = []
    for _ in range(2):
        kin = _grad_inputs(inp)
        out = _run_op(kin, 4)
        runs.append(torch.autograd.grad(out, [kin[k] for k in GRAD_NAMES], [torch.ones_like(o) for o in out]))
    for k, a, b in zip(GRAD_NAMES, *runs):
        assert torch.equal(a, b), f"d{k} differs between two identical backward runs"


def test_rejects_non_power_of_two_chunk():
    inp = make_inputs(batch=1, dim=1, N=2, L=4)
    with pytest.raises(ValueError, match="power-of-two chunk_size"):
        _run_op(inp, 6)


# ---------------------------------------------------------------------------------------------
# opcheck / torch.compile
# ---------------------------------------------------------------------------------------------
def _op_args(inp, chunk_size=4):
    B = inp["B"].unsqueeze(1) if inp["B"].dim() == 3 else inp["B"]
    C = inp["C"].unsqueeze(1) if inp["C"].dim() == 3 else inp["C"]
    return (inp["u"], inp["delta"], inp["A"], B, C, inp["dt"], inp["D"], inp["z"], inp["delta_bias"],
            inp["dt_end"], inp["lengths"], inp["initial_state"], True, chunk_size)


# Under the interpreter, test_aot_dispatch_dynamic fails: AOTAutograd hands the launch tensors
# whose storage has no data pointer and the interpreter dereferences every pointer argument (it also
# takes minutes). Schema, fake (shape-only fakes registered for the interpreter) and autograd
# registration checks work; the full opcheck runs on the GPU below.
_CPU_OPCHECK_UTILS = ("test_schema", "test_faketensor", "test_autograd_registration")


@pytest.mark.skipif(HAS_CUDA, reason="the full opcheck runs on the GPU instead")
def test_opcheck_interpreter_subset():
    inp = make_inputs(batch=2, dim=2, N=3, L=6, lengths=torch.tensor([6, 3]), device="cpu")
    args = _op_args(inp)
    torch.library.opcheck(torch.ops.mvpp.mhp_scan_fwd_triton.default, args, test_utils=_CPU_OPCHECK_UTILS)
    y, y_left, integral, last, cs = mhp_triton.mhp_scan_fwd_triton(*args)
    bwd_args = (torch.randn_like(y), torch.randn_like(y_left), torch.randn_like(integral), torch.randn_like(last),
                *args[:12], cs, True, 4, True)
    torch.library.opcheck(torch.ops.mvpp.mhp_scan_bwd_triton.default, bwd_args, test_utils=_CPU_OPCHECK_UTILS)


@pytest.mark.cuda
def test_opcheck_full_cuda():
    inp = make_inputs(batch=2, dim=4, N=8, L=37, lengths=torch.tensor([37, 20], device="cuda"), device="cuda")
    args = _op_args(_grad_inputs(inp), 16)
    torch.library.opcheck(torch.ops.mvpp.mhp_scan_fwd_triton.default, args)
    y, y_left, integral, last, cs = mhp_triton.mhp_scan_fwd_triton(*[a.detach() if isinstance(a, torch.Tensor) else a
                                                                    for a in args])
    bwd_args = (torch.randn_like(y), torch.randn_like(y_left), torch.randn_like(integral), torch.randn_like(last),
                *[a.detach() if isinstance(a, torch.Tensor) else a for a in args[:12]], cs, True, 16, True)
    torch.library.opcheck(torch.ops.mvpp.mhp_scan_bwd_triton.default, bwd_args)


@pytest.mark.cuda
def test_torch_compile_cuda():
    inp = make_inputs(batch=4, dim=8, N=16, L=100, lengths=torch.tensor([100, 1, 0, 57], device="cuda"),
                      device="cuda")

    def f(**kw):
        out = mhp_scan(**kw, delta_softplus=True, return_last_state=True, backend="triton")
        return out.y.float().sum() + out.y_left.sum() + out.integral.sum() + out.last_state.sum()

    kin = _grad_inputs(inp)
    loss = torch.compile(f, fullgraph=False)(**kin)
    grads = torch.autograd.grad(loss, [kin[k] for k in GRAD_NAMES])
    kin2 = _grad_inputs(inp)
    loss2 = f(**kin2)
    grads2 = torch.autograd.grad(loss2, [kin2[k] for k in GRAD_NAMES])
    torch.testing.assert_close(loss, loss2)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("L", [128, 2049])
def test_gpu_shapes_match_reference(L):
    # Real tile sizes on the GPU: packed rows at L = 128, several 64-event chunks at L = 2049.
    inp = make_inputs(batch=3, dim=8, N=16, L=L, dtype=torch.bfloat16,
                      lengths=torch.tensor([L, L // 2, 1], device="cuda"), device="cuda")
    _check(inp, torch.bfloat16, CHUNK_SIZE["triton"], grad_scale=2.0)


# ---------------------------------------------------------------------------------------------
# GPU code generation without a GPU
# ---------------------------------------------------------------------------------------------
_COMPILE_SCRIPT = r"""
import os, time
import torch
os.environ.pop("TRITON_INTERPRET", None)
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mvpp_kernels.ops.mhp_scan import triton as K

IO = {"u_ptr", "delta_ptr", "z_ptr", "y_ptr", "dy_ptr", "du_ptr", "ddelta_ptr", "dz_ptr", "B_ptr", "C_ptr"}
INTS = {"n_rows", "dim", "L", "N", "dpg_B", "dpg_C", "G_B", "G_C", "n_chunks"}

def sig_for(kern, io, consts):
    sig = {}
    for name in kern.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in INTS:
            sig[name] = "i32"
        elif name == "len_ptr":
            sig[name] = "*i64"
        else:
            sig[name] = io if name in IO else "*fp32"
    return sig

# bf16, variable B/C, every optional input, one 64-event tile per program; fp32, constant B/C, no
# optionals, four packed rows of a 16-event tile. Geometry and warps as _geometry picks them.
for io, full, L, N, rows in (("*bf16", True, 2048, 16, 4096), ("*fp32", False, 16, 16, 4096)):
    R, BL, NP, nw = K._geometry(rows, L, N, 64)
    flags = {f: full for f in ("HAS_D", "HAS_Z", "HAS_DB", "HAS_DTEND", "HAS_LEN", "HAS_H0", "SOFTPLUS",
                                "B_VAR", "C_VAR")}
    common = dict(flags, R=R, BL=BL, NP=NP, TERMS=9, CT=tl.float32, **K._limits(torch.float32))
    bwd = dict(common, HAS_DYL=full, HAS_DINT=full, HAS_DLAST=full)
    for kern, consts in ((K._mhp_scan_fwd_kernel, common), (K._mhp_scan_bwd_kernel, bwd)):
        t0 = time.time()
        triton.compile(ASTSource(kern, sig_for(kern, io, consts), consts), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=nw))
        print("compiled", kern.__name__, io, R, BL, NP, nw, round(time.time() - t0, 1), flush=True)
"""


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the other tests compile the kernels for real")
def test_triton_kernels_compile_for_sm90():
    """The interpreter runs kernels as Python and misses what only GPU code generation rejects (it did
    catch a loop-carried variable changing shape here). Triton bundles ptxas, so compiling for sm_90
    needs no GPU; it runs in a subprocess without TRITON_INTERPRET."""
    import os
    import subprocess
    import sys

    nvidia = pytest.importorskip("triton.backends.nvidia")
    if not os.path.exists(os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas")):
        pytest.skip("this triton install has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("compiled") == 4, res.stdout
