"""exact_search and cluster_lookup: every backend against float64 oracles, ties, exclusion, NaN-poisoned
outputs, opcheck, bad input.

Two kinds of data:
- "integer" keys/queries (small integers): every score is exact in every dtype and on every backend,
  so results must be *identical* to the float64 oracle, ties included (many scores tie: the lower id
  must win everywhere);
- random unit vectors: scores must match the oracle within the dtype's tolerance and the returned set
  must be a valid top-k up to that tolerance (near-ties may legitimately order differently).
The big grid runs on reference/cpu; Triton (interpreter) gets tiny shapes; cuda tests are marked.
"""
from __future__ import annotations

import pytest
import torch

from mvpp_kernels import BackendUnavailableError, cluster_lookup, exact_search
from mvpp_kernels._backend import has_compiled_kernel
from mvpp_kernels.ops.cluster_lookup import route_ref
from mvpp_kernels.testing import make_memory_bank_data, poisoned_allocations, tolerance

HAS_CPP = has_compiled_kernel("exact_search", "CPU") and has_compiled_kernel("cluster_lookup", "CPU")
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="the C++ extension (exact_search/cluster_lookup) is not built")

HOST_BACKENDS = ["reference", pytest.param("cpu", marks=needs_cpp)]
KERNEL_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ---------------------------------------------------------------------------------------------
# oracles
# ---------------------------------------------------------------------------------------------
def oracle_exact(keys, queries, k, exclude=None):
    """torch.sort of the full float64 score matrix; a stable sort over ids in ascending order makes
    the lower id win ties."""
    S = queries.double().cpu() @ keys.double().cpu().T
    if exclude is not None:
        S[torch.arange(S.shape[0]), exclude.cpu().clamp_min(0)] = torch.where(
            exclude.cpu() >= 0, torch.tensor(float("-inf"), dtype=S.dtype),
            S[torch.arange(S.shape[0]), exclude.cpu().clamp_min(0)])
    s, i = torch.sort(S, dim=1, descending=True, stable=True)
    s, i = s[:, :k], i[:, :k]
    i = torch.where(torch.isneginf(s), torch.full_like(i, -1), i)
    return s, i


def assert_identical(got, want, what=""):
    s, i = got
    ws, wi = want
    assert i.dtype == torch.int64
    assert torch.equal(i.cpu(), wi.cpu()), f"{what}: ids differ\n{i}\n{wi}"
    assert torch.equal(s.cpu().double(), ws.cpu().double()), f"{what}: scores differ"


def assert_valid_topk(got, keys, queries, k, dtype, exclude=None, what=""):
    """Scores match the float64 scores of the returned ids, and no better key was missed, within tol."""
    s, i = (t.cpu() for t in got)
    S = queries.double().cpu() @ keys.double().cpu().T
    if exclude is not None:
        rows = (exclude.cpu() >= 0).nonzero().squeeze(1)
        S[rows, exclude.cpu()[rows]] = float("-inf")
    atol, rtol = tolerance(dtype)
    tol = atol + rtol * float(S[torch.isfinite(S)].abs().max()) + (1e-2 if dtype != torch.float32 else 0)
    assert not torch.isnan(s).any(), f"{what}: NaN score (unwritten output)"
    assert bool((i >= 0).all()), f"{what}: missing results"
    for r in range(s.shape[0]):
        assert len(set(i[r].tolist())) == k, f"{what}: repeated ids {i[r].tolist()}"
    true = S.gather(1, i)
    assert torch.allclose(s.double(), true, atol=tol, rtol=0), f"{what}: scores do not match their ids"
    kth = torch.sort(S, dim=1, descending=True).values[:, k - 1]
    assert bool((true >= kth[:, None] - tol).all()), f"{what}: a better key was missed"
    assert bool((s[:, :-1] >= s[:, 1:]).all()), f"{what}: not sorted"


