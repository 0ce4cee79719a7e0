"""A seeded, deterministic MicroLens-like generator: the embedded default data of `mvpp`.

The generative model (every draw comes from one `numpy.random.Generator(seed)`, so a seed and a
preset give the same bytes on every machine):

Topics and content
    Coarse topics c = 1..C have centroids on the unit sphere in R^Z; each has `fine_per_coarse`
    fine topics (centroid = coarse centroid + a smaller offset). A video i picks a fine topic f_i
    uniformly and has a content latent z_i = centroid(f_i) + noise. Its *content quality*
    q_i = v . z_i / |v| (a fixed random direction v) is visible in the title/text, the frames and the
    retrieval vector.

What each video shows
    * text (D_text): a fixed random linear map of z_i plus noise (the "title" embedding);
    * retrieval vector (D_ret): normalised (linear map of z_i + noise), what MMRA retrieves with;
    * frames (T_i x F, T_i between T/2 and T): a scene vector (linear map of z_i) + a slow temporal
      drift + per-frame noise. `n_highlight` frames, placed at random positions that are NOT on the
      10-frame `linspace` grid MMRA samples, additionally carry a marker direction m (what makes
      them recognisable to a frame scorer) and a_i * h (h a fixed "value" direction) where
      a_i ~ N(0, 1) is the video's *highlight strength*. Uniform 10-frame sampling never sees a_i;
      mean pooling over all frames sees it diluted n_highlight/T_i times; a learned frame scorer
      can pick those frames out.
    * upload time u_i ~ U(0, 1).

Topic popularity (the memory bank's signal)
    Each fine topic has a popularity trend p_f(t) = b_f + a Brownian path over upload time
    (b_f ~ N(0, 1) scaled); p_i = p_{f_i}(u_i), standardised. It is independent of the topic's
    content centroid, so it cannot be read from the content: only from the labels of other videos
    of the same neighbourhood (there are about n / videos_per_topic fine topics, too many to
    memorise from the content alone).

Engagement (the MHP's signal)
    Likes, comments and shares (marks 0, 1, 2) follow a 3-variate Hawkes process with exponential
    kernels, intensity lambda_k(t) = mu_k(t) + sum_{t_j < t} alpha_{k_j k} exp(-beta (t - t_j)):
    * virality (branching ratio) n_i = n_min + (n_max - n_min) * sigmoid(g_i), g_i ~ N(0, s_g^2):
      alpha_i = n_i * beta_i * P with P a fixed non-negative 3x3 matrix of spectral radius 1, so
      the branching ratio is exactly n_i. beta_i (decay rate) varies per video.
    * the baseline is piecewise constant: during the observation window [0, T_obs] (the early
      audience, the uploader's followers) mu_k = base_k * exp(w_q q_i); after it (the
      recommender's push) mu_k = base_k * exp(w_q q_i + w_a a_i + w_p p_i).
    The observed engagement stream is the events in [0, T_obs] (at most `max_events`; if there are
    more, the window is cut just before event max_events + 1, so the likelihood stays exact).
    It reveals q_i and the virality n_i, but not a_i or p_i.

Label
    y_i = log2(1 + number of comments in [0, H]) with H >> T_obs, the horizon (MicroLens: log2 of
    the comment count; we add 1 instead of dropping zero-comment videos). Roughly
    log(E[comments]) = const + w_q q + w_a a + w_p p - log(1 - n): each term is visible to exactly one
    module (text/frames; frame scoring; memory bank; MHP), plus Poisson/Hawkes noise none can see.

Simulation: Ogata's thinning, vectorised over all videos at once (one numpy step advances every
still-running video by one candidate point). Between events the exponential-kernel intensity only
decays, so the intensity right after the current time is an exact upper bound; at the baseline's
change point T_obs the bound is reset (the candidate is discarded and time moves to T_obs).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

__all__ = ["SyntheticConfig", "PRESETS", "VideoData", "generate", "simulate_hawkes_exp", "uniform_frame_grid"]

MARKS = ("likes", "comments", "shares")


@dataclass(frozen=True)
class SyntheticConfig:
    n_videos: int = 2000
    frames: int = 64  # T: maximum frames per video (each video has between T/2 and T)
    frame_dim: int = 32  # F
    text_dim: int = 32
    retrieval_dim: int = 32
    latent_dim: int = 16
    n_coarse: int = 8
    videos_per_topic: int = 12  # fine topics = n_videos / videos_per_topic
    n_highlight: int = 2
    max_events: int = 64  # L: events kept in the observation window
    t_obs: float = 1.0  # observation window [0, T_obs]
    horizon: float = 10.0  # label horizon H
    base_rates: tuple = (4.0, 1.0, 0.5)  # likes, comments, shares per unit time at q = 0
    w_quality: float = 0.5
    w_highlight: float = 0.6
    w_topic: float = 0.6
    virality_scale: float = 1.5
    n_min: float = 0.1
    n_max: float = 0.85
    beta_range: tuple = (4.0, 12.0)
    max_total_events: int = 20000  # per-video safety cap of the simulation (never hit by the presets)
    uniform_samples: int = 10  # the MMRA frame grid highlight frames avoid

    def replace(self, **kw) -> "SyntheticConfig":
        return dataclasses.replace(self, **kw)


PRESETS: dict[str, SyntheticConfig] = {
    # tests and the CLI smoke test: seconds
    "tiny": SyntheticConfig(n_videos=300, frames=32, frame_dim=16, text_dim=16, retrieval_dim=16, latent_dim=8,
                            n_coarse=4, max_events=32, horizon=6.0),
    # the demo default: trains every model on 2 CPU cores in a few minutes
    "small": SyntheticConfig(),
    "medium": SyntheticConfig(n_videos=8000, frames=128, frame_dim=64, text_dim=64, retrieval_dim=64,
                              latent_dim=24, n_coarse=16, max_events=128),
    "large": SyntheticConfig(n_videos=20000, frames=128, frame_dim=64, text_dim=64, retrieval_dim=64,
                             latent_dim=32, n_coarse=32, max_events=128),
}


@dataclass
class VideoData:
    """A set of videos, padded. Field shapes (n videos):

    frames (n, T, F) float32, frame_lengths (n,) int64; text (n, D_text); retrieval (n, D_ret)
    (unit norm); upload_time (n,); event_dt (n, L) gaps (dt[:, 0] from the window start, 0 past
    the length), event_marks (n, L) int64 in {0: likes, 1: comments, 2: shares} (0 past the
    length), event_lengths (n,), dt_end (n,) gap from the last kept event to the window end,
    window (n,) the window length; label (n,) float32.
    `latents` holds the generator's hidden variables (for diagnostics and docs, never a model input).
    """

    frames: torch.Tensor
    frame_lengths: torch.Tensor
    text: torch.Tensor
    retrieval: torch.Tensor
    upload_time: torch.Tensor
    event_dt: torch.Tensor
    event_marks: torch.Tensor
    event_lengths: torch.Tensor
    dt_end: torch.Tensor
    window: torch.Tensor
    label: torch.Tensor
    ids: list = field(default_factory=list)
    latents: dict = field(default_factory=dict)
    n_marks: int = 3

    TENSOR_FIELDS = ("frames", "frame_lengths", "text", "retrieval", "upload_time", "event_dt", "event_marks",
                     "event_lengths", "dt_end", "window", "label")

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def subset(self, idx) -> "VideoData":
        idx = torch.as_tensor(idx, dtype=torch.long)
        kw = {f: getattr(self, f)[idx] for f in self.TENSOR_FIELDS}
        ids = [self.ids[i] for i in idx.tolist()] if self.ids else []
        lat = {k: v[idx] for k, v in self.latents.items()}
        return VideoData(**kw, ids=ids, latents=lat, n_marks=self.n_marks)

    def tensors(self) -> dict:
        return {f: getattr(self, f) for f in self.TENSOR_FIELDS}


def uniform_frame_grid(length: int, samples: int) -> np.ndarray:
    """MMRA's uniform sampling: `samples` frame indices by linspace over [0, length - 1]."""
    return np.unique(np.linspace(0, length - 1, samples).round().astype(np.int64))


