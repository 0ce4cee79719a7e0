"""Regression tests for issue 16 (bad-input probe): crashes, silent wrong answers, backend disagreement.

Crash-prone calls run in a subprocess, so a regression (SIGFPE / SIGSEGV / heap corruption) shows up as
a failing test with the child's exit status, not as a dead pytest process.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import mvpp_kernels  # noqa: F401
from mvpp_kernels.ops.cluster_lookup import cluster_lookup
from mvpp_kernels.ops.cluster_update import cluster_update

_TREE = """
import torch, mvpp_kernels
from mvpp_kernels.ops.cluster_lookup import cluster_lookup
from mvpp_kernels.ops.cluster_update import cluster_update
g = torch.Generator().manual_seed(16)
d = 4
q = torch.randn(2, d, generator=g)
coarse = torch.randn(2, d, generator=g)
fine = torch.randn(3, d, generator=g)
mkeys = torch.randn(6, d, generator=g)
mids = torch.arange(6, dtype=torch.int64)
coff = torch.tensor([0, 1, 3])
foff = torch.tensor([0, 2, 4, 6])
def expect_error(fn, *words):
    try:
        fn()
    except (RuntimeError, ValueError) as e:
        msg = str(e)
        missing = [w for w in words if w not in msg]
        assert not missing, (missing, msg)
        print("CLEAR-ERROR")
        return
    raise AssertionError("no error raised")
