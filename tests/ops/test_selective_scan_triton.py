"""The Triton backend of selective_scan (mvpp_kernels/ops/selective_scan/triton.py).

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (set by the root conftest),
which executes every program in Python: shapes here are tiny (batch 2, dim 4, N 4/16, L <= 130) and
the cases are picked, not a full product. The big grid runs on the reference/cpu backends in
test_selective_scan.py. On a CUDA machine the `device` fixture also runs every case on the GPU.
"""
from __future__ import annotations

import pytest
import torch

from mvpp_kernels._backend import triton_interpret
from mvpp_kernels.ops.selective_scan import CHUNK_SIZE, selective_scan, selective_scan_ref
from mvpp_kernels.testing import (
    assert_close,
    make_selective_scan_inputs,
    poisoned_allocations,
    to_reference,
)

T = pytest.importorskip("mvpp_kernels.ops.selective_scan.triton")

pytestmark = pytest.mark.triton


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    # Triton runs on CPU tensors only through the interpreter, which the root conftest switches on
    # when there is no GPU; on a GPU machine the cpu cases would have no backend to run on.
    if request.param == "cpu" and not triton_interpret():
        pytest.skip("Triton runs CPU tensors only under TRITON_INTERPRET=1 (the default without a GPU)")
    return request.param

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def _check_fwd_bwd(inputs, *, device, dtype, softplus=True, lengths=None, return_last_state=True, scale=1.0):
    """Triton forward and backward (NaN-poisoned allocations) against the float64 reference's autograd."""
    ref_inputs = to_reference(inputs)
    with poisoned_allocations(device):
        res = selective_scan(**inputs, delta_softplus=softplus, return_last_state=return_last_state,
                             lengths=lengths, backend="triton")
    ref = selective_scan_ref(**ref_inputs, delta_softplus=softplus, return_last_state=return_last_state,
                             lengths=lengths.cpu() if lengths is not None else None)
    out, last = res if return_last_state else (res, None)
    ref_out, ref_last = ref if return_last_state else (ref, None)
    assert out.dtype == inputs["u"].dtype and out.shape == inputs["u"].shape
    assert_close(out, ref_out, dtype, name="out", scale=scale)
    if return_last_state:
        expected_state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        assert last.dtype == expected_state_dtype
        assert_close(last, ref_last, dtype, name="last_state", scale=scale)

    # Random cotangents for both outputs, so dlast_state is exercised too.
    g = torch.Generator().manual_seed(1)
    gout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    loss_ref = (ref_out * gout).sum()
    loss_dtype = torch.promote_types(out.dtype, torch.float32)  # half outputs: the loss in float32
    loss = (out.to(loss_dtype) * gout.to(device=device, dtype=loss_dtype)).sum()
    if return_last_state:
        glast = torch.randn(last.shape, generator=g, dtype=torch.float64)
        loss_ref = loss_ref + (ref_last * glast).sum()
        loss = loss + (last * glast.to(device=device, dtype=last.dtype)).sum()
    names = [k for k in GRAD_NAMES if inputs.get(k) is not None and inputs[k].requires_grad]
    with poisoned_allocations(device):
        grads = torch.autograd.grad(loss, [inputs[k] for k in names])
    # With L = 0 the reference never touches u, delta, B, C, z: their gradient is zero.
    ref_grads = torch.autograd.grad(loss_ref, [ref_inputs[k] for k in names], allow_unused=True)
    ref_grads = [torch.zeros_like(ref_inputs[k]) if gr is None else gr for k, gr in zip(names, ref_grads)]
    for name, gk, gr in zip(names, grads, ref_grads):
        assert gk.shape == inputs[name].shape and gk.dtype == inputs[name].dtype, name
        assert_close(gk, gr, dtype, grad=True, name=f"d{name}", scale=scale)


