"""Repository-wide pytest set-up, loaded before any test module imports triton or torch ops.

- Without a CUDA GPU, Triton kernels run on the CPU through the interpreter, which must be
  switched on before `triton` is first imported.
- A plain `pytest` runs the benchmark files as a smoke test (benchmarking disabled, tiny shapes);
  `pytest benchmarks --benchmark-only` (or `--benchmark-enable`) times them for real.
"""
import os


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing is reported by the tests themselves
        return False


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    opt = config.option
    if hasattr(opt, "benchmark_disable"):
        timing_asked = getattr(opt, "benchmark_only", False) or getattr(opt, "benchmark_enable", False)
        if not timing_asked:
            opt.benchmark_disable = True
            os.environ.setdefault("MVPP_BENCH_SMOKE", "1")
