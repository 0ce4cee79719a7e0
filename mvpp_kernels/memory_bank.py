"""The topology-aware memory bank: a two-level cluster tree over a bank of keys (and values), searched
with `cluster_lookup`, grown with `cluster_update` under a fixed memory bound, saved atomically.

Build (`HierarchicalIndex.build`)
    1. Hierarchical k-means in torch (k-means++ init from a seeded generator, Lloyd iterations on at
       most `max_train_per_centroid` sampled points per centroid, runs on the keys' device): c1 coarse
       clusters, then up to c2 fine clusters inside each coarse cluster. metric="cosine" normalises
       keys and uses spherical k-means (unit centroids); metric="ip" uses Euclidean k-means.
    2. Topology refinement with the k-nearest-neighbour graph of the keys (approximate: found once with
       the freshly built tree itself, `knn_nprobe`, default (2, 8), excluding each key's own id). Rule,
       applied for `refine_rounds` rounds (default 3): an item's candidate fine clusters are its own and
       those holding its kNN-graph neighbours, under any coarse parent; it moves to the candidate whose
       centroid is nearest, if strictly nearer than its own centroid. Centroids are then re-centred on
       their (new) members. Every move lowers the k-means objective, so it costs nothing in
       distance, and an item only goes where part of its neighbourhood already lives. Why it helps:
       hierarchical k-means confines an item to the fine clusters of its coarse cell, but queries rank
       fine clusters by their centroids (among the top coarse cells); near a coarse border an item's
       nearest fine centroid is often across the border, where the queries that need it probe first.
       Measured (docs/memory_bank.md): +1 to +1.5 recall@10 points at fixed nprobe on the hard
       manifold data with ~2% fewer members scanned; no change on the clustered data. Rules that vote
       with the neighbours' clusters or with their query routing (majority, similarity-weighted,
       coverage of the neighbours' probes) were tried and gained nothing or lost recall on the hard
       data: nearest-centroid assignment is already nearly optimal inside a cell, and the votes add
       noise and unbalance the clusters.
    3. CSR storage: coarse centroids + child offsets; fine centroids + member offsets; member keys,
       ids, values and insertion sequence numbers contiguous per fine cluster.

Update (`index.update`)
    New items are routed greedily (top-1 coarse, top-1 fine) and folded into their fine cluster's
    float64 running mean (keys and values) and per-dimension second moment by `cluster_update`
    (deterministic: same bytes on every backend for the same input order). Each fine cluster keeps at
    most `max_members` exemplars: the most recent ones (FIFO). Why recency: popularity depends on
    current trends, so recent neighbours are the most informative for a new video; a FIFO is
    deterministic, O(1) per item, and never freezes the exemplar set the way "closest to the centroid"
    would (a drifting cluster would keep its old, stale exemplars). The cluster's *feature* (its
    running mean) still reflects every item ever added. A fine cluster whose spread (mean squared
    distance to its mean, from the running moments) exceeds `split_factor` times the median spread at
    build time, and that has at least 4 exemplars, is split in two by 2-means over its exemplars, as
    long as there are fewer than `max_fine_clusters` fine clusters. Memory is therefore bounded by
    max_fine_clusters * (max_members * (d + dv + 2) + 3 d + dv + small) elements whatever the number
    of items added (`index.nbytes()`, `index.memory_bound_bytes()`).

Save/load: one safetensors file whose metadata holds a JSON header (format name, version, metric,
branching, d, dtype, configuration and a SHA-256 over the header's fields and every tensor's bytes),
through mvpp_kernels._io: written to a temporary file in the same directory, fsynced, then
os.replace'd; a truncated, altered (header or tensors) or foreign file is refused.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import _io
from ._checks import FLOAT_DTYPES, check_finite, check_tensor
from .ops.cluster_lookup import cluster_lookup
from .ops.cluster_update import cluster_update
from .ops.exact_search import check_metric, normalize_rows
from .ops.exact_search.reference import compute_dtype

__all__ = ["HierarchicalIndex", "kmeans", "retrieval_aggregate", "FORMAT_NAME", "FORMAT_VERSION"]

FORMAT_NAME = "mvpp.memory_bank"
FORMAT_VERSION = 2  # 2: the checksum covers the header too (issue 16); 1 hashed the tensors only
_HEADER_KEY = "mvpp_header"
_OLD_FORMATS = {(FORMAT_NAME, 1): "it is a version-1 mvpp memory bank, whose checksum does not cover its header "
                                  "(an edited next_id/metric/max_members/split_factor would load silently); "
                                  "this mvpp only loads version 2: rebuild it (e.g. `mvpp bank build`)"}


# ---------------------------------------------------------------------------------------------
# k-means (torch only; runs wherever x lives)
# ---------------------------------------------------------------------------------------------
def _assign(x: torch.Tensor, c: torch.Tensor, spherical: bool, chunk: int = 1 << 14) -> tuple[torch.Tensor, torch.Tensor]:
    """(best centroid, its distance^2 or 2 - 2 cos) per row of x, ties to the lower index."""
    out_a = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    out_d = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    cn = (c * c).sum(1)
    for a in range(0, x.shape[0], chunk):
        xb = x[a:a + chunk]
        s = xb @ c.T
        if spherical:
            score = s
        else:
            score = s - 0.5 * cn[None, :]
        best, idx = score.max(1)
        out_a[a:a + chunk] = idx
        xn = (xb * xb).sum(1)
        out_d[a:a + chunk] = (xn - 2 * best).clamp_min(0) if not spherical else (xn + 1 - 2 * best).clamp_min(0)
    return out_a, out_d


def kmeans(
    x: torch.Tensor,
    n_clusters: int,
    *,
    iters: int = 20,
    seed: int = 0,
    spherical: bool = False,
    max_train_per_centroid: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means++ seeded Lloyd's k-means on the rows of x (float32/float64, any device).

    Returns (centroids (c, d) in x's dtype, assignment (n,) int64 of every row of x). `spherical`
    keeps unit-norm centroids and assigns by inner product (for normalised data). Deterministic for a
    given seed and device. Empty clusters are re-seeded with the point farthest from its centroid.
    """
    n, d = x.shape
    c = min(int(n_clusters), n)
    if c < 1:
        raise ValueError(f"kmeans needs at least one point and one cluster, got n = {n}, n_clusters = {n_clusters}")
    g = torch.Generator(device=x.device)
    g.manual_seed(int(seed))
    if n > max_train_per_centroid * c:
        train = x[torch.randperm(n, generator=g, device=x.device)[: max_train_per_centroid * c]]
    else:
        train = x
    nt = train.shape[0]
    # k-means++ initialisation
    first = int(torch.randint(nt, (1,), generator=g, device=x.device))
    cent = [train[first]]
    # squared distances as |t|^2 + |c|^2 - 2 t.c: one matrix-vector product per new centre instead of
    # an (nt, d) difference
    tn = (train * train).sum(1)
    d2 = (tn + tn[first] - 2 * (train @ train[first])).clamp_min(0)
    for _ in range(1, c):
        tot = d2.sum()
        if float(tot) <= 0:
            idx = int(torch.randint(nt, (1,), generator=g, device=x.device))
        else:
            idx = int(torch.multinomial(d2 / tot, 1, generator=g))
        cent.append(train[idx])
        d2 = torch.minimum(d2, (tn + tn[idx] - 2 * (train @ train[idx])).clamp_min(0))
    C = torch.stack(cent)
    if spherical:
        C = normalize_rows(C)
    for _ in range(iters):
        a, dist = _assign(train, C, spherical)
        # per-cluster sums as a one-hot GEMM: index_add_ into few rows is several times slower on CPU
        sums = torch.nn.functional.one_hot(a, c).to(train.dtype).T @ train
        cnt = torch.bincount(a, minlength=c).to(train.dtype)
        newC = sums / cnt.clamp_min(1)[:, None]
        empty = (cnt == 0).nonzero().squeeze(1)
        if empty.numel():
            far = torch.argsort(dist, descending=True, stable=True)[: empty.numel()]
            newC[empty] = train[far]
        if spherical:
            newC = normalize_rows(newC)
        shift = (newC - C).abs().max()
        C = newC
        if float(shift) < 1e-7:
            break
    a, _ = _assign(x, C, spherical)
    return C, a


