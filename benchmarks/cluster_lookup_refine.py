"""Topology refinement, same index, same process: recall@10 and queries/s with and without it.

The pytest-benchmark file times each provider in its own block of 2 rounds, so on a 2-core VM a
scheduler stall can move one provider's q/s by 2x (see RESULTS.md: identical members scanned, very
different q/s). Here the plain index (build(refine=False)) and its refined copy (refine_topology())
are searched alternately, several rounds each, so only the refinement differs.

    python benchmarks/cluster_lookup_refine.py [--n 200000] [--q 2000] [--kind hard] [--rounds 6] \
        > benchmarks/results/cluster_lookup_refine.txt
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch

from mvpp_kernels import HierarchicalIndex, exact_search
from mvpp_kernels.testing import make_memory_bank_data, recall_at_k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--q", type=int, default=2_000)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--kind", default="hard")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nprobe", default="8x32,16x64,32x128")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keys, queries = make_memory_bank_data(args.n, args.d, args.q, kind=args.kind, seed=0)[:2]
    nlist = int(4 * math.sqrt(args.n))
    c1 = 32 if args.n <= 300_000 else 64
    plain = HierarchicalIndex.build(keys, branching=(c1, max(2, round(nlist / c1))), refine=False, seed=0)
    refined = plain.refine_topology()
    _, truth = exact_search(keys, queries, 10)
    print(f"{args.kind} bank {args.n} x {args.d}, {args.q} queries, k=10, {args.threads} threads, rounds {args.rounds}, "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}")
    print("| nprobe | recall@10 plain | recall@10 refined | q/s plain (median) | q/s refined (median) |")
    print("|---|---:|---:|---:|---:|")
    for spec in args.nprobe.split(","):
        nprobe = tuple(int(x) for x in spec.split("x"))
        times = {"plain": [], "refined": []}
        recall = {}
        for _ in range(args.rounds):
            for name, index in (("plain", plain), ("refined", refined)):
                t = time.perf_counter()
                _, ids = index.search(queries, 10, nprobe=nprobe)
                times[name].append(time.perf_counter() - t)
                recall[name] = float(recall_at_k(ids, truth))
        qps = {k: args.q / sorted(v)[len(v) // 2] for k, v in times.items()}
        print(f"| {nprobe} | {recall['plain']:.4f} | {recall['refined']:.4f} | {qps['plain']:.0f} | {qps['refined']:.0f} |")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
