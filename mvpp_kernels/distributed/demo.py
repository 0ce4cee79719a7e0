"""A sharded memory bank under torchrun (gloo on CPU, NCCL-free), end to end:

    torchrun --nproc_per_node=2 -m mvpp_kernels.distributed.demo [--items 20000 --dim 32 --topk 10 --queries 64 --dir DIR]

Every rank builds its shard of the same seeded bank (global id g on rank g % N), searches its own
queries collectively, checks the merged top-k against one `exact_search` over the whole bank
(exact-representable data, so ids and scores must be bit-identical), adds items with `update`,
saves one file per shard plus a manifest, loads it back and searches again. Rank 0 prints a summary;
any mismatch exits non-zero. Also runs without torchrun (one shard).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from mvpp_kernels import exact_search
from mvpp_kernels.distributed import ShardedIndex


def _dyadic(g, n, d):
    # m / 8 with |m| <= 8: every score is exact in float32, whatever the summation order
    return torch.randint(-8, 9, (n, d), generator=g).float() / 8


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="sharded memory bank demo (run under torchrun)")
    ap.add_argument("--items", "--n", dest="n", type=int, default=20000)
    ap.add_argument("--dim", "--d", dest="d", type=int, default=32)
    ap.add_argument("--topk", "--k", dest="k", type=int, default=10)
    ap.add_argument("--queries", "--q", dest="q", type=int, default=64, help="queries per rank")
    ap.add_argument("--dir", default="", help="where to save the bank (default: a temporary directory)")
    args = ap.parse_args(argv)
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    g = torch.Generator().manual_seed(0)
    keys = _dyadic(g, args.n, args.d)
    queries = _dyadic(torch.Generator().manual_seed(1 + rank), args.q, args.d)
    t0 = time.perf_counter()
    bank = ShardedIndex.build(keys, kind="exact", metric="ip")
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    s, i = bank.search(queries, args.k)
    t_search = time.perf_counter() - t0
    ws, wi = exact_search(keys, queries, args.k, metric="ip")
    ok = torch.equal(s, ws) and torch.equal(i, wi)
    new = _dyadic(torch.Generator().manual_seed(100 + rank), 5, args.d)  # each rank adds 5 items
    new_ids = bank.update(new)
    union = torch.cat([keys] + [_dyadic(torch.Generator().manual_seed(100 + r), 5, args.d) for r in range(world)])
    s2, i2 = bank.search(queries, args.k)  # the next search sees every rank's new items
    ws2, wi2 = exact_search(union, queries, args.k, metric="ip")
    ok &= torch.equal(s2, ws2) and torch.equal(i2, wi2)
    with tempfile.TemporaryDirectory() as tmp:
        # every rank must save to the same directory: rank 0 picks it and broadcasts
        where = [args.dir or os.path.join(tmp, "bank")]
        if world > 1 and not args.dir:
            dist.broadcast_object_list(where, src=0)
        bank.save(where[0])
        back = ShardedIndex.load(where[0])
        s3, i3 = back.search(queries, args.k)
        s4, i4 = bank.search(queries, args.k)
        ok &= torch.equal(s3, s4) and torch.equal(i3, i4)
        files = sorted(os.listdir(where[0]))
        if world > 1:
            dist.barrier()  # nobody deletes the temporary directory while another rank reads it
    flags = [ok] * world
    if world > 1:
        flags = [None] * world
        dist.all_gather_object(flags, bool(ok))
    if rank == 0:
        print(f"sharded memory bank: {world} rank(s), n = {args.n}, d = {args.d}, k = {args.k}, "
              f"{args.q} queries per rank; rank 0 holds {bank.n_local} items (ids 0, {world}, ...)")
        print(f"build {t_build * 1e3:.1f} ms, collective search {t_search * 1e3:.1f} ms; new ids on rank 0: "
              f"{new_ids.tolist()}; next_id {bank.next_id}")
        print(f"saved {files}")
        print("per-rank equality with one exact_search over the whole bank, update, save/load: "
              + ("OK" if all(flags) else f"MISMATCH {flags}"))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0 if all(flags) else 1


if __name__ == "__main__":
    sys.exit(main())
