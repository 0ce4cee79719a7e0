"""Sampler, prediction and GOF of mvpp.pointprocess against closed-form exponential-Hawkes oracles.

Statistical checks are deterministic (fixed generators) and never rely on a KS p-value alone: each
also asserts a moment (mean count, mean gap) within 4 standard errors of its closed form."""
import math

import pytest
import torch

from mvpp.pointprocess import (ExpHawkes, MHPModel, gap_compensators, gof, ks_exp1, predict_next, qq_plot,
                               sample, tail_compensator, tail_intensity, time_rescaling)

MU2 = [0.5, 0.3]
ALPHA2 = [[0.3, 0.2], [0.1, 0.4]]
BETA = 2.0


def _counts(r, K):
    valid = torch.arange(r.times.shape[1])[None, :] < r.lengths[:, None]
    return torch.stack([((r.marks == k) & valid).sum(1) for k in range(K)], 1).double()


def test_mean_count_closed_form_univariate_formula():
    mu, a, b = 0.7, 0.6, 1.5
    m = ExpHawkes([mu], [[a]], b)
    T = 7.0
    # scalar solution of lambda' = -(b - a b) lambda + b mu, lambda(0) = mu (independent derivation)
    r = b * (1 - a)
    lam_inf = mu / (1 - a)
    expect = lam_inf * T + (mu - lam_inf) * (1 - math.exp(-r * T)) / r
    assert float(m.mean_count(T)[0]) == pytest.approx(expect, rel=1e-10)


def test_sampler_mean_count_multivariate():
    m = ExpHawkes(MU2, ALPHA2, BETA)
    g = torch.Generator().manual_seed(1)
    T = 8.0
    r = sample(m, T, 1200, generator=g)
    c = _counts(r, 2)
    se = c.std(0) / math.sqrt(c.shape[0])
    z = (c.mean(0) - m.mean_count(T)) / se
    assert bool((z.abs() < 4).all()), z
    # variable horizons: each row ends by its own T
    Tv = torch.linspace(1.0, 6.0, 50, dtype=torch.float64)
    rv = sample(m, Tv, generator=g)
    last = rv.times.gather(1, (rv.lengths - 1).clamp(min=0)[:, None]).squeeze(1)
    assert bool(((last < Tv) | (rv.lengths == 0)).all())


def test_first_event_and_second_gap_distribution():
    mu, a, b = 0.8, 0.5, 2.0
    m = ExpHawkes([mu], [[a]], b)
    g = torch.Generator().manual_seed(2)
    r = sample(m, 50.0, 2000, max_events=2, generator=g)
    assert bool((r.lengths == 2).all())
    t1 = r.times[:, 0]
    # first event from an empty history: Exp(mu)
    n = t1.numel()
    assert abs(float(t1.mean()) - 1 / mu) < 4 * (1 / mu) / math.sqrt(n)
    assert ks_exp1(t1 * mu)[1] > 0.01
    # second gap: survival exp(-(mu tau + a (1 - e^{-b tau}))) in closed form
    tau = r.times[:, 1] - t1
    z = mu * tau + a * (-torch.expm1(-b * tau))
    assert abs(float(z.mean()) - 1) < 4 / math.sqrt(n)
    assert ks_exp1(z)[1] > 0.01


def test_gof_exp_hawkes_and_misspecification():
    m = ExpHawkes(MU2, ALPHA2, BETA)
    g = torch.Generator().manual_seed(3)
    T = 8.0
    r = sample(m, T, 300, generator=g)
    res = gof(m, r.times, r.marks, r.lengths, T)
    for key in ("overall", 0, 1):
        n, D, p = res[key]
        x = res["residuals"][key]
        assert n > 500 and abs(float(x.mean()) - 1) < 4 / math.sqrt(n)
        assert p > 0.01
    # a Poisson model with the right mean rate but no excitation is rejected
    rate = m.mean_count(T) / T
    pois = ExpHawkes(rate, [[0.0, 0.0], [0.0, 0.0]], BETA)
    assert gof(pois, r.times, r.marks, r.lengths, T)["overall"][2] < 1e-4
    # the compensators over all gaps add up to the closed-form Lambda(T) of each sequence
    G = gap_compensators(m, r.times[:3], r.marks[:3], r.lengths[:3], T)
    for bi in range(3):
        n_b = int(r.lengths[bi])
        tb, kb = r.times[bi, :n_b], r.marks[bi, :n_b]
        alpha = torch.tensor(ALPHA2, dtype=torch.float64)
        tot = sum(MU2) * T + sum(float(alpha[:, kb[j]].sum()) * (1 - math.exp(-BETA * (T - float(tb[j]))))
                                  for j in range(n_b))
        assert float(G[bi].sum()) == pytest.approx(tot, rel=1e-10)


def test_ks_matches_scipy_if_available():
    stats = pytest.importorskip("scipy.stats")
    x = torch.empty(300, dtype=torch.float64).exponential_(1.3, generator=torch.Generator().manual_seed(4))
    D, p = ks_exp1(x)
    ref = stats.kstest(x.numpy(), "expon")
    assert D == pytest.approx(ref.statistic, abs=1e-12)
    assert p == pytest.approx(ref.pvalue, abs=5e-3)


