"""exact_search: brute-force top-k inner-product / cosine search, the memory bank's oracle and its
small-bank path. Kernels: csrc/cpu/exact_search.cpp (blocked BLAS + fused running top-k),
csrc/cuda/cluster_lookup.cu (shared scan kernel), triton.py (fused dot + on-chip top-k).
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import _library  # noqa: F401  (defines mvpp::exact_search)
from ..._backend import register_op_info, resolve_backend
from ..._checks import FLOAT_DTYPES, check_finite, check_same_device, check_tensor
from .reference import compute_dtype, exact_search_ref, topk_score_then_id

__all__ = ["exact_search", "exact_search_ref", "METRICS", "MAX_ID", "MAX_K_KERNEL"]

METRICS = ("ip", "cosine")
# Ids are packed with the score into one 64-bit sort key by the Triton/CUDA kernels.
MAX_ID = 2**32 - 2
# The Triton/CUDA kernels keep the running top-k on chip; larger k runs on cpu/reference.
MAX_K_KERNEL = 128

_KERNEL_NAME = "exact_search"
register_op_info("exact_search", _KERNEL_NAME, ("cuda", "triton", "cpu", "reference"))


@torch.library.register_fake("mvpp::exact_search")
def _fake(keys, queries, k, exclude):
    q = queries.shape[0]
    return (queries.new_empty((q, k), dtype=compute_dtype(keys.dtype)),
            queries.new_empty((q, k), dtype=torch.int64))


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return metric


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Unit-norm rows (computed in float32/float64, returned in x's dtype); zero rows stay zero."""
    xf = x.to(compute_dtype(x.dtype))
    return (xf / xf.norm(dim=-1, keepdim=True).clamp_min(1e-30)).to(x.dtype)


def check_exclude(exclude, q: int, device) -> Optional[torch.Tensor]:
    if exclude is None:
        return None
    check_tensor("exclude", exclude, shape=(q,), dims="(q,): one id to skip per query")
    if exclude.is_floating_point() or exclude.dtype == torch.bool:
        raise TypeError(f"exclude must be an integer tensor of ids, got {exclude.dtype}")
    if exclude.device != torch.device(device) and exclude.device.type != torch.device(device).type:
        raise ValueError(f"exclude is on {exclude.device} but the queries are on {device}")
    return exclude.to(device=device, dtype=torch.int64).contiguous()


def check_finite_fast(name: str, t: torch.Tensor) -> None:
    """check_finite's verdict, from one reduction (min and max propagate NaN and show +-inf) in the
    common all-finite case: check_finite's elementwise mask costs ~100 ms on a 100k x 256 bank, a third
    of an exact search over it. The slow check runs only to name what is wrong."""
    if t.numel() and t.is_floating_point():
        lo, hi = torch.aminmax(t)
        if bool(torch.isfinite(lo) & torch.isfinite(hi)):
            return
    check_finite(name, t)


def _validate(keys, queries, k, metric, check_inputs):
    check_metric(metric)
    check_tensor("keys", keys, ndim=2, dims="(n, d)", dtypes=FLOAT_DTYPES)
    check_tensor("queries", queries, ndim=2, dims="(q, d)", dtypes=FLOAT_DTYPES)
    n, d = keys.shape
    if queries.shape[1] != d:
        raise ValueError(f"queries must have d = {d} columns like keys (n, d), got shape {tuple(queries.shape)}")
    if n == 0:
        raise ValueError("keys is empty (n = 0): there is nothing to search")
    if d == 0:
        raise ValueError("keys must have a feature dimension d >= 1, got shape (n, 0)")
    if n > MAX_ID:
        raise ValueError(f"keys has n = {n} rows; at most {MAX_ID} are supported")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > n:
        raise ValueError(f"k = {k} is larger than the bank (n = {n} keys)")
    check_same_device("keys", keys, queries=queries)
    if check_inputs and not torch.compiler.is_compiling():
        check_finite_fast("keys", keys)
        check_finite_fast("queries", queries)


def exact_search(
    keys: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    metric: str = "ip",
    exclude: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
    check_inputs: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k search: for each query, the k keys with the largest score

        ip:      s(q, j) = <q, keys[j]>
        cosine:  s(q, j) = <q / |q|, keys[j] / |keys[j]|>

    Args:
        keys: (n, d) float32/bf16/fp16 (float64 on cpu/reference).
        queries: (q, d), any float dtype (cast to keys' dtype).
        k: 1 <= k <= n.
        metric: "ip" or "cosine".
        exclude: optional (q,) int ids; query i never returns id exclude[i] (MMRA's self-exclusion;
            negative = nothing excluded).
        backend: "auto" | "cuda" | "triton" | "cpu" | "reference".
        check_inputs: reject NaN/inf keys and queries (one pass over the inputs).

    Returns:
        scores (q, k) float32 (float64 for float64 keys) and ids (q, k) int64, best first; among equal
        scores the lower id comes first, on every backend. A slot without a candidate (k = n with an
        excluded id) is (-inf, -1). The kernels never hold the (q, n) score matrix.
    """
    _validate(keys, queries, k, metric, check_inputs)
    name = resolve_backend(_KERNEL_NAME, keys.device, backend)
    if name in ("triton", "cuda") and (keys.dtype == torch.float64 or k > MAX_K_KERNEL):
        if backend is not None:
            from ..._backend import BackendUnavailableError

            raise BackendUnavailableError(
                f"backend {name!r} runs exact_search for float32/bf16/fp16 keys and k <= {MAX_K_KERNEL}; "
                f"got {keys.dtype}, k = {k}")
        name = "reference"
    ex = check_exclude(exclude, queries.shape[0], keys.device)
    queries = queries.to(keys.dtype)
    if metric == "cosine":
        keys, queries = normalize_rows(keys), normalize_rows(queries)
    keys, queries = keys.contiguous(), queries.contiguous()
    if name == "reference":
        return exact_search_ref(keys, queries, k, ex)
    needs_grad = torch.is_grad_enabled() and (keys.requires_grad or queries.requires_grad)
    kq = (keys.detach(), queries.detach()) if needs_grad else (keys, queries)
    if name == "triton":
        from . import triton as _triton

        scores, ids = _triton.exact_search_triton(kq[0], kq[1], k, ex)
    else:
        scores, ids = torch.ops.mvpp.exact_search(kq[0], kq[1], k, ex)
    if needs_grad:
        scores = _attach_score_grad(scores, ids, keys, queries)
    return scores, ids


def _attach_score_grad(scores, ids, keys, queries):
    """The kernels have no backward: give the returned scores the gradient of s = <q, keys[id]> for
    the selected ids (what the reference's autograd gives), keeping the kernel's values bit for bit.
    Slots without a candidate (id -1) get no gradient."""
    acc = scores.dtype
    valid = ids >= 0
    rows = keys[ids.clamp(min=0)].to(acc)  # (q, k, d)
    s = (queries.to(acc)[:, None, :] * rows).sum(-1)
    s = torch.where(valid, s, torch.zeros_like(s))
    return scores + (s - s.detach())