def make_tree(n, d, c1, cf, seed=0, dtype=torch.float32, kind="integer"):
    """A random two-level CSR tree over `n` members with an empty coarse cluster and empty fine
    clusters, members in a shuffled id order (ids are not the row numbers)."""
    g = torch.Generator().manual_seed(seed)
    keys, _ = make_memory_bank_data(n, d, 0, kind, seed=seed, dtype=torch.float64)
    # children per coarse cluster: coarse 1 has none
    child = torch.randint(1, 4, (c1,), generator=g)
    child[1 % c1] = 0 if c1 > 1 else child[0]
    child[-1] += cf - child.sum()
    assert child.min() >= 0 and child.sum() == cf
    coff = torch.zeros(c1 + 1, dtype=torch.int64)
    coff[1:] = child.cumsum(0)
    sizes = torch.randint(0, 3 * n // cf + 1, (cf,), generator=g).double()
    sizes[0] = 0  # an empty fine cluster
    if sizes.sum() == 0:  # every draw was 0 (found by the long fuzz profile): 0/0 sizes became INT64_MIN
        sizes[-1] = 1
    sizes = (sizes / sizes.sum() * n).floor().long()
    sizes[-1] += n - sizes.sum()
    foff = torch.zeros(cf + 1, dtype=torch.int64)
    foff[1:] = sizes.cumsum(0)
    ids = torch.randperm(n, generator=g)
    C = torch.randn(c1, d, generator=g, dtype=torch.float64)
    F = torch.randn(cf, d, generator=g, dtype=torch.float64)
    return dict(coarse_centroids=C.to(dtype), coarse_offsets=coff, fine_centroids=F.to(dtype), fine_offsets=foff,
                member_keys=keys.to(dtype), member_ids=ids)


def tree_args(t):
    return (t["coarse_centroids"], t["coarse_offsets"], t["fine_centroids"], t["fine_offsets"], t["member_keys"],
            t["member_ids"])


def keys_by_id(t):
    out = torch.empty_like(t["member_keys"])
    out[t["member_ids"]] = t["member_keys"]
    return out


# ---------------------------------------------------------------------------------------------
# exact_search
# ---------------------------------------------------------------------------------------------
EXACT_GRID = [(1, 1, 1, 1), (63, 16, 5, 10), (2049, 33, 70, 10), (2049, 8, 3, 1), (1000, 256, 17, 64)]


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES + [torch.float64])
@pytest.mark.parametrize("n,d,q,k", EXACT_GRID)
def test_exact_search_integer_identical(backend, dtype, n, d, q, k):
    keys, queries = make_memory_bank_data(n, d, q, "integer", seed=n + d, dtype=dtype)
    k = min(k, n)
    with poisoned_allocations():
        got = exact_search(keys, queries, k, backend=backend)
    assert_identical(got, oracle_exact(keys, queries, k), f"{backend} {dtype} n={n}")
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES + [torch.float64])
@pytest.mark.parametrize("n,d,q,k", [(63, 16, 5, 10), (2049, 33, 70, 10), (5000, 256, 9, 100)])
def test_exact_search_random_valid(backend, dtype, n, d, q, k):
    keys, queries = make_memory_bank_data(n, d, q, "clustered", seed=3, dtype=dtype)
    with poisoned_allocations():
        got = exact_search(keys, queries, k, backend=backend)
    assert_valid_topk(got, keys, queries, k, dtype, what=f"{backend} {dtype}")


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_exact_search_exclude_and_cosine(backend):
    keys, queries = make_memory_bank_data(500, 24, 0, "integer", seed=5)
    queries = keys[:40].clone()
    exclude = torch.arange(40)
    exclude[::3] = -1  # some queries exclude nothing
    got = exact_search(keys, queries, 7, exclude=exclude, backend=backend)
    assert_identical(got, oracle_exact(keys, queries, 7, exclude), "exclude")
    assert not bool((got[1] == exclude[:, None]).any())
    # cosine = inner product of normalised vectors
    kk, qq = keys.double(), queries.double()
    kn, qn = kk / kk.norm(dim=1, keepdim=True), qq / qq.norm(dim=1, keepdim=True)
    got = exact_search(keys, queries, 5, metric="cosine", backend=backend)
    assert_valid_topk(got, kn, qn, 5, torch.float32, what="cosine")


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_exact_search_k_equals_n_with_exclusion_pads(backend):
    keys, queries = make_memory_bank_data(6, 4, 3, "integer", seed=2)
    exclude = torch.tensor([0, -1, 5])
    with poisoned_allocations():
        s, i = exact_search(keys, queries, 6, exclude=exclude, backend=backend)
    assert i[0, -1] == -1 and torch.isneginf(s[0, -1]) and i[2, -1] == -1
    assert bool((i[1] >= 0).all())
    assert_identical((s, i), oracle_exact(keys, queries, 6, exclude), "k = n")


def test_exact_search_all_ties_lower_id_wins():
    keys = torch.ones(300, 8)
    queries = torch.ones(4, 8)
    for backend in ["reference"] + (["cpu"] if HAS_CPP else []):
        s, i = exact_search(keys, queries, 5, backend=backend)
        assert torch.equal(i, torch.arange(5).expand(4, 5)), backend


