"""nMSE, MAE and SRC (Spearman rank correlation), globally and in MMRA's per-batch convention.

MMRA's evaluation (ICDM-UESTC/MMRA) walks the test set in unshuffled batches of 256 and, per
batch, computes nMSE = MSE / population variance of that batch's labels (numpy's default
ddof=0), MAE and SRC; the reported numbers are the means over batches. Per-batch nMSE is not the
same as the global one (a batch with a small label spread weighs more), so both are reported.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr

__all__ = ["nmse", "mae", "src", "regression_metrics", "mmra_batch_metrics", "all_metrics"]


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _pair(pred, true):
    p, t = _np(pred), _np(true)
    if p.shape != t.shape:
        raise ValueError(f"pred has {p.size} values but true has {t.size}")
    if p.size == 0:
        raise ValueError("metrics of an empty set are undefined")
    if not (np.isfinite(p).all() and np.isfinite(t).all()):
        raise ValueError("pred/true contain NaN or inf")
    return p, t


def nmse(pred, true) -> float:
    """MSE divided by the population variance of `true` (nan if `true` is constant)."""
    p, t = _pair(pred, true)
    var = t.var()
    return float(np.mean((p - t) ** 2) / var) if var > 0 else float("nan")


def mae(pred, true) -> float:
    p, t = _pair(pred, true)
    return float(np.mean(np.abs(p - t)))


def src(pred, true) -> float:
    """Spearman's rank correlation (average ranks for ties; nan if either side is constant)."""
    p, t = _pair(pred, true)
    if p.size < 2 or np.all(p == p[0]) or np.all(t == t[0]):
        return float("nan")
    return float(spearmanr(p, t).statistic)


def regression_metrics(pred, true) -> dict:
    return {"nmse": nmse(pred, true), "mae": mae(pred, true), "src": src(pred, true)}


def mmra_batch_metrics(pred, true, batch_size: int = 256) -> dict:
    """MMRA's convention: per unshuffled batch of `batch_size`, then the mean over batches.

    Batches whose metric is undefined (constant labels, a single item) are left out of that
    metric's mean; `n_batches` counts all batches.
    """
    p, t = _pair(pred, true)
    vals = {"nmse": [], "mae": [], "src": []}
    n_batches = 0
    for s in range(0, p.size, batch_size):
        pb, tb = p[s: s + batch_size], t[s: s + batch_size]
        n_batches += 1
        for k, fn in (("nmse", nmse), ("mae", mae), ("src", src)):
            v = fn(pb, tb)
            if np.isfinite(v):
                vals[k].append(v)
    out = {k: (float(np.mean(v)) if v else float("nan")) for k, v in vals.items()}
    out["n_batches"] = n_batches
    return out


def all_metrics(pred, true, batch_size: int = 256) -> dict:
    """{"nmse", "mae", "src"} globally plus the same with a "batch_" prefix in MMRA's convention."""
    g = regression_metrics(pred, true)
    b = mmra_batch_metrics(pred, true, batch_size)
    g.update({f"batch_{k}": v for k, v in b.items() if k != "n_batches"})
    return g