def test_predict_next_oracles():
    # Poisson: closed forms
    m = ExpHawkes([0.4, 1.1], [[0.0, 0.0], [0.0, 0.0]], 1.0)
    times = torch.tensor([[0.5, 1.0]], dtype=torch.float64)
    marks = torch.tensor([[0, 1]])
    p = predict_next(m, times, marks, quantiles=(0.25, 0.5, 0.9))
    assert float(p["mean"][0]) == pytest.approx(1 / 1.5, rel=1e-6)
    for q, v in zip((0.25, 0.5, 0.9), p["quantiles"][0]):
        assert float(v) == pytest.approx(-math.log1p(-q) / 1.5, rel=1e-9)
    assert torch.allclose(p["mark_probs"][0], torch.tensor([0.4, 1.1], dtype=torch.float64) / 1.5, atol=1e-6)
    # univariate Hawkes after one event at t1: S(tau) = exp(-(mu tau + a (1 - e^{-b tau})))
    mu, a, b = 0.5, 0.7, 3.0
    m = ExpHawkes([mu], [[a]], b)
    p = predict_next(m, torch.tensor([[2.0]], dtype=torch.float64), torch.tensor([[0]]), quantiles=(0.5,))
    tau = torch.linspace(0, 80, 800_001, dtype=torch.float64)
    S = torch.exp(-(mu * tau + a * (-torch.expm1(-b * tau))))
    assert float(p["mean"][0]) == pytest.approx(float(torch.trapezoid(S, tau)), rel=1e-5)
    med = float(p["quantiles"][0, 0])
    assert math.exp(-(mu * med + a * (1 - math.exp(-b * med)))) == pytest.approx(0.5, abs=1e-9)
    assert float(p["expected_time"][0]) == pytest.approx(2.0 + float(p["mean"][0]))


def test_bad_input():
    m = ExpHawkes(MU2, ALPHA2, BETA)
    with pytest.raises(ValueError, match="sorted"):
        m.tail(torch.tensor([[1.0, 0.5]], dtype=torch.float64), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="marks"):
        m.tail(torch.tensor([[0.1, 0.5]], dtype=torch.float64), torch.tensor([[0, 2]]))
    with pytest.raises(ValueError, match="T"):
        sample(m, -1.0, 3)
    with pytest.raises(ValueError, match="batch"):
        sample(m, 1.0)


@pytest.fixture(scope="module")
def mhp():
    from mvpp.models.mhp import MHPEncoder

    torch.manual_seed(0)
    enc = MHPEncoder(n_marks=2, d_model=8, d_state=4, time_scale=2.0).eval()
    return enc, MHPModel(enc)


def test_mhp_tail_matches_intensity_and_loglik(mhp):
    enc, mm = mhp
    g = torch.Generator().manual_seed(5)
    T = 6.0
    r = sample(mm, T, 6, generator=g)
    B = 6
    tn = r.times.gather(1, (r.lengths - 1).clamp(min=0)[:, None]).squeeze(1) * (r.lengths > 0)
    q = tn[:, None] + torch.rand(B, 4, dtype=torch.float64, generator=g) * (T - tn[:, None])
    mu, a, b = mm.tail(r.times, r.marks, r.lengths)
    assert bool((a >= 0).all() and (b >= 0).all())
    dt = torch.diff(r.times, dim=1, prepend=torch.zeros(B, 1, dtype=torch.float64)).clamp(min=0).float()
    ref = enc.intensity(dt, r.marks, r.lengths, torch.zeros(B), q.float()).double() * enc.time_scale
    assert torch.allclose(tail_intensity(mu, a, b, q - tn[:, None]), ref, rtol=1e-4, atol=1e-6)
    # fused-prefix gap compensators == the generic tail recursion, and they reproduce the encoder's loglik
    G = gap_compensators(mm, r.times, r.marks, r.lengths, T)

    class Generic:
        K = 2
        tail = mm.tail

    assert torch.allclose(G, gap_compensators(Generic(), r.times, r.marks, r.lengths, T), rtol=1e-4, atol=1e-6)
    out = enc(dt, r.marks, r.lengths, (T - tn).float())
    for bi in range(B):
        n = int(r.lengths[bi])
        logs = 0.0
        for i in range(n):
            mu_i, a_i, b_i = mm.tail(r.times[bi:bi + 1, :i], r.marks[bi:bi + 1, :i], torch.tensor([i]))
            t_prev = float(r.times[bi, i - 1]) if i else 0.0
            lam = tail_intensity(mu_i, a_i, b_i, torch.tensor([float(r.times[bi, i]) - t_prev], dtype=torch.float64))
            logs += math.log(float(lam[0, r.marks[bi, i]]) / enc.time_scale)  # loglik is in scaled time
        assert float(out["loglik"][bi].detach()) == pytest.approx(logs - float(G[bi].sum()), rel=1e-4, abs=1e-4)


def test_mhp_sampler_ks_and_martingale(mhp, tmp_path):
    enc, mm = mhp
    g = torch.Generator().manual_seed(6)
    T = 8.0
    r = sample(mm, T, 150, generator=g)
    res = gof(mm, r.times, r.marks, r.lengths, T)
    n, D, p = res["overall"]
    assert n > 500 and p > 0.01
    assert abs(float(res["residuals"]["overall"].mean()) - 1) < 4 / math.sqrt(n)
    # E[N(T) - Lambda(T)] = 0 (compensator martingale), within 4 standard errors
    G = gap_compensators(mm, r.times, r.marks, r.lengths, T)
    d = r.lengths.double() - G.sum((1, 2))
    assert abs(float(d.mean())) < 4 * float(d.std()) / math.sqrt(d.numel())
    pytest.importorskip("matplotlib")
    path = qq_plot(res["residuals"], str(tmp_path / "qq.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
