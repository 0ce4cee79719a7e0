"""Memory-bank search: ours (exact_search; HierarchicalIndex.search via cluster_lookup over an nprobe
sweep, with and without the kNN-graph topology refinement) against faiss IndexFlatIP / IndexIVFFlat
(nlist ~ 4 sqrt(n), nprobe swept) and plain torch matmul + topk, on two synthetic banks of unit vectors:
"clustered" (a mixture of Gaussians on the sphere) and "hard" (a 16-dimensional manifold embedded in d
dimensions by random Fourier features, see mvpp_kernels.testing.make_memory_bank_data; faiss IVF needs
nprobe ~ 96 for recall@10 = 0.95 at 1M).

    pytest benchmarks/test_bench_cluster_lookup.py --benchmark-only -s \
        --benchmark-json=benchmarks/results/cluster_lookup.json            # reduced: 200k x 256, 2k queries
    MVPP_BENCH_N=100000 MVPP_BENCH_Q=1000 MVPP_BENCH_ROWS=rows.jsonl pytest ...  # smaller; rows as measured
    MVPP_BENCH_FULL=1 pytest benchmarks/test_bench_cluster_lookup.py --benchmark-only -s \
        --benchmark-json=benchmarks/results/cluster_lookup_full.json       # the issue's 1M x 256, 10k queries
    python benchmarks/plot_recall_speed.py benchmarks/results/cluster_lookup_full.json   # -> recall_speed.png
    pytest benchmarks/test_bench_cluster_lookup.py                         # smoke (tiny sizes)

Progress lines (data, ground truth, index builds) go to stderr (`-s` shows them). The exact ground truth
is computed once per kind and cached on disk (MVPP_BENCH_CACHE, default <tmp>/mvpp_bench_cache), keyed
by the sizes and a fingerprint of the generated data. At the full size the exact providers (ours exact,
faiss Flat, torch) are timed in one round over the first 1000 queries (a 1000-query batch is large
enough that queries/s does not depend on the count; all 10k would take ~12 min per kind for the three)
and the approximate ones over all 10k queries in two rounds without warm-up.

Each row's extra_info: kind, provider, nprobe, n, d, queries, k, recall@10 against exact search,
queries/s (from the median time), build seconds, the index's memory in bytes (ours: the tensors it
holds; faiss: vectors + ids + centroids, its storage layout), and for ours the mean number of members a
query scans at that nprobe (so recall can be compared at equal work). Timed: one search of every query.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
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
_P2 = [2, 32] if SMOKE else [8, 16, 32, 64, 128, 256, 384]
OUR_PROBES = [(min(C1, max(4, p2 // 4)), p2) for p2 in _P2]
IVF_PROBES = [2, 32] if SMOKE else [4, 8, 16, 32, 64, 96, 128, 192, 256]
# exact providers scan the whole bank: at 1M x 10k queries one round is tens of seconds
EXACT_ROUNDS, EXACT_WARMUP = (1, 0) if FULL else (2, 1)
# ... and at the full size they are timed on the first EXACT_Q queries (1000: large enough batches that
# queries/s does not depend on the count; all 10k would take ~12 min per kind for the three of them)
EXACT_Q = 1000 if FULL else Q
ROUNDS, WARMUP = (2, 0) if FULL else (2, 1)
ROWS = os.environ.get("MVPP_BENCH_ROWS")  # optional: append every row as a JSON line as it is measured
CACHE = os.environ.get("MVPP_BENCH_CACHE", os.path.join(tempfile.gettempdir(), "mvpp_bench_cache"))
K = 10
KINDS = ["clustered", "hard"]
_T0 = time.perf_counter()


def log(msg):
    """Progress of the slow steps (seen with pytest -s)."""
    print(f"[cluster_lookup bench +{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


try:
    import faiss

    HAS_FAISS = True
except ImportError:  # pragma: no cover - faiss-cpu is in the test extras
    HAS_FAISS = False

needs_faiss = pytest.mark.skipif(not HAS_FAISS, reason="faiss-cpu is not installed")

_DATA: dict = {}
_INDEX: dict = {}


def _ground_truth(kind, keys, queries):
    """Exact top-K ids, cached on disk: at 1M x 10k queries exact search takes minutes on 2 cores."""
    h = hashlib.sha256()
    for t in (keys[:64], keys[-64:], queries[:64], queries[-64:]):
        h.update(t.contiguous().numpy().tobytes())
    path = os.path.join(CACHE, f"truth_{kind}_{N}x{D}_q{Q}_k{K}_{h.hexdigest()[:16]}.pt")
    if not SMOKE and os.path.exists(path):
        log(f"{kind}: ground truth from {path}")
        return torch.load(path)
    log(f"{kind}: exact ground truth ({Q} queries x {N} keys) ...")
    t0 = time.perf_counter()
    _, true = exact_search(keys, queries, K)
    log(f"{kind}: ground truth took {time.perf_counter() - t0:.1f}s")
    if not SMOKE:
        os.makedirs(CACHE, exist_ok=True)
        tmp = path + f".tmp{os.getpid()}"
        torch.save(true, tmp)
        os.replace(tmp, path)
    return true


def data(kind):
    if kind not in _DATA:
        t0 = time.perf_counter()
        keys, queries = make_memory_bank_data(N, D, Q, kind, seed=0)
        log(f"{kind}: generated {N} x {D} keys, {Q} queries in {time.perf_counter() - t0:.1f}s")
        _DATA[kind] = (keys, queries, _ground_truth(kind, keys, queries))
    return _DATA[kind]


def ours(kind, refine=True):
    """Our index; the refined one is the plain one plus `refine_topology` (exactly what
    build(refine=True) does), so one k-means serves both and the refined build time is the plain build
    time plus the refinement's."""
    key = ("ours", kind, refine)
    if key not in _INDEX:
        keys, _, _ = data(kind)
        if refine:
            plain, plain_s = ours(kind, refine=False)
            log(f"{kind}: refining ours with the kNN graph ...")
            t0 = time.perf_counter()
            idx = plain.refine_topology()
            build_s = plain_s + time.perf_counter() - t0
        else:
            log(f"{kind}: building ours {BRANCHING} (k-means) ...")
            t0 = time.perf_counter()
            idx = HierarchicalIndex.build(keys, branching=BRANCHING, metric="cosine", seed=0, refine=False)
            build_s = time.perf_counter() - t0
        _INDEX[key] = (idx, build_s)
        info = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in idx.build_info.items()}
        log(f"{kind}: ours (refine={refine}) built in {build_s:.1f}s: {info}")
    return _INDEX[key]


