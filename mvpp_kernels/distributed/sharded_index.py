"""`ShardedIndex`: a memory bank split across the ranks of a torch.distributed process group.

Ownership: global id g lives on rank g % N (N = world size). Ids are dense and consecutive like one
`HierarchicalIndex` ("item i gets id i"; `update` continues from `next_id`), so shard r holds the
items r, r + N, r + 2N, ... in increasing order and its local id l is the global id l * N + r -- no
id table is stored.

Each shard is either
    kind="exact":        flat keys (+ values), searched with `exact_search`, or
    kind="hierarchical": its own `HierarchicalIndex` (built on its items), searched with
                         `cluster_lookup` at the given probes per shard. A shard that is empty at
                         build time stays flat (exact) -- a tree needs at least one key.

search (collective): every rank scores the queries of every rank against its shard (the queries are
all-gathered, padded to the largest rank's count), converts local ids to global ids, and the per-rank
top-k lists (scores + int64 ids) are all-gathered and merged with the same total order as one index
(score descending, then global id ascending; `topk_score_then_id`). A shard with fewer than k items
(or none) pads with (-inf, -1). With `replicated=True` all ranks pass the same queries and the query
all-gather is skipped. `search(..., return_rows=True)` also returns the keys and values of the hits
(gathered from their owning shards), so no rank needs the whole bank.

Collective contract: search, update, save and build-with-`replicated` data are collectives; every rank
of the group must call them the same number of times, in the same order, with the same k / nprobe.
A rank that stops calling leaves the others blocked until the process group's timeout.

Without an initialised process group (or group size 1) the class is one shard (no communication).

save/load: one file per shard, written by its rank through mvpp_kernels._io (atomic, checksummed),
then, after a barrier, a JSON manifest written atomically by rank 0. `load` refuses a manifest whose
world size differs from the group's, naming both (no re-sharding).
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.distributed as dist

from .. import _io
from .._checks import FLOAT_DTYPES, check_finite, check_tensor
from ..memory_bank import HierarchicalIndex, checked_values
from ..ops.exact_search import check_exclude, check_metric, exact_search, normalize_rows
from ..ops.exact_search.reference import compute_dtype

__all__ = ["ShardedIndex", "MANIFEST_NAME", "merge_topk"]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "mvpp.sharded_memory_bank"
MANIFEST_VERSION = 1
_EXACT_FMT = "mvpp.sharded_exact_shard"
_EXACT_KEY = "mvpp_exact_shard"
KINDS = ("exact", "hierarchical")


def _group_info(group) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group), dist.get_rank(group)
    return 1, 0


def _shard_file(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.safetensors"


def merge_topk(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise top-k of (q, m) candidates under (score desc, id asc), the order of one index
    (`topk_score_then_id`); also returns each winner's column in the input (for gathering rows).
    Entries with score -inf are invalid and come out as (-inf, -1)."""
    big = torch.iinfo(torch.int64).max
    key_ids = torch.where(torch.isneginf(scores), torch.full_like(ids, big), ids)
    o1 = torch.argsort(key_ids, dim=1, stable=True)
    s1 = scores.gather(1, o1)
    o2 = torch.argsort(s1, dim=1, descending=True, stable=True)[:, :k]
    pos = o1.gather(1, o2)
    s = scores.gather(1, pos)
    i = torch.where(torch.isneginf(s), torch.full_like(pos, -1), ids.gather(1, pos))
    return s, i, pos


