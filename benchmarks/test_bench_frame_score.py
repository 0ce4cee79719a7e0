"""frame_score: our backends against eager PyTorch composed the obvious way and torch.compile of it.

    pytest benchmarks/test_bench_frame_score.py --benchmark-only            # time for real
    pytest benchmarks/test_bench_frame_score.py                             # smoke (tiny shapes)
    python -m benchmarks.test_bench_frame_score [--rounds 40] [--mode fwd+bwd]
        # the CPU providers timed in ONE process, round-robin (ours, eager, compile, ours, ...), so
        # load from other processes hits all of them alike; prints medians, mins, the ratios and the
        # machine's read bandwidth (torch.sum over 400 MB) as the floor for reading the frames once

Providers: `ours` -- the C++ kernel on CPU tensors, and `triton` / `cuda` on a GPU; `eager` -- scores
by a matmul, a masked softmax, the weighted sum as a batched matmul, torch.topk + gather; `compile` --
torch.compile of that eager function. Shapes (batch, T, F) = (64, 128, 768) and (16, 2048, 768);
float32 on CPU (CPU bf16 matmuls have no fast path to compare against), float32 and bfloat16 on GPU;
modes fwd and fwd+bwd (gradients to frames and the weight through dense, scores and topk_frames).
extra_info carries the bytes a fused kernel must move -- frames read once (they dominate), outputs
written once; fwd+bwd adds dframes written once and frames read once more -- and the achieved GB/s.
"""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

from mvpp_kernels import frame_score
from mvpp_kernels._backend import BackendUnavailableError, resolve_backend

from .conftest import run_pedantic

