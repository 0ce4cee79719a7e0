"""The `mvpp` op namespace: every compiled op's schema, defined once here in Python so the ops exist
on every install (CPU-only, no compiler, no GPU), then the compiled extension, which only registers
implementations (TORCH_LIBRARY_IMPL(mvpp, CPU|CUDA, m)).

Fake (meta) implementations and autograd for each op live next to the op's public function in
`mvpp_kernels/ops/<op>/`, which imports this module first. Triton ops are `torch.library.triton_op`s
defined in the op's `triton.py` (their schema is inferred from the Python signature).

Conventions for the schemas below:
- Optional inputs are `Tensor?`; absent optional gradients come back as empty tensors (shape (0,)).
- Reductions over the batch that would otherwise need float atomics (dA, dD, d(delta_bias), and dB/dC
  when B/C are per-channel constants) come back as per-batch partials in float32, and the Python
  wrapper sums them: the result is deterministic and no kernel needs cross-thread float atomics.
"""
from __future__ import annotations

import glob
import os
import warnings

import torch

NAMESPACE = "mvpp"
_lib = torch.library.Library(NAMESPACE, "DEF")


def _define(schema: str) -> None:
    _lib.define(schema)


# ----------------------------------------------------------------------------------------------
# selective_scan (issue: foundation)
#   u, delta: (batch, dim, L); A: (dim, N); B, C: (dim, N) or (batch, G, N, L); D, delta_bias: (dim,)
#   z: (batch, dim, L); initial_state: (batch, dim, N) float32; lengths: (batch,) int64
#   chunk_states: (batch, dim, ceil(L / chunk_size) * N) float32, [b][d][chunk][n] flattened (a 4-D
#   tensor would make torch.export guard on ceil(L / chunk_size) != 1) -- the state after each chunk,
#   saved by the forward for the backward's recomputation (only chunk boundaries, never every step).
# ----------------------------------------------------------------------------------------------
_define(
    "selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
    "Tensor? delta_bias, Tensor? initial_state, Tensor? lengths, bool delta_softplus, int chunk_size) "
    "-> (Tensor out, Tensor last_state, Tensor chunk_states)"
)
# Returns: du, ddelta (input dtypes); dA (batch, dim, N) f32 partials; dB, dC: B's/C's shape in f32
# when variable, (batch, dim, N) f32 partials when constant; dD, ddelta_bias (batch, dim) f32
# partials (zeros when absent); dz (z's shape, or (0,)); dinitial_state (batch, dim, N) f32.
_define(
    "selective_scan_bwd(Tensor dout, Tensor? dlast_state, Tensor u, Tensor delta, Tensor A, Tensor B, "
    "Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, Tensor? initial_state, Tensor? lengths, "
    "Tensor chunk_states, bool delta_softplus, int chunk_size, bool deterministic) "
    "-> (Tensor du, Tensor ddelta, Tensor dA, Tensor dB, Tensor dC, Tensor dD, Tensor dz, "
    "Tensor ddelta_bias, Tensor dinitial_state)"
)

# ----------------------------------------------------------------------------------------------
# mhp_scan (issue: mhp_scan) -- the continuous-time selective scan fused with the exact integral of
# its readout. Shapes as selective_scan, plus dt: (batch, L) gaps (dt[:, 0] = first event's time
# from the window start), dt_end: (batch,) gap from the last valid event to the window end.
# Returns y (batch, dim, L) in u's dtype; y_left (batch, dim, L), integral (batch, dim) and
# last_state (batch, dim, N) in the state dtype (float32; float64 for float64 inputs); chunk_states
# as selective_scan's.
# ----------------------------------------------------------------------------------------------
_define(
    "mhp_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor dt, Tensor? D, Tensor? z, "
    "Tensor? delta_bias, Tensor? dt_end, Tensor? lengths, Tensor? initial_state, bool delta_softplus, "
    "int chunk_size) -> (Tensor y, Tensor y_left, Tensor integral, Tensor last_state, Tensor chunk_states)"
)
# Returns selective_scan_bwd's gradients plus ddt as (batch, dim, L) state-dtype partials (summed over
# dim in Python: dt is shared by all channels) and ddt_end as (batch, dim) partials (zeros if absent).
_define(
    "mhp_scan_bwd(Tensor dy, Tensor? dy_left, Tensor? dintegral, Tensor? dlast_state, Tensor u, Tensor delta, "
    "Tensor A, Tensor B, Tensor C, Tensor dt, Tensor? D, Tensor? z, Tensor? delta_bias, Tensor? dt_end, "
    "Tensor? lengths, Tensor? initial_state, Tensor chunk_states, bool delta_softplus, int chunk_size, "
    "bool deterministic) -> (Tensor du, Tensor ddelta, Tensor dA, Tensor dB, Tensor dC, Tensor dD, Tensor dz, "
    "Tensor ddelta_bias, Tensor ddt, Tensor ddt_end, Tensor dinitial_state)"
)
# The public wrapper's data checks in one pass without temporaries (CPU only; other devices use torch
# ops): over x's valid entries (row b of a 2-D x up to lengths[b]; all entries without lengths), the
# smallest and largest finite value (+inf / -inf when there is none) and the number of NaN/inf values.
_define("mhp_scan_masked_stats(Tensor x, Tensor? lengths) -> (float, float, int)")

