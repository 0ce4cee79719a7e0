"""selective_scan on every backend against the float64 reference, plus the reference itself against an
independent closed form and against mamba-ssm's own `selective_scan_ref` (when installed).

The grid is mamba's test_selective_scan grid as a floor: L in {1, 63, 128, 2049}; B/C constant,
variable and grouped (G = 2); with and without z, D, delta_bias, softplus, last state -- plus what
mamba lacks: initial_state, variable lengths (0, 1 and L in one padded batch) and non-contiguous
inputs. The eight on/off features are combined by a strength-2 covering array (every pair of
features is seen in all four on/off combinations), not the full 2^8 product, to keep the file fast.

Backends: reference and cpu run the whole grid (float32 and float64); triton runs under
TRITON_INTERPRET=1 on CPU with tiny shapes (its own file, test_selective_scan_triton.py, goes
deeper); cuda runs the grid on a GPU and is skipped without one. A cpu backend that is missing
because the extension is not built FAILS here: it is the product, not an optional extra.
"""
from __future__ import annotations

import os
import re

import pytest
import torch
import torch.nn.functional as F

import mvpp_kernels
from mvpp_kernels import _library
from mvpp_kernels._backend import BackendUnavailableError, resolve_backend
from mvpp_kernels.ops import selective_scan as ss_mod
from mvpp_kernels.ops.selective_scan import MAX_DSTATE, selective_scan, selective_scan_ref
from mvpp_kernels.testing import (
    assert_close,
    load_mamba_selective_scan_ref,
    make_selective_scan_inputs,
    poisoned_allocations,
    to_reference,
)

HAS_CUDA = torch.cuda.is_available()
TRITON_FILE = os.path.join(os.path.dirname(ss_mod.__file__), "triton.py")
GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
BACKENDS = ["reference", "cpu", pytest.param("triton", marks=pytest.mark.triton),
            pytest.param("cuda", marks=pytest.mark.cuda)]

# The compiled CPU kernel is the product: a missing build is a failure, not a skip.
CPU_BUILD_ERROR = None if _library.compiled_loaded() else (
    f"the compiled extension is not loaded ({_library.compiled_status()}); the cpu backend of "
    "selective_scan cannot be tested. Build it: pip install --no-build-isolation -e .")


def backend_device(backend: str) -> str:
    if backend == "cuda":
        return "cuda"
    if backend == "triton":
        return "cuda" if HAS_CUDA else "cpu"
    return "cpu"


def require_backend(backend: str) -> str:
    """The device to run `backend` on; skips only where a skip is legitimate, fails otherwise."""
    if backend == "cpu" and CPU_BUILD_ERROR:
        pytest.fail(CPU_BUILD_ERROR)
    device = backend_device(backend)
    try:
        resolve_backend("selective_scan_fwd", torch.device(device), backend)
    except BackendUnavailableError as e:
        if backend == "triton" and not os.path.exists(TRITON_FILE):
            pytest.skip(f"{e} (mvpp_kernels/ops/selective_scan/triton.py is not written yet)")
        if backend == "cuda" and not HAS_CUDA:
            pytest.skip(str(e))
        raise
    if backend == "cpu" and not torch._C._dispatch_has_kernel_for_dispatch_key("mvpp::selective_scan_fwd", "CPU"):
        pytest.fail("the compiled extension is loaded but registers no CPU kernel for mvpp::selective_scan_fwd")
    return device


# ---------------------------------------------------------------------------------------------
# Case construction
# ---------------------------------------------------------------------------------------------
FEATURES = ("z", "D", "delta_bias", "softplus", "last_state", "initial_state", "lengths", "noncontig")
# Strength-2 covering array over the 8 features (rows 0..5) plus the all-off row.
COMBOS = [
    (1, 1, 1, 1, 1, 1, 1, 1),
    (0, 0, 0, 0, 0, 0, 1, 1),
    (0, 0, 0, 1, 1, 1, 0, 0),
    (0, 1, 1, 0, 0, 1, 0, 0),
    (1, 0, 1, 0, 1, 0, 0, 1),
    (1, 1, 0, 1, 0, 0, 1, 0),
    (0, 0, 0, 0, 0, 0, 0, 0),
]


def combo_id(c) -> str:
    on = [f for f, v in zip(FEATURES, c) if v]
    return "+".join(on) if on else "plain"


