"""cluster_update: route new items down a two-level cluster tree and fold them into their fine
cluster's float64 running statistics (count-weighted running mean), deterministically: the same input
order gives the same bytes on every backend. The update op of `mvpp_kernels.HierarchicalIndex`.
Kernels: csrc/cpu/cluster_update.cpp, triton.py.
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import _library  # noqa: F401  (defines mvpp::cluster_update)
from ..._backend import register_op_info, resolve_backend
from ..._checks import FLOAT_DTYPES, check_finite, check_same_device, check_tensor
from .reference import cluster_update_ref, fold_ref, route_greedy_ref

__all__ = ["cluster_update", "cluster_update_ref", "route_greedy_ref", "fold_ref"]

_KERNEL_NAME = "cluster_update"
register_op_info("cluster_update", _KERNEL_NAME, ("triton", "cpu", "reference"))


@torch.library.register_fake("mvpp::cluster_update")
def _fake(new_keys, new_values, coarse_centroids, coarse_offsets, fine_centroids, fine_mean, fine_sq,
          fine_value_mean, fine_counts):
    m = new_keys.shape[0]
    return (new_keys.new_empty((m,), dtype=torch.int64), torch.empty_like(fine_mean, dtype=torch.float64),
            torch.empty_like(fine_sq, dtype=torch.float64), torch.empty_like(fine_value_mean, dtype=torch.float64),
            torch.empty_like(fine_counts, dtype=torch.int64))


def cluster_update(
    new_keys: torch.Tensor,
    new_values: Optional[torch.Tensor],
    coarse_centroids: torch.Tensor,
    coarse_offsets: torch.Tensor,
    fine_centroids: torch.Tensor,
    fine_mean: torch.Tensor,
    fine_sq: torch.Tensor,
    fine_value_mean: torch.Tensor,
    fine_counts: torch.Tensor,
    *,
    backend: Optional[str] = None,
    check_inputs: bool = True,
):
    """Route and fold new items (functional: the inputs are not modified).

    Routing (float64 scores): c = argmax_c <x, coarse_centroids[c]> over coarse clusters with children,
    f = argmax <x, fine_centroids[f]> over c's children; ties go to the lower index.
    Fold, per fine cluster in input order, with n its count before the item::

        mean += (x - mean) / (n + 1);  sq += (x*x - sq) / (n + 1);  vmean += (v - vmean) / (n + 1)

    Args:
        new_keys: (m, d) float. new_values: (m, dv) float or None (dv = 0).
        coarse_centroids (c1, d), coarse_offsets (c1 + 1,), fine_centroids (cf, d): the tree.
        fine_mean, fine_sq: (cf, d) float64; fine_value_mean: (cf, dv) float64; fine_counts: (cf,) int64.

    Returns:
        assign (m,) int64 and the updated (fine_mean, fine_sq, fine_value_mean, fine_counts).
    """
    check_tensor("new_keys", new_keys, ndim=2, dims="(m, d)", dtypes=FLOAT_DTYPES)
    m, d = new_keys.shape
    if new_values is None:
        new_values = new_keys.new_zeros((m, 0), dtype=torch.float64)
    check_tensor("new_values", new_values, ndim=2, dims="(m, dv)", dtypes=FLOAT_DTYPES)
    if new_values.shape[0] != m:
        raise ValueError(f"new_values must have one row per new key ({m}), got shape {tuple(new_values.shape)}")
    c1, cf = coarse_centroids.shape[0], fine_centroids.shape[0]
    check_tensor("coarse_centroids", coarse_centroids, shape=(None, d), dims="(c1, d)", dtypes=FLOAT_DTYPES)
    check_tensor("fine_centroids", fine_centroids, shape=(None, d), dims="(cf, d)", dtypes=FLOAT_DTYPES)
    check_tensor("coarse_offsets", coarse_offsets, shape=(c1 + 1,), dims="(c1 + 1,)")
    check_tensor("fine_mean", fine_mean, shape=(cf, d), dims="(cf, d)", dtypes=(torch.float64,))
    check_tensor("fine_sq", fine_sq, shape=(cf, d), dims="(cf, d)", dtypes=(torch.float64,))
    dv = new_values.shape[1]
    check_tensor("fine_value_mean", fine_value_mean, shape=(cf, dv), dims="(cf, dv)", dtypes=(torch.float64,))
    check_tensor("fine_counts", fine_counts, shape=(cf,), dims="(cf,)", dtypes=(torch.int64,))
    check_same_device("new_keys", new_keys, new_values=new_values, coarse_centroids=coarse_centroids,
                      coarse_offsets=coarse_offsets, fine_centroids=fine_centroids, fine_mean=fine_mean,
                      fine_sq=fine_sq, fine_value_mean=fine_value_mean, fine_counts=fine_counts)
    if d == 0:
        raise ValueError("new_keys must have a feature dimension d >= 1, got shape (m, 0)")
    if c1 == 0 or cf == 0:
        raise ValueError("the cluster tree is empty (no coarse or no fine clusters)")
    if check_inputs and not torch.compiler.is_compiling():
        check_finite("new_keys", new_keys)
        check_finite("new_values", new_values)
        if bool((coarse_offsets.diff() < 0).any()) or int(coarse_offsets[0]) != 0 or int(coarse_offsets[-1]) != cf:
            raise ValueError(f"coarse_offsets must be non-decreasing CSR offsets from 0 to {cf}")
    args = (new_keys.contiguous(), new_values.contiguous(), coarse_centroids.contiguous(),
            coarse_offsets.to(torch.int64).contiguous(), fine_centroids.contiguous(), fine_mean.contiguous(),
            fine_sq.contiguous(), fine_value_mean.contiguous(), fine_counts.contiguous())
    name = resolve_backend(_KERNEL_NAME, new_keys.device, backend, ("triton", "cpu", "reference"))
    if name == "reference":
        return cluster_update_ref(*args)
    if name == "triton":
        from . import triton as _triton

        return _triton.cluster_update_triton(*args)
    return torch.ops.mvpp.cluster_update(*args)
