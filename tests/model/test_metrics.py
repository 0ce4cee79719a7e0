import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from mvpp.metrics import all_metrics, mae, mmra_batch_metrics, nmse, src


def test_hand_computed():
    true = [1.0, 2.0, 3.0, 4.0]
    pred = [1.5, 2.0, 2.0, 5.0]
    # MSE = (0.25 + 0 + 1 + 1) / 4 = 0.5625; population variance of 1..4 = 1.25
    assert nmse(pred, true) == pytest.approx(0.5625 / 1.25)
    assert mae(pred, true) == pytest.approx((0.5 + 0 + 1 + 1) / 4)
    # ranks pred: 1, 2.5, 2.5, 4 vs 1, 2, 3, 4
    assert src(pred, true) == pytest.approx(spearmanr(pred, true).statistic)


def test_against_scipy_random():
    rng = np.random.default_rng(1)
    t = rng.normal(size=1000)
    p = t + rng.normal(size=1000)
    assert src(p, t) == pytest.approx(spearmanr(p, t).statistic, rel=1e-12)
    assert nmse(torch.tensor(p), torch.tensor(t)) == pytest.approx(np.mean((p - t) ** 2) / np.var(t))


def test_mmra_per_batch_convention():
    rng = np.random.default_rng(2)
    t = rng.normal(size=600)
    p = t + rng.normal(scale=0.5, size=600)
    out = mmra_batch_metrics(p, t, batch_size=256)
    assert out["n_batches"] == 3
    exp_nmse = np.mean([np.mean((p[s:s + 256] - t[s:s + 256]) ** 2) / np.var(t[s:s + 256]) for s in (0, 256, 512)])
    exp_src = np.mean([spearmanr(p[s:s + 256], t[s:s + 256]).statistic for s in (0, 256, 512)])
    assert out["nmse"] == pytest.approx(exp_nmse)
    assert out["src"] == pytest.approx(exp_src)
    # per-batch differs from global in general
    assert out["nmse"] != pytest.approx(nmse(p, t), rel=1e-9)
    allm = all_metrics(p, t)
    assert allm["batch_nmse"] == pytest.approx(out["nmse"]) and allm["nmse"] == pytest.approx(nmse(p, t))


def test_degenerate_and_bad_input():
    assert np.isnan(nmse([1.0, 2.0], [3.0, 3.0]))
    assert np.isnan(src([1.0, 1.0], [1.0, 2.0]))
    with pytest.raises(ValueError, match="pred has 2 values but true has 3"):
        nmse([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="empty"):
        mae([], [])
    with pytest.raises(ValueError, match="NaN"):
        mae([float("nan")], [1.0])
