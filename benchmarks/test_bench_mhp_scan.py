"""mhp_scan benchmarks: ours on each backend vs an eager Mamba-Hawkes baseline and vs selective_scan
alone; the classic Hawkes log-likelihood vs tick and hawkesbook.

    pytest benchmarks/test_bench_mhp_scan.py --benchmark-only --benchmark-json=benchmarks/results/mhp_scan_cpu.json
    python -m benchmarks.test_bench_mhp_scan [--threads 1 --cpu-time]   # the CPU targets' ratios, interleaved

Providers (extra_info["provider"]):
- mhp_scan_<backend>: the fused op (y, y_left and the exact integral in one pass).
- eager_baseline: how public Mamba-Hawkes / neural point-process code does it: an eager PyTorch
  scan that keeps every state, then a Monte Carlo estimate of the integral with 20 uniform
  samples per gap (each sample re-reads the (batch, dim, N, L) states).
- selective_scan_<backend>: the discrete scan alone on the same backend (the cost of the fusion).
The eager baseline's fwd+bwd holds about 2 x 20 (batch, dim, N, L) tensors for autograd; at the
long shape that is > 10 GB, so there it runs forward only (recorded as such).

Hawkes likelihood (op "hawkes_loglik"): a padded batch of univariate exponential-kernel Hawkes
sequences simulated by tick; ours = mhp_scan (cpu, float64) + hawkes_loglik; tick = its C++
ModelHawkesExpKernLogLik loss per sequence; hawkesbook = exp_log_likelihood per sequence.
With MVPP_BENCH_SMOKE=1 (a plain `pytest`) every case runs once on tiny shapes.
"""
from __future__ import annotations

import os
import statistics
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import run_pedantic
from mvpp_kernels import hawkes_loglik, mhp_scan, selective_scan
from mvpp_kernels._backend import has_compiled_kernel
from mvpp_kernels.testing import make_selective_scan_inputs

