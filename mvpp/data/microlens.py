"""The real MicroLens-100k layout (westlake-repl/MicroLens), as MMRA uses it.

Files in one folder (``root``):

* ``MicroLens-100k_title_en.csv``: video id, English title (a header row ``item,title`` is allowed).
* ``MicroLens-100k_likes_and_views.txt``: tab-separated video id, likes, views (no header).
* ``MicroLens-100k_comment_en.txt``: tab-separated user id, video id, comment text (no header).
* ``MicroLens-100k_pairs.csv``: user id, video id, timestamp in milliseconds (header ``user,item,timestamp``
  allowed): the user-video interactions, our engagement events.
* videos as ``<id>.mp4`` in ``root/videos`` (or ``root`` itself).

Label, as MMRA: log2 of a video's number of comments. **Videos with zero comments are dropped**
(log2(0) is undefined); `load_microlens` reports how many. Split, as MMRA:
``train_test_split(test_size=0.2, random_state=9)`` over the kept videos, then the held-out 20%
50/50 into validation and test with ``random_state=18``.

Engagement stream: a video's interactions sorted by time; its observation window starts at its first
interaction (the upload proxy; the dataset has no upload time) and lasts ``window_hours``; the first
``max_events`` interactions inside it are the events (a single mark, "interaction": MicroLens has no
per-event type or time for comments and shares).
"""
from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from .synthetic import VideoData

__all__ = ["FILES", "MicroLensTable", "MicroLensParseError", "read_microlens", "microlens_split", "event_streams", "load_microlens",
           "load_microlens_features", "find_video"]

FILES = {
    "titles": "MicroLens-100k_title_en.csv",
    "likes_views": "MicroLens-100k_likes_and_views.txt",
    "comments": "MicroLens-100k_comment_en.txt",
    "pairs": "MicroLens-100k_pairs.csv",
}


@dataclass
class MicroLensTable:
    ids: list  # kept video ids (str), in ascending numeric/lexical order
    titles: dict
    likes: dict
    views: dict
    comments: dict  # id -> comment count
    interactions: dict  # id -> sorted np.ndarray of timestamps (seconds)
    label: np.ndarray  # log2(comment count) of `ids`
    dropped_zero_comment: int


def _path(root: str, key: str) -> str:
    p = os.path.join(root, FILES[key])
    if not os.path.exists(p):
        raise FileNotFoundError(f"MicroLens layout: {FILES[key]} is missing from {root!r} "
                                f"(expected files: {', '.join(FILES.values())})")
    return p


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def _sort_key(i: str):
    return (0, int(i), "") if _is_int(i) else (1, 0, i)


class MicroLensParseError(ValueError):
    """A malformed line in a MicroLens file; the message names the file (full path) and the line."""


def _bad(path: str, line: int, expected: str, got: str) -> MicroLensParseError:
    return MicroLensParseError(f"{path} line {line}: expected {expected}, got {got.strip()[:80]!r}")


def _lines(path: str):
    """(line number, text) of a text file; a byte that is not UTF-8 is reported with its file and line."""
    with open(path, "rb") as f:
        for ln, raw in enumerate(f, 1):
            try:
                yield ln, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise MicroLensParseError(f"{path} line {ln}: not UTF-8 text ({e.reason} at byte "
                                          f"{e.start})") from None


def _csv_rows(path: str):
    """(line number where the row starts, row) of a CSV file (quoted fields may span lines)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise MicroLensParseError(f"{path} line {line}: not UTF-8 text ({e.reason})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise MicroLensParseError(f"{path} line {reader.line_num}: malformed CSV ({e})") from None
        yield start, row
        start = reader.line_num + 1


def read_microlens(root: str) -> MicroLensTable:
    """Parse the four MicroLens files; a malformed line raises MicroLensParseError naming file and line."""
    titles = {}
    path = _path(root, "titles")
    for ln, row in _csv_rows(path):
        if not row or not any(c.strip() for c in row):
            continue
        if ln == 1 and not _is_int(row[0].strip()):
            continue  # header
        if not row[0].strip():
            raise _bad(path, ln, "'video,title' with a video id", ",".join(row))
        titles[row[0].strip()] = ",".join(row[1:]).strip()
    likes, views = {}, {}
    path = _path(root, "likes_views")
    for ln, line in _lines(path):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 3 or not parts[0].strip() or not (_is_int(parts[1]) and _is_int(parts[2])):
            raise _bad(path, ln, "'video<TAB>likes<TAB>views' (integer likes and views)", line)
        likes[parts[0].strip()], views[parts[0].strip()] = int(parts[1]), int(parts[2])
    comments: dict = {}
    path = _path(root, "comments")
    for ln, line in _lines(path):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or not parts[1].strip():
            raise _bad(path, ln, "'user<TAB>video<TAB>comment'", line)
        vid = parts[1].strip()
        comments[vid] = comments.get(vid, 0) + 1
    inter: dict = {}
    path = _path(root, "pairs")
    for ln, row in _csv_rows(path):
        if not row or not any(c.strip() for c in row):
            continue
        if ln == 1 and not _is_int(row[-1].strip()):
            continue  # header
        if len(row) < 3 or not row[1].strip() or not _is_int(row[2].strip()):
            raise _bad(path, ln, "'user,item,timestamp' (timestamp: integer milliseconds)", ",".join(row))
        inter.setdefault(row[1].strip(), []).append(int(row[2]) / 1000.0)
    interactions = {k: np.sort(np.asarray(v, dtype=np.float64)) for k, v in inter.items()}
    all_ids = sorted(titles, key=_sort_key)
    kept = [i for i in all_ids if comments.get(i, 0) > 0]
    label = np.log2(np.array([comments[i] for i in kept], dtype=np.float64))
    return MicroLensTable(ids=kept, titles=titles, likes=likes, views=views, comments=comments,
                          interactions=interactions, label=label, dropped_zero_comment=len(all_ids) - len(kept))


def microlens_split(n: int) -> dict:
    """MMRA's split of n items (indices into the kept videos)."""
    from .dataset import split_indices

    return split_indices(n, "mmra")


