"""Shared helpers of the client-integration tests (imported by name: pytest puts this folder on sys.path)."""
from __future__ import annotations

import pytest
import torch

from mvpp_kernels import _library
from mvpp_kernels._backend import BackendUnavailableError, resolve_backend


def require_backend(backend: str) -> None:
    """Skip only where a skip is legitimate (no GPU for cuda, Triton without a GPU or the interpreter);
    a missing C++ build fails."""
    if backend == "cpu" and not _library.compiled_loaded():
        pytest.fail("mvpp_kernels._C is not built: the cpu backend is unavailable (pip install -e . builds it)")
    device = "cuda" if backend == "cuda" else "cpu"
    try:
        resolve_backend("selective_scan_fwd", torch.device(device), backend)
    except BackendUnavailableError as e:
        if backend in ("cuda", "triton") and not torch.cuda.is_available():
            pytest.skip(str(e))
        raise


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref| in float64."""
    a, ref = a.detach().double(), ref.detach().double()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
