"""mvpp_kernels: fused kernels for micro-video popularity prediction, usable as drop-in torch ops.

Every op runs on every backend (CUDA C++, Triton, C++ CPU, pure-torch reference); pick one with
MVPP_BACKEND=auto|cuda|triton|cpu|reference or the op's `backend=` keyword, and see what is built
and what `auto` picks with `mvpp_kernels.backend_info()`.

Importing never fails because the compiled extension is missing or broken: a warning, and `auto`
falls back.
"""
from . import _library  # noqa: F401  (op schemas, then the compiled extension)
from ._backend import BACKENDS, BackendUnavailableError, backend_info, format_backend_info
from .ops.selective_scan import selective_scan, selective_scan_ref
from .ops.frame_score import frame_score, frame_score_ref
from .ops.mhp_scan import HawkesHead, MhpScanOutput, hawkes_intensity, hawkes_loglik, mhp_scan, mhp_scan_ref
from .ops.exact_search import exact_search, exact_search_ref  # memory bank (issue 5)
from .ops.cluster_lookup import cluster_lookup, cluster_lookup_ref  # memory bank
from .ops.cluster_update import cluster_update, cluster_update_ref  # memory bank
from .memory_bank import HierarchicalIndex, kmeans, retrieval_aggregate  # memory bank

from ._nvtx import annotate as _annotate, nvtx_range

# NVTX ranges around every public op and the index's stages, so an Nsight Systems profile reads
# well (a no-op unless a GPU is present or MVPP_NVTX=1; skipped while torch.compile traces).
selective_scan = _annotate("mvpp.selective_scan")(selective_scan)
frame_score = _annotate("mvpp.frame_score")(frame_score)
mhp_scan = _annotate("mvpp.mhp_scan")(mhp_scan)
hawkes_loglik = _annotate("mvpp.hawkes_loglik")(hawkes_loglik)
hawkes_intensity = _annotate("mvpp.hawkes_intensity")(hawkes_intensity)
exact_search = _annotate("mvpp.exact_search")(exact_search)
cluster_lookup = _annotate("mvpp.cluster_lookup")(cluster_lookup)
cluster_update = _annotate("mvpp.cluster_update")(cluster_update)
retrieval_aggregate = _annotate("mvpp.retrieval_aggregate")(retrieval_aggregate)
HierarchicalIndex.build = classmethod(_annotate("mvpp.index.build")(HierarchicalIndex.build.__func__))
HierarchicalIndex.search = _annotate("mvpp.index.search")(HierarchicalIndex.search)
HierarchicalIndex.update = _annotate("mvpp.index.update")(HierarchicalIndex.update)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "backend_info",
    "format_backend_info",
    "nvtx_range",
    "selective_scan",
    "selective_scan_ref",
    "frame_score",
    "frame_score_ref",
    "mhp_scan",
    "mhp_scan_ref",
    "MhpScanOutput",
    "hawkes_loglik",
    "hawkes_intensity",
    "HawkesHead",
    # memory bank (issue 5)
    "exact_search",
    "exact_search_ref",
    "cluster_lookup",
    "cluster_lookup_ref",
    "cluster_update",
    "cluster_update_ref",
    "HierarchicalIndex",
    "kmeans",
    "retrieval_aggregate",
]