def scanned_members(idx, queries, nprobe, block=2048):
    """Mean number of members a query scans at this nprobe (the cluster_lookup routing rule)."""
    p1, p2 = nprobe
    qn = queries / queries.norm(dim=1, keepdim=True)
    C1, F = idx.coarse_centroids.float(), idx.fine_centroids.float()
    parent = idx._parents()
    sizes = idx.fine_offsets.diff()
    total = 0
    for a in range(0, qn.shape[0], block):
        qb = qn[a:a + block]
        top = (qb @ C1.T).topk(p1, dim=1).indices
        allowed = torch.zeros(qb.shape[0], C1.shape[0], dtype=torch.bool).scatter_(1, top, True)[:, parent]
        fine = (qb @ F.T).masked_fill_(~allowed, float("-inf")).topk(p2, dim=1).indices
        total += int(sizes[fine].sum())
    return total / max(1, qn.shape[0])


def faiss_ivf(kind):
    key = ("ivf", kind)
    if key not in _INDEX:
        keys, _, _ = data(kind)
        x = keys.numpy()
        log(f"{kind}: building faiss IVF-Flat nlist={NLIST} ...")
        t0 = time.perf_counter()
        quant = faiss.IndexFlatIP(D)
        ivf = faiss.IndexIVFFlat(quant, D, NLIST, faiss.METRIC_INNER_PRODUCT)
        ivf.train(x)
        ivf.add(x)
        _INDEX[key] = (ivf, time.perf_counter() - t0)
        log(f"{kind}: built faiss IVF-Flat in {_INDEX[key][1]:.1f}s")
    return _INDEX[key]


def record(benchmark, kind, provider, nprobe, ids, build_s, mem_bytes, scanned=None):
    _, _, true = data(kind)
    ids = torch.as_tensor(ids)
    nq = ids.shape[0]  # the exact providers may run on the first EXACT_Q queries only
    median = benchmark.stats.stats.median if benchmark.stats else float("nan")
    benchmark.extra_info.update(
        kind=kind, provider=provider, nprobe=str(nprobe), n=N, d=D, queries=nq, k=K,
        recall_at_10=round(recall_at_k(ids, true[:nq]), 4), queries_per_s=round(nq / median, 1) if median else None,
        build_s=round(build_s, 3), memory_bytes=int(mem_bytes), nlist=NLIST if provider.startswith("faiss_ivf") else None,
        members_scanned=round(scanned, 1) if scanned is not None else None,
        reduced=not FULL and not SMOKE,
    )
    log(f"{kind} {provider} nprobe={nprobe}: recall@10 {benchmark.extra_info['recall_at_10']}, "
        f"{benchmark.extra_info['queries_per_s']} q/s")
    if ROWS:
        with open(ROWS, "a") as f:
            f.write(json.dumps(dict(benchmark.extra_info, median_s=median)) + "\n")


