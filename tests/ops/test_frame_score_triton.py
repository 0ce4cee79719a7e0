"""frame_score's Triton backend against the float64 reference.

Without a GPU this runs under TRITON_INTERPRET=1 (set by the root conftest), which executes every
program in numpy: the grid here is a subset of test_frame_score.py's, chosen so each issue axis
value still appears -- T in {1, 7, 100, 1000, 4097} (1000 and 4097 take the split + merge path, the
interpreter's chunk is 512 frames), F in {64, 768, 1000}, k in {1, 8, 16} incl. k > length -- with
small F where T is large. The file stays well under 90 s on 2 cores.
"""
from __future__ import annotations

import pytest
import torch

from mvpp_kernels._backend import triton_status
from mvpp_kernels.testing import make_frame_score_inputs, poisoned_allocations

# tests/ops is not a package; pytest's default (prepend) import mode puts it on sys.path.
from test_frame_score import _op_args, _Pool, call, check_forward, grads_vs_reference

pytestmark = [pytest.mark.triton, pytest.mark.skipif(not triton_status()[0], reason="triton is not importable")]

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"


@pytest.mark.parametrize(
    "T,F,k,H",
    [
        (1, 64, 8, None),
        (7, 1000, 16, 16),
        (100, 768, 1, None),
        (100, 64, 8, 128),
        (1000, 64, 16, None),
        (1000, 96, 8, 32),
        (4097, 64, 8, None),
    ],
)
def test_forward(T, F, k, H):
    inp = make_frame_score_inputs(3, T, F, H=H, seed=T + F + k, device=DEV)
    with poisoned_allocations():
        out = call(inp, k, backend="triton")
    check_forward(out, inp, k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H", [None, 16])
def test_forward_low_precision(dtype, H):
    inp = make_frame_score_inputs(3, 40, 64, H=H, dtype=dtype, seed=3, device=DEV)
    with poisoned_allocations():
        out = call(inp, 8, backend="triton")
    # The MLP's tl.dot runs in the frames' dtype (W1 rounded to it, as tensor cores need): the scores
    # then carry that rounding, so they and the near-tie order are judged at the dtype's tolerance.
    check_forward(out, inp, 8, scale=2.0, score_dtype=dtype if H else None)


@pytest.mark.parametrize("H", [None, 16])
def test_ties_and_empty(H):
    inp = make_frame_score_inputs(3, 100, 64, H=H, ties=True, seed=11, device=DEV)
    with poisoned_allocations():
        out = call(inp, 16, backend="triton")
    check_forward(out, inp, 16)
    same = dict(inp, frames=inp["frames"][:, :1].expand(3, 100, 64).contiguous(),
                lengths=torch.tensor([100, 5, 0], device=DEV))
    _, dense, idx, tf = call(same, 8, backend="triton")
    assert idx[0].tolist() == list(range(8))
    assert idx[1].tolist() == [0, 1, 2, 3, 4, -1, -1, -1]
    assert idx[2].tolist() == [-1] * 8 and bool((dense[2] == 0).all()) and bool((tf[2] == 0).all())


@pytest.mark.parametrize("T,F,H,k", [(100, 64, None, 8), (700, 48, None, 16), (63, 1000, 16, 8), (40, 64, 128, 9)])
def test_grads_vs_reference(T, F, H, k):
    grads_vs_reference("triton", T, F, H, torch.float32, k, device=DEV)


def test_grads_bf16():
    grads_vs_reference("triton", 50, 64, None, torch.bfloat16, 8, device=DEV)


@pytest.mark.parametrize("H", [None, 4])
def test_opcheck(H):
    from mvpp_kernels.ops.frame_score import triton as fs_triton

    inp, args = _op_args(H, device=DEV)
    # Under the interpreter, torch.library.wrap_triton hands back the plain interpreted kernel, which
    # cannot run on the fake tensors that test_aot_dispatch_* trace with; schema and fake-tensor
    # checks work there. On a GPU, every check runs.
    utils = None if HAS_CUDA else ("test_schema", "test_faketensor")
    kw = {} if utils is None else {"test_utils": utils}
    torch.library.opcheck(fs_triton.frame_score_fwd_triton, args, **kw)
    scores, dense, idx, tf, lse = fs_triton.frame_score_fwd_triton(*args)
    W1, b1 = args[4], args[5]
    bwd_args = (torch.randn_like(scores), torch.randn_like(dense), torch.randn_like(tf), args[0].detach(),
                args[1].detach(), W1.detach() if W1 is not None else None, b1.detach() if b1 is not None else None,
                args[3], scores.detach(), lse.detach(), idx, 0.9)
    torch.library.opcheck(fs_triton.frame_score_bwd_triton, bwd_args, **kw)


@pytest.mark.cuda
@pytest.mark.parametrize("H", [None, 16])
def test_torch_compile_fullgraph_cuda(H):
    # torch.compile of a triton_op on CPU tensors fails in fake tracing under the interpreter: GPU only.
    torch._dynamo.reset()
    mod = _Pool(32, H, "triton").cuda()
    frames = torch.randn(3, 12, 32, device="cuda", requires_grad=True)
    lengths = torch.tensor([12, 5, 0], device="cuda")
    eager = mod(frames, lengths)
    out = torch.compile(mod, fullgraph=True)(frames, lengths)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-4)