# Read at collection time (the root conftest sets it in pytest_configure, after benchmarks/conftest.py
# was imported, so that module's SMOKE constant can be stale).
SMOKE = os.environ.get("MVPP_BENCH_SMOKE", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
SHAPES = [(2, 4, 4, 16), (2, 8, 4, 33)] if SMOKE else [(256, 64, 16, 128), (8, 256, 16, 2048)]
MC_SAMPLES = 20


def _backends():
    if HAS_CUDA:
        return ["cuda", "triton"]
    return ["cpu", "reference"]


def _available(backend: str) -> bool:
    if backend == "cpu":
        return has_compiled_kernel("mhp_scan_fwd", "CPU")
    if backend == "cuda":
        return has_compiled_kernel("mhp_scan_fwd", "CUDA")
    if backend == "triton":
        try:
            from mvpp_kernels.ops.mhp_scan import triton  # noqa: F401
        except Exception:
            return False
        return HAS_CUDA
    return True


def make_inputs(batch, dim, N, L, dtype=torch.float32, device=DEVICE, requires_grad=False):
    inp = make_selective_scan_inputs(batch, dim, N, L, dtype=dtype, device=device, seed=0)
    g = torch.Generator().manual_seed(1)
    inp["dt"] = torch.distributions.Exponential(1.0).sample((batch, L)).to(device, torch.float32)
    inp["dt_end"] = torch.rand(batch, generator=g).to(device)
    if requires_grad:
        for v in inp.values():
            if v is not None and v.is_floating_point():
                v.requires_grad_(True)
    return inp


def eager_mamba_hawkes(u, delta, A, B, C, dt, D, z, delta_bias, dt_end=None, n_samples=MC_SAMPLES, generator=None):
    """The public-code way: an eager scan that keeps every state, then a Monte Carlo integral.

    Same model as mhp_scan (gap i decays at A Δ_{i-1}, read out with C_{i-1}); the integral over each
    gap is estimated as dt_i * mean_k readout(s_k), s_k ~ U(0, dt_i), k = 1..n_samples.
    """
    batch, dim, L = u.shape
    step = F.softplus(delta + delta_bias[:, None])
    step_prev = torch.cat([step[..., :1], step[..., :-1]], dim=-1)
    C_prev = torch.cat([C[..., :1], C[..., :-1]], dim=-1)  # (batch, N, L)
    h = u.new_zeros(batch, dim, A.shape[1])
    h_prev, ys, y_left = [], [], []
    for i in range(L):
        h_prev.append(h)
        h_minus = torch.exp(A * (step_prev[:, :, i] * dt[:, i, None])[..., None]) * h
        y_left.append((h_minus * C_prev[:, None, :, i]).sum(-1))
        h = h_minus + (step[:, :, i] * u[:, :, i])[..., None] * B[:, None, :, i]
        ys.append((h * C[:, None, :, i]).sum(-1))
    H_prev = torch.stack(h_prev, dim=-1)  # (batch, dim, N, L): every state, as the public code keeps
    y = (torch.stack(ys, dim=-1) + D[:, None] * u) * F.silu(z)
    s = torch.rand(batch, L, n_samples, generator=generator, device=u.device) * dt[..., None]
    readout_w = C_prev[:, None] * H_prev  # (batch, dim, N, L)
    integral = u.new_zeros(batch, dim)
    for k in range(n_samples):
        decay = torch.exp(A[None, :, :, None] * (step_prev * s[:, None, :, k])[:, :, None, :])
        lam = (readout_w * decay).sum(2)  # (batch, dim, L)
        integral = integral + (lam * dt[:, None, :]).sum(-1) / n_samples
    return y, torch.stack(y_left, dim=-1), integral


def _bytes(batch, dim, N, L, elt=4):
    # Inputs read once (u, delta, z, B, C, dt) and outputs written once (y, y_left, integral).
    return elt * (3 * batch * dim * L + 2 * batch * N * L + batch * L + 2 * batch * dim * L + batch * dim)


def make_fn(provider, shape, mode):
    """The timed callable of one (provider, shape, mode) case (inputs built once, outside it)."""
    backend = provider.rsplit("_", 1)[1] if provider != "eager_baseline" else None
    bwd = mode == "fwd+bwd"
    inp = make_inputs(*shape, requires_grad=bwd)
    u, delta, A, B, C, D, z, bias = (inp[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
    dt, dt_end = inp["dt"], inp["dt_end"]
    if provider.startswith("mhp_scan"):
        def fwd():
            return mhp_scan(u, delta, A, B, C, dt, D, z, bias, True, dt_end, backend=backend)

        def loss(o):
            return o.y.sum() + o.y_left.sum() + o.integral.sum()
    elif provider.startswith("selective_scan"):
        def fwd():
            return selective_scan(u, delta, A, B, C, D, z, bias, True, backend=backend)

        def loss(o):
            return o.sum()
    else:
        gen = torch.Generator(device=u.device).manual_seed(0)

        def fwd():
            return eager_mamba_hawkes(u, delta, A, B, C, dt, D, z, bias, dt_end, generator=gen)

        def loss(o):
            return o[0].sum() + o[1].sum() + o[2].sum()

    if bwd:
        params = [t for t in (u, delta, A, B, C, D, z, bias, dt) if t is not None and t.requires_grad]

        def fn():
            torch.autograd.grad(loss(fwd()), params, allow_unused=True)
    else:
        def fn():
            with torch.no_grad():
                fwd()
    fn.u = u
    return fn


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider", [f"mhp_scan_{b}" for b in _backends()] + ["eager_baseline"]
                         + [f"selective_scan_{b}" for b in _backends() if b != "reference"])
def test_bench_mhp_scan(benchmark, provider, shape, mode):
    batch, dim, N, L = shape
    long_shape = L >= 1024
    backend = provider.rsplit("_", 1)[1] if provider != "eager_baseline" else None
    if backend and not _available(backend):
        pytest.skip(f"backend {backend} is not available here")
    if provider == "mhp_scan_reference" and long_shape and mode == "fwd+bwd":
        pytest.skip("the reference loops over 2048 events in Python; its fwd+bwd is not a useful number")
    if provider == "eager_baseline" and long_shape and mode == "fwd+bwd":
        pytest.skip("the eager baseline's autograd graph needs > 10 GB at this shape (measured fwd only)")
    bwd = mode == "fwd+bwd"
    fn = make_fn(provider, shape, mode)
    rounds = 1 if (SMOKE or (long_shape and provider in ("eager_baseline", "mhp_scan_reference"))) else 5
    if not SMOKE and provider in ("mhp_scan_cpu", "selective_scan_cpu"):
        rounds = 20  # milliseconds each; 5 rounds let one scheduler stall on a 2-core VM move the median
    benchmark.extra_info.update(op="mhp_scan", provider=provider, shape=f"{batch}x{dim}x{N}x{L}", dtype="float32",
                                mode=mode, device=torch.cuda.get_device_name() if HAS_CUDA else "cpu",
                                threads=torch.get_num_threads())
    if provider.startswith("mhp_scan") and not bwd:
        benchmark.extra_info["bytes"] = _bytes(batch, dim, N, L)
    run_pedantic(benchmark, fn, fn.u.device, rounds=rounds, warmup_rounds=0 if SMOKE else 1)


# ---------------------------------------------------------------------------------------------
# The classic exponential-kernel Hawkes log-likelihood: ours vs tick vs hawkesbook
# ---------------------------------------------------------------------------------------------
MU, ALPHA, BETA = 0.5, 0.8, 1.5
N_SEQ, T_END = (4, 20.0) if SMOKE else (256, 200.0)


def simulate_classic_sequences():
    """N_SEQ event sequences on [0, T_END] simulated by tick (its kernel is α·β·e^{-βt})."""
    from tick.hawkes import SimuHawkesExpKernels

    seqs = []
    for seed in range(N_SEQ):
        sim = SimuHawkesExpKernels(adjacency=np.array([[ALPHA / BETA]]), decays=np.array([[BETA]]),
                                   baseline=np.array([MU]), end_time=T_END, seed=seed + 1, verbose=False)
        sim.simulate()
        seqs.append(np.ascontiguousarray(sim.timestamps[0], dtype=np.float64))
    return seqs


@pytest.fixture(scope="module")
def classic_sequences():
    return simulate_classic_sequences()


def _classic_batch(seqs):
    batch, L = len(seqs), max(1, max(len(s) for s in seqs))
    times = torch.zeros(batch, L, dtype=torch.float64)
    lens = torch.tensor([len(s) for s in seqs])
    for b, s in enumerate(seqs):
        times[b, : len(s)] = torch.from_numpy(s)
    dt = torch.diff(times, dim=1, prepend=torch.zeros(batch, 1, dtype=torch.float64)).clamp_min(0)
    dt_end = torch.tensor([T_END - (s[-1] if len(s) else 0.0) for s in seqs], dtype=torch.float64)
    return dict(u=torch.full((batch, 1, L), ALPHA, dtype=torch.float64), delta=torch.ones(batch, 1, L, dtype=torch.float64),
                A=torch.tensor([[-BETA]], dtype=torch.float64), B=torch.ones(1, 1, dtype=torch.float64),
                C=torch.ones(1, 1, dtype=torch.float64), dt=dt, dt_end=dt_end, lengths=lens)


def make_hawkes_fn(provider, seqs):
    """The timed callable of one Hawkes log-likelihood provider: (batch,) log-likelihoods of `seqs`."""
    if provider == "mhp_scan_cpu":
        x = _classic_batch(seqs)
        marks = torch.zeros_like(x["dt"], dtype=torch.int64)
        mu, W = torch.tensor([MU], dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)

        def fn():
            out = mhp_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["dt"], dt_end=x["dt_end"],
                           lengths=x["lengths"], backend="cpu")
            return hawkes_loglik(out, marks, mu, W, T_END, x["lengths"]).numpy()
    elif provider == "tick":
        from tick.hawkes.model.build.hawkes_model import ModelHawkesExpKernLogLik

        coeffs = np.array([MU, ALPHA / BETA])
        data = [([[s]], np.array([T_END])) for s in seqs]

        def fn():
            # tick's loss is (-log L - T) / n_events for one node; undo it per sequence.
            out = []
            for d, ends in data:
                model = ModelHawkesExpKernLogLik(BETA, 1)
                model.set_data(d, ends)
                out.append(-(model.loss(coeffs) * len(d[0][0]) + T_END))
            return np.array(out)
    else:
        from hawkesbook import exp_log_likelihood

        theta = np.array([MU, ALPHA, BETA])
        exp_log_likelihood(seqs[0], T_END, theta)  # numba compiles outside the timed rounds

        def fn():
            return np.array([exp_log_likelihood(s, T_END, theta) for s in seqs])
    return fn


@pytest.mark.parametrize("provider", ["mhp_scan_cpu", "tick", "hawkesbook"])
def test_bench_hawkes_loglik(benchmark, classic_sequences, provider):
    seqs = classic_sequences
    n_events = sum(len(s) for s in seqs)
    if provider == "mhp_scan_cpu" and not _available("cpu"):
        pytest.skip("the C++ extension has no mhp_scan kernel")
    fn = make_hawkes_fn(provider, seqs)
    benchmark.extra_info.update(op="hawkes_loglik", provider=provider, shape=f"{len(seqs)} seqs, {n_events} events",
                                dtype="float64", mode="fwd")
    result = run_pedantic(benchmark, fn, "cpu", rounds=1 if SMOKE else 5, warmup_rounds=0 if SMOKE else 1)
    from hawkesbook import exp_log_likelihood

    want = np.array([exp_log_likelihood(s, T_END, np.array([MU, ALPHA, BETA])) for s in seqs])
    np.testing.assert_allclose(result, want, rtol=1e-8)  # every provider computes the same thing


# ---------------------------------------------------------------------------------------------
# Same-process, interleaved comparison (python -m benchmarks.test_bench_mhp_scan): the CPU targets
# are ratios (fused op vs selective_scan alone, ours vs tick), and on a shared machine only rounds
# taken back to back in one process compare fairly.
# ---------------------------------------------------------------------------------------------
def _round_robin(fns, rounds, clock):
    for f in fns.values():  # warm-up
        f()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = clock()
            f()
            times[k].append(clock() - t)
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description="mhp_scan CPU targets: fused op vs selective_scan, ours vs tick")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--shape", default="256x64x16x128")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with process CPU time instead of wall time (steadier on a loaded machine; "
                         "use with --threads 1, where it excludes time spent descheduled)")
    ap.add_argument("--skip-hawkes", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    shape = tuple(int(v) for v in args.shape.split("x"))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, clock "
          f"{'process CPU time' if args.cpu_time else 'wall'}, rounds {args.rounds}, load average at start "
          f"{os.getloadavg()[0]:.2f}")
    for mode in ("fwd", "fwd+bwd"):
        res = _round_robin({p: make_fn(p, shape, mode) for p in ("mhp_scan_cpu", "selective_scan_cpu")},
                           args.rounds, clock)
        (m_med, m_min), (s_med, s_min) = res["mhp_scan_cpu"], res["selective_scan_cpu"]
        print(f"{args.shape} float32 {mode}: mhp_scan_cpu median {m_med * 1e3:.2f} ms (min {m_min * 1e3:.2f}), "
              f"selective_scan_cpu median {s_med * 1e3:.2f} ms (min {s_min * 1e3:.2f}); "
              f"fused / selective_scan = {m_med / s_med:.2f} (median/median), {m_min / s_min:.2f} (min/min)")
    if not args.skip_hawkes:
        seqs = simulate_classic_sequences()
        fns = {p: make_hawkes_fn(p, seqs) for p in ("mhp_scan_cpu", "tick", "hawkesbook")}
        want = fns["hawkesbook"]()
        for p, f in fns.items():
            np.testing.assert_allclose(f(), want, rtol=1e-8)
        res = _round_robin(fns, max(args.rounds, 30), clock)
        n_events = sum(len(s) for s in seqs)
        print(f"Hawkes log-likelihood, {len(seqs)} sequences, {n_events} events, float64:")
        for p, (med, mn) in res.items():
            line = f"  {p:13s} median {med * 1e3:7.3f} ms (min {mn * 1e3:7.3f})"
            if p != "mhp_scan_cpu":
                line += f"   ours faster by {med / res['mhp_scan_cpu'][0]:.2f}x (median/median)"
            print(line)
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
