"""TopologyMemoryBank (seeds 000 + 001): a hierarchical, updatable memory of past videos.

Keys are the past (training) videos' unit retrieval vectors, indexed by
`mvpp_kernels.HierarchicalIndex` (hierarchical k-means refined by the kNN-graph topology; searched by
the fused `cluster_lookup`). A query retrieves candidates by content through the index, then ranks
them by M3TR's temporal-aware similarity

    s(q, b) = <r_q, r_b> + traj_weight * <P tau_q, P tau_b> / (|P tau_q| |P tau_b|)

where tau is the MHP encoder's trajectory descriptor of the engagement stream (P learned), keeps
the top k, and aggregates the retrieved values with MMRA's eq. 4 softmax weights (via
`mvpp_kernels.retrieval_aggregate`, differentiable to the query). The values are each past video's
label and text feature. New videos (e.g. the validation set once their labels are known) arrive
through `update`, which calls the index's `cluster_update`: they are folded into their cluster's
running statistics and exemplars are bounded, so memory does not grow without bound.

With `hierarchical=False` the same module uses flat `exact_search` (the MMRA memory).

Sharding (`shard`): with `shard="auto"` (default) the bank is a `mvpp_kernels.distributed.ShardedIndex`
when torch.distributed is initialised with world size > 1 (e.g. under torchrun), else the
single-process path above, unchanged. `shard=True` always uses ShardedIndex (one shard without a
process group), `shard=False` never does. Sharded, rank r keeps only the items with id % world == r
(its own HierarchicalIndex, or flat keys for `hierarchical=False`); a search gathers every rank's
queries, searches the local shard and merges the per-rank top-k (and the hits' keys and values) with
all-gathers, ties broken by global id as in one index, so a flat sharded bank retrieves exactly what
the single-process flat bank retrieves.

Collective contract (sharded): `forward` (and `build`/`update`, which expect the SAME items on every
rank: the bank is built and refreshed consistently everywhere) are collectives -- every rank must
call them the same number of times in the same order (a rank with no batch left calls forward with
a 0-row batch, or the evaluation loop pads, as mvpp.train does), with the same k. A rank that stops
calling leaves the others blocked until the process group's timeout.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._ops import op

__all__ = ["TopologyMemoryBank", "default_branching"]


def default_branching(n: int) -> tuple[int, int]:
    """Coarse x fine clusters for a bank of n items: ~sqrt(n) fine clusters in ~n^(1/4) groups."""
    c1 = max(2, int(round(n ** 0.25)))
    c2 = max(2, int(round(math.sqrt(n) / c1)))
    return c1, c2


class TopologyMemoryBank(nn.Module):
    def __init__(self, content_dim: int, value_dim: int, d_out: int, traj_dim: int = 0, k: int = 8,
                 traj_weight: float = 0.5, hierarchical: bool = True, branching: tuple = (), nprobe: tuple = (),
                 backend: str | None = None, shard: str | bool = "auto"):
        super().__init__()
        if shard not in ("auto", True, False):
            raise ValueError(f"shard must be 'auto', True or False, got {shard!r}")
        self.shard = shard
        self.sharded = None  # a ShardedIndex when the bank is sharded
        self.k, self.traj_weight, self.hierarchical = k, float(traj_weight), hierarchical
        self.branching, self.nprobe, self.backend = tuple(branching), tuple(nprobe), backend
        self.traj_proj = nn.Linear(traj_dim, 16) if traj_dim else None
        self.log_inv_temp = nn.Parameter(torch.tensor(math.log(10.0)))
        self.value_proj = nn.Linear(value_dim, d_out)
        self.index = None
        self.register_buffer("bank_keys", torch.zeros(0, content_dim), persistent=False)
        self.register_buffer("bank_values", torch.zeros(0, value_dim), persistent=False)
        self.register_buffer("bank_traj", torch.zeros(0, max(traj_dim, 1)), persistent=False)

    # -- the bank -------------------------------------------------------------------------------
    def _use_shard(self) -> bool:
        if self.shard == "auto":
            import torch.distributed as dist

            return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        return bool(self.shard)

    def _build_sharded(self, keys: torch.Tensor, values: torch.Tensor, seed: int) -> None:
        from mvpp_kernels.distributed import ShardedIndex

        if self.hierarchical:
            import torch.distributed as dist

            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            per_shard = max(1, -(-keys.shape[0] // world))
            branching = self.branching or default_branching(per_shard)
            self.sharded = ShardedIndex.build(keys, self.bank_values, kind="hierarchical", metric="cosine",
                                              branching=branching, seed=seed, backend=self.backend)
        else:
            # keys are unit rows already: "ip" scores them exactly as the flat exact_search(metric="ip")
            self.sharded = ShardedIndex.build(keys, self.bank_values, kind="exact", metric="ip")
        # the whole bank is not kept on every rank: each rank holds its shard only
        self.bank_keys = keys.new_zeros((0, keys.shape[1]))
        self.bank_values = self.bank_values.new_zeros((0, self.bank_values.shape[1]))
        self.index = None

    def build(self, keys: torch.Tensor, values: torch.Tensor, seed: int = 0) -> None:
        """Index past videos: keys (n, d) retrieval vectors, values (n, value_dim). Item i gets id i."""
        keys = F.normalize(keys.float(), dim=1)
        self.bank_keys = keys
        self.bank_values = values.float()
        self.sharded = None
        if self._use_shard():
            self._build_sharded(keys, self.bank_values, seed)
        elif self.hierarchical:
            HierarchicalIndex = op("HierarchicalIndex", "TopologyMemoryBank")
            branching = self.branching or default_branching(keys.shape[0])
            self.index = HierarchicalIndex.build(keys, values=self.bank_values, branching=branching,
                                                 metric="cosine", knn=min(16, keys.shape[0] - 1), seed=seed,
                                                 backend=self.backend)
        else:
            op("exact_search", "the flat memory bank")
            self.index = None

    def set_trajectories(self, traj: torch.Tensor) -> None:
        """Trajectory descriptors of the bank's items, row = item id."""
        self.bank_traj = traj.detach().float()

    def update(self, keys: torch.Tensor, values: torch.Tensor, traj: torch.Tensor | None = None) -> torch.Tensor:
        """New past videos arrive: fold them into the hierarchical index (`cluster_update`: running
        cluster statistics, bounded exemplars). Returns their ids. Sharded: a collective; every rank
        passes the same items, each goes to its owning shard."""
        if self.sharded is not None:
            ids = self.sharded.update(F.normalize(keys.float(), dim=1), values.float(), replicated=True)
        elif self.index is None:
            raise RuntimeError("update needs a hierarchical bank built with build() first")
        else:
            ids = self.index.update(F.normalize(keys.float(), dim=1), values.float(), backend=self.backend)
        if traj is not None and self.traj_proj is not None:
            grown = torch.zeros(int(ids.max()) + 1 if ids.numel() else self.bank_traj.shape[0],
                                self.bank_traj.shape[1], device=self.bank_traj.device)
            grown[: self.bank_traj.shape[0]] = self.bank_traj
            grown[ids] = traj.detach().float().to(grown.device)
            self.bank_traj = grown
        return ids

    @property
    def size(self) -> int:
        if self.sharded is not None:  # items ever added over all shards (the same on every rank)
            return self.sharded.size
        return int(self.index.n_members) if self.index is not None else int(self.bank_keys.shape[0])

    def _nprobe(self, index):
        """Probes for `index` (the bank's tree, or this rank's shard tree): the configured ones clamped to
        the tree, else half the coarse and a quarter of the fine clusters."""
        if self.nprobe:
            return (min(self.nprobe[0], index.n_coarse), min(self.nprobe[1], index.n_fine))
        return (max(1, math.ceil(index.n_coarse / 2)), max(1, math.ceil(index.n_fine / 4)))

    def _search(self, q: torch.Tensor, k: int, exclude):
        """(ids (B, k), keys (B, k, d), values (B, k, dv), found (B, k))."""
        if self.sharded is not None:
            ix = self.sharded.index  # this rank's tree (None: a flat shard); probes are per shard
            nprobe = self._nprobe(ix) if ix is not None else None
            _, ids, keys, values, found = self.sharded.search(q, k, nprobe=nprobe, exclude=exclude,
                                                              return_rows=True)
            return ids, keys.float(), values.float(), found
        if self.index is not None:
            _, ids = self.index.search(q, k, nprobe=self._nprobe(self.index), exclude=exclude, backend=self.backend,
                                      check_inputs=False)
            keys, values, found = self.index.lookup(ids)
            return ids, keys.float(), values.float(), found
        exact_search = op("exact_search", "the flat memory bank")
        _, ids = exact_search(self.bank_keys, q, k, metric="ip", exclude=exclude, backend=self.backend,
                             check_inputs=False)
        found = ids >= 0
        c = ids.clamp(min=0)
        return ids, self.bank_keys[c], self.bank_values[c], found

    # -- a query --------------------------------------------------------------------------------
    def forward(self, content: torch.Tensor, traj: torch.Tensor | None = None, exclude: torch.Tensor | None = None):
        """content (batch, d) retrieval vectors, traj (batch, traj_dim) or None, exclude (batch,) bank
        ids to skip (-1: none). Returns rep (batch, d_out), agg (batch, value_dim), ids (batch, k)."""
        if self.size < 2:
            raise RuntimeError("the memory bank is empty: call build() with past videos first")
        retrieval_aggregate = op("retrieval_aggregate", "TopologyMemoryBank")
        q = F.normalize(content.float(), dim=1)
        use_traj = self.traj_proj is not None and traj is not None and self.bank_traj.shape[0] > 1
        k = min(self.k, self.size - 1)
        n_cand = min(self.size - 1, 3 * k if use_traj else k)
        with torch.no_grad():
            ids, keys, values, found = self._search(q.detach(), n_cand, exclude)
        # similarity recomputed with autograd so the query (and the trajectory projection) learn
        s = (q.unsqueeze(1) * keys).sum(-1)
        if use_traj:
            tq = F.normalize(self.traj_proj(traj.float()), dim=1)
            tid = ids.clamp(min=0, max=self.bank_traj.shape[0] - 1)
            tb = F.normalize(self.traj_proj(self.bank_traj[tid]), dim=-1)
            s = s + self.traj_weight * (tq.unsqueeze(1) * tb).sum(-1)
        s = s.masked_fill(~found, float("-inf"))
        if n_cand > k:
            s, pos = s.topk(k, dim=1)
            ids, values, found = ids.gather(1, pos), values.gather(1, pos[..., None].expand(-1, -1, values.shape[-1])), \
                found.gather(1, pos)
        scores = torch.where(found, s, torch.zeros_like(s)) * self.log_inv_temp.exp()
        agg = retrieval_aggregate(q, scores, values, valid=found)
        return {"rep": F.relu(self.value_proj(agg)), "agg": agg, "ids": ids}