def event_streams(table: MicroLensTable, max_events: int = 64, window_hours: float = 72.0):
    """(dt (n, L), marks (n, L), lengths (n,), dt_end (n,), window (n,)) in hours, per kept video."""
    n, L = len(table.ids), max_events
    dt = np.zeros((n, L), np.float32)
    lengths = np.zeros(n, np.int64)
    dt_end = np.zeros(n, np.float32)
    window = np.full(n, window_hours, np.float32)
    for r, vid in enumerate(table.ids):
        ts = table.interactions.get(vid)
        if ts is None or ts.size == 0:
            dt_end[r] = window_hours
            continue
        rel = (ts - ts[0]) / 3600.0
        rel = rel[rel <= window_hours]
        if rel.size > L:  # cut the window just before the first event that does not fit
            window[r] = rel[L]
            rel = rel[:L]
        m = rel.size
        lengths[r] = m
        dt[r, :m] = np.diff(np.concatenate([[0.0], rel]))
        dt_end[r] = window[r] - rel[-1]
    return dt, np.zeros((n, L), np.int64), lengths, dt_end, window


def find_video(root: str, vid: str) -> str | None:
    for d in (os.path.join(root, "videos"), root):
        p = os.path.join(d, f"{vid}.mp4")
        if os.path.exists(p):
            return p
    return None


def load_microlens(root: str, frames: torch.Tensor, frame_lengths: torch.Tensor, text: torch.Tensor,
                   ids: list, max_events: int = 64, window_hours: float = 72.0) -> VideoData:
    """Assemble a VideoData from the layout plus per-video features (rows aligned with `ids`).

    Videos without features (unreadable/missing video files) are left out; the retrieval vector is the
    normalised text feature concatenated with the mean frame feature (MMRA retrieves with a text
    embedding of title + captions)."""
    table = read_microlens(root)
    pos = {v: i for i, v in enumerate(ids)}
    keep = [r for r, v in enumerate(table.ids) if v in pos]
    if not keep:
        raise ValueError("none of the kept MicroLens videos has features; run `mvpp features` on this folder")
    rows = torch.tensor([pos[table.ids[r]] for r in keep], dtype=torch.long)
    dt, marks, lengths, dt_end, window = event_streams(table, max_events, window_hours)
    k = torch.tensor(keep, dtype=torch.long)
    fr, fl, tx = frames[rows].float(), frame_lengths[rows].long(), text[rows].float()
    mask = (torch.arange(fr.shape[1])[None] < fl[:, None]).unsqueeze(-1)
    mean_frame = (fr * mask).sum(1) / fl.clamp(min=1)[:, None]
    retrieval = torch.nn.functional.normalize(
        torch.cat([torch.nn.functional.normalize(tx, dim=1), torch.nn.functional.normalize(mean_frame, dim=1)], 1), dim=1)
    return VideoData(
        frames=fr, frame_lengths=fl, text=tx, retrieval=retrieval,
        upload_time=torch.zeros(len(keep)), event_dt=torch.from_numpy(dt)[k], event_marks=torch.from_numpy(marks)[k],
        event_lengths=torch.from_numpy(lengths)[k], dt_end=torch.from_numpy(dt_end)[k],
        window=torch.from_numpy(window)[k], label=torch.from_numpy(table.label.astype(np.float32))[k],
        ids=[table.ids[r] for r in keep], latents={}, n_marks=1)


def load_microlens_features(root: str, feature_dir: str, **kw) -> VideoData:
    """Load the features `mvpp features` cached in `feature_dir` and assemble the dataset."""
    from ..features import load_feature_table

    ft = load_feature_table(feature_dir)
    return load_microlens(root, ft["frames"], ft["frame_lengths"], ft["text"], ft["ids"], **kw)
