"""cluster_lookup: two-level (coarse -> fine -> members) inverted-file search over a CSR cluster tree,
the search op of `mvpp_kernels.HierarchicalIndex`. Kernels: csrc/cpu/cluster_lookup.cpp (routing,
then cluster-major BLAS tiles with a fused running top-k), csrc/cuda/cluster_lookup.cu + the
torch-free core csrc/include/mvpp/cluster_lookup.cuh, triton.py (fused member scan + on-chip top-k).
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import _library  # noqa: F401  (defines mvpp::cluster_lookup)
from ..._backend import BackendUnavailableError, register_op_info, resolve_backend
from ..._checks import FLOAT_DTYPES, check_tensor
from ..exact_search import MAX_ID, MAX_K_KERNEL, check_exclude, check_finite_fast
from ..exact_search.reference import compute_dtype
from .reference import cluster_lookup_ref, route_ref

__all__ = ["cluster_lookup", "cluster_lookup_ref", "route_ref"]

_KERNEL_NAME = "cluster_lookup"
KERNEL_ID_LIMIT = MAX_ID  # ids the Triton/CUDA sort-key packing carries exactly (exact_search's bound)
register_op_info("cluster_lookup", _KERNEL_NAME, ("cuda", "triton", "cpu", "reference"))


@torch.library.register_fake("mvpp::cluster_lookup")
def _fake(queries, coarse_centroids, coarse_offsets, fine_centroids, fine_offsets, member_keys, member_ids, k,
          nprobe_coarse, nprobe_fine, exclude):
    q = queries.shape[0]
    return (queries.new_empty((q, k), dtype=compute_dtype(member_keys.dtype)),
            queries.new_empty((q, k), dtype=torch.int64))


def _check_offsets(name: str, off: torch.Tensor, n_parent: int, n_child: int) -> None:
    check_tensor(name, off, shape=(n_parent + 1,), dims=f"({n_parent} + 1,) CSR offsets")
    if off.is_floating_point():
        raise TypeError(f"{name} must be an integer tensor, got {off.dtype}")
    if torch.compiler.is_compiling():
        return
    if n_parent >= 0 and (int(off[0]) != 0 or int(off[-1]) != n_child or bool((off.diff() < 0).any())):
        raise ValueError(f"{name} must be non-decreasing CSR offsets from 0 to {n_child}, got "
                         f"[{int(off[0])} .. {int(off[-1])}]")


def validate_tree(coarse_centroids, coarse_offsets, fine_centroids, fine_offsets, member_keys, member_ids):
    check_tensor("member_keys", member_keys, ndim=2, dims="(m, d)", dtypes=FLOAT_DTYPES)
    m, d = member_keys.shape
    check_tensor("coarse_centroids", coarse_centroids, ndim=2, dims="(c1, d)", dtypes=FLOAT_DTYPES)
    check_tensor("fine_centroids", fine_centroids, ndim=2, dims="(cf, d)", dtypes=FLOAT_DTYPES)
    for name, t in (("coarse_centroids", coarse_centroids), ("fine_centroids", fine_centroids)):
        if t.shape[1] != d:
            raise ValueError(f"{name} must have d = {d} columns like member_keys, got shape {tuple(t.shape)}")
    c1, cf = coarse_centroids.shape[0], fine_centroids.shape[0]
    if c1 == 0 or cf == 0:
        raise ValueError("the cluster tree is empty (no coarse or no fine clusters)")
    _check_offsets("coarse_offsets", coarse_offsets, c1, cf)
    _check_offsets("fine_offsets", fine_offsets, cf, m)
    check_tensor("member_ids", member_ids, shape=(m,), dims="(m,) one id per member")
    if member_ids.is_floating_point():
        raise TypeError(f"member_ids must be an integer tensor, got {member_ids.dtype}")


def check_kernel_ids(member_ids: torch.Tensor, backend: str) -> None:
    """Raise unless every id lies in [0, KERNEL_ID_LIMIT), the range the kernels' packed keys carry."""
    if member_ids.numel():
        lo, hi = int(member_ids.min()), int(member_ids.max())
        if lo < 0 or hi >= KERNEL_ID_LIMIT:
            raise ValueError(f"member_ids must lie in [0, {KERNEL_ID_LIMIT}) for backend {backend!r} "
                             f"(ids are packed into 32 bits), got ids in [{lo}, {hi}]; use backend='cpu' or 'reference'")