# ----------------------------------------------------------------------------------------------
# Further ops (frame_score, cluster_lookup/cluster_update) add their schemas below, one section
# each, in the same style.
# ----------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------
# memory bank (issue 5): exact_search, cluster_lookup, cluster_update. Inner product only: cosine
# is inner product on normalised keys/queries (the Python wrappers normalise). Results are ordered
# by (score desc, id asc) -- lower id wins a tie -- on every backend; empty slots are (-inf, -1).
# Scores are float32 (float64 for float64 keys). Ids must be < 2**32 - 1 (packed top-k keys).
#   exact_search: keys (n, d), queries (q, d) in keys' dtype, exclude (q,) int64 (< 0: none).
# ----------------------------------------------------------------------------------------------
_define("exact_search(Tensor keys, Tensor queries, int k, Tensor? exclude) -> (Tensor scores, Tensor ids)")
# cluster_lookup: a two-level CSR tree. coarse_centroids (c1, d); coarse_offsets (c1 + 1,) int64 into
# the fine clusters (children of coarse c are fine clusters coarse_offsets[c]..coarse_offsets[c+1]);
# fine_centroids (cf, d); fine_offsets (cf + 1,) int64 into the members; member_keys (m, d) contiguous
# per fine cluster; member_ids (m,) int64. Routing: top nprobe_coarse coarse clusters, then top
# nprobe_fine fine clusters among their children, then exact top-k over those members.
_define(
    "cluster_lookup(Tensor queries, Tensor coarse_centroids, Tensor coarse_offsets, Tensor fine_centroids, "
    "Tensor fine_offsets, Tensor member_keys, Tensor member_ids, int k, int nprobe_coarse, int nprobe_fine, "
    "Tensor? exclude) -> (Tensor scores, Tensor ids)"
)
# cluster_update: route new_keys (m, d) greedily (top-1 coarse, top-1 child, float64 scores) and fold
# them, sequentially per fine cluster in input order, into float64 running means: fine_mean (cf, d),
# fine_sq (cf, d) per-dimension second moment, fine_value_mean (cf, dv) (dv may be 0), fine_counts
# (cf,) int64. Functional: returns (assign (m,) int64, and the four updated statistics).
_define(
    "cluster_update(Tensor new_keys, Tensor new_values, Tensor coarse_centroids, Tensor coarse_offsets, "
    "Tensor fine_centroids, Tensor fine_mean, Tensor fine_sq, Tensor fine_value_mean, Tensor fine_counts) "
    "-> (Tensor assign, Tensor fine_mean_out, Tensor fine_sq_out, Tensor fine_value_mean_out, "
    "Tensor fine_counts_out)"
)
# ---------------------------------------------------------------------------- end memory bank --