"""


def _run_child(body: str) -> None:
    code = _TREE + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"child exited with {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    assert "CLEAR-ERROR" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_cluster_lookup_cpu_kernel_d0_is_a_clear_error():
    # was SIGFPE (integer division by d in csrc/cpu/cluster_lookup.cpp)
    _run_child("""
        z = lambda *s: torch.zeros(*s)
        expect_error(lambda: torch.ops.mvpp.cluster_lookup(z(2, 0), z(2, 0), coff, z(3, 0), foff,
                                                            torch.zeros(6, 0), mids, 2, 1, 1, None),
                     "d must be >= 1")
    """)


@pytest.mark.parametrize("bad", ["10**7", "-5"])
def test_cluster_lookup_compiled_bad_fine_offsets_is_a_clear_error(bad):
    # was SIGSEGV: the Python offset check is skipped while tracing and the kernel trusted the offsets
    _run_child(f"""
        f = torch.compile(lambda *a: cluster_lookup(*a, backend="cpu"), backend="eager", fullgraph=True)
        bad = foff.clone(); bad[2] = {bad}
        expect_error(lambda: f(q, coarse, coff, fine, bad, mkeys, mids, 2, (2, 3)), "fine_offsets")
    """)


def test_cluster_lookup_kernel_bad_coarse_offsets_is_a_clear_error():
    _run_child("""
        expect_error(lambda: torch.ops.mvpp.cluster_lookup(q, coarse, torch.tensor([0, 5, 3]), fine, foff, mkeys,
                                                            mids, 2, 2, 3, None), "coarse_offsets")
    """)


@pytest.mark.parametrize("offs", [[0, 0, 0, 0], [0, 3, 6, 10**8], [1, 2, 3, 6], [0, 4, 2, 6]])
def test_cluster_update_unchecked_bad_coarse_offsets_is_a_clear_error(offs):
    # was heap corruption / SIGSEGV with check_inputs=False
    _run_child(f"""
        c3 = torch.randn(3, d, generator=g)
        f6 = torch.randn(6, d, generator=g)
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)
        x = torch.randn(5, d, generator=g)
        expect_error(lambda: cluster_update(x, None, c3, torch.tensor({offs}), f6, z(6, d), z(6, d), z(6, 0),
                                            torch.zeros(6, dtype=torch.int64), backend="cpu", check_inputs=False),
                     "coarse_offsets")
    """)


def test_cluster_update_compiled_bad_coarse_offsets_is_a_clear_error():
    _run_child("""
        c3 = torch.randn(3, d, generator=g)
        f6 = torch.randn(6, d, generator=g)
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)
        x = torch.randn(5, d, generator=g)
        f = torch.compile(lambda *a: cluster_update(*a, backend="cpu"), backend="eager", fullgraph=True)
        expect_error(lambda: f(x, None, c3, torch.tensor([0, 3, 6, 10**8]), f6, z(6, d), z(6, d), z(6, 0),
                               torch.zeros(6, dtype=torch.int64)), "coarse_offsets")
    """)


def test_cluster_update_kernel_rejects_non_cpu_inputs():
    # was: one input on `meta` returned uninitialised memory
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, generator=g)
    c = torch.randn(2, 3, generator=g)
    f = torch.randn(3, 3, generator=g)
    z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
    with pytest.raises(ValueError, match="fine_mean"):
        cluster_update(x, None, c, torch.tensor([0, 1, 3]), f, z(3, 3).to("meta"), z(3, 3), z(3, 0),
                       torch.zeros(3, dtype=torch.int64), backend="cpu", check_inputs=False)


def test_cluster_kernels_still_match_reference_after_guards():
    # the guards must not reject valid trees (including empty coarse clusters)
    g = torch.Generator().manual_seed(11)
    d = 5
    q = torch.randn(3, d, generator=g, dtype=torch.float64)
    coarse = torch.randn(3, d, generator=g, dtype=torch.float64)
    fine = torch.randn(4, d, generator=g, dtype=torch.float64)
    mkeys = torch.randn(9, d, generator=g, dtype=torch.float64)
    mids = torch.randperm(9, generator=g)
    coff, foff = torch.tensor([0, 2, 2, 4]), torch.tensor([0, 3, 3, 7, 9])
    a = cluster_lookup(q, coarse, coff, fine, foff, mkeys, mids, 4, (3, 4), backend="cpu")
    b = cluster_lookup(q, coarse, coff, fine, foff, mkeys, mids, 4, (3, 4), backend="reference")
    torch.testing.assert_close(a[0], b[0])
    assert torch.equal(a[1], b[1])
    x = torch.randn(6, d, generator=g, dtype=torch.float64)
    z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
    st = (z(4, d), z(4, d), z(4, 0), torch.zeros(4, dtype=torch.int64))
    u = cluster_update(x, None, coarse, coff, fine, *st, backend="cpu", check_inputs=False)
    r = cluster_update(x, None, coarse, coff, fine, *st, backend="reference")
    for s, t in zip(u, r):
        torch.testing.assert_close(s, t)


def small_tree(seed, bad_id=None):
    """A 2-query, 2-coarse, 3-fine, 6-member float32 tree (d = 4) from a seeded generator, as the
    (queries, coarse, coarse_offsets, fine, fine_offsets, member_keys, member_ids) arguments of
    cluster_lookup; member 3 gets `bad_id` if given."""
    g = torch.Generator().manual_seed(seed)
    d = 4
    q, coarse, fine = torch.randn(2, d, generator=g), torch.randn(2, d, generator=g), torch.randn(3, d, generator=g)
    mkeys = torch.randn(6, d, generator=g)
    coff, foff = torch.tensor([0, 1, 3]), torch.tensor([0, 2, 4, 6])
    mids = torch.arange(6, dtype=torch.int64)
    if bad_id is not None:
        mids[3] = bad_id
    return q, coarse, coff, fine, foff, mkeys, mids


@pytest.mark.triton
@pytest.mark.parametrize("bad_id", [2**32 - 2, 2**32 - 1, 2**32 + 5, -3])
def test_triton_cluster_lookup_refuses_ids_outside_packed_range(bad_id):
    # issue 16: the Triton scan packs ids into 32 bits, so 2**32 + 5 came back as 5 (silently wrong)
    pytest.importorskip("triton")
    q, coarse, coff, fine, foff, mkeys, mids = small_tree(161, bad_id)
    with pytest.raises(ValueError, match="member_ids"):
        cluster_lookup(q, coarse, coff, fine, foff, mkeys, mids, 4, (2, 3), backend="triton")
    # the exact backends carry int64 ids unchanged
    s, i = cluster_lookup(q, coarse, coff, fine, foff, mkeys, mids, 6, (2, 3), backend="cpu")
    assert (i == bad_id).any(dim=1).all()
    mids[3] = 2**32 - 3  # the largest id the kernels carry: returned intact
    s2, i2 = cluster_lookup(q, coarse, coff, fine, foff, mkeys, mids, 6, (2, 3), backend="triton")
    sr, ir = cluster_lookup(q, coarse, coff, fine, foff, mkeys, mids, 6, (2, 3), backend="reference")
    assert torch.equal(i2, ir) and torch.allclose(s2, sr)


def test_selective_scan_reference_masks_nan_past_lengths():
    # issue 16: NaN in the padded tail (past `lengths`) leaked into the oracle's outputs and grads
    from mvpp_kernels.ops.selective_scan import selective_scan_ref

    g = torch.Generator().manual_seed(162)
    batch, dim, N, L = 2, 3, 4, 6
    lengths = torch.tensor([4, 6])

    def inputs(poison):
        u = torch.randn(batch, dim, L, generator=g, dtype=torch.float64)
        delta = torch.rand(batch, dim, L, generator=g, dtype=torch.float64)
        z = torch.randn(batch, dim, L, generator=g, dtype=torch.float64)
        B = torch.randn(batch, N, L, generator=g, dtype=torch.float64)
        C = torch.randn(batch, N, L, generator=g, dtype=torch.float64)
        if poison:
            for t in (u, delta, z, B, C):
                t[0, ..., 4:] = float("nan")
        return [t.requires_grad_() for t in (u, delta, z, B, C)]

    A = -torch.rand(dim, N, generator=g, dtype=torch.float64) - 0.1
    g_state = g.get_state()
    clean = inputs(False)
    g.set_state(g_state)
    dirty = inputs(True)
    outs = []
    for u, delta, z, B, C in (clean, dirty):
        out, last = selective_scan_ref(u, delta, A, B, C, z=z, lengths=lengths, return_last_state=True)
        (out.sum() + last.sum()).backward()
        outs.append((out, last))
    assert torch.isfinite(outs[1][0]).all() and torch.isfinite(outs[1][1]).all()
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    for a, b in zip(clean, dirty):
        assert torch.isfinite(b.grad).all()
        assert torch.equal(a.grad, b.grad)


# The CUDA binding mirrors the CPU guards (csrc/cuda/cluster_lookup.cu, check_index_arrays): offsets,
# member-id range and d are validated on the device with one host sync, so torch.compile (which skips the
# Python wrapper's checks) cannot make the kernel index out of bounds. Needs a GPU: skipped without one.
_CUDA_BAD = [
    ("fine_offsets", dict(foff=[0, 2, 4, 10**7])),
    ("fine_offsets", dict(foff=[0, 4, 2, 6])),
    ("coarse_offsets", dict(coff=[0, 0, 0])),
    ("coarse_offsets", dict(coff=[1, 1, 3])),
    ("member_ids", dict(mids_fix=(3, 2**32 - 2))),
    ("member_ids", dict(mids_fix=(0, -1))),
]


@pytest.mark.cuda
@pytest.mark.parametrize("word,bad", _CUDA_BAD, ids=[f"{w}-{i}" for i, (w, _) in enumerate(_CUDA_BAD)])
def test_cuda_cluster_lookup_kernel_validates_what_it_indexes_with(word, bad):
    dev = "cuda"
    q, coarse, _, fine, _, mkeys, mids = (t.to(dev) for t in small_tree(162))
    if "mids_fix" in bad:
        mids[bad["mids_fix"][0]] = bad["mids_fix"][1]
    coff = torch.tensor(bad.get("coff", [0, 1, 3]), device=dev)
    foff = torch.tensor(bad.get("foff", [0, 2, 4, 6]), device=dev)
    with pytest.raises(RuntimeError, match=word):
        torch.ops.mvpp.cluster_lookup(q, coarse, coff, fine, foff, mkeys, mids, 2, 2, 3, None)
    torch.cuda.synchronize()  # no asynchronous illegal access left behind


@pytest.mark.cuda
def test_cuda_cluster_lookup_kernel_d0_and_valid_tree():
    dev = "cuda"
    z = lambda *s: torch.zeros(*s, device=dev)  # noqa: E731
    coff, foff = torch.tensor([0, 1, 3], device=dev), torch.tensor([0, 2, 4, 6], device=dev)
    mids = torch.arange(6, device=dev)
    with pytest.raises(RuntimeError, match="d must be >= 1"):
        torch.ops.mvpp.cluster_lookup(z(2, 0), z(2, 0), coff, z(3, 0), foff, z(6, 0), mids, 2, 1, 1, None)
    with pytest.raises(RuntimeError, match="d must be >= 1"):
        torch.ops.mvpp.exact_search(z(6, 0), z(2, 0), 2, None)
    g = torch.Generator().manual_seed(163)
    q, coarse, fine, mkeys = (torch.randn(s, 4, generator=g) for s in (2, 2, 3, 6))
    a = cluster_lookup(q.to(dev), coarse.to(dev), coff, fine.to(dev), foff, mkeys.to(dev), mids, 4, (2, 3))
    b = cluster_lookup(q, coarse, coff.cpu(), fine, foff.cpu(), mkeys, mids.cpu(), 4, (2, 3), backend="reference")
    torch.testing.assert_close(a[0].cpu(), b[0])
    assert torch.equal(a[1].cpu(), b[1])


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.triton)])
def test_cluster_lookup_kernel_scores_carry_the_reference_gradient(backend):
    # same class as exact_search with keys.requires_grad (issue 16): the kernel's scores claimed a
    # gradient (requires_grad=True) and backward gave None for queries and member_keys
    if backend == "triton":
        pytest.importorskip("triton")
    g = torch.Generator().manual_seed(164)
    d = 4
    dt = torch.float32
    q = torch.randn(3, d, generator=g, dtype=dt)
    coarse, fine = torch.randn(2, d, generator=g, dtype=dt), torch.randn(3, d, generator=g, dtype=dt)
    mkeys = torch.randn(6, d, generator=g, dtype=dt)
    coff, foff = torch.tensor([0, 1, 3]), torch.tensor([0, 2, 4, 6])
    mids = torch.tensor([50, 7, 31, 2, 19, 44])  # ids are not row numbers
    ex = torch.tensor([7, -1, -1])
    grads = {}
    for b in (backend, "reference"):
        qq, kk = q.clone().requires_grad_(), mkeys.clone().requires_grad_()
        s, i = cluster_lookup(qq, coarse, coff, fine, foff, kk, mids, 4, (2, 3), exclude=ex, backend=b)
        w = torch.arange(1, s.numel() + 1, dtype=dt).view_as(s)
        (torch.where(i >= 0, s, torch.zeros_like(s)) * w).sum().backward()
        grads[b] = (s.detach(), i, qq.grad, kk.grad)
    s, i, gq, gk = grads[backend]
    rs, ri, rq, rk = grads["reference"]
    assert torch.equal(i, ri)
    torch.testing.assert_close(s, rs)
    assert gq is not None and gk is not None
    torch.testing.assert_close(gq, rq)
    torch.testing.assert_close(gk, rk)


def test_assert_close_is_not_disarmed_by_an_infinite_reference():
    # the harness took its magnitude-relative tolerance over the whole reference, so one inf made the
    # tolerance inf and every finite element passed (found while fixing the cpu overflow corners)
    from mvpp_kernels.testing import assert_close
    inf = float("inf")
    e = torch.tensor([1.0, inf, -inf, 2.0], dtype=torch.float64)
    assert_close(e.clone().float(), e)
    with pytest.raises(AssertionError):
        assert_close(torch.tensor([1.0, inf, -inf, 1e6]), e)  # finite element far off
    with pytest.raises(AssertionError, match="where the reference is"):
        assert_close(torch.tensor([1.0, 3.0, -inf, 2.0]), e)  # finite where the reference is inf
    with pytest.raises(AssertionError, match="where the reference is"):
        assert_close(torch.tensor([1.0, -inf, -inf, 2.0]), e)  # wrong sign
    with pytest.raises(AssertionError, match="where the reference is"):
        assert_close(torch.tensor([inf, inf, -inf, 2.0]), e)  # inf where the reference is finite
