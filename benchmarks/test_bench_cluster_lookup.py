"""Memory-bank search: ours (exact_search; HierarchicalIndex.search via cluster_lookup over an nprobe
sweep, with and without the topology refinement) against faiss IndexFlatIP / IndexIVFFlat (nlist ~
4 sqrt(n), nprobe swept) and plain torch matmul + topk, on two synthetic banks of unit vectors:
"clustered" (a mixture of Gaussians on the sphere) and "hard" (a 6-dimensional manifold embedded in d
dimensions, see mvpp_kernels.testing.make_memory_bank_data).

    pytest benchmarks/test_bench_cluster_lookup.py --benchmark-only \
        --benchmark-json=benchmarks/results/cluster_lookup.json            # reduced: 200k x 256, 2k queries
    MVPP_BENCH_N=100000 MVPP_BENCH_Q=1000 MVPP_BENCH_ROWS=rows.jsonl pytest ...  # smaller; rows as measured
    MVPP_BENCH_FULL=1 pytest benchmarks/test_bench_cluster_lookup.py --benchmark-only \
        --benchmark-json=benchmarks/results/cluster_lookup_full.json       # the issue's 1M x 256, 10k queries
    python benchmarks/plot_recall_speed.py benchmarks/results/cluster_lookup.json   # -> recall_speed.png
    pytest benchmarks/test_bench_cluster_lookup.py                         # smoke (tiny sizes)

Each row's extra_info: kind, provider, nprobe, n, d, queries, k, recall@10 against exact search,
queries/s (from the median time), build seconds, and the index's memory in bytes (ours: the tensors
it holds; faiss: vectors + ids + centroids, its storage layout). Timed: one search of every query.
"""
from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch

from mvpp_kernels import HierarchicalIndex, exact_search
from mvpp_kernels.testing import make_memory_bank_data, recall_at_k

from .conftest import run_pedantic

SMOKE = os.environ.get("MVPP_BENCH_SMOKE", "0") == "1"
FULL = os.environ.get("MVPP_BENCH_FULL", "0") == "1"
if SMOKE:
    N, D, Q = 3000, 32, 50
elif FULL:
    N, D, Q = 1_000_000, 256, 10_000
else:  # reduced default; MVPP_BENCH_N / MVPP_BENCH_Q override (e.g. on a crowded machine)
    N, D, Q = int(os.environ.get("MVPP_BENCH_N", 200_000)), 256, int(os.environ.get("MVPP_BENCH_Q", 2_000))