def test_float64_refused():
    inp = make_frame_score_inputs(2, 10, 16, dtype=torch.float64, seed=1, device=DEV)
    with pytest.raises(Exception, match="float64"):
        call(inp, 4, backend="triton")


def test_k_above_kernel_limit():
    inp = make_frame_score_inputs(2, 10, 16, seed=1, device=DEV)
    with pytest.raises(ValueError, match="on-chip top-k size 256"):
        call(inp, 257, backend="triton")


# ---------------------------------------------------------------------------------------------
# GPU code generation without a GPU
# ---------------------------------------------------------------------------------------------
_COMPILE_SCRIPT = r"""
import os, sys, time
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mvpp_kernels.ops.frame_score import triton as K

PTR = {"X": "io", "D": "io", "G": "io", "dD": "io", "dTop": "io", "dX": "io",
       "lengths": "*i64", "I": "*i64", "part_i": "*i32"}

def sig_for(kern, io, consts):
    sig = {}
    for name in kern.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("T", "F", "H", "k", "n_split", "chunk"):
            sig[name] = "i32"
        elif name == "inv_tau":
            sig[name] = "fp32"
        else:
            t = PTR.get(name, "*fp32")
            sig[name] = io if t == "io" else t
    return sig

# bf16 frames: every kernel, both scorers (tensor-core tl.dot); fp32 frames: the MLP kernels' ieee tl.dot.
for io, ieee, mlp, only in (("*bf16", False, False, None), ("*bf16", False, True, None),
                            ("*fp32", True, True, ("_fwd_split_kernel", "_bwd_mlp_kernel"))):
    # Small tiles keep the compile quick (CI has 2 cores); the code paths are the same as at full size.
    bt, bf, bh = 16, 64, 16
    jobs = [
        (K._fwd_split_kernel, dict(HAS_BIAS=True, HAS_LEN=True, MLP=mlp, IEEE=ieee, BLOCK_T=bt, BLOCK_F=bf,
                                   BLOCK_H=bh, K_PAD=8, ROWWISE=False)),
        (K._fwd_merge_kernel, dict(BLOCK_F=bf, K_PAD=8, NS_PAD=4)),
        (K._bwd_dot_kernel, dict(HAS_LEN=True, BLOCK_T=bt, BLOCK_F=bf)),
        (K._bwd_frames_kernel, dict(HAS_LEN=True, MLP=mlp, IEEE=ieee, BLOCK_T=bt, BLOCK_F=bf, BLOCK_H=bh)),
        (K._bwd_mlp_kernel, dict(HAS_LEN=True, IEEE=ieee, BLOCK_T=bt, BLOCK_F=bf, BLOCK_H=bh)),
    ]
    for kern, consts in jobs:
        if (only and kern.__name__ not in only) or (kern is K._bwd_mlp_kernel and not mlp):
            continue
        t0 = time.time()
        triton.compile(ASTSource(kern, sig_for(kern, io, consts), consts), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=4))
        print("compiled", kern.__name__, io, mlp, round(time.time() - t0, 1), flush=True)
"""


def test_triton_kernels_compile_for_sm90():
    """The interpreter runs kernels as Python and cannot catch what only GPU code generation rejects
    (non-constexpr globals, loop-carried type changes, ptxas errors). Triton ships its own ptxas, so
    the sm_90 compile needs no GPU; it runs in a subprocess without TRITON_INTERPRET."""
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
    assert res.stdout.count("compiled") == 11, res.stdout
