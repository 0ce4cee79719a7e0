"""Point-process toolkit benchmarks (CPU): exact Ogata sampling and time-rescaling GOF of an MHPEncoder,
and the exact compensator (fused mhp_scan integral) vs EasyTPP-style 20-point grid integration of the
same intensity. The full EasyTPP side-by-side is `python benchmarks/easytpp_compare.py`.

    pytest benchmarks/test_bench_pointprocess.py --benchmark-only
With MVPP_BENCH_SMOKE=1 (a plain `pytest`) each case runs once on tiny shapes.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import smoke
from mvpp.pointprocess import ExpHawkes, MHPModel, gap_compensators, gof, sample


def _model():
    from mvpp.models.mhp import MHPEncoder

    torch.manual_seed(0)
    return MHPModel(MHPEncoder(n_marks=2, d_model=16, d_state=4, time_scale=1.0).eval())


@pytest.mark.parametrize("which", ["exp_hawkes", "mhp"])
def test_bench_sample(benchmark, which):
    n, T = (4, 3.0) if smoke() else (64, 20.0)
    model = ExpHawkes([0.5, 0.3], [[0.3, 0.2], [0.1, 0.4]], 2.0) if which == "exp_hawkes" else _model()
    benchmark.extra_info.update(provider=f"ogata_{which}", batch=n, T=T)
    r = benchmark.pedantic(lambda: sample(model, T, n, generator=torch.Generator().manual_seed(0)),
                           rounds=1 if smoke() else 3, iterations=1)
    assert int(r.lengths.sum()) > 0


def test_bench_gof_mhp(benchmark):
    n, T = (4, 3.0) if smoke() else (64, 20.0)
    model = _model()
    r = sample(model, T, n, generator=torch.Generator().manual_seed(1))
    benchmark.extra_info.update(provider="gof_mhp_fused_prefix", batch=n, events=int(r.lengths.sum()))
    res = benchmark.pedantic(lambda: gof(model, r.times, r.marks, r.lengths, T), rounds=1 if smoke() else 3,
                             iterations=1)
    assert 0 <= res["overall"][2] <= 1
    G = gap_compensators(model, r.times, r.marks, r.lengths, T)
    assert bool((G >= 0).all())