def make_lengths(batch: int, L: int) -> torch.Tensor:
    """A padded batch that has a full, a length-1, an empty and (batch >= 4) a middle sequence."""
    vals = [L, min(1, L), 0, (L // 2) + 1 if L > 1 else 1][:batch]
    vals += [L] * (batch - len(vals))
    return torch.tensor(vals, dtype=torch.int64)


def _strided(x: torch.Tensor) -> torch.Tensor:
    """The same values, stored every other element along the last axis of a leaf twice as long
    (a non-contiguous view at every L, including L = 1)."""
    base = torch.stack([x.detach(), torch.full_like(x.detach(), float("nan"))], dim=-1).flatten(-2)
    base.requires_grad_(x.requires_grad)
    return base[..., ::2]


def positive_steps(x: dict) -> dict:
    """Without softplus, Δ = delta + delta_bias is used as is: keep it positive (as mamba's tests
    do) so exp(Δ A) is a decay and the scan does not overflow over long sequences."""
    for k in ("delta", "delta_bias"):
        if x.get(k) is not None:
            x[k] = x[k].detach().abs().requires_grad_(x[k].requires_grad)
    return x


def build_case(L, layout, combo, *, dtype=torch.float32, N=None, batch=2, dim=4, seed=0, device="cpu"):
    f = dict(zip(FEATURES, combo))
    if f["lengths"]:
        batch = max(batch, 4)
    if N is None:
        N = (5, 16, 3)[(seed + L) % 3]  # padded and exact state sizes
    x = make_selective_scan_inputs(
        batch, dim, N, L, dtype=dtype, B_layout=layout, groups=2, with_D=bool(f["D"]), with_z=bool(f["z"]),
        with_delta_bias=bool(f["delta_bias"]), with_initial_state=bool(f["initial_state"]), seed=seed,
        requires_grad=True)
    if not f["softplus"]:
        positive_steps(x)
    if device != "cpu":
        x = {k: (v.detach().to(device).requires_grad_(True) if v is not None else None) for k, v in x.items()}
    if f["noncontig"]:
        for k in ("u", "delta", "z", "B", "C"):
            if x[k] is not None and x[k].dim() >= 3:
                x[k] = _strided(x[k])
        assert not x["u"].is_contiguous()
    lengths = make_lengths(batch, L).to(device) if f["lengths"] else None
    return x, lengths, bool(f["softplus"]), bool(f["last_state"])


def grad_inputs(x):
    return [k for k in GRAD_NAMES if x.get(k) is not None and x[k].requires_grad]


def run_with_grads(fn, x, lengths, softplus, last_state, *, seed=1, poison_device="cpu"):
    """Outputs and input gradients of fn(**x) under random cotangents (so dlast_state is exercised).
    Every allocation inside is NaN-poisoned."""
    g = torch.Generator().manual_seed(seed)
    with poisoned_allocations(poison_device):
        res = fn(**x, delta_softplus=softplus, return_last_state=last_state, lengths=lengths)
    out, last = res if last_state else (res, None)
    gout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    loss_dtype = torch.promote_types(out.dtype, torch.float32)
    loss = (out.to(loss_dtype) * gout.to(out.device, loss_dtype)).sum()
    if last_state:
        glast = torch.randn(last.shape, generator=g, dtype=torch.float64)
        loss = loss + (last * glast.to(last.device, last.dtype)).sum()
    names = grad_inputs(x)
    with poisoned_allocations(poison_device):
        grads = torch.autograd.grad(loss, [x[k] for k in names], allow_unused=True)
    grads = {k: (torch.zeros_like(x[k]) if gr is None else gr) for k, gr in zip(names, grads)}
    return out, last, grads


_ORACLE_CACHE: dict = {}


def oracle(x, lengths, softplus, last_state, key=None):
    """The float64 reference (CPU) with the same cotangents as run_with_grads. `key` names a case
    built deterministically (build_case's arguments), so backends sharing a case share its oracle:
    the reference's Python loop over L is the slow part of this file."""
    if key is not None and key in _ORACLE_CACHE:
        return _ORACLE_CACHE[key]
    r = to_reference(x)
    res = run_with_grads(selective_scan_ref, r, lengths.cpu() if lengths is not None else None, softplus, last_state)
    if key is not None:
        _ORACLE_CACHE.clear()  # cases of one parametrisation run back to back; keep one
        _ORACLE_CACHE[key] = res
    return res


def check_against_oracle(backend, x, lengths, softplus, last_state, dtype, device, *, scale=1.0, grad_scale=1.0,
                         key=None):
    def fn(**kw):
        return selective_scan(**kw, backend=backend)

    out, last, grads = run_with_grads(fn, x, lengths, softplus, last_state, poison_device=device)
    r_out, r_last, r_grads = oracle(x, lengths, softplus, last_state, key=key)
    assert out.dtype == x["u"].dtype and out.shape == x["u"].shape
    assert_close(out, r_out, dtype, name="out", scale=scale)
    if last_state:
        assert last.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert last.shape == r_last.shape
        assert_close(last, r_last, dtype, name="last_state", scale=scale)
    for k, gr in grads.items():
        assert gr.shape == x[k].shape, k
        assert_close(gr, r_grads[k], dtype, grad=True, name=f"d{k}", scale=grad_scale)


# ---------------------------------------------------------------------------------------------
# The grid: every backend against the float64 reference, forward and backward
# ---------------------------------------------------------------------------------------------
LAYOUTS = ["constant", "variable", "grouped"]


def grid(Ls, combos):
    return [pytest.param(L, lay, c, id=f"L{L}-{lay}-{combo_id(c)}") for L in Ls for lay in LAYOUTS for c in combos]


@pytest.fixture(autouse=True, scope="module")
def _flush_denormals():
    # Long scans drive adjoints through thousands of decays: denormal float64 values make the
    # reference's autograd (the oracle) several times slower on x86 without changing any result
    # at the tolerances used here.
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


# Backends are the outer parametrisation so that cases sharing an oracle run back to back.
@pytest.mark.parametrize("backend", ["reference", "cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("L,layout,combo", grid([1, 63, 128], COMBOS))
def test_grid_float32(backend, L, layout, combo):
    device = require_backend(backend)
    x, lengths, softplus, last_state = build_case(L, layout, combo, device=device)
    check_against_oracle(backend, x, lengths, softplus, last_state, torch.float32, device,
                         key=("f32", L, layout, combo))


# L = 2049 (mamba's odd long length): the reference oracle loops over L in Python, so a few cases.
def _long_cases():
    # The reference backend shares its oracle with the cpu case after it (same inputs).
    rows = [("reference", "variable", COMBOS[0]), ("cpu", "variable", COMBOS[0]), ("cpu", "grouped", COMBOS[5]),
            ("cpu", "constant", COMBOS[4]), ("cuda", "grouped", COMBOS[0])]
    return [pytest.param(b, 2049, lay, c, id=f"{b}-L2049-{lay}-{combo_id(c)}",
                         marks=[pytest.mark.cuda] if b == "cuda" else [])
            for b, lay, c in rows]


@pytest.mark.parametrize("backend,L,layout,combo", _long_cases())
def test_grid_long(backend, L, layout, combo):
    device = require_backend(backend)
    x, lengths, softplus, last_state = build_case(L, layout, combo, device=device, dim=2, N=16)
    # Sums over 2049 steps (dA, dD, d(delta_bias), constant dB/dC) round more than short ones.
    check_against_oracle(backend, x, lengths, softplus, last_state, torch.float32, device, grad_scale=4.0,
                         key=("long", L, layout, combo))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("L,layout,combo", grid([1, 63, 128], COMBOS[:3]))
def test_grid_float64(backend, L, layout, combo):
    device = require_backend(backend)
    x, lengths, softplus, last_state = build_case(L, layout, combo, dtype=torch.float64, dim=2)
    check_against_oracle(backend, x, lengths, softplus, last_state, torch.float64, device,
                         key=("f64", L, layout, combo))


@pytest.mark.triton
@pytest.mark.parametrize("L,layout,combo", grid([1, 63, 130], COMBOS[:1]))
def test_grid_triton(L, layout, combo):
    device = require_backend("triton")
    x, lengths, softplus, last_state = build_case(L, layout, combo, device=device, batch=2, dim=4, N=4)
    check_against_oracle("triton", x, lengths, softplus, last_state, torch.float32, device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_inputs(dtype):
    """Half-precision inputs are accepted on CPU and accumulate in float32."""
    require_backend("cpu")
    x, lengths, softplus, last_state = build_case(63, "grouped", COMBOS[0], dtype=dtype)
    check_against_oracle("cpu", x, lengths, softplus, last_state, dtype, "cpu")


@pytest.mark.parametrize("chunk_size", [1, 5, 64, 4096])
def test_cpu_chunk_sizes(monkeypatch, chunk_size):
    """The saved chunk-boundary states and the backward's per-chunk recomputation at any chunk size
    (1: a state per step; 4096: a single chunk)."""
    require_backend("cpu")
    monkeypatch.setitem(ss_mod.CHUNK_SIZE, "cpu", chunk_size)
    x, lengths, softplus, last_state = build_case(63, "variable", COMBOS[0])
    check_against_oracle("cpu", x, lengths, softplus, last_state, torch.float32, "cpu")
    n_chunks = -(-63 // chunk_size)
    u = x["u"].detach()
    Bk = x["B"].detach().unsqueeze(1)
    _, _, cs = torch.ops.mvpp.selective_scan_fwd(u, x["delta"].detach(), x["A"].detach(), Bk, Bk, None, None, None,
                                                 None, None, True, chunk_size)
    assert cs.shape == (u.shape[0], u.shape[1], n_chunks * x["A"].shape[1])  # [b][d][chunk][n], flat


def test_cpu_wide_state_and_many_channels():
    """N at the kernel maximum (MAX_DSTATE) and enough channels that the backward splits one B/C
    group across several tasks (the per-task buffers are then summed)."""
    require_backend("cpu")
    x = make_selective_scan_inputs(2, 64, MAX_DSTATE, 20, B_layout="grouped", groups=2, seed=3, requires_grad=True)
    check_against_oracle("cpu", x, None, True, True, torch.float32, "cpu")
    x = make_selective_scan_inputs(1, 96, 16, 37, B_layout="variable", seed=4, requires_grad=True)
    check_against_oracle("cpu", x, make_lengths(1, 37), True, True, torch.float32, "cpu")


def test_cpu_mixed_layouts():
    """B constant with C grouped, and B variable with C grouped with a different G."""
    require_backend("cpu")
    for seed, (lb, lc) in enumerate([("constant", "grouped"), ("variable", "grouped"), ("grouped", "constant")]):
        xb = make_selective_scan_inputs(2, 4, 6, 40, B_layout=lb, groups=4, seed=seed, requires_grad=True)
        xc = make_selective_scan_inputs(2, 4, 6, 40, B_layout=lc, groups=2, seed=seed + 10, requires_grad=True)
        x = dict(xb, C=xc["C"])
        check_against_oracle("cpu", x, make_lengths(2, 40), True, True, torch.float32, "cpu")


def test_cpu_deterministic():
    """Two backward passes give bit-identical gradients (fixed-order reductions, no atomics)."""
    require_backend("cpu")
    x = make_selective_scan_inputs(2, 64, 16, 100, B_layout="variable", seed=5, requires_grad=True)
    a = run_with_grads(lambda **kw: selective_scan(**kw, backend="cpu"), x, None, True, True)
    b = run_with_grads(lambda **kw: selective_scan(**kw, backend="cpu"), x, None, True, True)
    assert torch.equal(a[0], b[0])
    for k in a[2]:
        assert torch.equal(a[2][k], b[2][k]), k


def test_cpu_matches_reference_backend_defaults():
    """Positional mamba-style call, default arguments, auto backend = cpu on CPU tensors."""
    require_backend("cpu")
    assert mvpp_kernels.backend_info()["auto"]["cpu"]["selective_scan"] == "cpu"
    x = make_selective_scan_inputs(2, 4, 8, 33, seed=6)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True, True)
    out, last = selective_scan(*args)
    r_out, r_last = selective_scan_ref(*[a.double() if isinstance(a, torch.Tensor) else a for a in args])
    assert_close(out, r_out, torch.float32)
    assert_close(last, r_last, torch.float32)


# ---------------------------------------------------------------------------------------------
# gradcheck (float64), opcheck, torch.compile
# ---------------------------------------------------------------------------------------------
def _gradcheck_inputs(layout, seed=0):
    x = make_selective_scan_inputs(2, 2, 3, 7, dtype=torch.float64, B_layout=layout, groups=2,
                                   with_initial_state=True, seed=seed, requires_grad=True)
    return [x[k] for k in GRAD_NAMES]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck(backend, layout, monkeypatch):
    require_backend(backend)
    # Chunks of 3 over L = 7: the cpu backward recomputes three chunks, one partial.
    monkeypatch.setitem(ss_mod.CHUNK_SIZE, "cpu", 3)
    lengths = torch.tensor([7, 4])

    def f(u, delta, A, B, C, D, z, delta_bias, initial_state):
        out, last = selective_scan(u, delta, A, B, C, D, z, delta_bias, True, True, initial_state=initial_state,
                                   lengths=lengths, backend=backend)
        return out, last

    assert torch.autograd.gradcheck(f, _gradcheck_inputs(layout), eps=1e-6, atol=1e-6, rtol=1e-5)


def _op_args(layout, dtype=torch.float32, with_optional=True, seed=0):
    x = make_selective_scan_inputs(2, 4, 5, 19, dtype=dtype, B_layout=layout, groups=2, with_D=with_optional,
                                   with_z=with_optional, with_delta_bias=with_optional,
                                   with_initial_state=with_optional, seed=seed, requires_grad=True)
    B = x["B"].unsqueeze(1) if x["B"].dim() == 3 else x["B"]
    C = x["C"].unsqueeze(1) if x["C"].dim() == 3 else x["C"]
    lengths = torch.tensor([19, 3]) if with_optional else None
    return (x["u"], x["delta"], x["A"], B, C, x["D"], x["z"], x["delta_bias"], x["initial_state"], lengths,
            True, 8)


@pytest.mark.parametrize("with_optional", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_fwd(layout, with_optional):
    require_backend("cpu")
    torch.library.opcheck(torch.ops.mvpp.selective_scan_fwd.default, _op_args(layout, with_optional=with_optional))


@pytest.mark.parametrize("with_optional", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_bwd(layout, with_optional):
    require_backend("cpu")
    args = _op_args(layout, with_optional=with_optional)
    with torch.no_grad():
        out, last, chunk_states = torch.ops.mvpp.selective_scan_fwd(*args)
    u, delta, A, B, C, D, z, db, init, lengths, softplus, cs = args
    dout = torch.randn_like(out)
    dlast = torch.randn_like(last) if with_optional else None
    bwd_args = (dout, dlast, u.detach(), delta.detach(), A.detach(), B.detach(), C.detach(),
                *(t.detach() if t is not None else None for t in (D, z, db, init)), lengths, chunk_states,
                softplus, cs, False)
    torch.library.opcheck(torch.ops.mvpp.selective_scan_bwd.default, bwd_args)


class _TinyMamba(torch.nn.Module):
    """The S6 part of a Mamba block: projections make delta, B, C from the input, then the scan."""

    def __init__(self, dim=8, N=4, backend="cpu"):
        super().__init__()
        self.backend = backend
        self.in_proj = torch.nn.Linear(dim, 2 * dim)
        self.x_proj = torch.nn.Linear(dim, 1 + 2 * N)
        self.dt_proj = torch.nn.Linear(1, dim)
        self.A_log = torch.nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(dim, 1))
        self.D = torch.nn.Parameter(torch.ones(dim))
        self.N = N

    def forward(self, x, lengths):  # x: (batch, L, dim)
        xz = self.in_proj(x).transpose(1, 2)  # (batch, 2 dim, L)
        u, z = xz.chunk(2, dim=1)
        dbc = self.x_proj(u.transpose(1, 2))  # (batch, L, 1 + 2N)
        dt, B, C = torch.split(dbc, [1, self.N, self.N], dim=-1)
        delta = self.dt_proj(dt).transpose(1, 2)  # (batch, dim, L), non-contiguous
        y = selective_scan(u, delta, -torch.exp(self.A_log), B.transpose(1, 2), C.transpose(1, 2), self.D, z,
                           self.dt_proj.bias, delta_softplus=True, lengths=lengths, backend=self.backend)
        return y.transpose(1, 2)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_torch_compile_fullgraph(backend):
    require_backend(backend)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _TinyMamba(backend=backend)
    x = torch.randn(2, 11, 8)
    lengths = torch.tensor([11, 6])
    eager = model(x, lengths)
    # fullgraph=True: dynamo must trace the whole forward, op dispatch included, without a graph
    # break. cpu: aot_eager adds AOT autograd through the op's fake and registered backward (inductor
    # would only add minutes of C++ compilation). reference: dynamo alone (it is plain torch).
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if backend == "cpu" else "eager")
    out = compiled(x, lengths)
    assert_close(out, eager.detach().double(), torch.float32)
    out.square().sum().backward()
    g_compiled = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager.square().sum().backward()
    for gc, ge in zip(g_compiled, [p.grad for p in model.parameters()]):
        assert_close(gc, ge.double(), torch.float32, grad=True)


# ---------------------------------------------------------------------------------------------
# The reference against an independent oracle: the quadratic closed form
# ---------------------------------------------------------------------------------------------
def closed_form(u, delta, A, B, C, D, z, delta_bias, softplus, initial_state, lengths):
    """y_t = C_t . (prod_{r<=t} exp(Δ_r A)) h_0 + sum_{s<=t} C_t . (prod_{r=s+1..t} exp(Δ_r A)) Δ_s B_s u_s,
    computed densely (O(L^2)) in float64 with no recurrence."""
    batch, dim, L = u.shape
    N = A.shape[1]
    dt = delta + (delta_bias[:, None] if delta_bias is not None else 0)
    if softplus:
        dt = F.softplus(dt)

    def per_channel(X):  # -> (batch, dim, N, L)
        if X.dim() == 2:
            return X[None, :, :, None].expand(batch, dim, N, L)
        if X.dim() == 3:
            return X[:, None].expand(batch, dim, N, L)
        return X.repeat_interleave(dim // X.shape[1], dim=1)

    Bf, Cf = per_channel(B), per_channel(C)
    cum = torch.cumsum(dt[:, :, None, :] * A[None, :, :, None], dim=-1)  # (batch, dim, N, L): sum_{r<=t}
    # decay[t, s] = exp(cum_t - cum_s) for s <= t
    diff = cum[..., :, None] - cum[..., None, :]  # (batch, dim, N, t, s)
    mask = torch.ones(L, L, dtype=torch.bool).tril()
    decay = torch.where(mask, torch.exp(diff.masked_fill(~mask, 0.0)), torch.zeros((), dtype=u.dtype))
    drive = dt * u  # (batch, dim, L)
    contrib = decay * (Bf * drive[:, :, None, :])[..., None, :]  # (batch, dim, N, t, s)
    h = contrib.sum(-1)  # (batch, dim, N, t)
    if initial_state is not None:
        h = h + torch.exp(cum) * initial_state[..., None]
    y = (Cf * h).sum(2)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    last = h[..., -1] if L > 0 else initial_state
    if lengths is not None:
        valid = torch.arange(L)[None, :] < lengths[:, None]
        y = y * valid[:, None, :]
        idx = (lengths - 1).clamp_min(0)
        last = torch.gather(h, 3, idx[:, None, None, None].expand(batch, dim, N, 1))[..., 0]
        init = initial_state if initial_state is not None else torch.zeros(batch, dim, N, dtype=u.dtype)
        last = torch.where((lengths == 0)[:, None, None], init, last)
    return y, last


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("combo", COMBOS[:4], ids=combo_id)
def test_reference_against_closed_form(layout, combo):
    f = dict(zip(FEATURES, combo))
    batch = 4 if f["lengths"] else 2
    x = make_selective_scan_inputs(batch, 4, 5, 24, dtype=torch.float64, B_layout=layout, groups=2,
                                   with_D=bool(f["D"]), with_z=bool(f["z"]), with_delta_bias=bool(f["delta_bias"]),
                                   with_initial_state=bool(f["initial_state"]), seed=7)
    if not f["softplus"]:
        positive_steps(x)
    lengths = make_lengths(batch, 24) if f["lengths"] else None
    out, last = selective_scan_ref(**x, delta_softplus=bool(f["softplus"]), return_last_state=True, lengths=lengths)
    y, h = closed_form(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"],
                       bool(f["softplus"]), x["initial_state"], lengths)
    torch.testing.assert_close(out, y, atol=1e-11, rtol=1e-10)
    torch.testing.assert_close(last, h, atol=1e-11, rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# Against mamba-ssm's own selective_scan_ref (the CPU path its users have), when installed
# ---------------------------------------------------------------------------------------------
MAMBA_REF = load_mamba_selective_scan_ref()


@pytest.mark.skipif(MAMBA_REF is None, reason="mamba_ssm not importable; install with "
                    "MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE pip install --no-build-isolation --no-deps "
                    "mamba-ssm einops")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("combo", [(1, 1, 1, 1, 1), (0, 0, 0, 0, 1), (1, 0, 1, 0, 0)],
                         ids=["z+D+bias+softplus", "plain", "z+bias"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_against_mamba_ssm(backend, layout, combo):
    """Same float32 inputs to mamba-ssm's selective_scan_ref and to ours: outputs, last state and
    the gradients of every input agree to float32 accuracy (mamba's ref computes in float32)."""
    require_backend(backend)
    with_z, with_D, with_bias, softplus, last_state = (bool(v) for v in combo)
    x = make_selective_scan_inputs(2, 4, 8, 67, B_layout=layout, groups=2, with_D=with_D, with_z=with_z,
                                   with_delta_bias=with_bias, seed=11, requires_grad=True)
    if not softplus:
        positive_steps(x)
    ours = run_with_grads(lambda **kw: selective_scan(**kw, backend=backend), x, None, softplus, last_state)
    xm = {k: (v.detach().clone().requires_grad_(True) if v is not None else None) for k, v in x.items()}
    xm.pop("initial_state")

    def mamba(lengths=None, **kw):
        assert lengths is None
        return MAMBA_REF(**kw)

    theirs = run_with_grads(mamba, xm, None, softplus, last_state)
    assert_close(ours[0], theirs[0].double(), torch.float32, name="out", scale=2.0)
    if last_state:
        assert_close(ours[1], theirs[1].double(), torch.float32, name="last_state", scale=2.0)
    for k, g in theirs[2].items():
        assert_close(ours[2][k], g.double(), torch.float32, grad=True, name=f"d{k}", scale=2.0)


# ---------------------------------------------------------------------------------------------
# Memory: the cpu backend never allocates a (batch, dim, N, L) buffer
# ---------------------------------------------------------------------------------------------
def largest_allocation_bytes(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        fn()
    # Self memory: what each op allocated itself, not what its children (e.g. the aten::empty calls
    # inside our kernel, which appear as their own events) allocated. An op that allocates several
    # buffers reports their sum, so this over-estimates the largest single allocation.
    sizes = [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]
    return max(sizes) if sizes else 0


def test_cpu_no_full_state_buffer():
    """The largest single allocation during forward + backward on the cpu backend is far below
    batch x dim x N x L x 4 bytes (what materialising every state would take); the reference,
    which keeps every step's state for autograd, is measured as a control for the method."""
    require_backend("cpu")
    batch, dim, N, L = 2, 256, 16, 256
    full = batch * dim * N * L * 4
    x = make_selective_scan_inputs(batch, dim, N, L, B_layout="variable", seed=9, requires_grad=True)

    def step(backend):
        def run():
            out, last = selective_scan(**x, delta_softplus=True, return_last_state=True, backend=backend)
            (out.sum() + last.sum()).backward()
        return run

    biggest = largest_allocation_bytes(step("cpu"))
    # The biggest legitimate buffers: batch x dim x L tensors (u-sized outputs and gradients) and the
    # backward's variable-B/C task buffers, about max(16, 2 x threads) x L x N.
    assert biggest <= max(batch * dim * L * 4 * 2, 2 * max(16, 2 * torch.get_num_threads()) * L * N * 4), (biggest, full)
    assert biggest < full / 8, (biggest, full)
    # Control: the same probe sees the full-state-sized work of a materialising implementation.
    xs = {k: v for k, v in x.items()}

    def materialising():
        dA = torch.exp(xs["delta"][..., None] * xs["A"][None, :, None, :])  # (batch, dim, L, N)
        dA.sum().backward()

    assert largest_allocation_bytes(materialising) >= full


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument
# ---------------------------------------------------------------------------------------------
def _good(**over):
    x = make_selective_scan_inputs(2, 4, 5, 9, seed=0)
    x.update(over)
    return x


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(u=torch.randn(2, 4)), ValueError, r"\bu must be 3-D"),
        (dict(delta=torch.randn(2, 4, 8)), ValueError, r"\bdelta must have shape \(2, 4, 9\)"),
        (dict(A=torch.randn(3, 5)), ValueError, r"\bA must have shape \(dim=4"),
        (dict(B=torch.randn(2, 5, 8)), ValueError, r"\bB must have shape \(batch=2, N=5, L=9\)"),
        (dict(C=torch.randn(2, 3, 5, 9)), ValueError, r"\bC must have shape .*G dividing dim=4"),
        (dict(B=torch.randn(4, 6)), ValueError, r"\bB must have shape \(dim=4, N=5\)"),
        (dict(D=torch.randn(3)), ValueError, r"\bD must have shape \(4\) \(dim,\), got \(3\)"),
        (dict(z=torch.randn(2, 4, 10)), ValueError, r"\bz must have shape \(2, 4, 9\)"),
        (dict(delta_bias=torch.randn(4, 1)), ValueError, r"\bdelta_bias must have shape \(4\) \(dim,\)"),
        (dict(initial_state=torch.randn(2, 4, 4)), ValueError, r"\binitial_state must have shape \(2, 4, 5\)"),
        (dict(u=torch.ones(2, 4, 9, dtype=torch.int64)), TypeError, r"\bu must have dtype"),
        (dict(A=-torch.rand(4, 5).half()), TypeError, r"\bA must have dtype in \(float32, float64\)"),
        (dict(B=torch.ones(2, 5, 9, dtype=torch.int32)), TypeError, r"\bB must have dtype"),
        (dict(D=[1.0, 2.0, 3.0, 4.0]), TypeError, r"\bD must be a torch.Tensor"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_input(backend, over, exc, match):
    require_backend(backend)
    with pytest.raises(exc, match=match):
        selective_scan(**_good(**over), backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize(
    "lengths,exc,match",
    [
        (torch.tensor([9, 10]), ValueError, r"lengths must lie in \[0, 9\]"),
        (torch.tensor([-1, 3]), ValueError, r"lengths must lie in \[0, 9\]"),
        (torch.tensor([3, 4, 5]), ValueError, r"lengths must have shape \(2,\)"),
        (torch.tensor([[3, 4]]), ValueError, r"lengths must have shape \(2,\)"),
        (torch.tensor([3.0, 4.0]), TypeError, r"lengths must be an integer tensor"),
        ([3, 4], TypeError, r"lengths must be a torch.Tensor"),
    ],
)
def test_bad_lengths(backend, lengths, exc, match):
    require_backend(backend)
    with pytest.raises(exc, match=match):
        selective_scan(**_good(), lengths=lengths, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name", ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"])
def test_non_finite_with_check_inputs(backend, name):
    require_backend(backend)
    x = _good(initial_state=torch.randn(2, 4, 5))
    bad = x[name].clone()
    bad.view(-1)[1] = float("nan") if name != "delta" else float("inf")
    x[name] = bad
    with pytest.raises(ValueError, match=rf"^{name} has 1 non-finite value"):
        selective_scan(**x, backend=backend, check_inputs=True)
    selective_scan(**x, backend=backend)  # without the check: no error (the caller opted out)


def test_state_size_over_kernel_maximum():
    require_backend("cpu")
    x = make_selective_scan_inputs(1, 2, MAX_DSTATE + 1, 3, seed=0)
    with pytest.raises(ValueError, match=rf"N \(A.shape\[1\]\) = {MAX_DSTATE + 1} exceeds"):
        selective_scan(**x, backend="cpu")
    # The kernel refuses it too when called directly (no out-of-bounds state arrays).
    Bk = x["B"].unsqueeze(1)
    with pytest.raises(RuntimeError, match="exceeds the CPU kernel's maximum state size"):
        torch.ops.mvpp.selective_scan_fwd(x["u"], x["delta"], x["A"], Bk, Bk, None, None, None, None, None, False, 64)
    # The reference has no limit.
    selective_scan(**x, backend="reference")


def test_kernel_rejects_bad_lengths_and_chunks_directly():
    """The compiled op validates what it indexes with, even when called without the wrapper."""
    require_backend("cpu")
    x = make_selective_scan_inputs(2, 2, 4, 5, seed=0)
    Bk = x["B"].unsqueeze(1)
    args = [x["u"], x["delta"], x["A"], Bk, Bk, None, None, None, None]
    with pytest.raises(RuntimeError, match=r"lengths must lie in \[0, L=5\]"):
        torch.ops.mvpp.selective_scan_fwd(*args, torch.tensor([6, 1]), False, 64)
    with pytest.raises(RuntimeError, match="chunk_size must be >= 1"):
        torch.ops.mvpp.selective_scan_fwd(*args, None, False, 0)
    with pytest.raises(RuntimeError, match=r"B must be \(dim, N\) or \(batch, G, N, L\)"):
        torch.ops.mvpp.selective_scan_fwd(x["u"], x["delta"], x["A"], x["B"], Bk, None, None, None, None, None,
                                          False, 64)


def test_unknown_backend_and_wrong_device():
    x = _good()
    with pytest.raises(ValueError, match=r"backend='tpu' is not a backend"):
        selective_scan(**x, backend="tpu")
    with pytest.raises(BackendUnavailableError, match="cuda backend needs CUDA tensors, got cpu"):
        selective_scan(**x, backend="cuda")


@pytest.mark.cuda
def test_mixed_devices():
    x = _good()
    x["B"] = x["B"].cuda()
    with pytest.raises(ValueError, match=r"\bB is on cuda:0 but u is on cpu"):
        selective_scan(**x, backend="reference")


def test_env_backend(monkeypatch):
    require_backend("cpu")
    x = _good()
    monkeypatch.setenv("MVPP_BACKEND", "nonsense")
    with pytest.raises(ValueError, match=re.escape("MVPP_BACKEND='nonsense' is not a backend")):
        selective_scan(**x)
    monkeypatch.setenv("MVPP_BACKEND", "reference")
    ref = selective_scan(**x)
    monkeypatch.setenv("MVPP_BACKEND", "cpu")
    assert_close(selective_scan(**x), ref.double(), torch.float32)