@pytest.mark.parametrize("kind", KINDS)
def test_exact_ours(benchmark, kind):
    keys, queries, _ = data(kind)
    queries = queries[:EXACT_Q]
    out = run_pedantic(benchmark, lambda: exact_search(keys, queries, K), "cpu", rounds=EXACT_ROUNDS,
                       warmup_rounds=EXACT_WARMUP)
    record(benchmark, kind, "ours_exact", "-", out[1], 0.0, keys.numel() * keys.element_size())


@pytest.mark.parametrize("kind", KINDS)
def test_exact_torch_matmul_topk(benchmark, kind):
    keys, queries, _ = data(kind)
    queries = queries[:EXACT_Q]

    def run():
        ids = []
        for a in range(0, queries.shape[0], 256):  # query blocks: the full (q, n) matrix would not fit at 1M x 10k
            ids.append(torch.topk(queries[a:a + 256] @ keys.T, K, dim=1).indices)
        return torch.cat(ids)

    ids = run_pedantic(benchmark, run, "cpu", rounds=EXACT_ROUNDS, warmup_rounds=EXACT_WARMUP)
    record(benchmark, kind, "torch_matmul_topk", "-", ids, 0.0, keys.numel() * keys.element_size())


@needs_faiss
@pytest.mark.parametrize("kind", KINDS)
def test_exact_faiss_flat(benchmark, kind):
    keys, queries, _ = data(kind)
    t0 = time.perf_counter()
    flat = faiss.IndexFlatIP(D)  # not cached: a second 1 GB copy of the bank per kind at 1M
    flat.add(keys.numpy())
    build_s = time.perf_counter() - t0
    q = queries[:EXACT_Q].numpy()
    _, ids = run_pedantic(benchmark, lambda: flat.search(q, K), "cpu", rounds=EXACT_ROUNDS, warmup_rounds=EXACT_WARMUP)
    record(benchmark, kind, "faiss_flat_ip", "-", ids, build_s, N * D * 4)
    del flat


@pytest.mark.parametrize("nprobe", OUR_PROBES, ids=[f"{a}x{b}" for a, b in OUR_PROBES])
@pytest.mark.parametrize("kind", KINDS)
def test_hierarchical_ours(benchmark, kind, nprobe):
    _, queries, _ = data(kind)
    idx, build_s = ours(kind)
    p = (min(nprobe[0], idx.n_coarse), min(nprobe[1], idx.n_fine))
    out = run_pedantic(benchmark, lambda: idx.search(queries, K, nprobe=p), "cpu", rounds=ROUNDS, warmup_rounds=WARMUP)
    record(benchmark, kind, "ours_hier", p, out[1], build_s, idx.nbytes(), scanned_members(idx, queries, p))


@pytest.mark.parametrize("nprobe", OUR_PROBES, ids=[f"{a}x{b}" for a, b in OUR_PROBES])
@pytest.mark.parametrize("kind", KINDS)
def test_hierarchical_ours_no_refinement(benchmark, kind, nprobe):
    """The same index without the kNN-graph refinement: the refinement's effect at each nprobe (recall,
    members scanned, queries/s)."""
    _, queries, _ = data(kind)
    idx, build_s = ours(kind, refine=False)
    p = (min(nprobe[0], idx.n_coarse), min(nprobe[1], idx.n_fine))
    out = run_pedantic(benchmark, lambda: idx.search(queries, K, nprobe=p), "cpu", rounds=ROUNDS, warmup_rounds=WARMUP)
    record(benchmark, kind, "ours_hier_norefine", p, out[1], build_s, idx.nbytes(), scanned_members(idx, queries, p))


@needs_faiss
@pytest.mark.parametrize("nprobe", IVF_PROBES)
@pytest.mark.parametrize("kind", KINDS)
def test_ivf_faiss(benchmark, kind, nprobe):
    _, queries, _ = data(kind)
    ivf, build_s = faiss_ivf(kind)
    ivf.nprobe = nprobe
    q = queries.numpy()
    _, ids = run_pedantic(benchmark, lambda: ivf.search(q, K), "cpu", rounds=ROUNDS, warmup_rounds=WARMUP)
    record(benchmark, kind, "faiss_ivf_flat", nprobe, ids, build_s, N * D * 4 + N * 8 + NLIST * D * 4)
