"""Video frame sampling: MMRA's uniform sparse sampling and dense sampling, with decord (or PyAV).

* uniform: `samples` frames at round(linspace(0, n - 1, samples)) (MMRA: 10 frames);
* dense: every `every`-th frame, at most `cap` frames (the temporal enlargement's long view).

decord reads all requested frames with one batched `get_batch`. decord's VideoReader is known to
grow its memory across repeated `get_batch` calls on the same reader (dmlc/decord issues about
get_batch memory leaks); seeking back to frame 0 after every batch releases the decoder's buffered
frames, so we do that. When decord is not installed (it has no wheel for some platforms/Pythons) the
PyAV backend decodes the stream once and keeps the requested frames.

An unreadable or missing video raises `VideoReadError` naming the file; `sample_videos` catches it,
skips the video, counts it and goes on.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

__all__ = ["VideoReadError", "uniform_indices", "dense_indices", "read_frames", "sample_video", "sample_videos",
           "video_backend", "SampleReport"]


class VideoReadError(RuntimeError):
    """A video file is missing or cannot be decoded."""


def uniform_indices(n_frames: int, samples: int = 10) -> np.ndarray:
    if n_frames <= 0:
        raise ValueError("a video with no frames has nothing to sample")
    return np.linspace(0, n_frames - 1, samples).round().astype(np.int64)


def dense_indices(n_frames: int, every: int = 1, cap: int = 128) -> np.ndarray:
    if every < 1 or cap < 1:
        raise ValueError(f"dense sampling needs every >= 1 and cap >= 1 (got every={every}, cap={cap})")
    return np.arange(0, n_frames, every, dtype=np.int64)[:cap]


def video_backend(preferred: str = "auto") -> str:
    if preferred not in ("auto", "decord", "av"):
        raise ValueError(f"video backend {preferred!r}: expected auto, decord or av")
    if preferred in ("auto", "decord"):
        try:
            import decord  # noqa: F401

            return "decord"
        except ImportError:
            if preferred == "decord":
                raise ImportError("decord is not installed (pip install decord; no wheel for some platforms: "
                                  "use backend='av' with PyAV instead)") from None
    try:
        import av  # noqa: F401
    except ImportError:
        raise ImportError("reading videos needs decord or PyAV: pip install decord (or av)") from None
    return "av"


def _check_path(path: str) -> None:
    if not os.path.exists(path):
        raise VideoReadError(f"video {path!r} does not exist")
    if os.path.getsize(path) == 0:
        raise VideoReadError(f"video {path!r} is empty (0 bytes)")


def _frame_count_decord(path):
    import decord

    try:
        vr = decord.VideoReader(path, ctx=decord.cpu(0))
    except Exception as e:  # decord raises DECORDError (a RuntimeError subclass) with a C++ message
        raise VideoReadError(f"video {path!r} cannot be decoded by decord: {str(e).splitlines()[0][:200]}") from e
    return vr


def read_frames(path: str, indices_fn, backend: str = "auto") -> tuple[np.ndarray, int]:
    """Decode the frames `indices_fn(n_frames)` selects. Returns (frames (k, H, W, 3) uint8, n_frames)."""
    _check_path(path)
    be = video_backend(backend)
    if be == "decord":
        vr = _frame_count_decord(path)
        n = len(vr)
        if n == 0:
            raise VideoReadError(f"video {path!r} has no frames")
        idx = indices_fn(n)
        try:
            frames = vr.get_batch(list(map(int, idx))).asnumpy()
        except Exception as e:
            raise VideoReadError(f"video {path!r}: decoding frames failed: {str(e).splitlines()[0][:200]}") from e
        finally:
            vr.seek(0)  # decord get_batch leak workaround (see module docstring)
        return frames, n
    import av

    try:
        with av.open(path) as c:
            decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    except Exception as e:  # av.error.InvalidDataError and friends
        raise VideoReadError(f"video {path!r} cannot be decoded by PyAV: {e}") from e
    n = len(decoded)
    if n == 0:
        raise VideoReadError(f"video {path!r} has no frames")
    idx = indices_fn(n)
    return np.stack([decoded[int(i)] for i in idx]), n


def sample_video(path: str, samples: int = 10, dense_every: int = 0, dense_cap: int = 128,
                 backend: str = "auto") -> dict:
    """{"uniform": (samples, H, W, 3), "dense": (m, H, W, 3) or None, "n_frames": int}; one decode pass."""
    sel = {}

    def pick(n):
        u = uniform_indices(n, samples)
        d = dense_indices(n, dense_every, dense_cap) if dense_every else np.zeros(0, np.int64)
        allidx = np.concatenate([u, d])
        uniq, inv = np.unique(allidx, return_inverse=True)
        sel["inv"], sel["nu"] = inv, len(u)
        return uniq

    frames, n = read_frames(path, pick, backend)
    inv, nu = sel["inv"], sel["nu"]
    out = {"uniform": frames[inv[:nu]], "dense": frames[inv[nu:]] if dense_every else None, "n_frames": n}
    return out


@dataclass
class SampleReport:
    ok: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)  # id -> reason

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)


def sample_videos(items, samples: int = 10, dense_every: int = 0, dense_cap: int = 128, backend: str = "auto",
                  report: SampleReport | None = None):
    """Yield (id, sample dict) for (id, path) items; unreadable/missing videos are skipped and counted in
    `report` (a SampleReport) instead of stopping the run."""
    report = report if report is not None else SampleReport()
    for vid, path in items:
        try:
            s = sample_video(path, samples, dense_every, dense_cap, backend)
        except VideoReadError as e:
            report.skipped[vid] = str(e)
            continue
        report.ok.append(vid)
        yield vid, s
