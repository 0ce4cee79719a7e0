"""Fitting an MHPEncoder to event sequences by exact maximum likelihood, events files, next-event metrics."""
from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass, field

import torch

from . import MHPModel, _check_history, _last_time, predict_next

__all__ = ["EventData", "read_events_csv", "write_events_csv", "fit_mhp", "mhp_loglik_per_event",
           "next_event_metrics", "save_mhp", "load_mhp"]


@dataclass
class EventData:
    times: torch.Tensor  # (B, L) float64, padded with 0
    marks: torch.Tensor  # (B, L) int64
    lengths: torch.Tensor  # (B,)
    T: torch.Tensor  # (B,) window ends
    seq_ids: list = field(default_factory=list)
    mark_names: list = field(default_factory=list)

    def subset(self, idx):
        idx = torch.as_tensor(idx, dtype=torch.int64)
        L = int(self.lengths[idx].max()) if len(idx) else 0
        return EventData(self.times[idx, :L], self.marks[idx, :L], self.lengths[idx], self.T[idx],
                         [self.seq_ids[i] for i in idx.tolist()], list(self.mark_names))


def from_lists(seqs, K, T=None):
    """seqs: list of (times list, marks list) -> EventData; T None: each sequence's last time."""
    B = len(seqs)
    L = max((len(t) for t, _ in seqs), default=0)
    times = torch.zeros(B, L, dtype=torch.float64)
    marks = torch.zeros(B, L, dtype=torch.int64)
    lengths = torch.tensor([len(t) for t, _ in seqs], dtype=torch.int64)
    for b, (t, m) in enumerate(seqs):
        times[b, :len(t)] = torch.as_tensor(t, dtype=torch.float64)
        marks[b, :len(m)] = torch.as_tensor(m, dtype=torch.int64)
    last = _last_time(times, lengths)
    Tt = last.clone() if T is None else torch.as_tensor(T, dtype=torch.float64).expand(B).clone()
    return EventData(times, marks, lengths, Tt, list(range(B)), [str(k) for k in range(K)])


def read_events_csv(path: str, mark_names=None, horizon=None) -> EventData:
    """CSV with a header naming columns seq, time, mark (any order, extra columns ignored). Rows of a
    sequence must be in time order (times >= 0, gaps >= 0); marks are names (strings). With mark_names
    (a fitted model's vocabulary) an unknown mark is an error; otherwise the vocabulary is the sorted set
    (numerically if every mark is an integer). Window end: `horizon` if given, else each sequence's last time."""
    with open(path, newline="") as f:
        rd = csv.DictReader(f)
        cols = [c.strip().lower() for c in (rd.fieldnames or [])]
        need = {"seq", "time", "mark"}
        if not need <= set(cols):
            raise ValueError(f"{path}: the header must name the columns seq, time, mark; got {rd.fieldnames}")
        rd.fieldnames = cols
        seqs: dict = {}
        for line, row in enumerate(rd, start=2):
            try:
                t = float(row["time"])
            except (TypeError, ValueError):
                raise ValueError(f"{path}:{line}: time {row['time']!r} is not a number") from None
            if not math.isfinite(t) or t < 0:
                raise ValueError(f"{path}:{line}: time must be finite and >= 0, got {row['time']!r}")
            sid, mk = row["seq"].strip(), row["mark"].strip()
            ts, ms = seqs.setdefault(sid, ([], []))
            if ts and t < ts[-1]:
                raise ValueError(f"{path}:{line}: times of sequence {sid!r} are not sorted (negative gap: "
                                 f"{t} after {ts[-1]}); sort the rows of each sequence by time")
            ts.append(t)
            ms.append(mk)
    if not seqs:
        raise ValueError(f"{path}: no events")
    if mark_names is None:
        names = {m for _, ms in seqs.values() for m in ms}
        try:
            mark_names = [str(v) for v in sorted(int(n) for n in names)]
            if set(mark_names) != names:
                raise ValueError
        except ValueError:
            mark_names = sorted(names)
    index = {n: i for i, n in enumerate(mark_names)}
    lists = []
    for sid, (ts, ms) in seqs.items():
        bad = [m for m in ms if m not in index]
        if bad:
            raise ValueError(f"{path}: sequence {sid!r} has mark {bad[0]!r}, unknown to the model "
                             f"(known marks: {', '.join(mark_names)})")
        lists.append((ts, [index[m] for m in ms]))
    data = from_lists(lists, len(mark_names), horizon)
    if horizon is not None and bool((data.T < _last_time(data.times, data.lengths)).any()):
        raise ValueError(f"--horizon {horizon} is before the last event of some sequence")
    data.seq_ids = list(seqs)
    data.mark_names = list(mark_names)
    return data


def write_events_csv(path: str, data: EventData) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seq", "time", "mark"])
        for b in range(data.times.shape[0]):
            for i in range(int(data.lengths[b])):
                w.writerow([data.seq_ids[b], repr(float(data.times[b, i])), data.mark_names[int(data.marks[b, i])]])


def _gaps(data: EventData):
    lengths, valid, tv, gaps = _check_history(data.times, data.marks, data.lengths, len(data.mark_names) or
                                              int(data.marks.max()) + 1)
    tn = _last_time(tv, lengths)
    return gaps.float(), (data.T - tn).float()


