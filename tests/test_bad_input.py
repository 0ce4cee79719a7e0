"""Bad-input table (issue 11 item 2, issue 16 op items): one row per case, with the expected exception
type and a message fragment, or "ok" with a check of the defined answer. docs/bad_input.md is
generated from CASES by scripts/bad_input_table.py; test_doc_up_to_date keeps it in sync."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch

from mvpp_kernels import (BackendUnavailableError, HierarchicalIndex, cluster_lookup, cluster_update, exact_search,
                          frame_score, hawkes_intensity, hawkes_loglik, mhp_scan, selective_scan)
from mvpp_kernels._backend import triton_status

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _keys(n=8, d=4, dtype=torch.float32, seed=0):
    return torch.randn(n, d, generator=_g(seed), dtype=torch.float64).to(dtype)


def _tree(d=4, seed=1):
    g = _g(seed)
    coarse = torch.randn(2, d, generator=g, dtype=torch.float64)
    fine = torch.randn(4, d, generator=g, dtype=torch.float64)
    return dict(coarse_centroids=coarse, coarse_offsets=torch.tensor([0, 2, 4]), fine_centroids=fine,
                fine_mean=torch.zeros(4, d, dtype=torch.float64), fine_sq=torch.zeros(4, d, dtype=torch.float64),
                fine_value_mean=torch.zeros(4, 1, dtype=torch.float64),
                fine_counts=torch.zeros(4, dtype=torch.int64))


def _cu(**over):
    kw = dict(new_keys=_keys(3, 4, torch.float64, 2), new_values=torch.ones(3, 1, dtype=torch.float64), **_tree())
    backend = over.pop("backend", "reference")
    check = over.pop("check_inputs", True)
    kw.update(over)
    return lambda: cluster_update(kw["new_keys"], kw["new_values"], kw["coarse_centroids"], kw["coarse_offsets"],
                                  kw["fine_centroids"], kw["fine_mean"], kw["fine_sq"], kw["fine_value_mean"],
                                  kw["fine_counts"], backend=backend, check_inputs=check)


def _es(keys=None, queries=None, k=2, **kw):
    keys = _keys() if keys is None else keys
    queries = _keys(3, keys.shape[1] if isinstance(keys, torch.Tensor) and keys.dim() == 2 else 4, seed=5) if queries is None else queries
    kw.setdefault("backend", "reference")
    return lambda: exact_search(keys, queries, k, **kw)


def _es_ok_k_equals_n():
    keys, q = _keys(5, 3, torch.float64), _keys(2, 3, torch.float64, 7)
    s, i = exact_search(keys, q, 5, backend="reference")
    ref = (q @ keys.T).sort(dim=1, descending=True)
    assert torch.allclose(s, ref.values) and torch.equal(i, ref.indices)


def _es_ok_batch0():
    s, i = exact_search(_keys(5, 3), torch.zeros(0, 3), 2, backend="reference")
    assert s.shape == (0, 2) and i.shape == (0, 2)


# (id, callable, expected: exception type or "ok", message fragment)
CASES = [
    # exact_search
    ("exact_search/keys-1d", _es(keys=torch.zeros(4)), ValueError, "keys must be 2-D"),
    ("exact_search/queries-3d", _es(queries=torch.zeros(1, 2, 4)), ValueError, "queries must be 2-D"),
    ("exact_search/keys-int", _es(keys=torch.zeros(4, 4, dtype=torch.int32)), TypeError, "keys must have dtype"),
    ("exact_search/keys-complex", _es(keys=torch.zeros(4, 4, dtype=torch.complex64)), TypeError,
     "keys must have dtype"),
    ("exact_search/queries-int", _es(queries=torch.zeros(2, 4, dtype=torch.int64)), TypeError,
     "queries must have dtype"),
    ("exact_search/not-a-tensor", _es(keys=[[1.0]]), TypeError, "keys must be a torch.Tensor"),
    ("exact_search/dim-mismatch", _es(queries=torch.zeros(2, 5)), ValueError, "queries must have d = 4"),
    ("exact_search/empty-bank", _es(keys=torch.zeros(0, 4)), ValueError, "keys is empty"),
    ("exact_search/d0", _es(keys=torch.zeros(4, 0), queries=torch.zeros(2, 0)), ValueError, "d >= 1"),
    ("exact_search/d0-cpu", _es(keys=torch.zeros(4, 0), queries=torch.zeros(2, 0), backend="cpu"), ValueError,
     "d >= 1"),
    ("exact_search/k0", _es(k=0), ValueError, "k must be a positive int"),
    ("exact_search/k-negative", _es(k=-1), ValueError, "k must be a positive int"),
    ("exact_search/k-float", _es(k=2.0), ValueError, "k must be a positive int"),
    ("exact_search/k-bool", _es(k=True), ValueError, "k must be a positive int"),
    ("exact_search/k-gt-items", _es(k=9), ValueError, "larger than the bank"),
    ("exact_search/nan-key", _es(keys=_keys().index_put_((torch.tensor([1]), torch.tensor([2])),
                                                          torch.tensor(float("nan")))), ValueError, "non-finite"),
    ("exact_search/inf-query", _es(queries=torch.full((2, 4), float("inf"))), ValueError, "non-finite"),
    ("exact_search/-inf-key", _es(keys=torch.full((4, 4), float("-inf"))), ValueError, "non-finite"),
    ("exact_search/bad-metric", _es(metric="l2"), ValueError, "metric"),
    ("exact_search/exclude-shape", _es(exclude=torch.zeros(5, dtype=torch.int64)), ValueError, "exclude"),
    ("exact_search/device-mismatch", _es(queries=torch.zeros(3, 4, device="meta")), ValueError, "device"),
    ("exact_search/k-equals-n", _es_ok_k_equals_n, "ok", "sorted full scores"),
    ("exact_search/batch0", _es_ok_batch0, "ok", "empty (0, k) result"),
    # cluster_update
    ("cluster_update/keys-1d", _cu(new_keys=torch.zeros(4, dtype=torch.float64)), ValueError,
     "new_keys must be 2-D"),
    ("cluster_update/keys-int", _cu(new_keys=torch.zeros(3, 4, dtype=torch.int64)), TypeError,
     "new_keys must have dtype"),
    ("cluster_update/values-rows", _cu(new_values=torch.zeros(2, 1, dtype=torch.float64)), ValueError,
     "one row per new key"),
    ("cluster_update/centroid-dim", _cu(fine_centroids=torch.zeros(4, 5, dtype=torch.float64)), ValueError,
     "fine_centroids must have shape"),
    ("cluster_update/offsets-shape", _cu(coarse_offsets=torch.tensor([0, 4])), ValueError,
     "coarse_offsets must have shape"),
    ("cluster_update/offsets-zero", _cu(coarse_offsets=torch.tensor([0, 0, 0])), ValueError,
     "coarse_offsets must be non-decreasing"),
    ("cluster_update/offsets-huge", _cu(coarse_offsets=torch.tensor([0, 2, 10 ** 8])), ValueError,
     "coarse_offsets must be non-decreasing"),
    ("cluster_update/offsets-decreasing", _cu(coarse_offsets=torch.tensor([0, 3, 2])), ValueError,
     "coarse_offsets must be non-decreasing"),
    ("cluster_update/mean-dtype", _cu(fine_mean=torch.zeros(4, 4, dtype=torch.float32)), TypeError,
     "fine_mean must have dtype"),
    ("cluster_update/counts-dtype", _cu(fine_counts=torch.zeros(4, dtype=torch.int32)), TypeError,
     "fine_counts must have dtype"),
    ("cluster_update/nan-key", _cu(new_keys=torch.full((3, 4), float("nan"), dtype=torch.float64)), ValueError,
     "non-finite"),
    ("cluster_update/meta-mixed", _cu(new_values=torch.zeros(3, 1, dtype=torch.float64, device="meta")),
     ValueError, "all inputs must share a device"),
    ("cluster_update/d0", _cu(new_keys=torch.zeros(3, 0, dtype=torch.float64),
                              coarse_centroids=torch.zeros(2, 0, dtype=torch.float64),
                              fine_centroids=torch.zeros(4, 0, dtype=torch.float64),
                              fine_mean=torch.zeros(4, 0, dtype=torch.float64),
                              fine_sq=torch.zeros(4, 0, dtype=torch.float64)), ValueError, "d >= 1"),
    ("cluster_update/empty-tree", _cu(coarse_centroids=torch.zeros(0, 4, dtype=torch.float64),
                                      coarse_offsets=torch.tensor([0])), ValueError, "the cluster tree is empty"),
]


# ------------------------------------------------------------------------------------------------
# selective_scan / mhp_scan / hawkes / frame_score / cluster_lookup / HierarchicalIndex / CLI
# ------------------------------------------------------------------------------------------------
def _d(t):
    """A contiguous float64 copy of a float input (the reference's inputs); integer tensors unchanged."""
    return t.detach().double().contiguous() if t.is_floating_point() else t


def _close(a, b, tol):
    a, b = a.double(), b.double()
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, rtol=tol, atol=tol), (a - b).abs().max()