def test_exact_search_never_builds_full_score_matrix(monkeypatch):
    """The reference blocks over keys: with a tiny block budget the result is unchanged."""
    from mvpp_kernels.ops.exact_search import reference as ref

    keys, queries = make_memory_bank_data(3000, 16, 8, "integer", seed=9)
    full = ref.exact_search_ref(keys, queries, 10)
    monkeypatch.setattr(ref, "BLOCK_ELEMS", 8 * 37)
    assert_identical(ref.exact_search_ref(keys, queries, 10), full, "blocked")


# ---------------------------------------------------------------------------------------------
# cluster_lookup
# ---------------------------------------------------------------------------------------------
TREE_GRID = [(1, 1, 1, 1, 1), (63, 8, 3, 5, 40), (2049, 16, 4, 12, 33), (3000, 40, 6, 20, 9)]


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES + [torch.float64])
@pytest.mark.parametrize("n,d,c1,cf,q", TREE_GRID)
def test_cluster_lookup_integer_identical(backend, dtype, n, d, c1, cf, q):
    t = make_tree(n, d, c1, cf, seed=n, dtype=dtype)
    _, queries = make_memory_bank_data(0, d, q, "integer", seed=d + 1, dtype=dtype)
    k = min(10, n)
    for nprobe in [(1, 1), (2, 3), (c1, cf)]:
        want = cluster_lookup(queries, *tree_args(t), k, nprobe, backend="reference")
        with poisoned_allocations():
            got = cluster_lookup(queries, *tree_args(t), k, nprobe, backend=backend)
        assert_identical(got, want, f"{backend} {dtype} nprobe={nprobe}")
    # every cluster probed = exact search over the bank
    assert_identical(got, oracle_exact(keys_by_id(t), queries, k), "nprobe=all vs exact")


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_cluster_lookup_random_matches_reference(backend):
    t = make_tree(4000, 32, 5, 16, seed=1, kind="clustered")
    _, queries = make_memory_bank_data(0, 32, 50, "clustered", seed=2)
    for nprobe in [(1, 2), (3, 6), (5, 16)]:
        s, i = cluster_lookup(queries, *tree_args(t), 10, nprobe, backend=backend)
        rs, ri = cluster_lookup(queries.double(), *(x.double() if x.is_floating_point() else x for x in tree_args(t)),
                                10, nprobe, backend="reference")
        # the same routing (random centroids have no near-ties here) and the same members
        assert (i == ri).double().mean() > 0.99
        torch.testing.assert_close(s.double(), rs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_cluster_lookup_exclude_and_padding(backend):
    t = make_tree(200, 8, 3, 6, seed=4)
    queries = keys_by_id(t)[:20].clone()
    exclude = torch.arange(20)
    s, i = cluster_lookup(queries, *tree_args(t), 5, (3, 6), exclude=exclude, backend=backend)
    assert_identical((s, i), oracle_exact(keys_by_id(t), queries, 5, exclude), "exclude")
    # one small fine cluster probed: fewer members than k -> (-inf, -1) padding
    sizes = t["fine_offsets"].diff()
    small = int(torch.nonzero((sizes > 0) & (sizes < 5))[0]) if bool(((sizes > 0) & (sizes < 5)).any()) else None
    if small is not None:
        want = cluster_lookup(queries, *tree_args(t), 5, (1, 1), backend="reference")
        with poisoned_allocations():
            got = cluster_lookup(queries, *tree_args(t), 5, (1, 1), backend=backend)
        assert_identical(got, want, "padding")
    s, i = cluster_lookup(queries, *tree_args(t), 5, (1, 1), backend=backend)
    assert torch.equal(torch.isneginf(s), i == -1)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES + [torch.float64])
def test_cluster_lookup_tied_centroids(backend, dtype):
    """Integer centroids tie often: the lower coarse / fine index is probed first, as in the reference."""
    t = make_tree(500, 16, 6, 20, seed=21, dtype=dtype)
    g = torch.Generator().manual_seed(22)
    t["coarse_centroids"] = torch.randint(-1, 2, (6, 16), generator=g).to(dtype)
    t["fine_centroids"] = torch.randint(-1, 2, (20, 16), generator=g).to(dtype)
    t["coarse_centroids"][:3] = t["coarse_centroids"][3]  # four identical coarse centroids
    t["fine_centroids"][5:12] = t["fine_centroids"][4]
    _, queries = make_memory_bank_data(0, 16, 37, "integer", seed=23, dtype=dtype)
    for nprobe in [(1, 1), (2, 2), (3, 5), (4, 9), (6, 20)]:
        want = cluster_lookup(queries, *tree_args(t), 8, nprobe, backend="reference")
        got = cluster_lookup(queries, *tree_args(t), 8, nprobe, backend=backend)
        assert_identical(got, want, f"{backend} {dtype} {nprobe}")