def cluster_lookup(
    queries: torch.Tensor,
    coarse_centroids: torch.Tensor,
    coarse_offsets: torch.Tensor,
    fine_centroids: torch.Tensor,
    fine_offsets: torch.Tensor,
    member_keys: torch.Tensor,
    member_ids: torch.Tensor,
    k: int,
    nprobe: tuple[int, int],
    exclude: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
    check_inputs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate top-k inner-product search over a two-level cluster tree (exact when every
    cluster is probed):

        C = top-p1 coarse clusters by <q, coarse_centroids[c]>
        F = top-p2 fine clusters among the children of C by <q, fine_centroids[f]>
        result = top-k of <q, member_keys[r]> over the members r of F (score desc, then id asc),
                 skipping the member whose id is exclude[q]

    Args:
        queries: (q, d), cast to member_keys' dtype.
        coarse_centroids (c1, d), coarse_offsets (c1 + 1,): children of coarse c are the fine
            clusters coarse_offsets[c]..coarse_offsets[c + 1].
        fine_centroids (cf, d), fine_offsets (cf + 1,): members of fine f are rows
            fine_offsets[f]..fine_offsets[f + 1] of member_keys (m, d) / member_ids (m,) int64.
        k: results per query (1 <= k <= m). nprobe: (p1, p2), each >= 1; larger values are clamped to
            c1 / cf.
        exclude: optional (q,) ids to skip.

    Returns:
        scores (q, k) float32 (float64 for float64 keys), ids (q, k) int64; slots without a candidate
        (fewer than k members probed) are (-inf, -1).
    """
    validate_tree(coarse_centroids, coarse_offsets, fine_centroids, fine_offsets, member_keys, member_ids)
    m, d = member_keys.shape
    check_tensor("queries", queries, ndim=2, dims="(q, d)", dtypes=FLOAT_DTYPES)
    if queries.shape[1] != d:
        raise ValueError(f"queries must have d = {d} columns like the bank's keys, got shape {tuple(queries.shape)}")
    if m == 0:
        raise ValueError("the bank is empty (no members): there is nothing to search")
    if m > MAX_ID:
        raise ValueError(f"the bank has {m} members; at most {MAX_ID} are supported")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > m:
        raise ValueError(f"k = {k} is larger than the bank ({m} members)")
    try:
        p1, p2 = (int(p) for p in nprobe)
    except (TypeError, ValueError):
        raise TypeError(f"nprobe must be a pair (p1, p2) of ints, got {nprobe!r}") from None
    if p1 < 1 or p2 < 1:
        raise ValueError(f"nprobe = {(p1, p2)}: both must be >= 1")
    c1, cf = coarse_centroids.shape[0], fine_centroids.shape[0]
    p1, p2 = min(p1, c1), min(p2, cf)
    for name, t in (("queries", queries), ("coarse_centroids", coarse_centroids), ("fine_centroids", fine_centroids),
                    ("coarse_offsets", coarse_offsets), ("fine_offsets", fine_offsets), ("member_ids", member_ids)):
        if t.device != member_keys.device:
            raise ValueError(f"{name} is on {t.device} but member_keys is on {member_keys.device}")
    if check_inputs and not torch.compiler.is_compiling():
        check_finite_fast("queries", queries)
        check_finite_fast("member_keys", member_keys)
    ex = check_exclude(exclude, queries.shape[0], member_keys.device)
    dt = member_keys.dtype
    args = (queries.to(dt).contiguous(), coarse_centroids.to(dt).contiguous(), coarse_offsets.to(torch.int64).contiguous(),
            fine_centroids.to(dt).contiguous(), fine_offsets.to(torch.int64).contiguous(), member_keys.contiguous(),
            member_ids.to(torch.int64).contiguous(), k, p1, p2, ex)
    name = resolve_backend(_KERNEL_NAME, member_keys.device, backend)
    if name in ("triton", "cuda") and (dt == torch.float64 or k > MAX_K_KERNEL):
        if backend is not None:
            raise BackendUnavailableError(
                f"backend {name!r} runs cluster_lookup for float32/bf16/fp16 keys and k <= {MAX_K_KERNEL}; "
                f"got {dt}, k = {k}")
        name = "reference"
    if name == "reference":
        return cluster_lookup_ref(*args)
    if name == "cuda" and not torch.compiler.is_compiling():
        # the CUDA kernel packs each id into the low 32 bits of an int64 sort key (the Triton op
        # checks its ids itself, also under torch.compile: see triton.py; the CUDA binding checks
        # them again on the device)
        check_kernel_ids(args[6], name)
    # The kernels have no backward (issue 16: with member_keys.requires_grad the scores claimed a gradient
    # and backward gave none). Run them on detached inputs and attach the gradient of <q, key of the
    # returned id>, exactly what the reference's autograd gives; the scores keep the kernel's values.
    needs_grad = torch.is_grad_enabled() and (args[0].requires_grad or args[5].requires_grad)
    kargs = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args) if needs_grad else args
    if name == "triton":
        from . import triton as _triton

        scores, ids = _triton.cluster_lookup_triton(*kargs)
    else:
        scores, ids = torch.ops.mvpp.cluster_lookup(*kargs)
    if needs_grad:
        from ..exact_search import _attach_score_grad

        mids = args[6]
        order = torch.argsort(mids)
        pos = torch.searchsorted(mids[order], ids.clamp(min=0)).clamp(max=max(mids.numel() - 1, 0))
        rows = torch.where(ids >= 0, order[pos], torch.full_like(ids, -1))
        scores = _attach_score_grad(scores, rows, args[5], args[0])
    return scores, ids
