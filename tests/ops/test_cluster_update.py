"""cluster_update: routing rule, the stream fold against the float64 batch mean, the same bytes on every
backend, NaN-poisoned outputs, opcheck, bad input."""
from __future__ import annotations

import pytest
import torch

from mvpp_kernels import cluster_update
from mvpp_kernels._backend import has_compiled_kernel
from mvpp_kernels.ops.cluster_update import route_greedy_ref
from mvpp_kernels.testing import make_memory_bank_data, poisoned_allocations

HAS_CPP = has_compiled_kernel("cluster_update", "CPU")
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="the C++ extension (cluster_update) is not built")
ALL_BACKENDS = ["reference", pytest.param("cpu", marks=needs_cpp), pytest.param("triton", marks=pytest.mark.triton)]


def make_state(d, dv, c1=3, cf=7, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    C = torch.randn(c1, d, generator=g, dtype=torch.float64).to(dtype)
    coff = torch.tensor([0, 3, 3, cf]) if c1 == 3 else torch.linspace(0, cf, c1 + 1).long()
    F = torch.randn(cf, d, generator=g, dtype=torch.float64).to(dtype)
    counts = torch.randint(0, 6, (cf,), generator=g)
    mean = torch.randn(cf, d, generator=g, dtype=torch.float64)
    sq = mean * mean + torch.rand(cf, d, generator=g, dtype=torch.float64)
    vmean = torch.randn(cf, dv, generator=g, dtype=torch.float64)
    return (C, coff, F, mean, sq, vmean, counts)


def stream(m, d, dv, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, d, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(m, dv, generator=g, dtype=torch.float64).to(dtype))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stream_equals_batch_mean_float64(backend, dtype):
    """Folding a stream batch by batch gives the float64 batch mean of (initial items + all new)."""
    d, dv = 70, 3  # d > the Triton block: two column blocks
    st = make_state(d, dv, dtype=dtype)
    C, coff, F, mean0, sq0, vmean0, counts0 = st
    mean, sq, vmean, counts = mean0, sq0, vmean0, counts0
    xs, vs, assigns = [], [], []
    for b, m in enumerate([1, 13, 0, 40]):
        x, v = stream(m, d, dv, seed=10 + b, dtype=dtype)
        with poisoned_allocations():
            a, mean, sq, vmean, counts = cluster_update(x, v, C, coff, F, mean, sq, vmean, counts, backend=backend)
        xs.append(x.double()), vs.append(v.double()), assigns.append(a)
    x, v, a = torch.cat(xs), torch.cat(vs), torch.cat(assigns)
    assert torch.equal(a, route_greedy_ref(x.to(dtype), C, coff, F))
    n0 = counts0.double()[:, None]
    cnt = torch.bincount(a, minlength=F.shape[0])
    tot = n0 + cnt.double()[:, None]
    want_mean = (mean0 * n0 + torch.zeros_like(mean0).index_add_(0, a, x)) / tot.clamp_min(1)
    want_sq = (sq0 * n0 + torch.zeros_like(sq0).index_add_(0, a, x * x)) / tot.clamp_min(1)
    want_v = (vmean0 * n0 + torch.zeros_like(vmean0).index_add_(0, a, v)) / tot.clamp_min(1)
    touched = cnt > 0
    assert torch.equal(counts, counts0 + cnt)
    for got, want, init in ((mean, want_mean, mean0), (sq, want_sq, sq0), (vmean, want_v, vmean0)):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got[touched], want[touched], atol=1e-12, rtol=1e-12)
        assert torch.equal(got[~touched], init[~touched])


def test_same_bytes_on_every_backend():
    backends = ["reference"] + (["cpu"] if HAS_CPP else [])
    try:
        import triton  # noqa: F401

        backends.append("triton")
    except ImportError:
        pass
    d, dv = 33, 2
    st = make_state(d, dv, seed=3)
    x, v = stream(120, d, dv, seed=4)
    outs = {b: cluster_update(x, v, *st, backend=b) for b in backends}
    ref = outs["reference"]
    for b, out in outs.items():
        for name, got, want in zip(("assign", "mean", "sq", "vmean", "counts"), out, ref):
            assert got.dtype == want.dtype and torch.equal(got, want), f"{b}: {name} differs in bytes"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_routing_ties_and_empty_coarse(backend):
    """Equal scores go to the lower index; a coarse cluster without children is never chosen."""
    d = 4
    C = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [1.0, 0, 0, 0]])
    coff = torch.tensor([0, 0, 2, 3])  # coarse 0 has no children
    F = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [5.0, 0, 0, 0]])
    x = torch.tensor([[1.0, 0, 0, 0], [2.0, 1, 0, 0]])
    st = (C, coff, F, torch.zeros(3, d, dtype=torch.float64), torch.zeros(3, d, dtype=torch.float64),
          torch.zeros(3, 0, dtype=torch.float64), torch.zeros(3, dtype=torch.int64))
    a, mean, _, _, counts = cluster_update(x, None, *st, backend=backend)
    assert a.tolist() == [0, 0]  # coarse 1 (lower than 2), then fine 0 (ties with fine 1)
    assert counts.tolist() == [2, 0, 0]
    torch.testing.assert_close(mean[0], torch.tensor([1.5, 0.5, 0, 0], dtype=torch.float64))


@needs_cpp
def test_opcheck_compiled():
    st = make_state(8, 2, seed=5)
    x, v = stream(9, 8, 2, seed=6)
    torch.library.opcheck(torch.ops.mvpp.cluster_update, (x, v) + st)


@pytest.mark.triton
def test_opcheck_triton_cpu_subset():
    # The interpreter cannot run on fake tensors: schema, fake and autograd registration only.
    from mvpp_kernels.ops.cluster_update import triton as cut

    st = make_state(8, 2, seed=5)
    x, v = stream(9, 8, 2, seed=6)
    torch.library.opcheck(cut.cluster_update_triton, (x, v) + st,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.cuda
def test_triton_gpu_same_bytes():
    st = make_state(40, 3, seed=7)
    x, v = stream(500, 40, 3, seed=8)
    want = cluster_update(x, v, *st, backend="reference")
    got = cluster_update(x.cuda(), v.cuda(), *(t.cuda() for t in st), backend="triton")
    for g_, w_ in zip(got, want):
        assert torch.equal(g_.cpu(), w_)


def test_bad_input():
    st = make_state(8, 2)
    x, v = stream(5, 8, 2, seed=1)
    with pytest.raises(ValueError, match="new_values must have one row per new key"):
        cluster_update(x, v[:3], *st)
    with pytest.raises(ValueError, match="coarse_centroids must have shape"):
        cluster_update(x[:, :4], v, *st)
    bad = x.clone()
    bad[2, 1] = float("inf")
    with pytest.raises(ValueError, match="new_keys has 1 non-finite"):
        cluster_update(bad, v, *st)
    C, coff, F, mean, sq, vmean, counts = st
    with pytest.raises(TypeError, match="fine_mean must have dtype"):
        cluster_update(x, v, C, coff, F, mean.float(), sq, vmean, counts)
    with pytest.raises(ValueError, match="fine_value_mean must have shape"):
        cluster_update(x, None, C, coff, F, mean, sq, vmean, counts)
    with pytest.raises(ValueError, match="coarse_offsets must be non-decreasing"):
        cluster_update(x, v, C, coff.flip(0), F, mean, sq, vmean, counts)
