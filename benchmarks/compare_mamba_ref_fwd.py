"""Forward time of our C++ CPU selective_scan vs mamba-ssm's own selective_scan_ref at
(batch 8, dim 256, N 16, L 512) float32, with equal warm-up and several rounds for both (the
pytest-benchmark file gives the slow peer a single round).

    python -m benchmarks.compare_mamba_ref_fwd
"""
import statistics
import time

import torch

import mvpp_kernels as mk
from mvpp_kernels.testing import load_mamba_selective_scan_ref, make_selective_scan_inputs


def _times(fn, rounds):
    fn()  # warm-up
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main():
    x = make_selective_scan_inputs(8, 256, 16, 512, dtype=torch.float32, with_initial_state=False)
    kw = {k: v for k, v in x.items() if k != "initial_state"}
    ref = load_mamba_selective_scan_ref()
    if ref is None:
        raise SystemExit("mamba-ssm is not installed (scripts/setup.sh installs it)")
    with torch.no_grad():
        ours = _times(lambda: mk.selective_scan(**kw, delta_softplus=True, backend="cpu"), 30)
        theirs = _times(lambda: ref(**kw, delta_softplus=True), 7)
    print(f"torch threads: {torch.get_num_threads()}")
    for name, t in (("mvpp cpu", ours), ("mamba selective_scan_ref", theirs)):
        print(f"{name:26s} min {min(t) * 1e3:9.2f} ms   median {statistics.median(t) * 1e3:9.2f} ms   rounds {len(t)}")
    print(f"speedup: {min(theirs) / min(ours):.1f}x (min/min), {statistics.median(theirs) / statistics.median(ours):.1f}x (median/median)")


if __name__ == "__main__":
    main()