SMOKE = os.environ.get("MVPP_BENCH_SMOKE", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
K = 8

SHAPES = [(2, 16, 32)] if SMOKE else [(64, 128, 768), (16, 2048, 768)]
MODES = ["fwd", "fwd+bwd"]

# (provider, device, dtype)
CASES = [("ours", "cpu", torch.float32), ("eager", "cpu", torch.float32), ("compile", "cpu", torch.float32)]
if HAS_CUDA:
    for dt in (torch.float32, torch.bfloat16):
        CASES += [("triton", "cuda", dt), ("cuda", "cuda", dt), ("eager", "cuda", dt), ("compile", "cuda", dt)]


def eager_frame_score(frames, weight, lengths, k: int = K, temperature: float = 1.0):
    """The obvious composition: what a user writes without this op."""
    scores = frames @ weight.to(frames.dtype)
    valid = torch.arange(frames.shape[1], device=frames.device)[None, :] < lengths[:, None]
    scores = scores.masked_fill(~valid, float("-inf"))
    p = torch.softmax(scores.float() / temperature, dim=1)
    dense = (p.to(frames.dtype).unsqueeze(1) @ frames).squeeze(1)
    _, idx = torch.topk(scores, k, dim=1)
    topk_frames = torch.gather(frames, 1, idx.unsqueeze(-1).expand(-1, -1, frames.shape[2]))
    return scores, dense, idx, topk_frames


_COMPILED = {}


def _compiled():
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(eager_frame_score)
    return _COMPILED["fn"]


def bytes_moved(batch, T, F, dtype, mode):
    es = torch.tensor([], dtype=dtype).element_size()
    fwd = batch * T * F * es + batch * T * 4 + batch * F * es + batch * K * (F * es + 8)
    if mode == "fwd":
        return fwd
    # backward floor: frames read once more, dframes written once, the output gradients read.
    return fwd + 2 * batch * T * F * es + batch * (T * 4 + F * es + K * F * es)


def make_run(provider, device, dtype, shape, mode):
    """The timed callable for one case, or None if the provider's backend is unavailable."""
    batch, T, F = shape
    if provider in ("ours", "triton", "cuda"):
        backend = "cpu" if provider == "ours" else provider
        try:
            resolve_backend("frame_score_fwd", torch.device(device), backend)
        except BackendUnavailableError:
            return None
    g = torch.Generator().manual_seed(0)
    frames = torch.randn(batch, T, F, generator=g).to(device=device, dtype=dtype)
    weight = (torch.randn(F, generator=g) / F**0.5).to(device)
    lengths = torch.randint(T // 2, T + 1, (batch,), generator=g).to(device)
    lengths[0] = T
    if mode == "fwd+bwd":
        frames.requires_grad_(True)
        weight.requires_grad_(True)
    gd = torch.randn(batch, F, generator=g).to(device=device, dtype=dtype)
    gt = torch.randn(batch, K, F, generator=g).to(device=device, dtype=dtype)

    if provider in ("ours", "triton", "cuda"):
        def op():
            return frame_score(frames, weight, None, lengths, K, 1.0, backend=backend)
    elif provider == "eager":
        def op():
            return eager_frame_score(frames, weight, lengths)
    else:
        fn = _compiled()

        def op():
            return fn(frames, weight, lengths)

    if mode == "fwd":
        def run():
            with torch.no_grad():
                return op()
    else:
        def run():
            frames.grad = None
            weight.grad = None
            _, dense, _, tf = op()
            ((dense * gd).sum() + (tf * gt).sum()).backward()
            return frames.grad

    if provider == "compile":
        run()  # compile outside the timed rounds (also in smoke mode, where there is no warm-up)
    run.valid_frames = int(lengths.sum())
    return run


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider,device,dtype", CASES, ids=lambda c: str(c).replace("torch.", ""))
def test_bench_frame_score(benchmark, provider, device, dtype, shape, mode):
    if SMOKE and provider == "compile" and mode != "fwd":
        pytest.skip("smoke: one torch.compile case is enough to keep the provider from rotting")
    run = make_run(provider, device, dtype, shape, mode)
    if run is None:
        pytest.skip(f"{provider}: backend not available on {device}")
    batch, T, F = shape
    run_pedantic(benchmark, run, device, rounds=3 if SMOKE else 10)
    nbytes = bytes_moved(batch, T, F, dtype, mode)
    mean = benchmark.stats.stats.mean if benchmark.stats is not None else float("nan")
    benchmark.extra_info.update(
        op="frame_score", provider=provider, device=device, dtype=str(dtype).replace("torch.", ""),
        shape=dict(batch=batch, T=T, F=F, k=K), mode=mode, bytes=nbytes,
        gbps=(nbytes / mean / 1e9) if mean == mean and mean > 0 else None,
    )


def read_bandwidth_gbps(rounds: int = 15) -> float:
    """The machine's read bandwidth with torch's threads: the best of `rounds` sums over 400 MB."""
    x = torch.ones(100 * 2**20)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--mode", choices=MODES, default="fwd")
    ap.add_argument("--shapes", default="16x2048x768,64x128x768")
    ap.add_argument("--providers", default="ours,eager,compile")
    args = ap.parse_args(argv)
    providers = args.providers.split(",")
    bw = read_bandwidth_gbps()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, read bandwidth {bw:.1f} GB/s, "
          f"mode {args.mode}, rounds {args.rounds}, load average at start {os.getloadavg()[0]:.2f}")
    for spec in args.shapes.split(","):
        shape = tuple(int(v) for v in spec.split("x"))
        runs = {p: make_run(p, "cpu", torch.float32, shape, args.mode) for p in providers}
        runs = {p: r for p, r in runs.items() if r is not None}
        for r in runs.values():  # warm-up
            r()
        times = {p: [] for p in runs}
        for _ in range(args.rounds):
            for p, r in runs.items():
                t = time.perf_counter()
                r()
                times[p].append(time.perf_counter() - t)
        med = {p: statistics.median(v) for p, v in times.items()}
        batch, T, F = shape
        valid = next(iter(runs.values())).valid_frames
        print(f"({batch}, {T}, {F}) float32 {args.mode}: reading the frames once at {bw:.1f} GB/s takes "
              f"{batch * T * F * 4 / (bw * 1e9) * 1e3:.2f} ms ({valid * F * 4 / (bw * 1e9) * 1e3:.2f} ms for the "
              f"{valid} valid frames); load average now {os.getloadavg()[0]:.2f}")
        for p in runs:
            line = f"  {p:8s} median {med[p] * 1e3:8.3f} ms   min {min(times[p]) * 1e3:8.3f} ms"
            if p != "ours" and "ours" in med:
                line += f"   ours faster by {med[p] / med['ours']:.2f}x (median/median)"
            print(line)


if __name__ == "__main__":
    main()
