"""The self-correcting process (mvpp.pointprocess.classic.SelfCorrecting), the non-Hawkes oracle of the
EasyTPP comparison: exact sampler, closed-form compensator and log-likelihood.

Deterministic (fixed generators); the statistical checks pair a KS test with a moment within 4 standard
errors of a value computed independently (numerical quadrature of the survival function)."""
import math

import pytest
import torch

from mvpp.pointprocess import ks_exp1
from mvpp.pointprocess.classic import SelfCorrecting

PROC = SelfCorrecting(mu=0.8, alpha=0.6, p=(0.7, 0.3))


def _draw(n=600, T=12.0, seed=0):
    return PROC.sample(T, n, generator=torch.Generator().manual_seed(seed))


def test_time_rescaled_gaps_are_exp1_and_marks_follow_p():
    times, marks, lengths = _draw()
    assert int(lengths.min()) >= 1 and times.shape[1] == int(lengths.max())
    valid = torch.arange(times.shape[1])[None, :] < lengths[:, None]
    # sorted, inside the window, padding zeroed
    assert bool((torch.diff(times, dim=1)[valid[:, 1:]] > 0).all()) and bool((times[valid] <= 12.0).all())
    assert bool((times[~valid] == 0).all())
    G = PROC.gap_compensators(times, marks, lengths, 12.0)
    # Lambda over each gap ending at an event is i.i.d. Exp(1) for an exact sampler; the gaps near T are
    # censored by the window (a long last gap is never seen), so test the first m gaps of every sequence,
    # which end well before T (all sequences have more than m events).
    m = 6
    assert int(lengths.min()) > m
    resid = G[:, :m].flatten()
    D, p = ks_exp1(resid)
    assert p > 0.01, (D, p)
    n = resid.numel()
    assert abs(float(resid.mean()) - 1.0) < 4 / math.sqrt(n)
    frac = float((marks[valid] == 0).double().mean())
    nm = int(valid.sum())
    assert abs(frac - 0.7) < 4 * math.sqrt(0.7 * 0.3 / nm)


def test_first_event_mean_matches_quadrature():
    times, _, lengths = _draw(n=4000, T=30.0, seed=1)
    assert bool((lengths >= 1).all())
    t1 = times[:, 0]
    # E t_1 = int_0^inf exp(-(e^{mu t} - 1) / mu) dt, by a fine trapezoid rule (the integrand is ~0 by t = 8)
    s = torch.linspace(0, 8, 200001, dtype=torch.float64)
    surv = torch.exp(-torch.expm1(PROC.mu * s) / PROC.mu)
    mean = float(torch.trapezoid(surv, s))
    se = float(t1.std()) / math.sqrt(len(t1))
    assert abs(float(t1.mean()) - mean) < 4 * se, (float(t1.mean()), mean, se)


def test_loglik_matches_numerical_integral():
    times, marks, lengths = _draw(n=5, T=6.0, seed=2)
    ll = PROC.loglik(times, marks, lengths, 6.0)
    grid = torch.linspace(0, 6.0, 600001, dtype=torch.float64)
    for b in range(5):
        n = int(lengths[b])
        tb = times[b, :n]
        N = torch.searchsorted(tb, grid, right=False).double()  # events strictly before each grid point
        integral = float(torch.trapezoid(torch.exp(PROC.mu * grid - PROC.alpha * N), grid))
        logs = sum(math.log(float(PROC.p[marks[b, i]])) + PROC.mu * float(tb[i]) - PROC.alpha * i for i in range(n))
        assert abs(float(ll[b]) - (logs - integral)) < 1e-3 * max(1.0, abs(logs - integral)), b


@pytest.mark.parametrize("kwargs, msg", [
    (dict(mu=0.0, alpha=1.0), "mu must be"),
    (dict(mu=1.0, alpha=float("nan")), "alpha must be"),
    (dict(mu=1.0, alpha=1.0, p=(0.5, 0.6)), "probability vector"),
    (dict(mu=1.0, alpha=1.0, p=()), "probability vector"),
])
def test_bad_parameters(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        SelfCorrecting(**kwargs)


def test_bad_sampling_arguments():
    with pytest.raises(ValueError, match="T must be"):
        PROC.sample(-1.0, 3)
    with pytest.raises(ValueError, match="batch must be"):
        PROC.sample(1.0, 0)
    with pytest.raises(RuntimeError, match="max_events"):
        PROC.sample(50.0, 2, max_events=3, generator=torch.Generator().manual_seed(0))