def mhp_loglik_per_event(enc, data: EventData) -> float:
    """Exact log-likelihood per event in the data's time unit (the encoder's is in scaled time)."""
    dt, dt_end = _gaps(data)
    with torch.no_grad():
        ll = enc(dt, data.marks, data.lengths, dt_end)["loglik"].double()
    n = data.lengths.double()
    return float((ll + n * math.log(enc.time_scale)).sum() / n.sum().clamp(min=1))


def fit_mhp(data: EventData, n_marks: int, *, epochs: int = 20, batch_size: int = 32, lr: float = 1e-2,
            d_model: int = 16, d_state: int = 4, seed: int = 0, log=None):
    """Fit MHPEncoder + HawkesHead by maximising the exact log-likelihood (Adam). Returns (encoder, history)
    with history a list of {epoch, loglik_per_event, seconds}."""
    from mvpp.models.mhp import MHPEncoder

    torch.manual_seed(seed)
    dt, dt_end = _gaps(data)
    valid = torch.arange(dt.shape[1])[None, :] < data.lengths[:, None]
    med = float(dt[valid & (dt > 0)].median()) if bool((valid & (dt > 0)).any()) else 1.0
    enc = MHPEncoder(n_marks=n_marks, d_model=d_model, d_state=d_state, d_out=8, time_scale=1.0 / med)
    opt = torch.optim.Adam(enc.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    B = dt.shape[0]
    hist = []
    for ep in range(epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(B, generator=g)
        enc.train()
        for lo in range(0, B, batch_size):
            idx = perm[lo:lo + batch_size]
            n = data.lengths[idx]
            L = int(n.max())
            if L == 0:
                continue
            out = enc(dt[idx, :L], data.marks[idx, :L], n, dt_end[idx])
            loss = -out["loglik"].sum() / n.sum().clamp(min=1)
            opt.zero_grad()
            loss.backward()
            opt.step()
        enc.eval()
        sec = time.perf_counter() - t0
        hist.append({"epoch": ep + 1, "loglik_per_event": mhp_loglik_per_event(enc, data), "seconds": sec})
        if log:
            log(f"epoch {ep + 1}: train loglik/event {hist[-1]['loglik_per_event']:.4f} ({sec:.2f} s)")
    return enc, hist


@torch.no_grad()
def next_event_metrics(model, data: EventData, max_prefixes: int = 20000):
    """Predict event i+1 from events 1..i (i = 1..n-1) of every sequence: RMSE of the expected time and
    accuracy of the most likely mark. Returns {'rmse', 'mark_acc', 'n'}."""
    rows, pref = [], []
    for b in range(data.times.shape[0]):
        for i in range(1, int(data.lengths[b])):
            rows.append(b)
            pref.append(i)
    rows, pref = rows[:max_prefixes], pref[:max_prefixes]
    if not rows:
        return {"rmse": float("nan"), "mark_acc": float("nan"), "n": 0}
    rb, ri = torch.tensor(rows), torch.tensor(pref)
    L = int(ri.max())
    times = data.times[rb, :L] * (torch.arange(L)[None, :] < ri[:, None])
    marks = data.marks[rb, :L] * (torch.arange(L)[None, :] < ri[:, None])
    err, hit = [], []
    for lo in range(0, len(rb), 512):
        sl = slice(lo, lo + 512)
        p = predict_next(model, times[sl], marks[sl], ri[sl], quantiles=())
        t_true = data.times[rb[sl], ri[sl]]
        err.append(p["expected_time"] - t_true)
        hit.append((p["mark_probs"].argmax(-1) == data.marks[rb[sl], ri[sl]]).double())
    err, hit = torch.cat(err), torch.cat(hit)
    return {"rmse": float(err.pow(2).mean().sqrt()), "mark_acc": float(hit.mean()), "n": int(err.numel())}


def save_mhp(path: str, enc, mark_names) -> None:
    from safetensors.torch import save_file

    meta = {"kind": "mvpp.hawkes.MHPEncoder", "n_marks": str(enc.n_marks), "d_model": str(enc.d_model),
            "d_state": str(enc.d_state), "time_scale": repr(enc.time_scale), "mark_names": "\x1f".join(mark_names),
            "conv_width": str(enc.conv_weight.shape[1]), "d_out": str(enc.out_proj.out_features)}
    save_file({k: v.detach().contiguous() for k, v in enc.state_dict().items()}, path, metadata=meta)


def load_mhp(path: str):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from mvpp.models.mhp import MHPEncoder

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if meta.get("kind") != "mvpp.hawkes.MHPEncoder":
        raise ValueError(f"{path} is not a model written by `mvpp hawkes fit`")
    enc = MHPEncoder(n_marks=int(meta["n_marks"]), d_model=int(meta["d_model"]), d_state=int(meta["d_state"]),
                     d_out=int(meta["d_out"]), conv_width=int(meta["conv_width"]), time_scale=float(meta["time_scale"]))
    enc.load_state_dict(load_file(path))
    enc.eval()
    return enc, meta["mark_names"].split("\x1f")