# ----------------------------------------------------------------------------------------------
# frame_score (issue: frame_score) -- frames (batch, T, F); weight (F,) for the linear scorer or (H,)
# for the MLP scorer with W1 (F, H), b1 (H,); bias () ; lengths (batch,) int64. The parameters come
# in the compute dtype (float32; float64 for float64 frames): the Python wrapper casts them.
# Returns scores (batch, T) and lse (batch,) in the compute dtype (scores -inf past each length; lse =
# log sum_t exp((s_t - max s) / temperature) over the valid frames -- max-shifted, so it never overflows;
# the backward takes max s again from scores -- -inf for a length-0 video, NaN for a video poisoned by a
# NaN/+inf score (docs/frame_score.md)); dense (batch, F) and topk_frames (batch, k, F) in frames' dtype;
# topk_idx (batch, k) int64.
# ----------------------------------------------------------------------------------------------
_define(
    "frame_score_fwd(Tensor frames, Tensor weight, Tensor? bias, Tensor? lengths, Tensor? W1, Tensor? b1, "
    "int k, float temperature) -> (Tensor scores, Tensor dense, Tensor topk_idx, Tensor topk_frames, Tensor lse)"
)
# Returns dframes (frames' shape and dtype); dweight (batch, F or H), dbias (batch,) per-batch partials in
# the compute dtype; dW1 (batch, F, H) and db1 (batch, H) partials, or (0,) for the linear scorer.
_define(
    "frame_score_bwd(Tensor dscores, Tensor ddense, Tensor dtopk_frames, Tensor frames, Tensor weight, "
    "Tensor? W1, Tensor? b1, Tensor? lengths, Tensor scores, Tensor lse, Tensor topk_idx, float temperature) "
    "-> (Tensor dframes, Tensor dweight, Tensor dbias, Tensor dW1, Tensor db1)"
)
# ---------------------------------------------------------------------------------------------- end frame_score


# ----------------------------------------------------------------------------------------------
# The compiled extension. Loaded after every schema above is defined; never raises on import.
# ----------------------------------------------------------------------------------------------
_COMPILED: dict = {"loaded": False, "path": None, "error": None}


def _find_compiled() -> list[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    return sorted(glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here, "_C*.pyd")))


def _load_compiled() -> None:
    if os.environ.get("MVPP_NO_COMPILED", "0") == "1":
        _COMPILED["error"] = "disabled by MVPP_NO_COMPILED=1"
        return
    # MVPP_COMPILED_LIB: load this library instead of the package's _C (the portable-build test uses it).
    override = os.environ.get("MVPP_COMPILED_LIB")
    paths = [override] if override else _find_compiled()
    if override and not os.path.isfile(override):
        _COMPILED["error"] = f"MVPP_COMPILED_LIB={override!r} is not a file"
        return
    if not paths:
        _COMPILED["error"] = "not built (pip install --no-build-isolation -e . builds it)"
        return
    try:
        torch.ops.load_library(paths[0])
    except Exception as e:  # an ABI mismatch or missing symbol must not break `import mvpp_kernels`
        _COMPILED["error"] = f"failed to load {os.path.basename(paths[0])}: {type(e).__name__}: {e}"
        warnings.warn(
            f"mvpp_kernels: the compiled extension could not be loaded ({_COMPILED['error']}); "
            "the 'auto' backend falls back to Triton/reference. Rebuild with "
            "`pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=2,
        )
        return
    _COMPILED["loaded"] = True
    _COMPILED["path"] = paths[0]
    _COMPILED["isa"] = compiled_isa(paths[0])


def compiled_isa(path: str) -> str:
    """The vector ISA the library at `path` was compiled for (its CPU kernels choose loops by it)."""
    import ctypes

    try:
        fn = ctypes.CDLL(path).mvpp_compiled_isa
    except (OSError, AttributeError):  # an older build without the probe
        return "unknown"
    fn.restype = ctypes.c_char_p
    return fn().decode()


def compiled_loaded() -> bool:
    return bool(_COMPILED["loaded"])


def build_info() -> dict:
    """What setup.py decided at build time (written to _build_info.json), or {} if never built."""
    import json

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def compiled_status() -> str:
    if _COMPILED["loaded"]:
        info = build_info()
        cuda = "with CUDA kernels" if info.get("cuda") else f"CPU kernels only; CUDA not built: {info.get('cuda_reason', 'unknown')}"
        return f"loaded from {_COMPILED['path']} ({cuda}; CPU ISA: {_COMPILED.get('isa', 'unknown')})"
    return str(_COMPILED["error"])


_load_compiled()
