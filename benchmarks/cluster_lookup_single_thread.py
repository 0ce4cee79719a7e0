"""Single-thread recall/speed comparison of the memory bank against faiss (quick: 30k x 256 keys, 1k
queries, k = 10): ours (HierarchicalIndex.search, exact_search) vs faiss IndexIVFFlat (nlist = 4 sqrt(n))
and IndexFlatIP, torch and faiss both pinned to one thread. Complements test_bench_cluster_lookup.py
(which uses every core) on a machine where other jobs oversubscribe the cores.

    python benchmarks/cluster_lookup_single_thread.py > benchmarks/results/cluster_lookup_single_thread.txt
"""
import torch, time, math, faiss
from mvpp_kernels import HierarchicalIndex, exact_search
from mvpp_kernels.testing import make_memory_bank_data, recall_at_k
torch.set_num_threads(1); faiss.omp_set_num_threads(1)
n, q = 30000, 1000
nlist = int(4 * math.sqrt(n))
for kind in ["clustered", "hard"]:
    keys, qs = make_memory_bank_data(n, 256, q, kind, seed=0)
    _, true = exact_search(keys, qs, 10)
    t = time.perf_counter(); idx = HierarchicalIndex.build(keys, branching=(16, round(nlist / 16)), seed=0); bt = time.perf_counter() - t
    for p in [(4, 4), (4, 8), (4, 16), (8, 32), (16, 64), (16, 128)]:
        ts = []
        for _ in range(3):
            t0 = time.perf_counter(); _, ids = idx.search(qs, 10, nprobe=p); ts.append(time.perf_counter() - t0)
        print(kind, "ours", p, round(recall_at_k(ids, true), 4), round(q / min(ts)), "q/s", f"build {bt:.1f}s", flush=True)
    x = keys.numpy(); t = time.perf_counter()
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(256), 256, nlist, faiss.METRIC_INNER_PRODUCT); ivf.train(x); ivf.add(x)
    bt = time.perf_counter() - t
    for npb in [2, 4, 8, 16, 32, 64, 128]:
        ivf.nprobe = npb; ts = []
        for _ in range(3):
            t0 = time.perf_counter(); _, I = ivf.search(qs.numpy(), 10); ts.append(time.perf_counter() - t0)
        print(kind, "faiss_ivf", npb, round(recall_at_k(torch.from_numpy(I), true), 4), round(q / min(ts)), "q/s", f"build {bt:.1f}s", flush=True)
    flat = faiss.IndexFlatIP(256); flat.add(x)
    ts = []
    for _ in range(2):
        t0 = time.perf_counter(); flat.search(qs.numpy(), 10); ts.append(time.perf_counter() - t0)
    ts2 = []
    for _ in range(2):
        t0 = time.perf_counter(); exact_search(keys, qs, 10); ts2.append(time.perf_counter() - t0)
    print(kind, "exact: faiss_flat", round(q / min(ts)), "q/s; ours", round(q / min(ts2)), "q/s", flush=True)
