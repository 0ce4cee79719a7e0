"""Hierarchical search (HierarchicalIndex.search -> cluster_lookup) against faiss IndexIVFFlat at the same
thread count, interleaved in one process so that machine load hits both alike; optionally exact_search
against faiss IndexFlatIP. Prints, per nprobe: recall@10 against exact search, queries/s (best and median
of --reps timed searches of every query) and the members scanned per query (so a gap can be told apart
into kernel speed and pruning quality).

    python benchmarks/cluster_lookup_threads.py                          # 100k x 256, 1k queries, 2 threads
    python benchmarks/cluster_lookup_threads.py --n 200000 --q 2000 --exact
    python benchmarks/cluster_lookup_threads.py --cache /tmp/bank        # keep built indexes between runs

The index shapes follow benchmarks/test_bench_cluster_lookup.py: faiss nlist = 4 sqrt(n); ours c1 = 32
coarse clusters (64 above 300k keys) x nlist / c1 fine ones, metric cosine, seed 0.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import time

import torch

from mvpp_kernels import HierarchicalIndex, exact_search
from mvpp_kernels.ops.cluster_lookup import route_ref
from mvpp_kernels.testing import make_memory_bank_data, recall_at_k

K, D = 10, 256


def build(kind, keys, n, cache):
    import faiss

    nlist = max(4, int(4 * math.sqrt(n)))
    c1 = 32 if n <= 300_000 else 64
    tag = f"{kind}_{n}_{hashlib.sha1(keys[:1000].numpy().tobytes()).hexdigest()[:10]}"
    ours_path = cache and os.path.join(cache, f"ours_{tag}.mvpp")
    ivf_path = cache and os.path.join(cache, f"ivf_{tag}.faiss")
    if ours_path and os.path.exists(ours_path):
        idx = HierarchicalIndex.load(ours_path)
    else:
        t0 = time.perf_counter()
        idx = HierarchicalIndex.build(keys, branching=(c1, max(2, round(nlist / c1))), metric="cosine", seed=0)
        print(f"{kind}: ours built in {time.perf_counter() - t0:.1f} s", flush=True)
        if ours_path:
            idx.save(ours_path)
    if ivf_path and os.path.exists(ivf_path):
        ivf = faiss.read_index(ivf_path)
    else:
        t0 = time.perf_counter()
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(D), D, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.train(keys.numpy())
        ivf.add(keys.numpy())
        print(f"{kind}: faiss IVF-Flat built in {time.perf_counter() - t0:.1f} s", flush=True)
        if ivf_path:
            faiss.write_index(ivf, ivf_path)
    return idx, ivf


def timed(fn, times):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
    return out


def main():
    import faiss

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--q", type=int, default=1000)
    ap.add_argument("--kinds", default="clustered,hard")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ours", default="4x16,8x32,16x64,32x96,32x128,32x192", help="p1xp2,...")
    ap.add_argument("--ivf", default="16,32,64,96,128,192", help="nprobe,...")
    ap.add_argument("--exact", action="store_true", help="also exact_search vs faiss IndexFlatIP")
    ap.add_argument("--cache", default=None, help="directory to keep built indexes in")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    faiss.omp_set_num_threads(a.threads)
    if a.cache:
        os.makedirs(a.cache, exist_ok=True)
    ours_p = [tuple(int(v) for v in s.split("x")) for s in a.ours.split(",") if s]
    ivf_p = [int(s) for s in a.ivf.split(",") if s]
    print(f"n={a.n} d={D} queries={a.q} k={K} threads={a.threads}; {os.popen('uptime').read().strip()}", flush=True)
    for kind in a.kinds.split(","):
        keys, queries = make_memory_bank_data(a.n, D, a.q, kind, seed=0)
        _, true = exact_search(keys, queries, K)
        idx, ivf = build(kind, keys, a.n, a.cache)
        qn = queries.numpy()
        if a.exact:
            flat = faiss.IndexFlatIP(D)
            flat.add(keys.numpy())
        times, found = {}, {}
        for _ in range(a.reps):  # interleaved: every provider once per round
            for p in ours_p:
                p = (min(p[0], idx.n_coarse), min(p[1], idx.n_fine))
                found[("ours", p)] = timed(lambda: idx.search(queries, K, nprobe=p)[1], times.setdefault(("ours", p), []))
            for npb in ivf_p:
                ivf.nprobe = npb
                found[("faiss_ivf", npb)] = timed(lambda: ivf.search(qn, K)[1], times.setdefault(("faiss_ivf", npb), []))
            if a.exact:
                found[("ours_exact", "-")] = timed(lambda: exact_search(keys, queries, K)[1],
                                                   times.setdefault(("ours_exact", "-"), []))
                found[("faiss_flat", "-")] = timed(lambda: flat.search(qn, K)[1], times.setdefault(("faiss_flat", "-"), []))
        sizes = idx.fine_offsets.diff()
        lists = torch.tensor([ivf.invlists.list_size(i) for i in range(ivf.nlist)])
        _, assign = ivf.quantizer.search(qn, max(ivf_p)) if ivf_p else (None, None)
        for key, ts in times.items():
            prov, p = key
            if prov == "ours":
                tf = route_ref(queries, idx.coarse_centroids, idx.coarse_offsets, idx.fine_centroids, *p)
                scanned = float(torch.where(tf >= 0, sizes[tf.clamp_min(0)], 0).sum(1).double().mean())
            elif prov == "faiss_ivf":
                scanned = float(lists[torch.from_numpy(assign[:, :p])].sum(1).double().mean())
            else:
                scanned = float(a.n)
            ts = sorted(ts)
            print(f"{kind:9s} {prov:10s} {str(p):10s} recall@10 {recall_at_k(torch.as_tensor(found[key]), true):.4f}  "
                  f"q/s best {a.q / ts[0]:8.0f} median {a.q / ts[len(ts) // 2]:8.0f}  scanned/query {scanned:8.0f}",
                  flush=True)
    print(os.popen("uptime").read().strip())


if __name__ == "__main__":
    main()