@needs_cpp
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_cpu_cluster_lookup_large_clusters_many_queries(dtype):
    """Clusters larger than one scan block (256 rows of d = 256 float32), more queries per cluster than
    one scan item (128), several routing chunks (32 queries): integer data, identical to the reference."""
    t = make_tree(3000, 256, 2, 4, seed=24, dtype=dtype)
    _, queries = make_memory_bank_data(0, 256, 300, "integer", seed=25, dtype=dtype)
    exclude = t["member_ids"][:300].clone()
    for nprobe in [(1, 1), (1, 2), (2, 4)]:
        want = cluster_lookup(queries, *tree_args(t), 10, nprobe, exclude=exclude, backend="reference")
        with poisoned_allocations():
            got = cluster_lookup(queries, *tree_args(t), 10, nprobe, exclude=exclude, backend="cpu")
        assert_identical(got, want, f"{dtype} {nprobe}")


@needs_cpp
def test_cpu_cluster_lookup_query_batches_and_large_k():
    """k = 1024 makes the kernel split 300 queries into batches (its top-k lists are bounded)."""
    t = make_tree(2000, 8, 3, 9, seed=26)
    _, queries = make_memory_bank_data(0, 8, 300, "integer", seed=27)
    for nprobe in [(2, 4), (3, 9)]:
        want = cluster_lookup(queries, *tree_args(t), 1024, nprobe, backend="reference")
        with poisoned_allocations():
            got = cluster_lookup(queries, *tree_args(t), 1024, nprobe, backend="cpu")
        assert_identical(got, want, f"k=1024 {nprobe}")


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_cluster_lookup_independent_of_batch_and_threads(dtype):
    """Random data (rounding matters): every score is computed in one fixed order, so a query's result
    is bit-identical alone or in any batch, with 1 or 2 threads."""
    t = make_tree(4000, 48, 5, 16, seed=28, dtype=dtype, kind="clustered")
    _, queries = make_memory_bank_data(0, 48, 70, "clustered", seed=29, dtype=dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        full = cluster_lookup(queries, *tree_args(t), 10, (3, 7), backend="cpu")
        torch.set_num_threads(1)
        one = cluster_lookup(queries, *tree_args(t), 10, (3, 7), backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert_identical(one, full, "1 vs 2 threads")
    parts = [cluster_lookup(queries[a:a + b], *tree_args(t), 10, (3, 7), backend="cpu")
             for a, b in [(0, 1), (1, 2), (3, 5), (8, 62)]]
    assert_identical((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])), full, "batched")
    assert_valid_topk(cluster_lookup(queries, *tree_args(t), 10, (5, 16), backend="cpu"), keys_by_id(t), queries, 10,
                      dtype, what="all probed")


def test_route_ref_tie_rule():
    """Equal centroid scores: the lower cluster index is probed first."""
    C = torch.ones(4, 2)
    coff = torch.tensor([0, 1, 2, 3, 4])
    F = torch.ones(4, 2)
    top = route_ref(torch.ones(3, 2), C, coff, F, 2, 2)
    assert torch.equal(top, torch.tensor([[0, 1]] * 3))


# ---------------------------------------------------------------------------------------------
# Triton (interpreter on CPU: tiny shapes)
# ---------------------------------------------------------------------------------------------
@pytest.mark.triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_triton_exact_search(dtype):
    keys, queries = make_memory_bank_data(300, 16, 3, "integer", seed=7, dtype=dtype)
    exclude = torch.tensor([4, -1, 299])
    with poisoned_allocations():
        got = exact_search(keys, queries, 7, exclude=exclude, backend="triton")
    assert_identical(got, oracle_exact(keys, queries, 7, exclude), f"triton {dtype}")


