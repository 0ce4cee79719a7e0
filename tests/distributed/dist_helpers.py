"""Rank functions for tests/distributed (imported by the spawned gloo ranks through
`mvpp_kernels.distributed.spawn_ranks`, so they live in a plain module, not in the test file).

Every function takes (rank, world, ...) and returns plain tensors; the test process compares them
with single-process references built from the same seeded data (`data`)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from mvpp_kernels.distributed import ShardedIndex

D = 8
K = 5


MODES = ("dyadic", "ties", "gauss")


def _rows(g, n, d, mode, dtype, query):
    if mode == "dyadic":  # m / 8, |m| <= 32: every product and partial sum is exact in float32
        return (torch.randint(-32, 33, (n, d), generator=g).to(torch.float64) / 8).to(dtype)
    if mode == "ties":
        # 4 non-zeros of one magnitude per row: unit-normalised entries are +-0.5 and every ip and
        # cosine score is a multiple of 1/4 -- exact in any summation order, and full of ties
        mag = torch.ones(n, 1) if query else torch.randint(1, 3, (n, 1), generator=g).to(torch.float64)
        sign = torch.randint(0, 2, (n, d), generator=g).to(torch.float64) * 2 - 1
        pos = torch.rand(n, d, generator=g).argsort(1)[:, :4]
        x = torch.zeros(n, d, dtype=torch.float64).scatter_(1, pos, 1.0) * sign * mag
        return x.to(dtype)
    return torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)


def data(seed: int, n: int, mode: str = "gauss", d: int = D, dtype=torch.float32):
    """Keys (n, d) and values (n, 2), seeded, with exact duplicate rows (ties broken by global id)."""
    g = torch.Generator().manual_seed(seed)
    keys = _rows(g, n, d, mode, dtype, False)
    if n >= 6:
        keys[n - 3:] = keys[:3]
    values = torch.randn(n, 2, generator=g)
    return keys, values


def queries_of(seed: int, rank: int, mode: str = "gauss", d: int = D, dtype=torch.float32):
    """Uneven per-rank query sets (rank r: 3 + 2r rows)."""
    g = torch.Generator().manual_seed(seed * 100 + rank)
    return _rows(g, 3 + 2 * rank, d, mode, dtype, True)


def exact_case(mode: str, metric: str) -> bool:
    """Whether every score is exactly representable, so that any summation order (the kernel's GEMM
    blocking depends on where a key sits in the bank) gives the same float: then the sharded result
    must equal one exact_search bit for bit."""
    return mode == "ties" or (mode == "dyadic" and metric == "ip")


def exclude_of(rank: int, q: int, n: int):
    ex = torch.full((q,), -1, dtype=torch.int64)
    ex[::2] = (torch.arange(0, q, 2) * 7 + rank) % n
    return ex


def exact_checks(rank, world, n, save_dir):
    """Everything the exact shards must match, in one spawned job (one process-group start)."""
    out = {"world": dist.get_world_size(), "rank": rank}
    for mi, mode in enumerate(MODES):
        keys, values = data(1 + mi, n, mode)
        q = queries_of(1 + mi, rank, mode)
        ex = exclude_of(rank, q.shape[0], n)
        for metric in ("ip", "cosine"):
            bank = ShardedIndex.build(keys, values, kind="exact", metric=metric)
            out[("n_local", mode, metric)] = bank.n_local
            out[("plain", mode, metric)] = bank.search(q, K)
            out[("exclude", mode, metric)] = bank.search(q, K, exclude=ex)
            out[("rows", mode, metric)] = bank.search(q, K, exclude=ex, return_rows=True)
            out[("k=n", mode, metric)] = bank.search(q, n)
            out[("replicated", mode, metric)] = bank.search(queries_of(99, 0, mode), K, replicated=True)
    # float64 keys
    keys, values = data(3, n, "dyadic", dtype=torch.float64)
    bank = ShardedIndex.build(keys, values, kind="exact", metric="ip")
    out["f64"] = bank.search(queries_of(3, rank, "dyadic", dtype=torch.float64), K)
    # update: rank r adds r + 1 items of its own; then everybody searches
    keys, values = data(4, n, "ties")
    bank = ShardedIndex.build(keys, values, kind="exact", metric="cosine")
    nk, nv = data(40 + rank, rank + 1, "ties")
    out["update_ids"] = bank.update(nk, nv)
    out["update_next_id"] = bank.next_id
    out["update_search"] = bank.search(nk, K, return_rows=True)  # each new item finds itself
    out["update_n_local"] = bank.n_local
    # replicated update: every rank passes the same 4 items
    rk, rv = data(50, 4, "ties")
    out["update_rep_ids"] = bank.update(rk, rv, replicated=True)
    out["update_rep_search"] = bank.search(queries_of(5, rank, "ties"), K)
    # empty shards: fewer items than ranks (n = world - 1: the last rank owns nothing); k > n
    ek, ev = data(6, world - 1, "dyadic")
    eb = ShardedIndex.build(ek, ev, kind="exact", metric="ip")
    out["empty_n_local"] = eb.n_local
    out["empty_search"] = eb.search(queries_of(6, rank, "dyadic"), 3)
    hb = ShardedIndex.build(ek, ev, kind="hierarchical", metric="cosine", branching=(2, 2))
    out["empty_hier_search"] = hb.search(queries_of(6, rank, "dyadic"), 3)
    # a rank with zero queries still takes part in the collective
    out["zero_queries"] = eb.search(queries_of(6, rank, "dyadic")[: 0 if rank == world - 1 else 2], 1)
    # save / load round trip of the update-grown bank
    bank.save(save_dir)
    back = ShardedIndex.load(save_dir)
    out["loaded_n_local"] = back.n_local
    out["loaded_next_id"] = back.next_id
    out["loaded_search"] = back.search(queries_of(5, rank, "ties"), K)
    return out


def clustered(seed: int, n: int, d: int, centers: int = 24):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centers, d, generator=g) * 3
    lab = torch.randint(0, centers, (n,), generator=g)
    return c[lab] + torch.randn(n, d, generator=g)


HIER = dict(branching=(4, 4), nprobe=(1, 2), n=1200, d=16, q=120, k=10)


def hier_checks(rank, world, save_dir):
    """Hierarchical shards: global top-10 for one shared query set, plus a save/load round trip."""
    h = HIER
    keys = clustered(7, h["n"], h["d"])
    queries = clustered(8, h["q"], h["d"])
    bank = ShardedIndex.build(keys, kind="hierarchical", metric="cosine", branching=h["branching"], seed=0)
    out = {"search": bank.search(queries, h["k"], nprobe=h["nprobe"], replicated=True),
           "full": bank.search(queries, h["k"], replicated=True)}
    new = clustered(9, 30, h["d"])
    out["update_ids"] = bank.update(new, replicated=True)
    out["after_update"] = bank.search(new[:6], 1, nprobe=(4, 4), replicated=True)
    bank.save(save_dir)
    back = ShardedIndex.load(save_dir)
    out["loaded"] = back.search(queries, h["k"], nprobe=h["nprobe"], replicated=True)
    out["saved"] = bank.search(queries, h["k"], nprobe=h["nprobe"], replicated=True)
    return out


def raise_on_last(rank, world):
    """The last rank raises before the collective; the others block in search until killed."""
    keys, _ = data(1, 20, "dyadic")
    bank = ShardedIndex.build(keys, kind="exact", metric="ip")
    if rank == world - 1:
        raise ValueError("deliberate failure on the last rank")
    return bank.search(queries_of(1, rank, "dyadic"), 2)


def all_checks(rank, world, n, exact_dir, hier_dir):
    out = exact_checks(rank, world, n, exact_dir)
    if hier_dir:
        out["hier"] = hier_checks(rank, world, hier_dir)
        out["model"] = model_checks(rank, world)
    return out


def memory_module(hierarchical: bool, shard):
    from mvpp.models.memory import TopologyMemoryBank

    torch.manual_seed(0)
    return TopologyMemoryBank(D, 3, 4, traj_dim=0, k=4, hierarchical=hierarchical, shard=shard)


def model_inputs(rank: int):
    keys, _ = data(21, 40, "ties")
    values = torch.randn(40, 3, generator=torch.Generator().manual_seed(22))
    content = queries_of(23, rank, "ties")
    exclude = torch.arange(content.shape[0]) * 3 + rank  # bank ids to skip (self-exclusion)
    return keys, values, content, exclude


def model_checks(rank, world):
    """TopologyMemoryBank under a process group: "auto" shards; flat forward results per rank."""
    keys, values, content, exclude = model_inputs(rank)
    out = {}
    m = memory_module(False, "auto")
    m.build(keys, values)
    out["auto_sharded"] = m.sharded is not None and m.sharded.world == world
    out["n_local"] = m.sharded.n_local
    with torch.no_grad():
        r = m(content, exclude=exclude)
    out["flat"] = {k: v for k, v in r.items()}
    # gradient reaches the query through the sharded bank's gathered keys
    c = content.clone().requires_grad_(True)
    m(c, exclude=exclude)["rep"].sum().backward()
    out["flat_grad"] = c.grad
    # a rank with an empty batch still takes part (the others are not blocked)
    with torch.no_grad():
        out["empty_batch"] = m(content[: 0 if rank == 1 else 2])["ids"].shape
    h = memory_module(True, "auto")
    h.build(keys, values)
    with torch.no_grad():
        out["hier_ids"] = h(content, exclude=exclude)["ids"]
    new_keys, _ = data(24, 5, "ties")
    out["hier_update_ids"] = h.update(new_keys, torch.randn(5, 3, generator=torch.Generator().manual_seed(25)))
    out["hier_size"] = h.size
    return out


def fewer_items_than_ranks(rank, world):
    """Build an empty bank and add fewer items than there are ranks: ranks past the last new id own
    none of them (regression: `owned` raised there, leaving the other ranks in the collective)."""
    keys, values = data(60, 0, "dyadic")
    bank = ShardedIndex.build(keys, values, kind="exact", metric="ip")
    nk, nv = data(61, 1, "dyadic")
    ids = bank.update(nk, nv, replicated=True)
    ids0 = bank.update(nk[:0], nv[:0])  # nobody adds anything
    return ids, ids0, bank.n_local, bank.search(nk, 2)