NLIST = max(4, int(4 * math.sqrt(N)))
# ours: about as many fine clusters as faiss has lists, under 32 (64 from 300k keys) coarse ones
C1 = 4 if SMOKE else (32 if N <= 300_000 else 64)
BRANCHING = (C1, max(2, round(NLIST / C1)))
_P2 = [2, 32] if SMOKE else [8, 16, 32, 64, 128, 256]
OUR_PROBES = [(min(C1, max(4, p2 // 4)), p2) for p2 in _P2]
IVF_PROBES = [2, 32] if SMOKE else [4, 8, 16, 32, 64, 128, 256]
ROUNDS = 2
ROWS = os.environ.get("MVPP_BENCH_ROWS")  # optional: append every row as a JSON line as it is measured
K = 10
KINDS = ["clustered", "hard"]

try:
    import faiss

    HAS_FAISS = True
except ImportError:  # pragma: no cover - faiss-cpu is in the test extras
    HAS_FAISS = False

needs_faiss = pytest.mark.skipif(not HAS_FAISS, reason="faiss-cpu is not installed")

_DATA: dict = {}
_INDEX: dict = {}


def data(kind):
    if kind not in _DATA:
        keys, queries = make_memory_bank_data(N, D, Q, kind, seed=0)
        _, true = exact_search(keys, queries, K)
        _DATA[kind] = (keys, queries, true)
    return _DATA[kind]


def ours(kind, refine=True):
    key = ("ours", kind, refine)
    if key not in _INDEX:
        keys, _, _ = data(kind)
        t0 = time.perf_counter()
        idx = HierarchicalIndex.build(keys, branching=BRANCHING, metric="cosine", seed=0, refine=refine)
        _INDEX[key] = (idx, time.perf_counter() - t0)
    return _INDEX[key]


def faiss_ivf(kind):
    key = ("ivf", kind)
    if key not in _INDEX:
        keys, _, _ = data(kind)
        x = keys.numpy()
        t0 = time.perf_counter()
        quant = faiss.IndexFlatIP(D)
        ivf = faiss.IndexIVFFlat(quant, D, NLIST, faiss.METRIC_INNER_PRODUCT)
        ivf.train(x)
        ivf.add(x)
        _INDEX[key] = (ivf, time.perf_counter() - t0)
    return _INDEX[key]


def faiss_flat(kind):
    key = ("flat", kind)
    if key not in _INDEX:
        keys, _, _ = data(kind)
        t0 = time.perf_counter()
        flat = faiss.IndexFlatIP(D)
        flat.add(keys.numpy())
        _INDEX[key] = (flat, time.perf_counter() - t0)
    return _INDEX[key]


def record(benchmark, kind, provider, nprobe, ids, build_s, mem_bytes):
    _, _, true = data(kind)
    ids = torch.as_tensor(ids)
    median = benchmark.stats.stats.median if benchmark.stats else float("nan")
    benchmark.extra_info.update(
        kind=kind, provider=provider, nprobe=str(nprobe), n=N, d=D, queries=Q, k=K,
        recall_at_10=round(recall_at_k(ids, true), 4), queries_per_s=round(Q / median, 1) if median else None,
        build_s=round(build_s, 3), memory_bytes=int(mem_bytes), nlist=NLIST if provider.startswith("faiss_ivf") else None,
        reduced=not FULL and not SMOKE,
    )
    if ROWS:
        with open(ROWS, "a") as f:
            f.write(json.dumps(dict(benchmark.extra_info, median_s=median)) + "\n")


@pytest.mark.parametrize("kind", KINDS)
def test_exact_ours(benchmark, kind):
    keys, queries, _ = data(kind)
    out = run_pedantic(benchmark, lambda: exact_search(keys, queries, K), "cpu", rounds=ROUNDS)
    record(benchmark, kind, "ours_exact", "-", out[1], 0.0, keys.numel() * keys.element_size())


@pytest.mark.parametrize("kind", KINDS)
def test_exact_torch_matmul_topk(benchmark, kind):
    keys, queries, _ = data(kind)

    def run():
        ids = []
        for a in range(0, Q, 256):  # query blocks: the full (q, n) matrix would not fit at 1M x 10k
            ids.append(torch.topk(queries[a:a + 256] @ keys.T, K, dim=1).indices)
        return torch.cat(ids)

    ids = run_pedantic(benchmark, run, "cpu", rounds=ROUNDS)
    record(benchmark, kind, "torch_matmul_topk", "-", ids, 0.0, keys.numel() * keys.element_size())


@needs_faiss
@pytest.mark.parametrize("kind", KINDS)
def test_exact_faiss_flat(benchmark, kind):
    _, queries, _ = data(kind)
    flat, build_s = faiss_flat(kind)
    q = queries.numpy()
    _, ids = run_pedantic(benchmark, lambda: flat.search(q, K), "cpu", rounds=ROUNDS)
    record(benchmark, kind, "faiss_flat_ip", "-", ids, build_s, N * D * 4)


@pytest.mark.parametrize("nprobe", OUR_PROBES, ids=[f"{a}x{b}" for a, b in OUR_PROBES])
@pytest.mark.parametrize("kind", KINDS)
def test_hierarchical_ours(benchmark, kind, nprobe):
    _, queries, _ = data(kind)
    idx, build_s = ours(kind)
    p = (min(nprobe[0], idx.n_coarse), min(nprobe[1], idx.n_fine))
    out = run_pedantic(benchmark, lambda: idx.search(queries, K, nprobe=p), "cpu", rounds=ROUNDS)
    record(benchmark, kind, "ours_hier", p, out[1], build_s, idx.nbytes())


@pytest.mark.parametrize("nprobe", OUR_PROBES[:4], ids=[f"{a}x{b}" for a, b in OUR_PROBES[:4]])
def test_hierarchical_ours_no_refinement(benchmark, nprobe):
    """The same index without the kNN-graph refinement, on the hard data: the refinement's effect."""
    kind = "hard"
    _, queries, _ = data(kind)
    idx, build_s = ours(kind, refine=False)
    p = (min(nprobe[0], idx.n_coarse), min(nprobe[1], idx.n_fine))
    out = run_pedantic(benchmark, lambda: idx.search(queries, K, nprobe=p), "cpu", rounds=ROUNDS)
    record(benchmark, kind, "ours_hier_norefine", p, out[1], build_s, idx.nbytes())


@needs_faiss
@pytest.mark.parametrize("nprobe", IVF_PROBES)
@pytest.mark.parametrize("kind", KINDS)
def test_ivf_faiss(benchmark, kind, nprobe):
    _, queries, _ = data(kind)
    ivf, build_s = faiss_ivf(kind)
    ivf.nprobe = nprobe
    q = queries.numpy()
    _, ids = run_pedantic(benchmark, lambda: ivf.search(q, K), "cpu", rounds=ROUNDS)
    record(benchmark, kind, "faiss_ivf_flat", nprobe, ids, build_s, N * D * 4 + N * 8 + NLIST * D * 4)
