"""The CUDA C++ backend of mhp_scan (csrc/cuda/mhp_scan.cu, csrc/include/mvpp/mhp_scan.cuh) against
the float64 reference. Needs a GPU and the CUDA extension: every test is marked `cuda` (auto-skipped
without a GPU) and skips when the extension has no CUDA kernel for the op.
"""
from __future__ import annotations

import pytest
import torch

from mvpp_kernels._backend import has_compiled_kernel
from mvpp_kernels.ops.mhp_scan import CHUNK_SIZE, mhp_scan
from mvpp_kernels.testing import assert_close, make_selective_scan_inputs, poisoned_allocations, to_reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (torch.cuda.is_available() and has_compiled_kernel("mhp_scan_fwd", "CUDA")),
                       reason="needs a GPU and the CUDA extension with mhp_scan"),
]

GRAD_NAMES = ("u", "delta", "A", "B", "C", "dt", "D", "z", "delta_bias", "dt_end", "initial_state")


def make_inputs(batch, dim, N, L, *, dtype=torch.float32, layout="variable", lengths=None, with_h0=True,
                with_dt_end=True, seed=0):
    """Random inputs on the GPU with tied, 1e-6 and 1e4 gaps mixed in."""
    inp = make_selective_scan_inputs(batch, dim, N, L, dtype=dtype, B_layout=layout, with_initial_state=with_h0,
                                     seed=seed)
    g = torch.Generator().manual_seed(seed + 1000)
    dt = torch.rand(batch, L, generator=g, dtype=torch.float64) * 2
    if L >= 4:
        dt[:, 1], dt[:, 2], dt[:, 3] = 0.0, 1e-6, 1e4
    inp["dt"] = dt.float()
    inp["dt_end"] = (torch.rand(batch, generator=g, dtype=torch.float64) * 3).float() if with_dt_end else None
    inp["lengths"] = torch.tensor(lengths) if lengths is not None else None
    return {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}


def _leaf(inp):
    return {k: (v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point()
                else v) for k, v in inp.items()}


def _call(inp, backend):
    return mhp_scan(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], inp["dt"], inp["D"], inp["z"],
                    inp["delta_bias"], True, inp["dt_end"], inp["lengths"], inp["initial_state"], True,
                    backend=backend)


def check_against_reference(inp, dtype, grad_scale=1.0):
    kin = _leaf(inp)
    with poisoned_allocations():
        out = tuple(_call(kin, "cuda"))
    ref_in = to_reference(_leaf(inp))
    ref = tuple(_call(ref_in, "reference"))
    for name, a, e in zip(("y", "y_left", "integral", "last_state"), out, ref):
        assert_close(a, e, dtype, name=name)
    gen = torch.Generator().manual_seed(3)
    cot = [torch.randn(e.shape, generator=gen, dtype=torch.float64) for e in ref]
    names = [k for k in GRAD_NAMES if isinstance(kin.get(k), torch.Tensor)]
    with poisoned_allocations():
        got = torch.autograd.grad(out, [kin[k] for k in names], [c.to("cuda", o.dtype) for c, o in zip(cot, out)])
    want = torch.autograd.grad(ref, [ref_in[k] for k in names], cot)
    for k, a, e in zip(names, got, want):
        assert a.shape == kin[k].shape and a.dtype == kin[k].dtype, k
        assert_close(a, e, dtype, grad=True, name=f"d{k}", scale=grad_scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["variable", "grouped", "constant"])
