"""`mvpp bank build|search|update`: a HierarchicalIndex on disk, from key files or synthetic data.

Key files are safetensors with a tensor `keys` (n, d) and optionally `values` (n, dv) (`queries`
(q, d) for search). With `--data synthetic:<preset>` the bank holds the training videos' retrieval
vectors with [label, text feature] values, `update` adds the validation videos and `search`
queries with the test videos.
"""
from __future__ import annotations

import os
import time

import torch

from .models._ops import op

__all__ = ["bank_build", "bank_search", "bank_update"]


class BankUsageError(ValueError):
    pass


def _read(path: str, name: str, optional: bool = False):
    from safetensors import safe_open

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    try:
        f = safe_open(path, framework="pt")
    except Exception as e:  # SafetensorError (not safetensors, truncated), OSError
        raise BankUsageError(f"{path!r} is not a readable safetensors file with a tensor {name!r}: "
                             f"{' '.join(str(e).split())}") from None
    with f:
        keys = set(f.keys())
        if name not in keys:
            if optional:
                return None
            raise BankUsageError(f"{path!r} has no tensor {name!r} (it has: {sorted(keys)})")
        return f.get_tensor(name)


def _synthetic(spec: str, seed: int, part: str):
    from .data import generate, split_indices
    from .models.mvpp_model import bank_values

    kind, _, preset = spec.partition(":")
    if kind != "synthetic":
        raise BankUsageError(f"--data {spec!r}: the bank commands take synthetic:<preset> (or --keys FILE)")
    data = generate(preset or "small", seed=seed)
    idx = split_indices(len(data), "mmra")[part]
    return data.retrieval[idx], bank_values(data, idx)


def bank_build(index_path: str, data: str | None = None, seed: int = 0, keys_file: str | None = None,
               branching=None, knn: int = 16) -> dict:
    HierarchicalIndex = op("HierarchicalIndex", "mvpp bank build")
    from .models.memory import default_branching

    if bool(data) == bool(keys_file):
        raise BankUsageError("give exactly one of --keys FILE or --data synthetic:<preset>")
    if keys_file:
        keys, values = _read(keys_file, "keys"), _read(keys_file, "values", optional=True)
    else:
        keys, values = _synthetic(data, seed, "train")
    t0 = time.perf_counter()
    index = HierarchicalIndex.build(keys.float(), values=None if values is None else values.float(),
                                    branching=tuple(branching) if branching else default_branching(keys.shape[0]),
                                    metric="cosine", knn=min(knn, keys.shape[0] - 1))
    secs = time.perf_counter() - t0
    index.save(index_path)
    return {"index": index_path, "items": int(keys.shape[0]), "d": int(keys.shape[1]),
            "coarse_clusters": index.n_coarse, "fine_clusters": index.n_fine, "build_seconds": secs,
            "bytes": index.nbytes()}


def bank_search(index_path: str, queries_file: str | None = None, data: str | None = None, seed: int = 0,
                k: int = 10, nprobe=None, limit: int = 5) -> dict:
    HierarchicalIndex = op("HierarchicalIndex", "mvpp bank search")
    exact_search = op("exact_search", "mvpp bank search")
    if bool(data) == bool(queries_file):
        raise BankUsageError("give exactly one of --queries FILE or --data synthetic:<preset>")
    index = HierarchicalIndex.load(index_path)
    q = _read(queries_file, "queries") if queries_file else _synthetic(data, seed, "test")[0]
    q = torch.nn.functional.normalize(q.float(), dim=1)
    if k > index.n_members:
        raise BankUsageError(f"--k {k} is larger than the bank ({index.n_members} items)")
    p = tuple(nprobe) if nprobe else (max(1, (index.n_coarse + 1) // 2), max(1, (index.n_fine + 3) // 4))
    t0 = time.perf_counter()
    scores, ids = index.search(q, k, nprobe=p)
    secs = time.perf_counter() - t0
    # recall against exact search over the same members
    keys = torch.nn.functional.normalize(index.member_keys.float(), dim=1)
    _, exact_rows = exact_search(keys, q, k, metric="ip")
    exact_ids = index.member_ids[exact_rows.clamp(min=0)]
    hit = (ids[:, :, None] == exact_ids[:, None, :]).any(-1).float().mean().item()
    return {"queries": int(q.shape[0]), "k": k, "nprobe": list(p), "seconds": secs, f"recall@{k}": hit,
            "results": [{"ids": ids[i].tolist(), "scores": [round(float(s), 5) for s in scores[i]]}
                        for i in range(min(limit, q.shape[0]))]}


def bank_update(index_path: str, keys_file: str | None = None, data: str | None = None, seed: int = 0) -> dict:
    HierarchicalIndex = op("HierarchicalIndex", "mvpp bank update")
    if bool(data) == bool(keys_file):
        raise BankUsageError("give exactly one of --keys FILE or --data synthetic:<preset>")
    index = HierarchicalIndex.load(index_path)
    if keys_file:
        keys, values = _read(keys_file, "keys"), _read(keys_file, "values", optional=True)
    else:
        keys, values = _synthetic(data, seed, "val")
    before = index.n_members
    ids = index.update(keys.float(), None if values is None else values.float())
    index.save(index_path)
    return {"index": index_path, "added": int(ids.numel()), "members_before": before, "members_after": index.n_members,
            "items_seen": index.n_items, "fine_clusters": index.n_fine, "bytes": index.nbytes(),
            "memory_bound_bytes": index.memory_bound_bytes()}
