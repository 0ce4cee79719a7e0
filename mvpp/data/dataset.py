"""Datasets and batching over padded video tensors (frames, events) with their lengths."""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch

from .synthetic import VideoData

__all__ = ["VideoDataset", "collate_videos", "iterate_batches", "split_indices"]

# Fields padded along a length dimension, and the field holding that length.
_PADDED = {"frames": "frame_lengths", "event_dt": "event_lengths", "event_marks": "event_lengths"}


class VideoDataset(torch.utils.data.Dataset):
    """Map-style dataset over a `VideoData`; items are dicts of tensors, trimmed to their length.

    Use with `torch.utils.data.DataLoader(ds, collate_fn=collate_videos)`, which pads again to the
    longest item of the batch (so a batch of short videos costs little).
    """

    def __init__(self, data: VideoData, indices=None):
        self.data = data
        self.indices = torch.arange(len(data)) if indices is None else torch.as_tensor(indices, dtype=torch.long)

    def __len__(self) -> int:
        return int(self.indices.numel())

    def __getitem__(self, i: int) -> dict:
        j = int(self.indices[i])
        item = {"index": torch.tensor(j)}
        for f in VideoData.TENSOR_FIELDS:
            v = getattr(self.data, f)[j]
            if f in _PADDED:
                v = v[: int(getattr(self.data, _PADDED[f])[j])]
            item[f] = v
        return item


def collate_videos(items: list[dict]) -> dict:
    """Stack items, right-padding variable-length fields with zeros (lengths say what is valid)."""
    out = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        if key in _PADDED:
            # at least one step so that empty event sequences still have a (batch, 1) tensor
            m = max(1, max(int(v.shape[0]) for v in vals))
            pad = vals[0].new_zeros((len(vals), m) + tuple(vals[0].shape[1:]))
            for i, v in enumerate(vals):
                pad[i, : v.shape[0]] = v
            out[key] = pad
        else:
            out[key] = torch.stack(vals)
    return out


def shuffled(indices: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """`indices` in the epoch order of `iterate_batches(shuffle=True)` (one randperm from `generator`); the
    distributed trainer slices this same order per rank."""
    return indices[torch.randperm(indices.numel(), generator=generator)]


def iterate_batches(data: VideoData, indices, batch_size: int, shuffle: bool = False,
                    generator: Optional[torch.Generator] = None, device="cpu", trim: bool = True) -> Iterator[dict]:
    """Fast batching straight from the padded tensors (no per-item Python work).

    Yields the same dicts as `collate_videos`; with `trim`, padded fields are cut to the batch's
    longest length.
    """
    indices = torch.as_tensor(indices, dtype=torch.long)
    if shuffle:
        indices = shuffled(indices, generator)
    for s in range(0, indices.numel(), batch_size):
        idx = indices[s: s + batch_size]
        b = {"index": idx}
        for f in VideoData.TENSOR_FIELDS:
            b[f] = getattr(data, f)[idx]
        if trim:
            for f, lf in _PADDED.items():
                m = max(1, int(b[lf].max())) if idx.numel() else 1
                b[f] = b[f][:, :m]
        yield {k: v.to(device) for k, v in b.items()}


def _shuffle_split(idx: np.ndarray, test_size: float, random_state: int):
    """sklearn's train_test_split(idx, test_size=..., random_state=...) (ShuffleSplit: one permutation
    from RandomState(random_state); the first ceil(test_size * n) are the test part), without sklearn."""
    n = idx.shape[0]
    n_test = int(np.ceil(test_size * n))
    perm = np.random.RandomState(random_state).permutation(n)
    return idx[perm[n_test:]], idx[perm[:n_test]]


def split_indices(n: int, scheme: str = "mmra", seed: int = 0) -> dict:
    """Train/val/test indices (sorted).

    "mmra": MMRA's split -- train_test_split(test_size=0.2, random_state=9) of all items, then the
    held-out 20% split 50/50 into val/test with random_state=18 (so 80/10/10); reproduced exactly
    without needing scikit-learn (tested against it). "random": the same proportions from `seed`.
    """
    idx = np.arange(n)
    if scheme == "mmra":
        train, rest = _shuffle_split(idx, 0.2, 9)
        val, test = _shuffle_split(rest, 0.5, 18)
    elif scheme == "random":
        perm = np.random.default_rng(seed).permutation(n)
        n_test = int(round(0.2 * n))
        train, rest = perm[n_test:], perm[:n_test]
        val, test = rest[: n_test // 2], rest[n_test // 2:]
    else:
        raise ValueError(f"unknown split scheme {scheme!r}; expected 'mmra' or 'random'")
    return {k: torch.as_tensor(np.sort(v), dtype=torch.long) for k, v in (("train", train), ("val", val), ("test", test))}