class ShardedIndex:
    """A memory bank sharded over `group` (default: the world; see the module docstring)."""

    def __init__(self, kind: str, metric: str, d: int, dv: int, next_id: int, *, group=None,
                 dtype=torch.float32, device="cpu"):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind, self.metric, self.d, self.dv = kind, check_metric(metric), int(d), int(dv)
        self.next_id = int(next_id)
        self.group = group
        self.world, self.rank = _group_info(group)
        self.dtype, self.device = dtype, torch.device(device)
        self.keys = torch.zeros((0, self.d), dtype=dtype, device=self.device)
        self.values = torch.zeros((0, self.dv), dtype=torch.float32, device=self.device)
        self.index: Optional[HierarchicalIndex] = None
        self._branching, self._build_kwargs = (8, 8), {}

    # ------------------------------------------------------------------------------ helpers
    @property
    def n_local(self) -> int:
        """Rows held by this rank's shard (hierarchical: exemplars currently kept)."""
        if self.index is not None:
            return self.index.n_members
        return int(self.keys.shape[0])

    @property
    def size(self) -> int:
        """Items ever added over all shards (= the next global id)."""
        return self.next_id

    def owned(self, n_from: int, n_to: int) -> torch.Tensor:
        """Global ids in [n_from, n_to) owned by this rank."""
        first = n_from + (self.rank - n_from) % self.world
        return torch.arange(first, max(first, n_to), self.world, dtype=torch.int64)  # empty when first >= n_to

    def _to_global(self, local: torch.Tensor) -> torch.Tensor:
        return torch.where(local >= 0, local * self.world + self.rank, local)

    def _all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        if self.world == 1:
            return [t]
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t, group=self.group)
        return out

    def _all_gather_rows(self, t: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
        """All-gather tensors whose first dimension differs per rank (padded to the largest)."""
        if self.world == 1:
            return [t], [int(t.shape[0])]
        n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
        sizes = [int(s) for s in self._all_gather(n)]
        m = max(sizes)
        pad = t.new_zeros((m - t.shape[0], *t.shape[1:]))
        parts = self._all_gather(torch.cat([t, pad]))
        return [p[:s] for p, s in zip(parts, sizes)], sizes

    # ------------------------------------------------------------------------------ build
    @classmethod
    def build(cls, keys: torch.Tensor, values: Optional[torch.Tensor] = None, *, kind: str = "exact",
              metric: str = "cosine", group=None, branching: tuple[int, int] = (8, 8), **build_kwargs) -> "ShardedIndex":
        """Build from the global bank `keys` (n, d), identical on every rank (no communication);
        rank r keeps the items r, r + N, ... Item i gets global id i. kind="hierarchical" builds a
        `HierarchicalIndex` per shard with `branching` (c1 clamped to the shard size) and
        `build_kwargs` (knn defaults to min(16, shard size - 1))."""
        check_metric(metric)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        check_tensor("keys", keys, ndim=2, dims="(n, d)", dtypes=FLOAT_DTYPES)
        n, d = keys.shape
        if d == 0:
            raise ValueError("keys must have a feature dimension d >= 1, got shape (n, 0)")
        check_finite("keys", keys)
        values = checked_values(values, keys)
        self = cls(kind, metric, d, values.shape[1], n, group=group, dtype=keys.dtype, device=keys.device)
        self._branching, self._build_kwargs = tuple(int(b) for b in branching), dict(build_kwargs)
        mine = self.owned(0, n).to(keys.device)
        self._set_local(keys[mine], values[mine].to(torch.float32))
        return self

    def _set_local(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.kind == "exact" or k.shape[0] == 0:
            if self.metric == "cosine":
                k = normalize_rows(k)
            self.keys, self.values, self.index = k.contiguous(), v.contiguous(), None
            return
        kw = dict(self._build_kwargs)
        knn = min(int(kw.pop("knn", 16)), k.shape[0] - 1)
        c1 = max(1, min(self._branching[0], k.shape[0]))
        self.index = HierarchicalIndex.build(k, values=v, branching=(c1, self._branching[1]), metric=self.metric,
                                             knn=knn, **kw)
        self.keys = self.values = None

    # ------------------------------------------------------------------------------ search
    def search(self, queries: torch.Tensor, k: int, nprobe: Optional[tuple[int, int]] = None,
               exclude: Optional[torch.Tensor] = None, *, replicated: bool = False, return_rows: bool = False):
        """Global top-k of this rank's `queries` (q, d) over every shard (collective: every rank must
        call it, with the same k and nprobe). nprobe: probes per shard (hierarchical; clamped to each
        shard's tree; default every cluster). exclude: optional (q,) global ids to skip (negative:
        none). Returns scores (q, k) (float32; float64 for float64 keys) and global ids (q, k) int64,
        best first, (-inf, -1) in empty slots; ties broken by the lower global id, as in one index.
        With return_rows=True also the hits' keys (q, k, d) and values (q, k, dv) (zeros in empty
        slots; cosine keys are unit-norm) and found (q, k) bool."""
        check_tensor("queries", queries, ndim=2, dims="(q, d)", dtypes=FLOAT_DTYPES)
        if queries.shape[1] != self.d:
            raise ValueError(f"queries must have d = {self.d} columns like the bank's keys, got shape "
                             f"{tuple(queries.shape)}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if nprobe is not None:
            try:
                nprobe = tuple(int(p) for p in nprobe)
                assert len(nprobe) == 2
            except (TypeError, ValueError, AssertionError):
                raise TypeError(f"nprobe must be a pair (p1, p2) of ints, got {nprobe!r}") from None
            if min(nprobe) < 1:
                raise ValueError(f"nprobe = {nprobe}: both must be >= 1")
        check_finite("queries", queries)
        q_own = queries.shape[0]
        ex = check_exclude(exclude, q_own, queries.device)
        if ex is None:
            ex = torch.full((q_own,), -1, dtype=torch.int64, device=queries.device)
        # the same casts as exact_search over the union: to the keys' dtype, then normalise (cosine)
        qf = queries.to(self.dtype)
        if self.metric == "cosine":
            qf = normalize_rows(qf)
        if replicated or self.world == 1:
            allq, allx, sizes = qf, ex, [q_own] * self.world
        else:
            parts, sizes = self._all_gather_rows(qf)
            allq = torch.cat(parts)
            allx = torch.cat(self._all_gather_rows(ex)[0])
        s, i, rk, rv = self._local_search(allq, allx, k, nprobe, return_rows)
        gs, gi = self._all_gather(s), self._all_gather(i)
        s, i, pos = merge_topk(torch.cat(gs, 1), torch.cat(gi, 1), k)
        if return_rows:
            rk = torch.cat(self._all_gather(rk), 1).gather(1, pos[..., None].expand(-1, -1, self.d))
            rv = torch.cat(self._all_gather(rv), 1).gather(1, pos[..., None].expand(-1, -1, self.dv))
        if not (replicated or self.world == 1):
            start = sum(sizes[: self.rank])
            sl = slice(start, start + q_own)
            s, i = s[sl], i[sl]
            if return_rows:
                rk, rv = rk[sl], rv[sl]
        if not return_rows:
            return s, i
        found = i >= 0
        return s, i, rk * found[..., None], rv * found[..., None], found

    def _local_search(self, q: torch.Tensor, exclude_global: torch.Tensor, k: int, nprobe, rows: bool):
        Q, dev = q.shape[0], q.device
        cd = compute_dtype(self.dtype)
        out_s = torch.full((Q, k), float("-inf"), dtype=cd, device=dev)
        out_i = torch.full((Q, k), -1, dtype=torch.int64, device=dev)
        out_k = torch.zeros((Q, k, self.d) if rows else (0,), dtype=self.dtype, device=dev)
        out_v = torch.zeros((Q, k, self.dv) if rows else (0,), dtype=torch.float32, device=dev)
        n = self.n_local
        if n == 0 or Q == 0:
            return out_s, out_i, out_k, out_v
        mine = (exclude_global >= 0) & (exclude_global % self.world == self.rank)
        ex_local = torch.where(mine, exclude_global // self.world, torch.full_like(exclude_global, -1))
        kk = min(k, n)
        if self.index is not None:
            ix = self.index
            p = nprobe if nprobe is not None else (ix.n_coarse, ix.n_fine)
            p = (min(p[0], ix.n_coarse), min(p[1], ix.n_fine))
            s, i = ix.search(q, kk, nprobe=p, exclude=ex_local, check_inputs=False)
            if rows:
                lk, lv, _ = ix.lookup(i)
        else:
            s, i = exact_search(self.keys, q, kk, metric="ip", exclude=ex_local, check_inputs=False)
            if rows:
                c = i.clamp(min=0)
                lk, lv = self.keys[c], self.values[c]
        out_s[:, :kk] = s.to(cd)
        out_i[:, :kk] = self._to_global(i)
        if rows:
            out_k[:, :kk] = lk.to(self.dtype)
            out_v[:, :kk] = lv.to(torch.float32)
        return out_s, out_i, out_k, out_v

    # ------------------------------------------------------------------------------ update
    def update(self, new_keys: torch.Tensor, new_values: Optional[torch.Tensor] = None, *,
               replicated: bool = False) -> torch.Tensor:
        """Add items (collective). Each rank passes its own new items (or, with replicated=True,
        every rank the same ones); they get consecutive global ids from `next_id` in rank order and
        each goes to its owning shard (id % N). Returns the global ids of this rank's items."""
        check_tensor("new_keys", new_keys, ndim=2, dims="(m, d)", dtypes=FLOAT_DTYPES)
        if new_keys.shape[1] != self.d:
            raise ValueError(f"new_keys must have d = {self.d} columns like the bank's keys, got shape "
                             f"{tuple(new_keys.shape)}")
        m = new_keys.shape[0]
        if new_values is None:
            if self.dv:
                raise ValueError(f"this bank stores values of width {self.dv}: pass new_values (m, {self.dv})")
            new_values = new_keys.new_zeros((m, 0), dtype=torch.float32)
        if new_values.dim() == 1:
            new_values = new_values[:, None]
        check_tensor("new_values", new_values, shape=(m, self.dv), dims=f"(m, dv={self.dv})", dtypes=FLOAT_DTYPES)
        check_finite("new_keys", new_keys)
        check_finite("new_values", new_values)
        nk, nv = new_keys.to(self.dtype), new_values.to(torch.float32)
        if replicated or self.world == 1:
            allk, allv, my_start = nk, nv, 0
        else:
            kp, sizes = self._all_gather_rows(nk)
            allk, allv = torch.cat(kp), torch.cat(self._all_gather_rows(nv)[0])
            my_start = sum(sizes[: self.rank])
        total = allk.shape[0]
        base = self.next_id
        sel = (self.owned(base, base + total) - base).to(allk.device)
        k_add, v_add = allk[sel], allv[sel]
        if k_add.shape[0]:
            if self.index is not None:
                self.index.update(k_add, v_add)
            else:
                if self.metric == "cosine":
                    k_add = normalize_rows(k_add)
                self.keys = torch.cat([self.keys, k_add])
                self.values = torch.cat([self.values, v_add])
        self.next_id = base + total
        return torch.arange(base + my_start, base + my_start + m, dtype=torch.int64)

    # ------------------------------------------------------------------------------ save / load
    def save(self, directory: str | os.PathLike) -> None:
        """Collective: rank r writes `shard-r-of-N.safetensors` (atomically, checksummed), then, after
        a barrier, rank 0 writes the manifest atomically; a final barrier means that when save returns
        on any rank the whole bank is on disk. A reader trusts only a directory with a manifest."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, _shard_file(self.rank, self.world))
        if self.index is not None:
            self.index.save(path)
        else:
            _io.write_checked(path, {"keys": self.keys, "values": self.values},
                              {"metric": self.metric, "d": self.d, "dv": self.dv, "rank": self.rank,
                               "world_size": self.world},
                              key=_EXACT_KEY, fmt=_EXACT_FMT, version=1)
        info = torch.tensor([1 if self.index is not None else 0, self.n_local], dtype=torch.int64)
        infos = [t.tolist() for t in self._all_gather(info.to(self.device))]
        if self.rank == 0:
            manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "world_size": self.world,
                        "kind": self.kind, "metric": self.metric, "d": self.d, "dv": self.dv,
                        "dtype": str(self.dtype).replace("torch.", ""), "next_id": self.next_id,
                        "ownership": "global id g on rank g % world_size",
                        "branching": list(self._branching),
                        "shards": [{"file": _shard_file(r, self.world), "tree": bool(t), "rows": int(nr)}
                                   for r, (t, nr) in enumerate(infos)]}
            _io.atomic_write_bytes(os.path.join(directory, MANIFEST_NAME),
                                   json.dumps(manifest, sort_keys=True, indent=1).encode())
        if self.world > 1:
            dist.barrier(group=self.group)

    @classmethod
    def load(cls, directory: str | os.PathLike, group=None, device="cpu") -> "ShardedIndex":
        """Each rank reads the manifest and its own shard (no communication). Raises ValueError when
        the saved world size differs from the group's (re-sharding is not supported: load with the
        same number of ranks, or rebuild)."""
        directory = os.fspath(directory)
        mpath = os.path.join(directory, MANIFEST_NAME)
        if not os.path.exists(mpath):
            raise FileNotFoundError(f"no sharded memory bank at {directory!r} (missing {MANIFEST_NAME})")
        bad = f"{mpath!r} is not a valid sharded memory bank manifest"
        try:
            with open(mpath, "rb") as f:
                man = json.loads(f.read().decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{bad}: {e}") from None
        if not isinstance(man, dict) or man.get("format") != MANIFEST_FORMAT or man.get("version") != MANIFEST_VERSION:
            raise ValueError(f"{bad} (format/version "
                             f"{(man.get('format'), man.get('version')) if isinstance(man, dict) else None!r})")
        world, rank = _group_info(group)
        try:
            saved = int(man["world_size"])
            if saved != world:
                raise ValueError(f"the sharded memory bank at {directory!r} was saved with world size {saved} "
                                 f"but this process group has world size {world}: load it with {saved} ranks "
                                 f"(re-sharding on load is not supported)")
            if len(man["shards"]) != saved:
                raise ValueError(f"{bad}: {len(man['shards'])} shards listed for world size {saved}")
            self = cls(man["kind"], man["metric"], man["d"], man["dv"], man["next_id"], group=group,
                       dtype=getattr(torch, man["dtype"]), device=device)
            self._branching = tuple(man["branching"])
            entry = man["shards"][rank]
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{bad}: missing or malformed field {e}") from None
        path = os.path.join(directory, entry["file"])
        if entry["tree"]:
            self.index = HierarchicalIndex.load(path, device=device)
            self.keys = self.values = None
        else:
            t, h = _io.read_checked(path, key=_EXACT_KEY, fmt=_EXACT_FMT, version=1,
                                    what="sharded memory bank shard", required=("keys", "values"))
            if h.get("rank") != rank or h.get("world_size") != saved:
                raise ValueError(f"{path!r} is shard {h.get('rank')} of {h.get('world_size')}, "
                                 f"expected shard {rank} of {saved}")
            self.keys, self.values = t["keys"].to(device), t["values"].to(device)
        if self.n_local != entry["rows"]:
            raise ValueError(f"{path!r} holds {self.n_local} rows but the manifest says {entry['rows']}")
        return self