def _ss_inputs(b=2, dim=3, L=5, N=4, dtype=torch.float64, seed=11):
    g = _g(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return dict(u=r(b, dim, L), delta=torch.rand(b, dim, L, generator=g, dtype=torch.float64).to(dtype),
                A=-torch.rand(dim, N, generator=g, dtype=torch.float64).to(dtype if dtype == torch.float64 else torch.float32),
                B=r(b, N, L), C=r(b, N, L), D=r(dim))


def _ss(backend="reference", check_inputs=False, **over):
    kw = _ss_inputs()
    kw.update(over)
    return lambda: selective_scan(kw.pop("u"), kw.pop("delta"), kw.pop("A"), kw.pop("B"), kw.pop("C"), **kw,
                                  backend=backend, check_inputs=check_inputs)


def _ss_ok(backend, mutate, dtype=torch.float64, tol=1e-9, **shape):
    """Run `backend` on inputs changed by `mutate` (non-contiguous, expanded, ...) and compare with the
    float64 reference on contiguous float64 copies."""
    def run():
        kw = mutate(_ss_inputs(dtype=dtype, **shape))
        out = selective_scan(**kw, backend=backend)
        ref = selective_scan(**{n: _d(t) for n, t in kw.items()}, backend="reference")
        _close(out, ref, tol)
    return run


def _noncontig(kw):
    kw["u"] = kw["u"].transpose(1, 2).contiguous().transpose(1, 2)  # same values, strides (dim*L, 1, dim)
    kw["B"] = kw["B"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not kw["u"].is_contiguous()
    return kw


def _expanded(kw):
    kw["delta"] = kw["delta"][:1, :1, :].expand_as(kw["delta"])  # stride-0 batch and channel
    kw["C"] = kw["C"][:1].expand_as(kw["C"])
    assert kw["delta"].stride()[:2] == (0, 0)
    return kw


def _ss_ok_empty(batch, L):
    def run():
        kw = _ss_inputs(b=batch, L=L)
        out = selective_scan(**kw, backend="cpu")
        assert out.shape == (batch, 3, L)
        if L:
            _close(out, selective_scan(**kw, backend="reference"), 1e-12)
    return run


def _ss_ok_L1():
    kw = _ss_inputs(L=1)
    out = selective_scan(**kw, backend="cpu")
    # one step from h = 0: y = C . (delta * B * u) + D * u
    want = torch.einsum("bnl,bdl->bdl", kw["B"] * kw["C"], kw["delta"] * kw["u"]) + kw["D"][:, None] * kw["u"]
    _close(out, want, 1e-12)


def _ss_nan_propagates():
    kw = _ss_inputs()
    kw["u"][0, 1, 2] = float("nan")
    out = selective_scan(**kw, backend="cpu")
    ref = selective_scan(**kw, backend="reference")
    # documented: without check_inputs a NaN input propagates (from that step on, in that channel only)
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan()[0, 1, 2:].all() and out.isnan().sum() == 3
    _close(out.nan_to_num(), ref.nan_to_num(), 1e-12)


def _mhp_inputs(b=2, dim=3, L=5, N=4, seed=21):
    g = _g(seed)
    return dict(u=torch.randn(b, dim, L, generator=g, dtype=torch.float64),
                delta=torch.rand(b, dim, L, generator=g, dtype=torch.float64),
                A=-torch.rand(dim, N, generator=g, dtype=torch.float64),
                B=torch.randn(b, N, L, generator=g, dtype=torch.float64),
                C=torch.randn(b, N, L, generator=g, dtype=torch.float64),
                dt=torch.rand(b, L, generator=g, dtype=torch.float64),
                dt_end=torch.rand(b, generator=g, dtype=torch.float64))


def _mhp(backend="reference", check_inputs=False, **over):
    kw = _mhp_inputs()
    kw.update(over)
    return lambda: mhp_scan(**kw, backend=backend, check_inputs=check_inputs)


def _mhp_set(name, index, value):
    t = _mhp_inputs()[name].clone()
    t[index] = value
    return t


def _mhp_ok(backend, mutate, tol=1e-9):
    def run():
        kw = mutate(_mhp_inputs())
        out = mhp_scan(**kw, backend=backend)
        ref = mhp_scan(**{n: _d(t) for n, t in kw.items()}, backend="reference")
        _close(out.y, ref.y, tol)
        _close(out.y_left, ref.y_left, tol)
        _close(out.integral, ref.integral, tol)
    return run


def _f32(kw):
    return {n: (t.float() if t.is_floating_point() else t) for n, t in kw.items()}


def _es_ok_noncontig(backend):
    def run():
        keys, q = _keys(9, 4).t().contiguous().t(), _keys(3, 4, seed=8)[:, ::1].t().contiguous().t()
        assert not keys.is_contiguous()
        s, i = exact_search(keys, q, 4, backend=backend)
        rs, ri = exact_search(keys.double(), q.double(), 4, backend="reference")
        assert torch.equal(i, ri)
        _close(s, rs, 1e-5)
    return run


def _es_ok_expanded(backend):
    def run():
        keys = _keys(1, 4).expand(6, 4)  # six identical rows (stride 0): every score ties
        q = _keys(2, 4, seed=9)
        s, i = exact_search(keys, q, 3, backend=backend)
        assert torch.equal(i, torch.tensor([[0, 1, 2], [0, 1, 2]]))
        _close(s, (q.double() @ keys.double().T)[:, :3], 1e-5)
    return run


def _ss_mixed(kw):
    kw = _f32(kw)
    kw["delta"] = kw["delta"].double()  # mixed float32 / float64
    kw["B"] = kw["B"].bfloat16()
    return kw


def _ss_L_stride0(kw):
    kw["B"] = kw["B"][:, :, :1].expand_as(kw["B"])  # one B for every step: stride 0 along L
    return kw


def _ss_sliced(kw):
    return {n: (v[..., ::2] if v.dim() == 3 else v) for n, v in kw.items()}  # L stride 2


def _ss_ok_L1_triton():
    out = selective_scan(**_f32(_ss_inputs(L=1)), backend="triton")
    _close(out, selective_scan(**_ss_inputs(L=1), backend="reference"), 1e-5)


def _ss_ok_L0_triton():
    assert selective_scan(**_f32(_ss_inputs(L=0)), backend="triton").shape == (2, 3, 0)


def _mhp_ok_L0(backend):
    def run():
        out = mhp_scan(**_f32(_mhp_inputs(L=0)), backend=backend)
        # no events: no jump, the state stays 0 and so does the integral over [0, dt_end]
        assert out.y.shape == (2, 3, 0) and torch.equal(out.integral, torch.zeros(2, 3))
    return run


def _mhp_mixed(kw):
    kw = _f32(kw)
    kw["dt"] = kw["dt"].double()
    return kw


def _fs_ok_k_gt_T(backend):
    def run():
        kw = _f32(_fs_inputs())
        s, _, idx, top = frame_score(**kw, k=8, backend=backend)
        want = torch.sort(s.double(), dim=1, descending=True, stable=True).indices
        assert torch.equal(idx[:, :6], want) and (idx[:, 6:] == -1).all()
        assert torch.equal(top[:, 6:], torch.zeros(2, 2, 4))
    return run


def _fs_ok_lengths_int32(backend):
    def run():
        kw = _f32(_fs_inputs())
        a = frame_score(**kw, lengths=torch.tensor([3, 6], dtype=torch.int32), k=2, backend=backend)
        b = frame_score(**kw, lengths=torch.tensor([3, 6]), k=2, backend=backend)
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    return run


def _mhp_noncontig(kw):
    kw["u"] = kw["u"].transpose(1, 2).contiguous().transpose(1, 2)
    kw["dt"] = kw["dt"].t().contiguous().t()
    return kw


def _mhp_expanded(kw):
    kw["dt"] = kw["dt"][:1].expand_as(kw["dt"])
    kw["delta"] = kw["delta"][:, :1].expand_as(kw["delta"])
    return kw


def _mhp_ok_batch0():
    out = mhp_scan(**_mhp_inputs(b=0), backend="cpu")
    assert out.y.shape == (0, 3, 5) and out.integral.shape == (0, 3)


def _mhp_ok_lengths0():
    kw = _mhp_inputs()
    out = mhp_scan(**kw, lengths=torch.tensor([0, 5]), backend="cpu")
    ref = mhp_scan(**kw, lengths=torch.tensor([0, 5]), backend="reference")
    # a sequence with no events: nothing jumps, the state stays 0, so the integral is 0
    assert torch.equal(out.integral[0], torch.zeros(3, dtype=torch.float64))
    _close(out.integral, ref.integral, 1e-9)
    _close(out.y[1], ref.y[1], 1e-9)


def _mhp_ok_huge_gap():
    kw = _mhp_inputs()
    kw["dt"] = kw["dt"].clone()
    kw["dt"][0, 3] = 1e300  # exp(A * delta * dt) underflows to 0, never overflows (A <= 0)
    out = mhp_scan(**kw, backend="cpu")
    ref = mhp_scan(**kw, backend="reference")
    assert torch.isfinite(out.y).all() and torch.isfinite(out.integral).all()
    _close(out.y, ref.y, 1e-9)
    _close(out.integral, ref.integral, 1e-9)


class _Out:
    def __init__(self, y_left, integral):
        self.y_left, self.integral = y_left, integral


def _hk(**over):
    g = _g(31)
    kw = dict(out=_Out(torch.rand(2, 3, 5, generator=g, dtype=torch.float64),
                       torch.rand(2, 3, generator=g, dtype=torch.float64)),
              marks=torch.randint(0, 2, (2, 5), generator=g), mu=torch.tensor([0.5, 0.2], dtype=torch.float64),
              W=torch.rand(2, 3, generator=g, dtype=torch.float64), T=4.0)
    kw.update(over)
    return lambda: hawkes_loglik(**kw)


def _hi(**over):
    kw = _mhp_inputs()
    kw.pop("dt_end")
    kw.update(query_times=torch.tensor([[0.5, 1.0], [0.1, 2.0]], dtype=torch.float64),
              mu=torch.tensor([0.5, 0.2], dtype=torch.float64), W=torch.rand(2, 3, generator=_g(4), dtype=torch.float64))
    kw.update(over)
    return lambda: hawkes_intensity(**kw)


def _fs_inputs(b=2, T=6, F=4, dtype=torch.float64, seed=41):
    g = _g(seed)
    return dict(frames=torch.randn(b, T, F, generator=g, dtype=torch.float64).to(dtype),
                weight=torch.randn(F, generator=g, dtype=torch.float64).to(dtype))


def _fs(backend="reference", check_inputs=False, **over):
    kw = _fs_inputs()
    kw.setdefault("k", 2)
    kw.update(over)
    return lambda: frame_score(**kw, backend=backend, check_inputs=check_inputs)


def _fs_ok(backend, mutate, dtype=torch.float64, tol=1e-9, k=2):
    def run():
        kw = mutate(_fs_inputs(dtype=dtype))
        got = frame_score(**kw, k=k, backend=backend)
        ref = frame_score(**{n: _d(t) for n, t in kw.items()}, k=k, backend="reference")
        _close(got[0], ref[0], tol)
        _close(got[1], ref[1], tol)
        assert torch.equal(got[2], ref[2])
    return run


def _fs_noncontig(kw):
    kw["frames"] = kw["frames"].transpose(1, 2).contiguous().transpose(1, 2)
    kw["weight"] = torch.stack([kw["weight"], kw["weight"]], 1)[:, 0]
    assert not kw["frames"].is_contiguous() and kw["weight"].stride() == (2,)
    return kw


def _fs_expanded(kw):
    kw["frames"] = kw["frames"][:1].expand_as(kw["frames"])
    return kw


def _fs_ok_lengths():
    kw = _fs_inputs()
    s, dense, idx, top = frame_score(**kw, lengths=torch.tensor([0, 1]), k=2, backend="cpu")
    # length 0: no valid frame, dense is zeros and no index; length 1: the one frame, then -1
    assert torch.equal(idx, torch.tensor([[-1, -1], [0, -1]]))
    assert torch.equal(dense[0], torch.zeros(4, dtype=torch.float64))
    _close(dense[1], kw["frames"][1, 0], 1e-12)
    assert torch.isinf(s[0]).all() and torch.isinf(s[1, 1:]).all()


def _fs_ok_batch0():
    s, dense, idx, top = frame_score(**_fs_inputs(b=0), k=2, backend="cpu")
    assert s.shape == (0, 6) and dense.shape == (0, 4) and idx.shape == (0, 2) and top.shape == (0, 2, 4)


def _fs_ok_big_scores():
    kw = _fs_inputs()
    kw["frames"] = kw["frames"] * 1e4  # scores ~ 1e4: a naive exp(s) overflows; the softmax must not
    got = frame_score(**kw, k=2, backend="cpu")
    ref = frame_score(**kw, k=2, backend="reference")
    assert torch.isfinite(got[1]).all()
    _close(got[1], ref[1], 1e-9)


def _cl_tree(n=12, d=4):
    g = _g(51)
    keys = torch.randn(n, d, generator=g, dtype=torch.float64)
    return dict(coarse_centroids=keys[:2].clone(), coarse_offsets=torch.tensor([0, 2, 3]),
                fine_centroids=keys[:3].clone(), fine_offsets=torch.tensor([0, 4, 8, n]), member_keys=keys,
                member_ids=torch.arange(n))


def _cl(k=3, nprobe=(2, 3), backend="reference", **over):
    kw = _cl_tree()
    kw.update(over)
    q = kw.pop("queries", torch.randn(2, 4, generator=_g(52), dtype=torch.float64))
    return lambda: cluster_lookup(q, **kw, k=k, nprobe=nprobe, backend=backend, check_inputs=True)


def _cl_ok_full_probe(backend, dtype, tol):
    def run():
        kw = {n: (t.to(dtype) if t.is_floating_point() else t) for n, t in _cl_tree().items()}
        q = torch.randn(3, 4, generator=_g(53), dtype=torch.float64).to(dtype)
        q = q.t().contiguous().t()  # non-contiguous queries
        s, i = cluster_lookup(q, **kw, k=4, nprobe=(2, 3), backend=backend)
        rs, ri = exact_search(kw["member_keys"].double(), q.double(), 4, backend="reference")
        assert torch.equal(i, ri)
        _close(s, rs, tol)
    return run


def _bank(n=40, d=4, seed=61, **kw):
    keys = torch.randn(n, d, generator=_g(seed))
    return HierarchicalIndex.build(keys, torch.randn(n, 2, generator=_g(seed + 1)), branching=(2, 3), knn=4,
                                   kmeans_iters=3, refine=False, **kw)


_BANK = {}


def _bank_cached():
    if "b" not in _BANK:
        _BANK["b"] = _bank()
    return _BANK["b"]


def _hi_call(method, *args, **kwargs):
    return lambda: getattr(_bank_cached(), method)(*args, **kwargs)


def _hi_ok_update_dup():
    bank = _bank()
    x = torch.randn(1, 4, generator=_g(70))
    ids = bank.update(torch.cat([x, x]), torch.ones(2, 2))  # the same key twice: two distinct items
    assert ids.tolist() == [40, 41]
    s, i = bank.search(x, 2, nprobe=(bank.n_coarse, bank.n_fine))
    assert sorted(i[0].tolist()) == [40, 41] and torch.allclose(s, torch.ones(1, 2))


def _hi_ok_update_empty():
    bank = _bank()
    before = bank.n_items
    ids = bank.update(torch.zeros(0, 4), torch.zeros(0, 2))
    assert ids.numel() == 0 and bank.n_items == before


def _hi_save_load(tmp_edit):
    def run():
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            p = pathlib.Path(tmp) / "bank.mvpp"
            _bank_cached().save(p)
            tmp_edit(p)
            HierarchicalIndex.load(p)
    return run


def _truncate(p):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _flip(p):
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x40
    p.write_bytes(bytes(data))


def _hi_ok_roundtrip():
    import tempfile
    bank = _bank_cached()
    q = torch.randn(2, 4, generator=_g(71))
    with tempfile.TemporaryDirectory() as tmp:
        bank.save(pathlib.Path(tmp) / "b")
        back = HierarchicalIndex.load(pathlib.Path(tmp) / "b")
    a, b = bank.search(q, 3, nprobe=(2, 3)), back.search(q, 3, nprobe=(2, 3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _cli(argv, fragment_re):
    """The mvpp CLI in-process (main(argv)): exit code 2 and exactly one line on stderr, no traceback."""
    def run():
        import contextlib
        import io
        import re
        import tempfile
        from mvpp.cli import main
        err = io.StringIO()
        with tempfile.TemporaryDirectory(prefix="mvpp-bad-") as tmp, contextlib.redirect_stderr(err), \
                contextlib.redirect_stdout(io.StringIO()):
            args = [a.materialize(tmp) if isinstance(a, _CliFile) else a for a in argv]
            try:
                rc = main(args)
            except SystemExit as e:  # argparse usage errors
                rc = e.code
        text = err.getvalue().strip()
        assert rc == 2, (rc, text)
        lines = text.splitlines()
        assert "Traceback" not in text and (len(lines) == 1 or lines[0].startswith("usage:")), text
        assert re.search(fragment_re, lines[-1]), text
        raise _CliRefused(lines[-1])
    return run


class _CliRefused(Exception):
    """Raised by _cli rows after checking exit code 2 and a one-line message, so the row's fragment is
    checked against that line."""


class _CliFile:
    """A file argument of a _cli row, written into the row's own temporary directory only while the
    row runs (collecting the module creates no files, and the directory is removed afterwards)."""

    def __init__(self, name, content):
        self.name, self.content = name, content

    def materialize(self, directory):
        path = pathlib.Path(directory) / self.name
        path.write_bytes(self.content)
        return str(path)

    def __repr__(self):
        return f"<file {self.name}>"


def _cli_file(name, content):
    return _CliFile(name, content)


def _huge_guard(fn):
    """int32 index-overflow guards by arithmetic: a (2**31 + 1)-row bank is an expanded (stride-0) view."""
    return fn


_TRITON = pytest.mark.skipif(not triton_status()[0], reason="triton is not importable")
_nan = float("nan")
_inf = float("inf")

MORE_CASES = [
    # selective_scan
    ("selective_scan/u-2d", _ss(u=torch.zeros(3, 5, dtype=torch.float64)), ValueError, "u must be 3-D"),
    ("selective_scan/delta-shape", _ss(delta=torch.zeros(2, 3, 4, dtype=torch.float64)), ValueError,
     "delta must have shape (2, 3, 5)"),
    ("selective_scan/A-dim-mismatch", _ss(A=-torch.ones(4, 4, dtype=torch.float64)), ValueError,
     "A must have shape (dim=3, N)"),
    ("selective_scan/B-batch-mismatch", _ss(B=torch.zeros(1, 4, 5, dtype=torch.float64)), ValueError,
     "B must have shape (batch=2, N=4, L=5)"),
    ("selective_scan/C-groups-not-dividing", _ss(C=torch.zeros(2, 2, 4, 5, dtype=torch.float64)), ValueError,
     "G dividing dim=3"),
    ("selective_scan/u-int", _ss(u=torch.zeros(2, 3, 5, dtype=torch.int32)), TypeError, "u must have dtype"),
    ("selective_scan/A-complex", _ss(A=torch.zeros(3, 4, dtype=torch.complex64)), TypeError, "A must have dtype"),
    ("selective_scan/D-int", _ss(D=torch.zeros(3, dtype=torch.int64)), TypeError, "D must have dtype"),
    ("selective_scan/initial-state-shape", _ss(initial_state=torch.zeros(2, 3, 5, dtype=torch.float64)),
     ValueError, "initial_state must have shape (2, 3, 4)"),
    ("selective_scan/lengths-float", _ss(lengths=torch.tensor([1.0, 2.0])), TypeError,
     "lengths must be an integer tensor"),
    ("selective_scan/lengths-out-of-range", _ss(lengths=torch.tensor([6, 2])), ValueError,
     "lengths must lie in [0, 5]"),
    ("selective_scan/lengths-negative-cpu", _ss(lengths=torch.tensor([-1, 2]), backend="cpu"), ValueError,
     "lengths must lie in [0, 5]"),
    ("selective_scan/lengths-shape", _ss(lengths=torch.tensor([1, 2, 3])), ValueError,
     "lengths must have shape (2,)"),
    ("selective_scan/nan-u-check", _ss(u=torch.full((2, 3, 5), _nan, dtype=torch.float64), check_inputs=True),
     ValueError, "u has 30 non-finite"),
    ("selective_scan/inf-delta-check", _ss(delta=torch.full((2, 3, 5), _inf, dtype=torch.float64),
                                           check_inputs=True), ValueError, "delta has 30 non-finite"),
    ("selective_scan/-inf-B-check-cpu", _ss(B=torch.full((2, 4, 5), -_inf, dtype=torch.float64), check_inputs=True,
                                            backend="cpu"), ValueError, "B has 40 non-finite"),
    ("selective_scan/nan-u-propagates", _ss_nan_propagates, "ok", "NaN stays in its channel from that step on"),
    ("selective_scan/noncontig-cpu", _ss_ok("cpu", _noncontig), "ok", "matches reference"),
    ("selective_scan/expanded-cpu", _ss_ok("cpu", _expanded), "ok", "matches reference"),
    ("selective_scan/noncontig-triton", _ss_ok("triton", _noncontig, torch.float32, 1e-4), "ok",
                 "matches reference"),
    ("selective_scan/expanded-triton", _ss_ok("triton", _expanded, torch.float32, 1e-4), "ok",
                 "matches reference"),
    ("selective_scan/batch0", _ss_ok_empty(0, 5), "ok", "empty (0, dim, L) output"),
    ("selective_scan/L0", _ss_ok_empty(2, 0), "ok", "empty (batch, dim, 0) output"),
    ("selective_scan/L1", _ss_ok_L1, "ok", "y = C.(delta B u) + D u"),
    # mhp_scan
    ("mhp_scan/dt-shape", _mhp(dt=torch.zeros(2, 4, dtype=torch.float64)), ValueError, "dt must have shape (2, 5)"),
    ("mhp_scan/dt-int", _mhp(dt=torch.zeros(2, 5, dtype=torch.int64)), TypeError, "dt must have dtype"),
    ("mhp_scan/dt-end-shape", _mhp(dt_end=torch.zeros(3, dtype=torch.float64)), ValueError,
     "dt_end must have shape (2) (batch,)"),
    ("mhp_scan/negative-gap", _mhp(dt=_mhp_set("dt", (1, 2), -0.5)), ValueError, "dt must be >= 0"),
    ("mhp_scan/negative-gap-cpu", _mhp(dt=_mhp_set("dt", (0, 0), -1e-3), backend="cpu"), ValueError,
     "dt must be >= 0"),
    ("mhp_scan/nan-gap", _mhp(dt=_mhp_set("dt", (0, 4), _nan)), ValueError, "dt must be finite"),
    ("mhp_scan/inf-gap", _mhp(dt=_mhp_set("dt", (0, 1), _inf)), ValueError, "dt must be finite"),
    ("mhp_scan/negative-gap-in-padding", _mhp_ok("cpu", lambda kw: dict(
        kw, dt=_mhp_set("dt", (0, 4), -5.0), lengths=torch.tensor([4, 5]))), "ok",
     "padding past lengths is not read (cpu = reference)"),
    ("mhp_scan/nan-dt-end", _mhp(dt_end=torch.tensor([_nan, 1.0], dtype=torch.float64)), ValueError,
     "dt_end must be finite"),
    ("mhp_scan/A-positive", _mhp(A=torch.ones(3, 4, dtype=torch.float64)), ValueError, "A must be <= 0"),
    ("mhp_scan/nan-u-check", _mhp(u=_mhp_set("u", (1, 0, 0), _nan), check_inputs=True), ValueError,
     "u has 1 non-finite"),
    ("mhp_scan/inf-C-check", _mhp(C=_mhp_set("C", (0, 0, 0), _inf), check_inputs=True), ValueError,
     "C has 1 non-finite"),
    ("mhp_scan/negative-step", _mhp(delta=-_mhp_inputs()["delta"], check_inputs=True), ValueError,
     "delta + delta_bias must be >= 0"),
    ("mhp_scan/lengths-too-long", _mhp(lengths=torch.tensor([5, 6])), ValueError, "lengths must lie in [0, 5]"),
    ("mhp_scan/lengths-float", _mhp(lengths=torch.tensor([5.0, 1.0])), TypeError, "lengths must be an integer"),
    ("mhp_scan/mixed-device", _mhp(dt=torch.zeros(2, 5, dtype=torch.float64, device="meta")), ValueError,
     "all inputs must share a device"),
    ("mhp_scan/noncontig-cpu", _mhp_ok("cpu", _mhp_noncontig), "ok", "matches reference"),
    ("mhp_scan/expanded-cpu", _mhp_ok("cpu", _mhp_expanded), "ok", "matches reference"),
    ("mhp_scan/batch0", _mhp_ok_batch0, "ok", "empty outputs"),
    ("mhp_scan/lengths-0", _mhp_ok_lengths0, "ok", "zero integral for an empty sequence, cpu = reference"),
    ("mhp_scan/huge-gap-no-overflow", _mhp_ok_huge_gap, "ok", "exp underflows to 0, finite = reference"),
    ("mhp_scan/noncontig-triton", _mhp_ok("triton", lambda kw: _mhp_noncontig(_f32(kw)), 1e-4), "ok",
     "matches reference"),
    ("mhp_scan/expanded-triton", _mhp_ok("triton", lambda kw: _mhp_expanded(_f32(kw)), 1e-4), "ok",
     "matches reference"),
    ("mhp_scan/negative-gap-triton", _mhp(dt=_mhp_set("dt", (1, 1), -2.0), backend="triton"), ValueError,
     "dt must be >= 0"),
    ("selective_scan/lengths-negative-triton", _ss(lengths=torch.tensor([-1, 2]), backend="triton"), ValueError,
     "lengths must lie in [0, 5]"),
    ("exact_search/noncontig-triton", _es_ok_noncontig("triton"), "ok", "matches reference"),
    ("exact_search/expanded-cpu", _es_ok_expanded("cpu"), "ok", "ties of repeated rows -> lower id, = reference"),
    ("cluster_update/nan-key-triton", _cu(new_keys=torch.full((3, 4), float("nan")), backend="triton"), ValueError,
     "non-finite"),
    ("selective_scan/mixed-dtypes-cpu", _ss_ok("cpu", _ss_mixed, torch.float32, 1e-4), "ok",
     "f32 u + f64 delta + bf16 B: matches reference"),
    ("selective_scan/mixed-dtypes-triton", _ss_ok("triton", _ss_mixed, torch.float32, 1e-4), "ok",
     "f32 u + f64 delta + bf16 B: matches reference"),
    ("selective_scan/B-stride0-L-cpu", _ss_ok("cpu", _ss_L_stride0), "ok", "matches reference"),
    ("selective_scan/B-stride0-L-triton", _ss_ok("triton", _ss_L_stride0, torch.float32, 1e-4), "ok",
     "matches reference"),
    ("selective_scan/sliced-L-triton", _ss_ok("triton", _ss_sliced, torch.float32, 1e-4), "ok", "matches reference"),
    ("selective_scan/L1-triton", _ss_ok_L1_triton, "ok", "matches reference"),
    ("selective_scan/L0-triton", _ss_ok_L0_triton, "ok", "empty (batch, dim, 0) output"),
    ("mhp_scan/L0-cpu", _mhp_ok_L0("cpu"), "ok", "empty y, zero integral"),
    ("mhp_scan/L0-triton", _mhp_ok_L0("triton"), "ok", "empty y, zero integral"),
    ("mhp_scan/mixed-dtypes-triton", _mhp_ok("triton", _mhp_mixed, 1e-4), "ok", "f32 inputs + f64 dt: matches reference"),
    ("frame_score/k-gt-T-cpu", _fs_ok_k_gt_T("cpu"), "ok", "all frames by score, then -1 and zero frames"),
    ("frame_score/k-gt-T-triton", _fs_ok_k_gt_T("triton"), "ok", "all frames by score, then -1 and zero frames"),
    ("frame_score/lengths-int32-triton", _fs_ok_lengths_int32("triton"), "ok", "same as int64 lengths"),
    ("frame_score/lengths-bool", _fs(lengths=torch.tensor([True, False])), TypeError,
     "lengths must be an integer tensor, got bool"),
    ("exact_search/k-gt-kernel-max-triton", _es(keys=_keys(200, 4), k=150, backend="triton"), BackendUnavailableError,
     "k <= 128"),
    # hawkes_loglik / hawkes_intensity
    ("hawkes_loglik/marks-float", _hk(marks=torch.zeros(2, 5)), TypeError, "marks must be an integer tensor"),
    ("hawkes_loglik/marks-shape", _hk(marks=torch.zeros(2, 4, dtype=torch.int64)), ValueError,
     "marks must have shape (2, 5)"),
    ("hawkes_loglik/mu-nonpositive", _hk(mu=torch.tensor([0.5, 0.0], dtype=torch.float64)), ValueError, "mu"),
    ("hawkes_loglik/W-negative", _hk(W=-torch.ones(2, 3, dtype=torch.float64)), ValueError, "W"),
    ("hawkes_loglik/W-dim-mismatch", _hk(W=torch.ones(2, 4, dtype=torch.float64)), ValueError, "W"),
    ("hawkes_loglik/marks-out-of-range", _hk(marks=torch.full((2, 5), 2)), ValueError, "marks"),
    ("hawkes_loglik/integral-shape", _hk(out=_Out(torch.rand(2, 3, 5, dtype=torch.float64),
                                                   torch.rand(2, 4, dtype=torch.float64))), ValueError,
     "out.integral must have shape (2, 3)"),
    ("hawkes_intensity/query-negative", _hi(query_times=torch.tensor([[-1.0, 1.0], [0.1, 2.0]],
                                                                     dtype=torch.float64)), ValueError, "query_times"),
    ("hawkes_intensity/query-nan", _hi(query_times=torch.tensor([[_nan, 1.0], [0.1, 2.0]], dtype=torch.float64)),
     ValueError, "query_times"),
    ("hawkes_intensity/query-1d", _hi(query_times=torch.tensor([0.5, 1.0], dtype=torch.float64)), ValueError,
     "query_times"),
    # frame_score
    ("frame_score/frames-2d", _fs(frames=torch.zeros(6, 4, dtype=torch.float64)), ValueError, "frames must be 3-D"),
    ("frame_score/frames-int", _fs(frames=torch.zeros(2, 6, 4, dtype=torch.int64)), TypeError,
     "frames must have dtype"),
    ("frame_score/weight-complex", _fs(weight=torch.zeros(4, dtype=torch.complex64)), TypeError,
     "weight must have dtype"),
    ("frame_score/weight-dim-mismatch", _fs(weight=torch.zeros(5, dtype=torch.float64)), ValueError,
     "weight must have shape (F=4,)"),
    ("frame_score/T0", _fs(frames=torch.zeros(2, 0, 4, dtype=torch.float64)), ValueError, "T >= 1 frame slots"),
    ("frame_score/k0", _fs(k=0), ValueError, "k must be >= 1"),
    ("frame_score/k-float", _fs(k=2.0), TypeError, "k must be an int"),
    ("frame_score/temperature-0", _fs(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
    ("frame_score/temperature-inf", _fs(temperature=_inf), ValueError, "temperature must be a finite number > 0"),
    ("frame_score/bias-vector", _fs(bias=torch.zeros(2, dtype=torch.float64)), ValueError, "bias must be a scalar"),
    ("frame_score/lengths-out-of-range", _fs(lengths=torch.tensor([7, 1])), ValueError, "lengths must lie in [0, 6]"),
    ("frame_score/lengths-float", _fs(lengths=torch.tensor([1.0, 2.0])), TypeError, "lengths must be an integer"),
    ("frame_score/nan-frames-check", _fs(frames=torch.full((2, 6, 4), _nan, dtype=torch.float64),
                                         check_inputs=True, backend="cpu"), ValueError, "frames has 48 non-finite"),
    ("frame_score/inf-weight-check", _fs(weight=torch.tensor([1.0, _inf, 0.0, 0.0], dtype=torch.float64),
                                         check_inputs=True), ValueError, "weight has 1 non-finite"),
    ("frame_score/hidden-mismatch", _fs(hidden=(torch.zeros(5, 3, dtype=torch.float64),
                                                torch.zeros(3, dtype=torch.float64))), ValueError,
     "hidden[0] (W1) must have shape (F=4, H)"),
    ("frame_score/float64-triton", _fs(backend="triton"), BackendUnavailableError,
                 "does not take float64 frames"),
    ("frame_score/k-gt-max-triton", _fs(frames=torch.zeros(2, 6, 4), weight=torch.zeros(4), k=10 ** 6,
                                                    backend="triton"), ValueError, "on-chip top-k size"),
    ("frame_score/noncontig-cpu", _fs_ok("cpu", _fs_noncontig), "ok", "matches reference"),
    ("frame_score/expanded-cpu", _fs_ok("cpu", _fs_expanded), "ok", "matches reference"),
    ("frame_score/noncontig-triton", _fs_ok("triton", _fs_noncontig, torch.float32, 1e-4), "ok",
                 "matches reference"),
    ("frame_score/lengths-0-and-1", _fs_ok_lengths, "ok", "zeros / single frame, -1 padding"),
    ("frame_score/batch0", _fs_ok_batch0, "ok", "empty outputs"),
    ("frame_score/scores-overflow-exp", _fs_ok_big_scores, "ok", "softmax of scores ~1e4 finite = reference"),
    # cluster_lookup
    ("cluster_lookup/k0", _cl(k=0), ValueError, "k must be a positive int"),
    ("cluster_lookup/k-gt-items", _cl(k=13), ValueError, "larger than the bank (12 members)"),
    ("cluster_lookup/query-dim", _cl(queries=torch.zeros(2, 5, dtype=torch.float64)), ValueError,
     "queries must have d = 4"),
    ("cluster_lookup/query-int", _cl(queries=torch.zeros(2, 4, dtype=torch.int64)), TypeError,
     "queries must have dtype"),
    ("cluster_lookup/nprobe-zero", _cl(nprobe=(0, 1)), ValueError, "both must be >= 1"),
    ("cluster_lookup/nprobe-not-pair", _cl(nprobe=3), TypeError, "nprobe must be a pair"),
    ("cluster_lookup/offsets-bad", _cl(fine_offsets=torch.tensor([0, 4, 9, 8])), ValueError,
     "fine_offsets must be non-decreasing"),
    ("cluster_lookup/offsets-float", _cl(coarse_offsets=torch.tensor([0.0, 2.0, 3.0])), TypeError,
     "coarse_offsets must be an integer"),
    ("cluster_lookup/ids-float", _cl(member_ids=torch.zeros(12)), TypeError, "member_ids must be an integer"),
    ("cluster_lookup/nan-query", _cl(queries=torch.full((2, 4), _nan, dtype=torch.float64)), ValueError,
     "non-finite"),
    ("cluster_lookup/empty-bank", _cl(member_keys=torch.zeros(0, 4, dtype=torch.float64),
                                      member_ids=torch.zeros(0, dtype=torch.int64),
                                      fine_offsets=torch.tensor([0, 0, 0, 0])), ValueError, "the bank is empty"),
    ("cluster_lookup/int32-id-guard", _cl(member_keys=torch.zeros(1, 4, dtype=torch.float64).expand(2 ** 32, 4),
                                          member_ids=torch.zeros(1, dtype=torch.int64).expand(2 ** 32),
                                          fine_offsets=torch.tensor([0, 4, 8, 2 ** 32])), ValueError,
     "at most 4294967294 are supported"),
    ("exact_search/int32-id-guard", _es(keys=torch.zeros(1, 4).expand(2 ** 32, 4)), ValueError,
     "at most 4294967294 are supported"),
    ("cluster_lookup/full-probe-cpu", _cl_ok_full_probe("cpu", torch.float64, 1e-12), "ok",
     "nprobe=all equals exact search"),
    ("cluster_lookup/full-probe-triton", _cl_ok_full_probe("triton", torch.float32, 1e-5), "ok",
                 "nprobe=all equals exact search"),
    # HierarchicalIndex
    ("HierarchicalIndex/build-empty", lambda: HierarchicalIndex.build(torch.zeros(0, 4)), ValueError,
     "cannot build an index over an empty bank"),
    ("HierarchicalIndex/build-int", lambda: HierarchicalIndex.build(torch.zeros(5, 4, dtype=torch.int64)),
     TypeError, "keys must have dtype"),
    ("HierarchicalIndex/build-nan", lambda: HierarchicalIndex.build(torch.full((8, 4), _nan), branching=(2, 3)), ValueError,
     "keys"),
    ("HierarchicalIndex/build-values-rows", lambda: HierarchicalIndex.build(torch.randn(8, 4), torch.zeros(7, 2), branching=(2, 3)),
     ValueError, "values"),
    ("HierarchicalIndex/search-dim", _hi_call("search", torch.zeros(2, 5), 3), ValueError,
     "queries must have d = 4"),
    ("HierarchicalIndex/search-k0", _hi_call("search", torch.zeros(2, 4), 0, nprobe=(2, 3)), ValueError, "k must be a positive int"),
    ("HierarchicalIndex/search-k-gt-items", _hi_call("search", torch.ones(2, 4), 41, nprobe=(2, 3)), ValueError,
     "larger than the bank"),
    ("HierarchicalIndex/search-nprobe", _hi_call("search", torch.ones(2, 4), 3, nprobe=(9, 1)), ValueError,
     "out of range"),
    ("HierarchicalIndex/search-inf", _hi_call("search", torch.full((1, 4), _inf), 3, nprobe=(2, 3)), ValueError, "non-finite"),
    ("HierarchicalIndex/update-dim", _hi_call("update", torch.zeros(2, 3), torch.zeros(2, 2)), ValueError,
     "new_keys must have d = 4"),
    ("HierarchicalIndex/update-no-values", _hi_call("update", torch.zeros(2, 4)), ValueError,
     "pass new_values (m, 2)"),
    ("HierarchicalIndex/update-nan", _hi_call("update", torch.full((2, 4), _nan), torch.zeros(2, 2)), ValueError,
     "new_keys has 8 non-finite"),
    ("HierarchicalIndex/update-duplicate-keys", _hi_ok_update_dup, "ok", "two new ids, both found"),
    ("HierarchicalIndex/update-empty", _hi_ok_update_empty, "ok", "no ids, bank unchanged"),
    ("HierarchicalIndex/load-missing", lambda: HierarchicalIndex.load("/nonexistent/bank.mvpp"), FileNotFoundError,
     "bank.mvpp"),
    ("HierarchicalIndex/load-truncated", _hi_save_load(_truncate), ValueError, "mvpp memory bank"),
    ("HierarchicalIndex/load-bitflip", _hi_save_load(_flip), ValueError, "checksum"),
    ("HierarchicalIndex/load-foreign", _hi_save_load(lambda p: p.write_bytes(b"hello world" * 10)), ValueError,
     "mvpp memory bank"),
    ("HierarchicalIndex/save-load-roundtrip", _hi_ok_roundtrip, "ok", "identical search results"),
    # mvpp CLI: exit code 2, one line on stderr
    ("cli/unknown-command", _cli(["nope"], r"invalid choice"), _CliRefused, "invalid choice"),
    ("cli/bad-int-flag", _cli(["bank", "search", "--index", "x", "--k", "two"], r"invalid int"), _CliRefused,
     "invalid int value"),
    ("cli/bank-search-missing-index", _cli(["bank", "search", "--index", "/nonexistent/i.mvpp",
                                            "--data", "synthetic:tiny"], r"i\.mvpp"), _CliRefused, "mvpp bank: error"),
    ("cli/bank-load-foreign-file", _cli(["bank", "search", "--index", _cli_file("i.mvpp", b"not a bank" * 20),
                                         "--data", "synthetic:tiny"], r"error"), _CliRefused, "mvpp bank: error"),
    ("cli/bank-build-bad-keys-file", _cli(["bank", "build", "--index", "/tmp/never-written.mvpp",
                                           "--keys", _cli_file("k.safetensors", b"\x00" * 16)], r"k\.safetensors"),
     _CliRefused, "is not a readable safetensors file with a tensor 'keys'"),
    ("cli/eval-missing-checkpoint", _cli(["eval", "--checkpoint", "/nonexistent/m.safetensors"], r"m\.safetensors"),
     _CliRefused, "mvpp eval: error"),
    ("cli/train-bad-data-spec", _cli(["train", "--data", "synthetic:nosuchpreset", "--out",
                                      "/tmp/never-written.safetensors"], r"nosuchpreset|preset"), _CliRefused,
     "mvpp train: error"),
]


CASES = CASES + MORE_CASES
# Rows fixed in this branch (the wrapper validation the case exposed): id -> what was wrong before.
FIXED = {
    "cli/bank-build-bad-keys-file": "a --keys file that is not safetensors gave the bare 'Error while "
                                    "deserializing header' without naming the file or the tensor",
}
# Kernel-level bugs found by a row and left to the kernel owners (bugs-bad11.md): id -> reason.
XFAIL = {}


def _param(case):
    marks = []
    if case[0].endswith("-triton"):
        marks.append(pytest.mark.skipif(not triton_status()[0], reason="triton is not importable"))
    if case[0] in XFAIL:
        marks.append(pytest.mark.xfail(strict=True, reason=XFAIL[case[0]]))
    return pytest.param(case, id=case[0], marks=marks)


def test_case_ids_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input(case):
    _, fn, expected, fragment = case
    if expected == "ok":
        fn()
        return
    with pytest.raises(expected) as info:
        fn()
    assert fragment in str(info.value), str(info.value)


def test_mhp_scan_A_plus_inf_rejected():
    g = _g(3)
    b, dim, n, L = 1, 2, 3, 4
    A = -torch.rand(dim, n, generator=g, dtype=torch.float64)
    A[0, 1] = float("inf")
    args = (torch.randn(b, dim, L, generator=g, dtype=torch.float64), torch.rand(b, dim, L, generator=g,
            dtype=torch.float64), A, torch.randn(b, n, L, generator=g, dtype=torch.float64),
            torch.randn(b, n, L, generator=g, dtype=torch.float64), torch.rand(b, L, generator=g, dtype=torch.float64))
    with pytest.raises(ValueError, match="A must be <= 0"):
        mhp_scan(*args, backend="reference")


def test_exact_search_cpu_grad_matches_reference():
    keys = _keys(6, 3, torch.float64).requires_grad_()
    q = _keys(2, 3, torch.float64, 9).requires_grad_()
    s, i = exact_search(keys, q, 3, backend="cpu")
    s.sum().backward()
    gk, gq = keys.grad.clone(), q.grad.clone()
    keys.grad = q.grad = None
    s2, i2 = exact_search(keys, q, 3, backend="reference")
    s2.sum().backward()
    assert torch.equal(i, i2) and torch.allclose(s, s2)
    assert torch.allclose(gk, keys.grad) and torch.allclose(gq, q.grad)


def test_doc_up_to_date():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bad_input_table.py"), "--check"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