def simulate_hawkes_exp(mu_early, mu_late, alpha, beta, t_obs, horizon, max_events, rng,
                        count_mark=1, max_total_events=20000):
    """Ogata thinning for n independent K-variate exponential-kernel Hawkes processes at once.

    lambda_k(t) = mu_k(t) + sum_{t_j < t} alpha[j_mark, k] exp(-beta (t - t_j)), where mu(t) is
    mu_early on [0, t_obs] and mu_late after it.

    Args: mu_early, mu_late (n, K) > 0; alpha (n, K, K) >= 0; beta (n,) > 0; t_obs, horizon floats.
    Returns dict: times (n, max_events + 1) and marks of the first max_events + 1 events inside
    [0, t_obs] (nan / -1 past their count), n_window (n,) events in [0, t_obs] (capped at
    max_events + 1), count (n,) events of mark `count_mark` in [0, horizon], total (n,) all events
    in [0, horizon].
    """
    n, K = mu_early.shape
    keep = max_events + 1
    times = np.full((n, keep), np.nan)
    marks = np.full((n, keep), -1, dtype=np.int64)
    n_window = np.zeros(n, dtype=np.int64)
    count = np.zeros(n, dtype=np.int64)
    total = np.zeros(n, dtype=np.int64)
    t = np.zeros(n)
    S = np.zeros((n, K))  # excitation part of the intensity at time t (just after it)
    idx = np.arange(n)
    while idx.size:
        early = t[idx] < t_obs
        mu = np.where(early[:, None], mu_early[idx], mu_late[idx])
        Sb = S[idx]
        lam_bar = (mu + Sb).sum(1)
        tn = t[idx] + rng.exponential(1.0, idx.size) / lam_bar
        u = rng.random(idx.size) * lam_bar
        # crossing the baseline change point: move to t_obs without an event, redraw from there
        cross = early & (tn > t_obs)
        tn = np.where(cross, t_obs, tn)
        decay = np.exp(-beta[idx] * (tn - t[idx]))
        Sn = Sb * decay[:, None]
        lam = mu + Sn
        accept = (u < lam.sum(1)) & ~cross & (tn <= horizon)
        k = np.minimum((np.cumsum(lam, 1) <= u[:, None]).sum(1), K - 1)
        a_idx = idx[accept]
        ka = k[accept]
        Sn[accept] += alpha[a_idx, ka, :]
        S[idx] = Sn
        t[idx] = tn
        in_win = accept & (tn <= t_obs)
        w_idx = idx[in_win]
        slot = n_window[w_idx]
        ok = slot < keep
        times[w_idx[ok], slot[ok]] = tn[in_win][ok]
        marks[w_idx[ok], slot[ok]] = k[in_win][ok]
        n_window[w_idx[ok]] += 1
        count[a_idx] += ka == count_mark
        total[a_idx] += 1
        alive = (tn <= horizon) & (total[idx] < max_total_events)
        idx = idx[alive]
    return {"times": times, "marks": marks, "n_window": n_window, "count": count, "total": total}


