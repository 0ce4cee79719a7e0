"""Bad-input table (issue 11 item 2, issue 16 op items): one row per case, with the expected exception
type and a message fragment, or "ok" with a check of the defined answer. docs/bad_input.md is
generated from CASES by scripts/bad_input_table.py; test_doc_up_to_date keeps it in sync."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch

from mvpp_kernels import cluster_update, exact_search, mhp_scan

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


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
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