# (B layout, N, L, with z, D, delta_bias, initial_state, softplus, lengths kind)
CASES = [
    ("constant", 4, 1, True, True, True, True, True, "none"),
    ("constant", 4, 63, True, True, True, True, True, "mixed"),
    ("constant", 16, 63, True, True, True, True, True, "with_zero"),
    ("variable", 4, 1, True, True, True, True, True, "mixed"),
    ("variable", 4, 63, False, False, False, False, False, "none"),
    ("variable", 4, 130, True, True, True, True, True, "with_zero"),
    ("grouped", 4, 1, False, True, False, True, True, "none"),
    ("grouped", 4, 63, True, True, True, True, True, "with_zero"),
    ("grouped", 16, 130, True, False, True, False, True, "mixed"),
    ("grouped", 4, 130, False, False, False, False, False, "none"),
]


def _lengths(kind, L, device):
    if kind == "none":
        return None
    if kind == "mixed":
        return torch.tensor([L, max(L // 2, 1)], device=device)
    return torch.tensor([0, max(L - 3, 1)], device=device)  # an empty sequence and a padded one


@pytest.mark.parametrize("layout,N,L,with_z,with_D,with_db,with_h0,softplus,lengths_kind", CASES)
def test_triton_matches_reference(device, layout, N, L, with_z, with_D, with_db, with_h0, softplus, lengths_kind):
    inputs = make_selective_scan_inputs(
        2, 4, N, L, dtype=torch.float32, device=device, B_layout=layout, groups=2, with_D=with_D, with_z=with_z,
        with_delta_bias=with_db, with_initial_state=with_h0, seed=L * 7 + N, requires_grad=True,
    )
    _check_fwd_bwd(inputs, device=device, dtype=torch.float32, softplus=softplus,
                   lengths=_lengths(lengths_kind, L, device))


@pytest.mark.parametrize("dim,N,layout,groups,L", [
    (3, 5, "constant", 1, 40),   # N not a power of two: the state tile's tail lanes are masked
    (3, 5, "variable", 1, 40),
    (6, 3, "grouped", 3, 40),    # three groups of two channels
    (3, 5, "grouped", 1, 0),     # empty sequence axis: last_state = initial_state
])
def test_triton_odd_sizes(device, dim, N, layout, groups, L):
    inputs = make_selective_scan_inputs(2, dim, N, L, device=device, B_layout=layout, groups=groups,
                                        with_initial_state=True, seed=dim * 100 + N + L, requires_grad=True)
    lengths = torch.tensor([L, L // 3], device=device)
    _check_fwd_bwd(inputs, device=device, dtype=torch.float32, lengths=lengths)


def test_triton_without_last_state(device):
    inputs = make_selective_scan_inputs(2, 4, 4, 63, device=device, B_layout="grouped", seed=3, requires_grad=True)
    _check_fwd_bwd(inputs, device=device, dtype=torch.float32, return_last_state=False)


def test_triton_mixed_constant_and_variable(device):
    """Constant B with grouped C (and the reverse): each reduced the way its own layout needs."""
    a = make_selective_scan_inputs(2, 4, 4, 63, device=device, B_layout="constant", seed=5, requires_grad=True)
    b = make_selective_scan_inputs(2, 4, 4, 63, device=device, B_layout="grouped", groups=2, seed=6,
                                   requires_grad=True)
    inputs = dict(a, C=b["C"])
    _check_fwd_bwd(inputs, device=device, dtype=torch.float32)
    inputs = dict(b, C=a["C"])
    _check_fwd_bwd(inputs, device=device, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_triton_dtypes(device, dtype):
    """Half inputs accumulate in float32 (their own tolerance); float64 stays float64 throughout."""
    inputs = make_selective_scan_inputs(2, 4, 4, 63, dtype=dtype, device=device, B_layout="grouped",
                                        with_initial_state=True, seed=11, requires_grad=True)
    if dtype == torch.float64 and device == "cuda":
        pytest.skip("float64 is a CPU dtype for selective_scan")
    _check_fwd_bwd(inputs, device=device, dtype=dtype, lengths=torch.tensor([63, 40], device=device))


def _noncontiguous(inputs):
    """The same values in transposed / strided storage (a fresh leaf each)."""

    def leaf(x):
        return x.detach().requires_grad_(True)

    u = inputs["u"]
    out = dict(inputs)
    out["u"] = leaf(u.detach().transpose(1, 2).contiguous().transpose(1, 2))
    out["delta"] = leaf(torch.stack([inputs["delta"].detach()] * 2, dim=-1)[..., 1])
    out["z"] = leaf(inputs["z"].detach().transpose(1, 2).contiguous().transpose(1, 2))
    out["A"] = leaf(inputs["A"].detach().t().contiguous().t())
    out["B"] = leaf(inputs["B"].detach().transpose(-1, -2).contiguous().transpose(-1, -2))
    out["C"] = leaf(torch.stack([inputs["C"].detach(), inputs["C"].detach()], dim=-1)[..., 1])
    out["D"] = leaf(torch.stack([inputs["D"].detach(), inputs["D"].detach()], dim=-1)[:, 0])
    out["initial_state"] = leaf(inputs["initial_state"].detach().transpose(0, 2).contiguous().transpose(0, 2))
    return out


@pytest.mark.parametrize("layout", ["constant", "grouped"])
def test_triton_noncontiguous_inputs(device, layout):
    inputs = make_selective_scan_inputs(2, 4, 4, 63, device=device, B_layout=layout, with_initial_state=True,
                                        seed=13, requires_grad=True)
    nc = _noncontiguous(inputs)
    assert not nc["u"].is_contiguous() and not nc["delta"].is_contiguous() and not nc["B"].is_contiguous()
    assert not nc["A"].is_contiguous() and not nc["D"].is_contiguous() and not nc["initial_state"].is_contiguous()
    _check_fwd_bwd(nc, device=device, dtype=torch.float32, lengths=torch.tensor([63, 20], device=device))


def _op_args(inputs, lengths, softplus, chunk_size):
    return (inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], inputs["D"], inputs["z"],
            inputs["delta_bias"], inputs["initial_state"], lengths, softplus, chunk_size)


@pytest.mark.parametrize("chunk_size", [2, 16, 128])
def test_triton_chunk_sizes(device, chunk_size):
    """Many short chunks (state carried across every boundary) and one chunk longer than L; the
    forward's chunk_states are the reference's states at each chunk's last step."""
    L = 21
    inputs = make_selective_scan_inputs(2, 4, 4, L, device=device, B_layout="grouped", with_initial_state=True,
                                        seed=17)
    lengths = torch.tensor([L, 12], device=device)
    with poisoned_allocations(device):
        out, last, chunk_states = T.selective_scan_fwd_triton(*_op_args(inputs, lengths, True, chunk_size))
    ref = to_reference(inputs)
    ref_out, ref_last = selective_scan_ref(**ref, delta_softplus=True, return_last_state=True, lengths=lengths.cpu())
    assert_close(out, ref_out, name="out")
    assert_close(last, ref_last, name="last_state")
    n_chunks = -(-L // chunk_size)
    assert chunk_states.shape == (2, 4, n_chunks * 4)  # [b][d][chunk][n], flat
    chunk_states = chunk_states.view(2, 4, n_chunks, 4)
    for c in range(n_chunks):
        end = min((c + 1) * chunk_size, L)
        _, state = selective_scan_ref(**{k: (v[..., :end] if k in ("u", "delta", "z", "B", "C") else v)
                                         for k, v in ref.items()},
                                      delta_softplus=True, return_last_state=True,
                                      lengths=torch.clamp(lengths.cpu(), max=end))
        assert_close(chunk_states[:, :, c], state, name=f"chunk_states[{c}]")
    # Gradients through the op at this chunk size, against the default chunk size's.
    dout = torch.randn_like(out)
    dlast = torch.randn_like(last)
    common = (dout, dlast) + _op_args(inputs, lengths, True, chunk_size)[:10]
    with poisoned_allocations(device):
        g1 = T.selective_scan_bwd_triton(*common, chunk_states, True, chunk_size, True)
    _, _, cs64 = T.selective_scan_fwd_triton(*_op_args(inputs, lengths, True, 64))
    g2 = T.selective_scan_bwd_triton(*common, cs64, True, 64, True)
    for i, (a, b) in enumerate(zip(g1, g2)):
        assert a.shape == b.shape, i
        assert_close(a, b, torch.float32, grad=True, name=f"bwd output {i}")


def test_triton_partial_group_reduction(device, monkeypatch):
    """On a GPU a backward program may own part of a group (R < channels per group) and the ranges are
    summed afterwards; force that here so the interpreter covers it, and require identical results
    to the whole-group reduction up to float32 reassociation."""
    inputs = make_selective_scan_inputs(2, 8, 4, 24, device=device, B_layout="grouped", groups=2, seed=19)
    args = _op_args(inputs, torch.tensor([24, 17], device=device), True, 16)
    out, last, cs = T.selective_scan_fwd_triton(*args)
    dout, dlast = torch.randn_like(out), torch.randn_like(last)
    bargs = (dout, dlast) + args[:10] + (cs, True, 16, True)
    whole = T.selective_scan_bwd_triton(*bargs)
    for r in (1, 2):
        monkeypatch.setattr(T, "_channels_per_program", lambda *a, r=r: r)
        with poisoned_allocations(device):
            part = T.selective_scan_bwd_triton(*bargs)
        for i, (a, b) in enumerate(zip(part, whole)):
            assert_close(a, b, torch.float32, grad=True, name=f"bwd output {i} with R={r}")
    monkeypatch.undo()


def test_triton_backward_is_deterministic(device):
    inputs = make_selective_scan_inputs(2, 4, 4, 40, device=device, B_layout="grouped", seed=23)
    args = _op_args(inputs, torch.tensor([40, 33], device=device), True, 16)
    out, last, cs = T.selective_scan_fwd_triton(*args)
    bargs = (torch.randn_like(out), torch.randn_like(last)) + args[:10] + (cs, True, 16, False)
    first = T.selective_scan_bwd_triton(*bargs)
    second = T.selective_scan_bwd_triton(*bargs)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_triton_rejects_non_power_of_two_chunk(device):
    inputs = make_selective_scan_inputs(1, 2, 4, 8, device=device, seed=29)
    with pytest.raises(ValueError, match="chunk_size must be a power of two"):
        T.selective_scan_fwd_triton(*_op_args(inputs, None, False, 48))


def test_triton_default_chunk_size_is_a_power_of_two():
    c = CHUNK_SIZE["triton"]
    assert c >= 1 and c & (c - 1) == 0


# ---------------------------------------------------------------------------------------------
# GPU code generation without a GPU
# ---------------------------------------------------------------------------------------------
_COMPILE_SCRIPT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mvpp_kernels.ops.selective_scan import triton as T

IO = ("u_ptr", "delta_ptr", "z_ptr", "dout_ptr", "du_ptr", "ddelta_ptr", "dz_ptr", "out_ptr")
for kern in (T._selective_scan_fwd_kernel, T._selective_scan_bwd_kernel):
    for io, var, flags, bn, chunk in (("*bf16", True, True, 16, 64), ("*fp32", False, False, 8, 16)):
        consts = dict(HAS_D=flags, HAS_Z=flags, HAS_DB=flags, HAS_H0=flags, HAS_LEN=flags, SOFTPLUS=flags,
                      VAR_B=var, VAR_C=not var, ACC=tl.float32, BLOCK_N=bn, T=chunk)
        sig = {}
        for name in kern.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name == "len_ptr":
                sig[name] = "*i64"
            elif name.endswith("_ptr"):
                sig[name] = io if name in IO else "*fp32"
            else:
                sig[name] = "i32"
        nw = T._num_warps(bn, chunk, backward=kern is T._selective_scan_bwd_kernel)
        triton.compile(ASTSource(kern, sig, consts), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=nw))
        print("compiled", kern.__name__, io, var, flags)
"""


def test_triton_kernels_compile_for_sm90():
    """The interpreter runs the kernels as Python and cannot catch what only GPU code generation
    rejects (loop-carried type changes, unsupported ops in a layout, ptxas errors). Triton ships its
    own ptxas, so the sm_90 compile needs no GPU; it runs in a subprocess without TRITON_INTERPRET."""
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


# ---------------------------------------------------------------------------------------------
# opcheck
# ---------------------------------------------------------------------------------------------
def _opcheck_cases(device):
    for layout, with_opts in (("grouped", True), ("constant", False)):
        inputs = make_selective_scan_inputs(2, 4, 4, 20, device=device, B_layout=layout, with_D=with_opts,
                                            with_z=with_opts, with_delta_bias=with_opts,
                                            with_initial_state=with_opts, seed=31, requires_grad=True)
        lengths = torch.tensor([20, 9], device=device) if with_opts else None
        fargs = _op_args(inputs, lengths, with_opts, 16)
        with torch.no_grad():
            out, last, cs = T.selective_scan_fwd_triton(*fargs)
        detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in fargs)
        bargs = (torch.randn_like(out), torch.randn_like(last) if with_opts else None) + detached[:10] + (
            cs, with_opts, 16, False)
        yield fargs, bargs


# On CPU the kernels run in the interpreter, where `wrap_triton` returns the plain interpreted kernel:
# it cannot run on the FunctionalTensor/fake tensors that test_aot_dispatch_{static,dynamic} trace
# with (torch.compile of a triton_op on CPU tensors fails for the same reason). The schema, the fake
# (registered shape functions) and the autograd registration are checked here; the full set runs on
# CUDA below.
CPU_OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


def test_triton_opcheck_cpu_subset():
    if not triton_interpret():
        pytest.skip("CPU tensors need TRITON_INTERPRET=1; the full opcheck runs on CUDA instead")
    for fargs, bargs in _opcheck_cases("cpu"):
        torch.library.opcheck(torch.ops.mvpp.selective_scan_fwd_triton, fargs, test_utils=CPU_OPCHECK_UTILS)
        torch.library.opcheck(torch.ops.mvpp.selective_scan_bwd_triton, bargs, test_utils=CPU_OPCHECK_UTILS)


@pytest.mark.cuda
def test_triton_opcheck_cuda_full():
    for fargs, bargs in _opcheck_cases("cuda"):
        torch.library.opcheck(torch.ops.mvpp.selective_scan_fwd_triton, fargs)
        torch.library.opcheck(torch.ops.mvpp.selective_scan_bwd_triton, bargs)


@pytest.mark.cuda
def test_triton_torch_compile_fullgraph():
    class Block(torch.nn.Module):
        def __init__(self, dim, N):
            super().__init__()
            self.proj = torch.nn.Linear(dim, dim)
            self.A = torch.nn.Parameter(-torch.rand(dim, N) - 0.5)
            self.D = torch.nn.Parameter(torch.randn(dim))

        def forward(self, u, delta, B, C, backend):
            x = self.proj(u.transpose(1, 2)).transpose(1, 2)
            return selective_scan(x, delta, self.A, B, C, self.D, delta_softplus=True, backend=backend)

    torch.manual_seed(0)
    model = Block(8, 16).cuda()
    u = torch.randn(2, 8, 100, device="cuda")
    delta = torch.randn(2, 8, 100, device="cuda")
    B = torch.randn(2, 2, 16, 100, device="cuda")
    C = torch.randn(2, 2, 16, 100, device="cuda")
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(u, delta, B, C, "triton")
    eager = model(u, delta, B, C, "reference")
    assert_close(out, eager, torch.float32, name="compiled out")
    out.square().sum().backward()
    g_compiled = model.A.grad.clone()
    model.zero_grad()
    eager.square().sum().backward()
    assert_close(g_compiled, model.A.grad, torch.float32, grad=True, name="compiled dA")
