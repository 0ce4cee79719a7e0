"""selective_scan: our backends against the pure-torch reference loop and mamba-ssm's own
`selective_scan_ref` (the only CPU path mamba-ssm's users have), forward and forward+backward.

    pytest benchmarks/test_bench_selective_scan.py --benchmark-only            # time for real
    pytest benchmarks/test_bench_selective_scan.py                             # smoke (tiny shapes)

Providers: reference (pure torch, our oracle), cpu (the C++ kernel), mamba_ref (mamba-ssm's
selective_scan_ref, when mamba_ssm is importable) on CPU tensors; triton, cuda and mamba_cuda
(mamba-ssm's selective_scan_fn, when its CUDA extension is importable) on a GPU. Each result's
extra_info carries the shape, dtype, provider, mode, the bytes a fused kernel must move (inputs
read once, outputs written once) and the achieved GB/s against that floor.
"""
from __future__ import annotations

import os

import pytest
import torch

from mvpp_kernels._backend import BackendUnavailableError, resolve_backend
from mvpp_kernels.ops.selective_scan import selective_scan
from mvpp_kernels.testing import load_mamba_selective_scan_ref, make_selective_scan_inputs

SMOKE = os.environ.get("MVPP_BENCH_SMOKE", "0") == "1"
HAS_CUDA = torch.cuda.is_available()

SHAPES = [(2, 8, 4, 16)] if SMOKE else [(8, 256, 16, 512), (64, 64, 16, 128)]  # (batch, dim, N, L)
DTYPES = [torch.float32]
MODES = ["fwd", "fwd+bwd"]


def _load_mamba_cuda():
    if not HAS_CUDA:
        return None
    try:
        import selective_scan_cuda  # noqa: F401
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:
        return None
    return selective_scan_fn


MAMBA_REF = load_mamba_selective_scan_ref()
MAMBA_CUDA = _load_mamba_cuda()

# (provider, device)
PROVIDERS = [("reference", "cpu"), ("cpu", "cpu"), ("mamba_ref", "cpu")]
if HAS_CUDA:
    PROVIDERS += [("triton", "cuda"), ("cuda", "cuda"), ("mamba_cuda", "cuda")]


def _fn_for(provider: str, device: str):
    if provider == "mamba_ref":
        if MAMBA_REF is None:
            pytest.skip("mamba_ssm is not importable (MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE "
                        "pip install --no-build-isolation --no-deps mamba-ssm einops)")
        return MAMBA_REF
    if provider == "mamba_cuda":
        if MAMBA_CUDA is None:
            pytest.skip("mamba-ssm's CUDA extension is not importable")
        return MAMBA_CUDA
    try:
        resolve_backend("selective_scan_fwd", torch.device(device), provider)
    except BackendUnavailableError as e:
        if provider == "cpu":
            raise  # the C++ kernel is the product: a missing build must not pass as a skip
        pytest.skip(str(e))

    def ours(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
        return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                              backend=provider)

    return ours


def bytes_moved(batch, dim, N, L, dtype, mode) -> int:
    """The floor for a fused kernel: u, delta, z, B, C read and out written once (fwd); the backward
    also reads dout and writes du, ddelta, dz, dB, dC (weights are negligible)."""
    e = torch.finfo(dtype).bits // 8
    seq = batch * dim * L * e
    bc = batch * N * L * e
    fwd = 3 * seq + 2 * bc + seq
    if mode == "fwd":
        return fwd
    return fwd + seq + 3 * seq + 2 * bc


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _rounds(provider, shape, mode) -> tuple[int, int]:
    """(rounds, warmup rounds). The pure-torch loops take seconds to tens of seconds per call at the
    big shapes: one round, no warm-up."""
    if SMOKE:
        return 1, 0
    if provider in ("reference", "mamba_ref"):
        return (1, 0) if (mode == "fwd+bwd" or shape[0] * shape[1] * shape[3] >= 8 * 256 * 512) else (3, 1)
    return 10, 2


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}_d{}_n{}_l{}".format(*s))
@pytest.mark.parametrize("provider,device", PROVIDERS, ids=[f"{p}-{d}" for p, d in PROVIDERS])
def test_bench_selective_scan(benchmark, provider, device, shape, dtype, mode):
    fn = _fn_for(provider, device)
    batch, dim, N, L = shape
    x = make_selective_scan_inputs(batch, dim, N, L, dtype=dtype, device=device, B_layout="variable",
                                   requires_grad=(mode == "fwd+bwd"))
    kwargs = dict(D=x["D"], z=x["z"], delta_bias=x["delta_bias"], delta_softplus=True)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"])
    params = [t for t in (*args, x["D"], x["z"], x["delta_bias"]) if t is not None]

    if mode == "fwd":
        def run():
            with torch.no_grad():
                out = fn(*args, **kwargs)
            _sync(device)
            return out
    else:
        # seeded: benchmarks/ has no autouse seed fixture, so the global RNG would depend on test order
        dout = torch.randn(batch, dim, L, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device, dtype)

        def run():
            for p in params:
                p.grad = None
            out = fn(*args, **kwargs)
            out.backward(dout)
            _sync(device)
            return out

    rounds, warmup = _rounds(provider, shape, mode)
    out = benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup, iterations=1)
    assert out.shape == (batch, dim, L) and bool(torch.isfinite(out).all())
    nbytes = bytes_moved(batch, dim, N, L, dtype, mode)
    benchmark.extra_info.update(
        provider=provider, device=device, shape=dict(batch=batch, dim=dim, N=N, L=L),
        dtype=str(dtype).replace("torch.", ""), mode=mode, bytes_moved=nbytes, threads=torch.get_num_threads(),
    )
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.mean > 0:
        benchmark.extra_info["GB/s"] = nbytes / stats.stats.mean / 1e9