def _unit(x, axis=-1):
    return x / np.linalg.norm(x, axis=axis, keepdims=True)


def generate(config: SyntheticConfig | str = "small", seed: int = 0) -> VideoData:
    """Generate the synthetic dataset (see the module docstring for the generative model)."""
    if isinstance(config, str) and config not in PRESETS:
        raise ValueError(f"unknown preset {config!r}; expected one of {', '.join(PRESETS)}")
    cfg = PRESETS[config] if isinstance(config, str) else config
    rng = np.random.default_rng(seed)
    n, T, F, Z = cfg.n_videos, cfg.frames, cfg.frame_dim, cfg.latent_dim
    if n < 10 or T < 2 * cfg.uniform_samples // 2 or cfg.max_events < 1:
        raise ValueError(f"config too small: n_videos={n}, frames={T}, max_events={cfg.max_events}")

    # --- topics and content -------------------------------------------------------------------
    n_fine = max(cfg.n_coarse, n // cfg.videos_per_topic)
    coarse = _unit(rng.standard_normal((cfg.n_coarse, Z)))
    fine_parent = rng.integers(0, cfg.n_coarse, n_fine)
    fine = _unit(coarse[fine_parent] + 0.6 * _unit(rng.standard_normal((n_fine, Z))))
    topic = rng.integers(0, n_fine, n)
    z = fine[topic] + 0.25 * rng.standard_normal((n, Z)) / math.sqrt(Z)
    v = _unit(rng.standard_normal(Z))
    quality = z @ v
    quality = (quality - quality.mean()) / quality.std()

    # --- text and retrieval vectors ----------------------------------------------------------------
    Wt = rng.standard_normal((Z, cfg.text_dim)) / math.sqrt(Z)
    text = z @ Wt * 3.0 + 0.3 * rng.standard_normal((n, cfg.text_dim))
    Wr = rng.standard_normal((Z, cfg.retrieval_dim)) / math.sqrt(Z)
    retrieval = _unit(z @ Wr + 0.05 * rng.standard_normal((n, cfg.retrieval_dim)))

    # --- frames ----------------------------------------------------------------------------------
    Wf = rng.standard_normal((Z, F)) / math.sqrt(Z)
    marker = _unit(rng.standard_normal(F))
    value = rng.standard_normal(F)
    value = _unit(value - (value @ marker) * marker)
    frame_lengths = rng.integers(T // 2, T + 1, n)
    scene = (z @ Wf) * 3.0
    drift = np.cumsum(rng.standard_normal((n, T, F)) * 0.15, axis=1)
    frames = scene[:, None, :] + drift + 0.5 * rng.standard_normal((n, T, F))
    highlight = rng.standard_normal(n)
    highlight_idx = np.zeros((n, cfg.n_highlight), dtype=np.int64)
    for i in range(n):  # choice without replacement per video; n is at most a few 10k
        Ti = int(frame_lengths[i])
        grid = uniform_frame_grid(Ti, cfg.uniform_samples)
        allowed = np.setdiff1d(np.arange(Ti), grid)
        highlight_idx[i] = rng.choice(allowed, cfg.n_highlight, replace=False)
    rows = np.repeat(np.arange(n), cfg.n_highlight)
    cols = highlight_idx.reshape(-1)
    frames[rows, cols] += 3.0 * marker + 2.5 * np.repeat(highlight, cfg.n_highlight)[:, None] * value
    tmask = np.arange(T)[None, :] < frame_lengths[:, None]
    frames = frames * tmask[:, :, None]

    # --- topic popularity: a per-topic trend over upload time ------------------------------------
    upload = rng.random(n)
    n_steps = 32
    walk = np.cumsum(rng.standard_normal((n_fine, n_steps)) * (0.7 / math.sqrt(n_steps)), axis=1)
    trend = rng.standard_normal(n_fine)[:, None] + walk
    step = np.minimum((upload * n_steps).astype(np.int64), n_steps - 1)
    topic_pop = trend[topic, step]
    topic_pop = (topic_pop - topic_pop.mean()) / topic_pop.std()

    # --- engagement: 3-variate exponential Hawkes ---------------------------------------------------
    g = rng.standard_normal(n) * cfg.virality_scale
    branching = cfg.n_min + (cfg.n_max - cfg.n_min) / (1.0 + np.exp(-g))
    P = np.array([[0.6, 0.2, 0.2], [0.5, 0.4, 0.1], [0.3, 0.2, 0.5]])  # row j: what a mark-j event excites
    P = P / np.max(np.abs(np.linalg.eigvals(P)))
    beta = rng.uniform(*cfg.beta_range, n)
    alpha = branching[:, None, None] * beta[:, None, None] * P[None]
    base = np.asarray(cfg.base_rates)[None, :]
    mu_early = base * np.exp(cfg.w_quality * quality)[:, None]
    mu_late = base * np.exp(cfg.w_quality * quality + cfg.w_highlight * highlight + cfg.w_topic * topic_pop)[:, None]
    sim = simulate_hawkes_exp(mu_early, mu_late, alpha, beta, cfg.t_obs, cfg.horizon, cfg.max_events, rng,
                              count_mark=1, max_total_events=cfg.max_total_events)

    L = cfg.max_events
    nw = sim["n_window"]
    lengths = np.minimum(nw, L)
    times = sim["times"]
    # the window: [0, t_obs], or cut just before event L + 1 when there were more than L events
    window = np.where(nw > L, np.nan_to_num(times[:, L], nan=cfg.t_obs), cfg.t_obs)
    tk = np.nan_to_num(times[:, :L], nan=0.0)
    prev = np.concatenate([np.zeros((n, 1)), tk[:, :-1]], axis=1)
    valid = np.arange(L)[None, :] < lengths[:, None]
    dt = np.where(valid, tk - prev, 0.0)
    last = np.where(lengths > 0, tk[np.arange(n), np.maximum(lengths - 1, 0)], 0.0)
    dt_end = np.maximum(window - last, 0.0)
    ev_marks = np.where(valid, sim["marks"][:, :L], 0)
    label = np.log2(1.0 + sim["count"])

    def f32(x):
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))

    def i64(x):
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64))

    return VideoData(
        frames=f32(frames), frame_lengths=i64(frame_lengths), text=f32(text), retrieval=f32(retrieval),
        upload_time=f32(upload), event_dt=f32(dt), event_marks=i64(ev_marks), event_lengths=i64(lengths),
        dt_end=f32(dt_end), window=f32(window), label=f32(label), ids=[f"syn{seed}-{i:06d}" for i in range(n)],
        latents={"quality": f32(quality), "highlight": f32(highlight), "topic_pop": f32(topic_pop),
                 "branching": f32(branching), "beta": f32(beta), "topic": i64(topic),
                 "highlight_idx": i64(highlight_idx), "comments": i64(sim["count"]),
                 "events_total": i64(sim["total"])},
    )