# ---------------------------------------------------------------------------------------------
# Differentiable retrieval aggregation (MMRA eq. 4)
# ---------------------------------------------------------------------------------------------
def retrieval_aggregate(
    query: torch.Tensor,
    keys_or_scores: torch.Tensor,
    values: torch.Tensor,
    *,
    temperature: float = 1.0,
    valid: Optional[torch.Tensor] = None,
    metric: str = "ip",
) -> torch.Tensor:
    """Softmax-weighted sum of retrieved values (MMRA eq. 4), differentiable to the query:

        s_j = <query, key_j>   (cosine: of the normalised vectors), or the given scores
        alpha_j = exp(s_j / T) / sum_l exp(s_l / T)   over the valid slots
        out = sum_j alpha_j * values_j

    Args:
        query: (B, d).
        keys_or_scores: retrieved keys (B, k, d) -- the scores are recomputed from them so the gradient
            reaches the query (and the keys) -- or precomputed scores (B, k) (differentiable if they are).
        values: (B, k, dv) retrieved values.
        temperature: T > 0.
        valid: optional (B, k) bool; invalid slots (e.g. ids == -1 from a search) get weight 0. A row
            with no valid slot gives zeros.
        metric: "ip" or "cosine" (only used with keys).

    Returns:
        (B, dv) in the promoted dtype of the inputs.
    """
    check_metric(metric)
    check_tensor("query", query, ndim=2, dims="(B, d)", dtypes=FLOAT_DTYPES)
    B, d = query.shape
    check_tensor("values", values, ndim=3, dims="(B, k, dv)", dtypes=FLOAT_DTYPES)
    if values.shape[0] != B:
        raise ValueError(f"values must have B = {B} rows like query, got shape {tuple(values.shape)}")
    k = values.shape[1]
    if not (temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if keys_or_scores.dim() == 3:
        check_tensor("keys", keys_or_scores, shape=(B, k, d), dims="(B, k, d) retrieved keys", dtypes=FLOAT_DTYPES)
        qv, kv = query, keys_or_scores
        if metric == "cosine":
            qv = qv / qv.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            kv = kv / kv.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        scores = torch.einsum("bd,bkd->bk", qv, kv)
    else:
        check_tensor("scores", keys_or_scores, shape=(B, k), dims="(B, k) retrieval scores", dtypes=FLOAT_DTYPES)
        scores = keys_or_scores
    logits = scores / temperature
    if valid is not None:
        check_tensor("valid", valid, shape=(B, k), dims="(B, k)")
        logits = logits.masked_fill(~valid.bool(), float("-inf"))
    else:
        valid = torch.isfinite(logits)
        logits = logits.masked_fill(~valid, float("-inf"))
    # A row with no valid slot would be 0/0: give it a dummy finite logit, then zero weights.
    any_valid = valid.any(dim=1, keepdim=True)
    logits = torch.where(any_valid, logits, torch.zeros_like(logits))
    alpha = torch.softmax(logits, dim=1) * any_valid
    vals = torch.where(valid[..., None], values, torch.zeros_like(values))
    return torch.einsum("bk,bkv->bv", alpha.to(vals.dtype), vals)


# ---------------------------------------------------------------------------------------------
# The index
# ---------------------------------------------------------------------------------------------
_TENSOR_FIELDS = (
    "coarse_centroids", "coarse_offsets", "fine_centroids", "fine_offsets", "member_keys", "member_ids",
    "member_values", "member_seq", "fine_mean", "fine_sq", "fine_value_mean", "fine_counts",
)


def checked_values(values: Optional[torch.Tensor], keys: torch.Tensor) -> torch.Tensor:
    """The per-item values of a bank built over `keys` (n, d), validated and as (n, dv): None gives
    (n, 0) float32, a 1-D (n,) tensor becomes (n, 1); finite, one row per key."""
    n = keys.shape[0]
    if values is None:
        return keys.new_zeros((n, 0), dtype=torch.float32)
    check_tensor("values", values, ndim=(1, 2), dims="(n,) or (n, dv)", dtypes=FLOAT_DTYPES)
    if values.dim() == 1:
        values = values[:, None]
    if values.shape[0] != n:
        raise ValueError(f"values must have one row per key (n = {n}), got shape {tuple(values.shape)}")
    check_finite("values", values)
    return values


@dataclass
class HierarchicalIndex:
    """A two-level cluster tree over a memory bank, stored as CSR (see the module docstring).

    Tensors: coarse_centroids (c1, d) and coarse_offsets (c1 + 1,) into the fine clusters;
    fine_centroids (cf, d) (routing centroids, keys' dtype) and fine_offsets (cf + 1,) into the
    members; member_keys (m, d), member_ids (m,) int64, member_values (m, dv), member_seq (m,) int64
    (insertion order), contiguous per fine cluster; float64 running statistics fine_mean (cf, d),
    fine_sq (cf, d), fine_value_mean (cf, dv), fine_counts (cf,) int64.
    """

    coarse_centroids: torch.Tensor
    coarse_offsets: torch.Tensor
    fine_centroids: torch.Tensor
    fine_offsets: torch.Tensor
    member_keys: torch.Tensor
    member_ids: torch.Tensor
    member_values: torch.Tensor
    member_seq: torch.Tensor
    fine_mean: torch.Tensor
    fine_sq: torch.Tensor
    fine_value_mean: torch.Tensor
    fine_counts: torch.Tensor
    metric: str = "cosine"
    branching: tuple = (1, 1)
    max_members: int = 0
    max_fine_clusters: int = 0
    split_factor: float = 2.0
    base_spread: float = 0.0
    next_id: int = 0
    next_seq: int = 0
    n_splits: int = 0
    build_info: dict = field(default_factory=dict)

    # ----------------------------------------------------------------------------- properties
    @property
    def d(self) -> int:
        return int(self.member_keys.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.member_keys.dtype

    @property
    def device(self) -> torch.device:
        return self.member_keys.device

    @property
    def n_coarse(self) -> int:
        return int(self.coarse_centroids.shape[0])

    @property
    def n_fine(self) -> int:
        return int(self.fine_centroids.shape[0])

    @property
    def n_members(self) -> int:
        return int(self.member_keys.shape[0])

    @property
    def n_items(self) -> int:
        """Every item ever added (built or updated), including those no longer kept as exemplars."""
        return int(self.fine_counts.sum())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in _TENSOR_FIELDS}

    def nbytes(self) -> int:
        """Bytes held by the index's tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def memory_bound_bytes(self) -> int:
        """An upper bound on nbytes() that no number of updates can exceed."""
        cf, d, dv = self.max_fine_clusters, self.d, int(self.member_values.shape[1])
        es, vs = self.member_keys.element_size(), self.member_values.element_size()
        per_member = d * es + dv * vs + 16
        per_fine = d * es + 8 * (2 * d + dv) + 8 + 8
        per_coarse = self.d * self.coarse_centroids.element_size() + 8
        return cf * (self.max_members * per_member + per_fine) + 8 + self.n_coarse * per_coarse + 8

    # ----------------------------------------------------------------------------- build
    @classmethod
    def build(
        cls,
        keys: torch.Tensor,
        values: Optional[torch.Tensor] = None,
        branching: tuple[int, int] = (32, 32),
        metric: str = "cosine",
        knn: int = 16,
        seed: int = 0,
        *,
        refine: bool = True,
        refine_rounds: int = 3,
        knn_nprobe: Optional[tuple[int, int]] = None,
        kmeans_iters: int = 20,
        max_train_per_centroid: int = 256,
        max_members: Optional[int] = None,
        max_fine_clusters: Optional[int] = None,
        split_factor: float = 2.0,
        backend: Optional[str] = None,
    ) -> "HierarchicalIndex":
        """Cluster `keys` (n, d) (float32/bf16/fp16, float64 on CPU) with optional `values` (n, dv)
        into c1 coarse x up to c2 fine clusters per coarse one, then refine with the kNN graph
        (module docstring). Item i gets id i.

        max_members: exemplars kept per fine cluster by updates (default: the largest fine cluster
        after build, so the build keeps every key and nprobe=all equals exact search).
        max_fine_clusters: the cap on splits (default 2 x the built fine clusters).
        """
        check_metric(metric)
        check_tensor("keys", keys, ndim=2, dims="(n, d)", dtypes=FLOAT_DTYPES)
        n, d = keys.shape
        if n == 0:
            raise ValueError("keys is empty (n = 0): cannot build an index over an empty bank")
        try:
            c1, c2 = (int(b) for b in branching)
        except (TypeError, ValueError):
            raise TypeError(f"branching must be a pair (c1, c2) of ints, got {branching!r}") from None
        if c1 < 1 or c2 < 1:
            raise ValueError(f"branching = {(c1, c2)}: both must be >= 1")
        if c1 > n:
            raise ValueError(f"branching c1 = {c1} coarse clusters needs at least that many keys, got n = {n}")
        check_finite("keys", keys)
        values = checked_values(values, keys)
        if values.device != keys.device:
            raise ValueError(f"values is on {values.device} but keys is on {keys.device}")
        if not isinstance(knn, int) or knn < 0:
            raise ValueError(f"knn must be an int >= 0 (0: no topology refinement), got {knn!r}")
        dev = keys.device
        spherical = metric == "cosine"
        if spherical:
            keys = normalize_rows(keys)
        cd = compute_dtype(keys.dtype)
        x = keys.to(cd)
        info: dict = {"n": n, "d": d}
        t_start = time.perf_counter()
        # 1. hierarchical k-means
        C1, a1 = kmeans(x, c1, iters=kmeans_iters, seed=seed, spherical=spherical,
                        max_train_per_centroid=max_train_per_centroid)
        c1 = C1.shape[0]
        fine_cent, fine_parent = [], []
        assign = torch.empty(n, dtype=torch.int64, device=dev)
        order1 = torch.argsort(a1, stable=True)
        counts1 = torch.bincount(a1, minlength=c1).tolist()
        start = 0
        for c in range(c1):
            idx = order1[start:start + counts1[c]]
            start += counts1[c]
            if idx.numel() == 0:
                continue
            C2, a2 = kmeans(x[idx], c2, iters=kmeans_iters, seed=seed + 1 + c, spherical=spherical,
                            max_train_per_centroid=max_train_per_centroid)
            assign[idx] = a2 + sum(t.shape[0] for t in fine_cent)
            fine_cent.append(C2)
            fine_parent.append(torch.full((C2.shape[0],), c, dtype=torch.int64, device=dev))
        F = torch.cat(fine_cent)
        parent = torch.cat(fine_parent)
        info["kmeans_s"] = time.perf_counter() - t_start
        info["max_members_arg"], info["max_fine_clusters_arg"] = max_members, max_fine_clusters
        index = cls._from_assignment(keys, values, F, parent, C1, assign, metric)
        index.branching, index.split_factor, index.build_info = (c1, c2), float(split_factor), info
        # 2. topology refinement (module docstring: nearest centroid among the graph neighbours' clusters)
        if refine and knn > 0:
            index = index._refined(knn, refine_rounds, knn_nprobe, backend)
        index._finish_build(index.branching, index.split_factor, index.build_info)
        index.build_info["build_s"] = time.perf_counter() - t_start
        return index

    def _finish_build(self, branching, split_factor, info) -> None:
        """The exemplar cap, split cap and spread baseline of a freshly laid-out tree."""
        max_members, max_fine_clusters = info["max_members_arg"], info["max_fine_clusters_arg"]
        sizes = self.fine_offsets.diff()
        self.max_members = int(max_members) if max_members is not None else max(1, int(sizes.max()))
        if self.max_members < 1:
            raise ValueError(f"max_members must be >= 1, got {max_members}")
        self.max_fine_clusters = int(max_fine_clusters) if max_fine_clusters is not None else 2 * self.n_fine
        if self.max_fine_clusters < self.n_fine:
            raise ValueError(f"max_fine_clusters = {self.max_fine_clusters} is below the {self.n_fine} built clusters")
        self._trim_members()
        self.branching = tuple(branching)
        self.split_factor = float(split_factor)
        spread = self.spreads()
        nonempty = self.fine_counts > 1
        self.base_spread = float(spread[nonempty].median()) if bool(nonempty.any()) else 0.0
        info["n_fine"] = self.n_fine
        self.build_info = info

    def refine_topology(
        self,
        knn: int = 16,
        rounds: int = 3,
        knn_nprobe: Optional[tuple[int, int]] = None,
        *,
        backend: Optional[str] = None,
    ) -> "HierarchicalIndex":
        """A copy of this freshly built index refined with the kNN graph of its keys (the module
        docstring's rule): build(refine=False) then refine_topology() gives the same index as
        build(refine=True) (so a benchmark can time both from one k-means). Returns a new index; this one
        is unchanged. Only for an index straight from `build` that kept every key (before any
        `update`): the rule needs every key."""
        n = self.n_members
        if self.n_items != n or self.next_id != n or self.n_splits or "max_members_arg" not in self.build_info:
            raise ValueError("refine_topology needs an index straight from HierarchicalIndex.build (before update()) "
                             "that kept every key (max_members >= its largest cluster)")
        if not isinstance(knn, int) or knn < 1:
            raise ValueError(f"knn must be an int >= 1, got {knn!r}")
        index = self._refined(knn, rounds, knn_nprobe, backend)
        index._finish_build(self.branching, self.split_factor, index.build_info)
        index.build_info["build_s"] = self.build_info.get("build_s", 0.0) + index.build_info["refine_s"]
        return index

    def _refined(self, knn, rounds, knn_nprobe, backend) -> "HierarchicalIndex":
        """The refined layout of an untrimmed, freshly built tree (every key present, ids 0..n-1)."""
        n = self.n_members
        info = dict(self.build_info)
        info["refine_moved"] = []
        t0 = time.perf_counter()
        order = torch.argsort(self.member_ids)  # ids are 0..n-1 after build: back to the input order
        keys, values = self.member_keys[order], self.member_values[order]
        assign = self._member_cluster()[order]
        cd = compute_dtype(keys.dtype)
        x = keys.to(cd)
        F = self.fine_centroids.to(cd)  # the tree's routing centroids (its members' means)
        if n > 1 and self.n_fine > 1:
            # the approximate kNN graph, found with the tree itself (each key's own neighbourhood of
            # clusters), once: the graph is a property of the keys, not of the tree
            probe = knn_nprobe or (min(self.n_coarse, 2), min(self.n_fine, 8))
            _, nbr = self.search(keys, min(knn, n - 1), nprobe=probe, exclude=torch.arange(n, device=self.device),
                                 backend=backend, check_inputs=False)
            info["knn_graph_s"] = time.perf_counter() - t0
            for _ in range(rounds):
                moved = self._refine_step(x, assign, nbr, F)
                info["refine_moved"].append(moved)
                if moved == 0:
                    break
                F = self._recentre(x, assign, F, self.metric == "cosine")
        index = self._from_assignment(keys, values, F, self._parents(), self.coarse_centroids, assign, self.metric)
        index.branching, index.split_factor = self.branching, self.split_factor
        info["refine_s"] = time.perf_counter() - t0
        index.build_info = info
        return index

    @staticmethod
    def _refine_step(x, assign, nbr, F, block: int = 4096) -> int:
        """One round of the graph-restricted reassignment (module docstring); moves items in `assign` in
        place and returns how many moved. Item i's candidates are its own fine cluster and the fine
        clusters of its kNN-graph neighbours (rows of nbr, -1 = none), whatever their coarse parent; i
        moves to the candidate whose centroid (rows of F) is nearest, if strictly nearer than its own
        (ties: its own cluster, then the earlier neighbour)."""
        n = x.shape[0]
        new = assign.clone()
        F = F.to(x.dtype)
        fn = (F * F).sum(1)
        # items grouped by cluster: a block's candidates are then a few hundred distinct clusters, scored
        # with one GEMM instead of gathering 1 + knn centroid rows per item
        order = torch.argsort(assign, stable=True)
        present = torch.zeros(F.shape[0], dtype=torch.bool, device=x.device)
        column = torch.empty(F.shape[0], dtype=torch.int64, device=x.device)
        for a in range(0, n, block):
            items = order[a:a + block]
            own = assign[items]
            nb = nbr[items]
            cand = torch.cat([own[:, None], torch.where(nb >= 0, assign[nb.clamp_min(0)], own[:, None])], 1)
            # distinct candidates and each one's column (torch.unique sorts: far slower on CPU)
            present.zero_()
            present[cand] = True
            uniq = present.nonzero().squeeze(1)
            column[uniq] = torch.arange(uniq.numel(), device=x.device)
            inv = column[cand]
            # ||x - F_c||^2 up to the item's own ||x||^2: ||F_c||^2 - 2 <x, F_c>
            dist = fn[uniq][inv] - 2 * (x[items] @ F[uniq].T).gather(1, inv)
            best = dist.argmin(1, keepdim=True)  # first minimum: the own cluster wins ties
            strictly = dist.gather(1, best).squeeze(1) < dist[:, 0]
            new[items] = torch.where(strictly, cand.gather(1, best).squeeze(1), own)
        moved = int((new != assign).sum())
        assign.copy_(new)
        return moved

    @staticmethod
    def _recentre(x, assign, F, spherical):
        cf = F.shape[0]
        sums = torch.zeros_like(F).index_add_(0, assign, x)
        cnt = torch.bincount(assign, minlength=cf).to(x.dtype)
        newF = torch.where(cnt[:, None] > 0, sums / cnt.clamp_min(1)[:, None], F)
        return normalize_rows(newF) if spherical else newF

    @classmethod
    def _from_assignment(cls, keys, values, F, parent, C1, assign, metric) -> "HierarchicalIndex":
        """CSR layout from a fine-cluster assignment (fine clusters already grouped by parent)."""
        n, d = keys.shape
        dev = keys.device
        cf, c1 = F.shape[0], C1.shape[0]
        order = torch.argsort(assign, stable=True)  # members sorted by cluster, ids ascending inside
        counts = torch.bincount(assign, minlength=cf)
        fine_offsets = torch.zeros(cf + 1, dtype=torch.int64, device=dev)
        fine_offsets[1:] = counts.cumsum(0)
        coarse_offsets = torch.zeros(c1 + 1, dtype=torch.int64, device=dev)
        coarse_offsets[1:] = torch.bincount(parent, minlength=c1).cumsum(0)
        x64 = keys.to(torch.float64)
        mean = torch.zeros(cf, d, dtype=torch.float64, device=dev).index_add_(0, assign, x64)
        sq = torch.zeros(cf, d, dtype=torch.float64, device=dev).index_add_(0, assign, x64 * x64)
        v64 = values.to(torch.float64)
        vmean = torch.zeros(cf, v64.shape[1], dtype=torch.float64, device=dev).index_add_(0, assign, v64)
        c64 = counts.to(torch.float64).clamp_min(1)[:, None]
        mean, sq, vmean = mean / c64, sq / c64, vmean / c64
        # empty fine clusters keep their k-means centroid as "mean" so routing stays defined
        empty = counts == 0
        mean[empty] = F[empty].to(torch.float64)
        idx = cls(
            coarse_centroids=C1.to(keys.dtype).contiguous(),
            coarse_offsets=coarse_offsets,
            fine_centroids=F.to(keys.dtype).contiguous(),
            fine_offsets=fine_offsets,
            member_keys=keys[order].contiguous(),
            member_ids=order.clone(),
            member_values=values[order].contiguous(),
            member_seq=order.clone(),
            fine_mean=mean,
            fine_sq=sq,
            fine_value_mean=vmean,
            fine_counts=counts.to(torch.int64),
            metric=metric,
            next_id=n,
            next_seq=n,
        )
        idx.max_members = max(1, int(counts.max()))
        idx.max_fine_clusters = cf
        idx._refresh_centroids()
        return idx

    # ----------------------------------------------------------------------------- internals
    def _parents(self) -> torch.Tensor:
        c1 = self.n_coarse
        return torch.repeat_interleave(torch.arange(c1, device=self.device), self.coarse_offsets.diff(),
                                       output_size=self.n_fine)

    def _refresh_centroids(self) -> None:
        """Routing centroids from the running means: fine = mean (unit-norm for cosine); coarse =
        count-weighted mean of its children's means."""
        spherical = self.metric == "cosine"
        fm = self.fine_mean
        self.fine_centroids = (normalize_rows(fm) if spherical else fm).to(self.dtype).contiguous()
        par = self._parents()
        w = self.fine_counts.to(torch.float64).clamp_min(0)
        csum = torch.zeros(self.n_coarse, self.d, dtype=torch.float64, device=self.device)
        csum.index_add_(0, par, fm * w[:, None])
        cw = torch.zeros(self.n_coarse, dtype=torch.float64, device=self.device).index_add_(0, par, w)
        has = cw > 0
        cm = torch.where(has[:, None], csum / cw.clamp_min(1e-300)[:, None], self.coarse_centroids.to(torch.float64))
        self.coarse_centroids = (normalize_rows(cm) if spherical else cm).to(self.dtype).contiguous()

    def spreads(self) -> torch.Tensor:
        """(cf,) float64 mean squared distance of a fine cluster's items to its running mean."""
        return (self.fine_sq - self.fine_mean * self.fine_mean).sum(1).clamp_min(0)

    def _member_cluster(self) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(self.n_fine, device=self.device), self.fine_offsets.diff(),
                                       output_size=self.n_members)

    def _set_members(self, cluster, keys, ids, values, seq) -> None:
        """Lay members out in CSR order (by cluster, then insertion order), keeping the most recent
        max_members per cluster."""
        cf = self.n_fine
        if cluster.numel():
            # sort by (cluster, seq): seq is unique, so the sort key is unique
            key = cluster * (int(seq.max()) + 1) + seq
            order = torch.argsort(key)
            cluster, keys, ids, values, seq = cluster[order], keys[order], ids[order], values[order], seq[order]
        counts = torch.bincount(cluster, minlength=cf)
        ends = counts.cumsum(0)
        pos_from_end = ends[cluster] - torch.arange(cluster.numel(), device=self.device)  # 1 = newest
        keep = pos_from_end <= self.max_members
        cluster, keys, ids, values, seq = cluster[keep], keys[keep], ids[keep], values[keep], seq[keep]
        counts = torch.bincount(cluster, minlength=cf)
        self.fine_offsets = torch.zeros(cf + 1, dtype=torch.int64, device=self.device)
        self.fine_offsets[1:] = counts.cumsum(0)
        self.member_keys = keys.contiguous()
        self.member_ids = ids.contiguous()
        self.member_values = values.contiguous()
        self.member_seq = seq.contiguous()

    def _trim_members(self) -> None:
        self._set_members(self._member_cluster(), self.member_keys, self.member_ids, self.member_values, self.member_seq)

    # ----------------------------------------------------------------------------- search
    def search(
        self,
        queries: torch.Tensor,
        k: int,
        nprobe: tuple[int, int] = (4, 16),
        exclude: Optional[torch.Tensor] = None,
        *,
        backend: Optional[str] = None,
        check_inputs: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k members by inner product (cosine: of normalised queries) through `cluster_lookup`:
        the top nprobe[0] coarse clusters, the top nprobe[1] fine clusters among their children, exact
        scores over those members. nprobe = (n_coarse, n_fine) scans every member (= exact search over
        the members). Returns scores (q, k) float32 (float64 for float64 keys) and ids (q, k) int64,
        (-inf, -1) in slots left without a candidate."""
        check_tensor("queries", queries, ndim=2, dims="(q, d)", dtypes=FLOAT_DTYPES)
        if queries.shape[1] != self.d:
            raise ValueError(f"queries must have d = {self.d} columns like the bank's keys, got shape "
                             f"{tuple(queries.shape)}")
        try:
            p1, p2 = (int(p) for p in nprobe)
        except (TypeError, ValueError):
            raise TypeError(f"nprobe must be a pair (p1, p2) of ints, got {nprobe!r}") from None
        if not (1 <= p1 <= self.n_coarse) or not (1 <= p2 <= self.n_fine):
            raise ValueError(f"nprobe = {(p1, p2)} out of range: need 1 <= p1 <= {self.n_coarse} (coarse clusters) "
                             f"and 1 <= p2 <= {self.n_fine} (fine clusters)")
        if check_inputs:
            check_finite("queries", queries)
        if self.metric == "cosine":
            queries = normalize_rows(queries)
        return cluster_lookup(queries, self.coarse_centroids, self.coarse_offsets, self.fine_centroids,
                              self.fine_offsets, self.member_keys, self.member_ids, k, (p1, p2), exclude,
                              backend=backend)

    def lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values, found) of the members with these ids (any shape); id -1 or an id no longer
        kept gives zeros and found = False."""
        order = torch.argsort(self.member_ids)
        sid = self.member_ids[order]
        flat = ids.reshape(-1)
        pos = torch.searchsorted(sid, flat).clamp_max(max(sid.numel() - 1, 0))
        found = (sid[pos] == flat) & (flat >= 0)
        rows = order[pos]
        keys = torch.where(found[:, None], self.member_keys[rows], torch.zeros_like(self.member_keys[rows]))
        vals = torch.where(found[:, None], self.member_values[rows], torch.zeros_like(self.member_values[rows]))
        return (keys.reshape(*ids.shape, -1), vals.reshape(*ids.shape, -1), found.reshape(ids.shape))

    # ----------------------------------------------------------------------------- update
    def update(
        self,
        new_keys: torch.Tensor,
        new_values: Optional[torch.Tensor] = None,
        *,
        backend: Optional[str] = None,
    ) -> torch.Tensor:
        """Add items: route, fold into the running means (`cluster_update`), keep the most recent
        `max_members` exemplars per fine cluster, split clusters that grew too wide. Returns the new
        items' ids (int64, consecutive)."""
        check_tensor("new_keys", new_keys, ndim=2, dims="(m, d)", dtypes=FLOAT_DTYPES)
        m = new_keys.shape[0]
        if new_keys.shape[1] != self.d:
            raise ValueError(f"new_keys must have d = {self.d} columns like the bank's keys, got shape "
                             f"{tuple(new_keys.shape)}")
        dv = int(self.member_values.shape[1])
        if new_values is None:
            if dv:
                raise ValueError(f"this bank stores values of width {dv}: pass new_values (m, {dv})")
            new_values = new_keys.new_zeros((m, 0), dtype=self.member_values.dtype)
        if new_values.dim() == 1:
            new_values = new_values[:, None]
        check_tensor("new_values", new_values, shape=(m, dv), dims=f"(m, dv={dv})", dtypes=FLOAT_DTYPES)
        check_finite("new_keys", new_keys)
        check_finite("new_values", new_values)
        new_keys = new_keys.to(device=self.device, dtype=self.dtype)
        new_values = new_values.to(device=self.device, dtype=self.member_values.dtype)
        if self.metric == "cosine":
            new_keys = normalize_rows(new_keys)
        ids = torch.arange(self.next_id, self.next_id + m, dtype=torch.int64, device=self.device)
        if m == 0:
            return ids
        assign, mean, sq, vmean, counts = cluster_update(
            new_keys, new_values, self.coarse_centroids, self.coarse_offsets, self.fine_centroids,
            self.fine_mean, self.fine_sq, self.fine_value_mean, self.fine_counts, backend=backend)
        self.fine_mean, self.fine_sq, self.fine_value_mean, self.fine_counts = mean, sq, vmean, counts
        seq = torch.arange(self.next_seq, self.next_seq + m, dtype=torch.int64, device=self.device)
        self.next_id += m
        self.next_seq += m
        self._set_members(torch.cat([self._member_cluster(), assign]), torch.cat([self.member_keys, new_keys]),
                          torch.cat([self.member_ids, ids]), torch.cat([self.member_values, new_values]),
                          torch.cat([self.member_seq, seq]))
        self._split_wide_clusters(torch.unique(assign))
        self._refresh_centroids()
        return ids

    def _split_wide_clusters(self, touched: torch.Tensor) -> None:
        if self.base_spread <= 0 or self.split_factor <= 0:
            return
        spread = self.spreads()
        sizes = self.fine_offsets.diff()
        wide = touched[(spread[touched] > self.split_factor * self.base_spread) & (sizes[touched] >= 4)]
        for f in wide.tolist():
            if self.n_fine >= self.max_fine_clusters:
                break
            self._split(int(f))

    def _split(self, f: int) -> None:
        """Split fine cluster f in two by 2-means over its exemplars; the new cluster becomes a sibling
        (same coarse parent). Running statistics are divided in proportion to the exemplars."""
        a, b = int(self.fine_offsets[f]), int(self.fine_offsets[f + 1])
        xs = self.member_keys[a:b].to(torch.float64)
        # deterministic 2-means: start from the exemplar farthest from the mean and the one farthest
        # from that
        mu = xs.mean(0)
        i0 = int(((xs - mu) ** 2).sum(1).argmax())
        i1 = int(((xs - xs[i0]) ** 2).sum(1).argmax())
        C = torch.stack([xs[i0], xs[i1]])
        for _ in range(10):
            lab = ((xs[:, None, :] - C[None]) ** 2).sum(-1).argmin(1)
            if bool((lab == 0).all()) or bool((lab == 1).all()):
                return
            C = torch.stack([xs[lab == 0].mean(0), xs[lab == 1].mean(0)])
        w1 = float((lab == 1).sum()) / lab.numel()
        n = int(self.fine_counts[f])
        n1 = int(round(n * w1))
        n0 = n - n1
        if n0 < 1 or n1 < 1:
            return
        vs = self.member_values[a:b].to(torch.float64)
        stats = []
        for j in (0, 1):
            sel = lab == j
            stats.append((xs[sel].mean(0), (xs[sel] ** 2).mean(0),
                          vs[sel].mean(0) if vs.shape[1] else vs.new_zeros((0,))))
        mc = self._member_cluster()
        par = int(self._parents()[f])
        # the new cluster goes right after its parent's last child, keeping children contiguous
        new_pos = int(self.coarse_offsets[par + 1])

        def insert_row(t, row):
            return torch.cat([t[:new_pos], row[None].to(t.dtype), t[new_pos:]])

        self.fine_mean[f], self.fine_sq[f] = stats[0][0], stats[0][1]
        if vs.shape[1]:
            self.fine_value_mean[f] = stats[0][2]
        self.fine_counts[f] = n0
        self.fine_mean = insert_row(self.fine_mean, stats[1][0])
        self.fine_sq = insert_row(self.fine_sq, stats[1][1])
        self.fine_value_mean = insert_row(self.fine_value_mean, stats[1][2])
        self.fine_counts = insert_row(self.fine_counts, torch.tensor(n1, device=self.device))
        self.fine_centroids = insert_row(self.fine_centroids, C[1])
        self.coarse_offsets = self.coarse_offsets.clone()
        self.coarse_offsets[par + 1:] += 1
        # members: cluster indices at/after new_pos shift by one; f's exemplars labelled 1 move over
        mc = torch.where(mc >= new_pos, mc + 1, mc)
        mc[a:b] = torch.where(lab == 1, torch.full_like(lab, new_pos), mc[a:b])
        self._set_members(mc, self.member_keys, self.member_ids, self.member_values, self.member_seq)
        self.n_splits += 1

    # ----------------------------------------------------------------------------- save / load
    def _header(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "metric": self.metric,
            "branching": list(self.branching),
            "d": self.d,
            "dv": int(self.member_values.shape[1]),
            "dtype": str(self.dtype).replace("torch.", ""),
            "value_dtype": str(self.member_values.dtype).replace("torch.", ""),
            "n_coarse": self.n_coarse,
            "n_fine": self.n_fine,
            "n_members": self.n_members,
            "max_members": self.max_members,
            "max_fine_clusters": self.max_fine_clusters,
            "split_factor": self.split_factor,
            "base_spread": self.base_spread,
            "next_id": self.next_id,
            "next_seq": self.next_seq,
            "n_splits": self.n_splits,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the index to `path` atomically (temporary file in the same directory, fsync,
        os.replace, directory fsync): a reader sees the old file or the new one, never a partial one.
        The SHA-256 in the header covers the header's own fields and every tensor (mvpp_kernels._io)."""
        _io.write_checked(path, self.tensors(), self._header(), key=_HEADER_KEY, fmt=FORMAT_NAME,
                          version=FORMAT_VERSION)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "HierarchicalIndex":
        """Read an index written by `save`. Raises ValueError for a file that is not an mvpp memory
        bank, has an unsupported version, is truncated, or whose header or tensors do not match its
        checksum; FileNotFoundError for a missing file."""
        path = os.fspath(path)
        tensors, header = _io.read_checked(path, key=_HEADER_KEY, fmt=FORMAT_NAME, version=FORMAT_VERSION,
                                           what="mvpp memory bank file", required=_TENSOR_FIELDS, old=_OLD_FORMATS)
        what = f"{path!r} is not a valid mvpp memory bank file"
        if str(tensors["member_keys"].dtype).replace("torch.", "") != header.get("dtype") or \
                tensors["member_keys"].dim() != 2 or tensors["member_keys"].shape[1] != header.get("d"):
            raise ValueError(f"{what}: header (d, dtype) does not match the stored keys")
        try:
            idx = cls(**{n: tensors[n].to(device) for n in _TENSOR_FIELDS}, metric=header["metric"],
                      branching=tuple(header["branching"]), max_members=header["max_members"],
                      max_fine_clusters=header["max_fine_clusters"], split_factor=header["split_factor"],
                      base_spread=header["base_spread"], next_id=header["next_id"], next_seq=header["next_seq"],
                      n_splits=header["n_splits"])
        except KeyError as e:
            raise ValueError(f"{what}: its header has no field {e}") from None
        return idx
