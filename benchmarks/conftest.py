"""Benchmark set-up shared by every benchmarks/test_bench_*.py file.

- Every saved result carries the device name, torch/triton/CUDA versions, CPU count and the git
  commit (pytest-benchmark's machine_info, filled below), so a number is never separated from what
  produced it.
- `cuda_sync` / `timed` make timings honest on GPU: CUDA work is synchronised inside the timed call.
- With MVPP_BENCH_SMOKE=1 (set automatically by a plain `pytest`, see the root conftest.py) the
  files run tiny shapes once, as a smoke test that keeps them from rotting.
"""
from __future__ import annotations

import os
import platform
import subprocess

import pytest
import torch



def smoke() -> bool:
    """Read at call time: this conftest is imported before the root conftest's pytest_configure
    sets MVPP_BENCH_SMOKE, so a module-level constant would always be False."""
    return os.environ.get("MVPP_BENCH_SMOKE", "0") == "1"


def _git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except Exception:
        return "unknown"


def device_description() -> dict:
    info = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "commit": _git_commit(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    try:
        import mvpp_kernels

        info["mvpp_compiled"] = mvpp_kernels._library.compiled_status()
    except Exception as e:  # the benchmark itself will fail loudly; this is only metadata
        info["mvpp_compiled"] = f"import failed: {e}"
    return info


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["mvpp"] = device_description()


def cuda_sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    """Wrap `fn` so the benchmark clock stops only after its CUDA work finished."""

    def run():
        out = fn()
        cuda_sync(device)
        return out

    return run


def run_pedantic(benchmark, fn, device, *, rounds: int = 5, warmup_rounds: int = 1, iterations: int = 1):
    """benchmark.pedantic with CUDA sync and warm-up (Triton autotuning/compilation happens in the
    warm-up, never in a timed round). In smoke mode: one round, no warm-up."""
    if smoke():
        rounds, warmup_rounds = 1, 0
    return benchmark.pedantic(timed(fn, device), rounds=rounds, warmup_rounds=warmup_rounds, iterations=iterations)


@pytest.fixture
def bench_device_info():
    return device_description()