def test_matches_reference_short_packed(dtype, layout):
    # L <= 256: several rows per block (N = 16 -> 16 lanes per row, 8 rows per forward block).
    inp = make_inputs(4, 24, 16, 100, dtype=dtype, layout=layout, lengths=[100, 0, 1, 63])
    check_against_reference(inp, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_long_several_chunks(dtype):
    # 2049 events: 33 saved chunks of CHUNK_SIZE["cuda"] events, the last one a single event.
    inp = make_inputs(2, 8, 16, 2049, dtype=dtype, lengths=[2049, 1500])
    check_against_reference(inp, dtype, grad_scale=2.0)


@pytest.mark.parametrize("N", [1, 5, 32, 48, 256])
def test_state_sizes(N):
    # N <= 32: one state per lane (kMaxK = 1); N > 32: several per lane (kMaxK = 8), up to kMaxDState.
    inp = make_inputs(2, 6, N, 37, lengths=[37, 20])
    check_against_reference(inp, torch.float32)


def test_no_optionals_and_lengths():
    inp = make_inputs(3, 5, 8, 65, with_h0=False, with_dt_end=False, lengths=[65, 64, 0])
    inp.update(D=None, z=None, delta_bias=None)
    check_against_reference(inp, torch.float32)


def test_padding_is_never_read():
    inp = make_inputs(2, 4, 16, 70, lengths=[30, 70])
    clean = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    for k in ("u", "delta", "z"):
        inp[k][0, :, 30:] = float("nan")
    for k in ("B", "C"):
        inp[k][0, ..., 30:] = float("nan")
    inp["dt"][0, 30:] = float("nan")
    kin = _leaf(inp)
    out = _call(kin, "cuda")
    ref = _call(to_reference(clean), "reference")
    for a, e in zip(out, ref):
        assert_close(a, e, torch.float32)
    grads = torch.autograd.grad(sum(o.float().sum() for o in out), [kin[k] for k in GRAD_NAMES])
    for k, gr in zip(GRAD_NAMES, grads):
        assert torch.isfinite(gr).all(), f"NaN padding leaked into d{k}"


def _op_args(inp, chunk_size):
    B = inp["B"].unsqueeze(1) if inp["B"].dim() == 3 else inp["B"]
    C = inp["C"].unsqueeze(1) if inp["C"].dim() == 3 else inp["C"]
    return (inp["u"], inp["delta"], inp["A"], B, C, inp["dt"], inp["D"], inp["z"], inp["delta_bias"],
            inp["dt_end"], inp["lengths"], inp["initial_state"], True, chunk_size)


@pytest.mark.parametrize("layout", ["variable", "grouped"])
def test_deterministic_backward_is_bit_identical(layout):
    inp = make_inputs(3, 32, 16, 300, dtype=torch.bfloat16, layout=layout, lengths=[300, 299, 17])
    args = _op_args(inp, CHUNK_SIZE["cuda"])
    y, yl, integral, last, cs = torch.ops.mvpp.mhp_scan_fwd(*args)
    grads = (torch.randn_like(y), torch.randn_like(yl), torch.randn_like(integral), torch.randn_like(last))
    bwd = lambda det: torch.ops.mvpp.mhp_scan_bwd(*grads, *args[:12], cs, True, CHUNK_SIZE["cuda"], det)  # noqa: E731
    first, second = bwd(True), bwd(True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    # The atomic path computes the same sums in another order.
    fast = bwd(False)
    for a, b in zip(first, fast):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 200])
def test_any_chunk_size(chunk_size):
    # chunk_size > 64 recomputes sub-blocks of the history; odd ones end chunks mid-tile.
    inp = make_inputs(2, 4, 8, 150, lengths=[150, 77])
    args = _op_args(inp, chunk_size)
    out = torch.ops.mvpp.mhp_scan_fwd(*args)
    ref = _call(to_reference(inp), "reference")
    for a, e in zip(out[:4], ref):
        assert_close(a, e, torch.float32)
    cot = [torch.randn_like(o) for o in out[:4]]
    g = torch.ops.mvpp.mhp_scan_bwd(*cot, *args[:12], out[4], True, chunk_size, True)
    g64 = torch.ops.mvpp.mhp_scan_bwd(*cot, *_op_args(inp, 64)[:12], torch.ops.mvpp.mhp_scan_fwd(*_op_args(inp, 64))[4],
                                      True, 64, True)
    for a, b in zip(g, g64):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_opcheck():
    inp = make_inputs(2, 4, 8, 37, lengths=[37, 20])
    args = _op_args(inp, CHUNK_SIZE["cuda"])
    torch.library.opcheck(torch.ops.mvpp.mhp_scan_fwd.default, args)
    y, yl, integral, last, cs = torch.ops.mvpp.mhp_scan_fwd(*args)
    bwd_args = (torch.randn_like(y), torch.randn_like(yl), torch.randn_like(integral), torch.randn_like(last),
                *args[:12], cs, True, CHUNK_SIZE["cuda"], True)
    torch.library.opcheck(torch.ops.mvpp.mhp_scan_bwd.default, bwd_args)


def test_torch_compile():
    inp = make_inputs(4, 8, 16, 100, lengths=[100, 1, 0, 57])

    def f(**kw):
        out = _call(kw, "cuda")
        return out.y.sum() + out.y_left.sum() + out.integral.sum() + out.last_state.sum()

    kin, kin2 = _leaf(inp), _leaf(inp)
    loss = torch.compile(f)(**kin)
    loss2 = f(**kin2)
    torch.testing.assert_close(loss, loss2)
    for a, b in zip(torch.autograd.grad(loss, [kin[k] for k in GRAD_NAMES]),
                    torch.autograd.grad(loss2, [kin2[k] for k in GRAD_NAMES])):
        torch.testing.assert_close(a, b)


def test_bad_input_is_a_clear_error():
    inp = make_inputs(1, 2, 4, 8)
    args = list(_op_args(inp, 64))
    args[0] = args[0].double()
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        torch.ops.mvpp.mhp_scan_fwd(*args)
    args = list(_op_args(inp, 64))
    args[5] = args[5][:, :4]
    with pytest.raises(RuntimeError, match="dt must have shape"):
        torch.ops.mvpp.mhp_scan_fwd(*args)
