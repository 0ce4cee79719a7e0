"""Scale-out benchmark of the sharded memory bank (mvpp_kernels.distributed.ShardedIndex, exact
shards, gloo on CPU): search queries/s and, separately, the local search and the all-gather + merge
costs, for 1, 2, 4 ranks in one run (the 1-rank row is the baseline).

Strong scaling: a fixed global bank of n items (d, float32, cosine) is split over the ranks
(global id g on rank g % N) and a fixed global batch of Q queries is split evenly, Q / N per rank.
One `search` = all-gather the queries, exact top-k of all Q queries on the local shard, all-gather
the per-rank (Q, k) scores + ids (N * Q * k * (4 + 8) bytes received per rank), merge.
Every rank runs with torch.set_num_threads(1). Medians of --repeats timed calls after a warm-up,
each preceded by a barrier; rank 0's times.

    python benchmarks/scaleout_bench.py --ranks 1 2 4 --out benchmarks/results/scaleout.md
    torchrun --nproc_per_node=2 benchmarks/scaleout_bench.py --items 20000 --queries 64   # one world size

(under torchrun use the long option names: torchrun itself claims abbreviations such as --n)
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _median_time(fn, repeats, barrier):
    times = []
    for _ in range(repeats + 1):
        barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def bench_rank(rank, world, n, d, k, q_global, repeats, seed=0):
    import torch
    import torch.distributed as dist

    from mvpp_kernels.distributed import ShardedIndex
    from mvpp_kernels.distributed.sharded_index import merge_topk

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, d, generator=g)
    queries = torch.randn(q_global, d, generator=g)
    per = q_global // world
    mine = queries[rank * per:(rank + 1) * per]
    bank = ShardedIndex.build(keys, kind="exact", metric="cosine")
    del keys
    barrier = (lambda: dist.barrier()) if world > 1 else (lambda: None)
    t_search = _median_time(lambda: bank.search(mine, k), repeats, barrier)
    # the local part alone: the shard's exact top-k of all Q (already gathered, normalised) queries
    qn = torch.nn.functional.normalize(queries, dim=1)
    ex = torch.full((q_global,), -1, dtype=torch.int64)
    t_local = _median_time(lambda: bank._local_search(qn, ex, k, None, False), repeats, barrier)
    # the communication + merge part alone: query all-gather, result all-gathers, merge_topk
    s = torch.randn(q_global, k)
    i = torch.randint(0, n, (q_global, k))

    def comm():
        if world > 1:
            bank._all_gather_rows(mine.contiguous())
        gs, gi = bank._all_gather(s), bank._all_gather(i)
        merge_topk(torch.cat(gs, 1), torch.cat(gi, 1), k)

    t_comm = _median_time(comm, repeats, barrier)
    t_merge = _median_time(lambda: merge_topk(torch.cat([s] * world, 1), torch.cat([i] * world, 1), k),
                           repeats, lambda: None)
    return dict(world=world, n_local=bank.n_local, t_search=t_search, t_local=t_local, t_comm=t_comm,
                t_merge=t_merge, qps=q_global / t_search,
                gather_bytes=(world * q_global * k * (4 + 8) + world * per * d * 4) if world > 1 else 0)


def _table(rows, args, cmd):
    import torch

    base = rows[0]
    lines = [
        "# Scale-out: sharded memory bank search (ShardedIndex, exact shards, gloo)",
        "",
        f"Device: CPU `{platform.processor() or platform.machine()}`, {os.cpu_count()} logical cores "
        f"**shared with other jobs**; torch {torch.__version__}; gloo over loopback; 1 thread per rank. "
        "**The 2 shared cores bound this run**: 4 ranks oversubscribe them, so these points measure "
        "the merge overhead and the sharding logic, not a speed-up you would see with one GPU or "
        "core per rank.",
        "",
        f"Shapes: global bank n = {args.n} items, d = {args.d}, float32, cosine, k = {args.k}; "
        f"global batch Q = {args.q} queries split evenly over the ranks; median of {args.repeats} "
        "timed calls (after one warm-up), rank 0's clock.",
        "",
        f"Command: `{cmd}`",
        "",
        "| ranks | items/shard | search ms | queries/s | vs 1 rank | local search ms | all-gather + merge ms "
        "| merge only ms | bytes gathered/rank |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['world']} | {r['n_local']} | {r['t_search'] * 1e3:.1f} | {r['qps']:.0f} | "
                     f"{r['qps'] / base['qps']:.2f}x | {r['t_local'] * 1e3:.1f} | {r['t_comm'] * 1e3:.2f} | "
                     f"{r['t_merge'] * 1e3:.2f} | {r['gather_bytes']} |")
    lines += ["", "search ms = one collective `search` (query all-gather + local exact top-k of all Q queries "
              "+ result all-gathers + merge); local search ms = the shard's top-k alone; all-gather + merge "
              "ms = the collectives and `merge_topk` alone on (Q, k) results; bytes gathered/rank = "
              "N * Q * k * (4 + 8) (results) + N * (Q / N) * d * 4 (queries). See docs/scaleout.md for "
              "the model these points check.", ""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--items", "--n", dest="n", type=int, default=200_000)
    ap.add_argument("--dim", "--d", dest="d", type=int, default=64)
    ap.add_argument("--topk", "--k", dest="k", type=int, default=10)
    ap.add_argument("--queries", "--q", dest="q", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    cmd = "python benchmarks/scaleout_bench.py " + " ".join(sys.argv[1:])
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun: this world size only
        import torch.distributed as dist
        from datetime import timedelta

        dist.init_process_group("gloo", timeout=timedelta(seconds=120))
        rank, world = dist.get_rank(), dist.get_world_size()
        r = bench_rank(rank, world, args.n, args.d, args.k, args.q, args.repeats)
        if rank == 0:
            print(_table([r], args, f"torchrun --nproc_per_node={world} {cmd[len('python '):]}"))
        dist.destroy_process_group()
        return
    from benchmarks.scaleout_bench import bench_rank as fn  # importable by the spawned ranks
    from mvpp_kernels.distributed import spawn_ranks

    rows = []
    for world in args.ranks:
        if args.q % world:
            raise SystemExit(f"--q {args.q} must be divisible by every rank count, got {world}")
        out = spawn_ranks(fn, world, args.n, args.d, args.k, args.q, args.repeats, timeout_s=600,
                          pg_timeout_s=120, path=ROOT)
        rows.append(out[0])
        print(f"{world} ranks: {out[0]}", flush=True)
    text = _table(rows, args, cmd)
    print(text)
    if args.out:
        from mvpp_kernels._io import atomic_write_bytes

        atomic_write_bytes(args.out, text.encode())


if __name__ == "__main__":
    main()