@pytest.mark.triton
def test_triton_exact_search_random_and_k1():
    keys, queries = make_memory_bank_data(130, 40, 2, "clustered", seed=8)
    got = exact_search(keys, queries, 3, backend="triton")
    assert_valid_topk(got, keys, queries, 3, torch.float32, what="triton random")
    got = exact_search(keys, queries, 1, backend="triton")
    assert_valid_topk(got, keys, queries, 1, torch.float32, what="triton k=1")


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_cluster_lookup(dtype):
    t = make_tree(200, 8, 3, 6, seed=11, dtype=dtype)
    _, queries = make_memory_bank_data(0, 8, 3, "integer", seed=12, dtype=dtype)
    exclude = torch.tensor([int(t["member_ids"][0]), -1, 5])
    for nprobe in [(1, 1), (3, 6)]:
        want = cluster_lookup(queries, *tree_args(t), 6, nprobe, exclude=exclude, backend="reference")
        with poisoned_allocations():
            got = cluster_lookup(queries, *tree_args(t), 6, nprobe, exclude=exclude, backend="triton")
        assert_identical(got, want, f"triton {nprobe}")


# ---------------------------------------------------------------------------------------------
# CUDA (compiled and Triton)
# ---------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_gpu_backends(backend, dtype):
    keys, queries = make_memory_bank_data(5000, 64, 33, "integer", seed=13, dtype=dtype)
    keys, queries = keys.cuda(), queries.cuda()
    exclude = torch.arange(33, device="cuda")
    with poisoned_allocations("cuda"):
        got = exact_search(keys, queries, 10, exclude=exclude, backend=backend)
    assert_identical(got, oracle_exact(keys, queries, 10, exclude), f"{backend} exact")
    t = {k_: v.cuda() for k_, v in make_tree(3000, 32, 4, 12, seed=14, dtype=dtype).items()}
    _, q2 = make_memory_bank_data(0, 32, 40, "integer", seed=15, dtype=dtype)
    q2 = q2.cuda()
    for nprobe in [(1, 2), (2, 5), (4, 12)]:
        want = cluster_lookup(q2.cpu(), *(x.cpu() for x in tree_args(t)), 10, nprobe, backend="reference")
        got = cluster_lookup(q2, *tree_args(t), 10, nprobe, backend=backend)
        assert_identical(got, want, f"{backend} cluster_lookup {nprobe}")


# ---------------------------------------------------------------------------------------------
# opcheck
# ---------------------------------------------------------------------------------------------
# Triton ops on CPU tensors run under the interpreter, which cannot execute on fake tensors and cannot
# be torch.compiled: the schema, fake and autograd registration are checked here, the full set on CUDA.
CPU_OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


def _op_args():
    keys, queries = make_memory_bank_data(200, 8, 3, "integer", seed=16)
    t = make_tree(200, 8, 3, 6, seed=17)
    ex = torch.tensor([1, -1, 2])
    return (keys, queries, 5, ex), (queries, *tree_args(t), 5, 2, 3, ex)


@needs_cpp
def test_opcheck_compiled_ops():
    es, cl = _op_args()
    torch.library.opcheck(torch.ops.mvpp.exact_search, es)
    torch.library.opcheck(torch.ops.mvpp.exact_search, es[:3] + (None,))
    torch.library.opcheck(torch.ops.mvpp.cluster_lookup, cl)


@pytest.mark.triton
def test_opcheck_triton_ops_cpu_subset():
    from mvpp_kernels.ops.cluster_lookup import triton as clt
    from mvpp_kernels.ops.exact_search import triton as est

    es, cl = _op_args()
    torch.library.opcheck(est.exact_search_triton, es, test_utils=CPU_OPCHECK_UTILS)
    torch.library.opcheck(clt.cluster_lookup_triton, cl, test_utils=CPU_OPCHECK_UTILS)


@pytest.mark.triton
def test_opcheck_triton_id_check_op():
    # the opaque id-range check the Triton op calls (issue 16) is pure torch: the full opcheck runs on CPU
    from mvpp_kernels.ops.cluster_lookup import triton as clt

    _, cl = _op_args()
    torch.library.opcheck(clt.cluster_lookup_check_ids, (cl[6],))
    torch.library.opcheck(clt.cluster_lookup_check_ids, (cl[6][:0],))


@pytest.mark.cuda
def test_opcheck_gpu():
    from mvpp_kernels.ops.cluster_lookup import triton as clt
    from mvpp_kernels.ops.exact_search import triton as est

    es, cl = _op_args()
    es = tuple(x.cuda() if isinstance(x, torch.Tensor) else x for x in es)
    cl = tuple(x.cuda() if isinstance(x, torch.Tensor) else x for x in cl)
    for op in (torch.ops.mvpp.exact_search, est.exact_search_triton):
        torch.library.opcheck(op, es)
    for op in (torch.ops.mvpp.cluster_lookup, clt.cluster_lookup_triton):
        torch.library.opcheck(op, cl)


def test_torch_compile_reference_and_cpu():
    keys, queries = make_memory_bank_data(300, 8, 4, "integer", seed=18)
    # one compile (they are slow): the compiled op when built, else the reference
    for backend in ["cpu"] if HAS_CPP else ["reference"]:
        fn = torch.compile(lambda kk, qq: exact_search(kk, qq, 5, backend=backend, check_inputs=False), fullgraph=False)
        assert_identical(fn(keys, queries), oracle_exact(keys, queries, 5), f"compiled {backend}")


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_exact_search_bad_input():
    keys, queries = make_memory_bank_data(50, 8, 3, "clustered")
    with pytest.raises(ValueError, match="d = 8"):
        exact_search(keys, queries[:, :5], 3)
    with pytest.raises(ValueError, match="larger than the bank"):
        exact_search(keys, queries, 51)
    with pytest.raises(ValueError, match="empty"):
        exact_search(keys[:0], queries, 1)
    with pytest.raises(ValueError, match="k must be a positive int"):
        exact_search(keys, queries, 0)
    bad = keys.clone()
    bad[7, 2] = float("nan")
    with pytest.raises(ValueError, match="keys has 1 non-finite"):
        exact_search(bad, queries, 3)
    with pytest.raises(ValueError, match="metric"):
        exact_search(keys, queries, 3, metric="l2")
    with pytest.raises(ValueError, match="exclude must have shape"):
        exact_search(keys, queries, 3, exclude=torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="exclude must be an integer"):
        exact_search(keys, queries, 3, exclude=torch.zeros(3))
    with pytest.raises(TypeError, match="keys must have dtype"):
        exact_search(keys.int(), queries, 3)
    with pytest.raises(BackendUnavailableError):
        exact_search(keys.double(), queries, 3, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        exact_search(keys, queries, 3, backend="gpu")


def test_cluster_lookup_bad_input():
    t = make_tree(100, 8, 3, 6, seed=19)
    _, queries = make_memory_bank_data(0, 8, 3, "integer")
    with pytest.raises(ValueError, match="nprobe"):
        cluster_lookup(queries, *tree_args(t), 3, (0, 2))
    with pytest.raises(TypeError, match="nprobe must be a pair"):
        cluster_lookup(queries, *tree_args(t), 3, 4)
    with pytest.raises(ValueError, match="larger than the bank"):
        cluster_lookup(queries, *tree_args(t), 101, (1, 1))
    with pytest.raises(ValueError, match="d = 8"):
        cluster_lookup(queries[:, :4], *tree_args(t), 3, (1, 1))
    bad = dict(t)
    bad["fine_offsets"] = t["fine_offsets"].flip(0)
    with pytest.raises(ValueError, match="fine_offsets must be non-decreasing"):
        cluster_lookup(queries, *tree_args(bad), 3, (1, 1))
    bad = dict(t)
    bad["member_ids"] = t["member_ids"][:-1]
    with pytest.raises(ValueError, match="member_ids must have shape"):
        cluster_lookup(queries, *tree_args(bad), 3, (1, 1))
    # check_inputs: +-inf and NaN found by the one-reduction check, then named by the full one
    bad = dict(t)
    bad["member_keys"] = t["member_keys"].clone()
    bad["member_keys"][3, 1] = float("inf")
    with pytest.raises(ValueError, match="member_keys has 1 non-finite"):
        cluster_lookup(queries, *tree_args(bad), 3, (1, 1), check_inputs=True)
    bad_q = queries.clone()
    bad_q[1, 2] = -float("inf")
    with pytest.raises(ValueError, match=r"queries has 1 non-finite value\(s\) \(NaN or inf\), first at index \(1, 2\)"):
        cluster_lookup(bad_q, *tree_args(t), 3, (1, 1), check_inputs=True)
    bad_q[1, 2] = float("nan")
    with pytest.raises(ValueError, match="queries has 1 non-finite"):
        exact_search(t["member_keys"], bad_q, 3)


def test_make_tree_gives_valid_csr_trees_for_every_seed():
    # the long fuzz profile drew a tree whose random fine sizes were all 0: 0/0 became INT64_MIN offsets
    from mvpp_kernels.ops.cluster_lookup import validate_tree
    for seed in range(3000):
        t = make_tree(18, 1, 1, 3, seed=seed)
        validate_tree(*tree_args(t))
