"""torch.export.export of every public op and of the full model (not only torch.compile).

Each exported program is run on inputs of a different size than the example it was traced with and
compared with the eager op. selective_scan and mhp_scan are exported with a dynamic length whose range
spans the chunk size (64): their saved chunk states are a flat (batch, dim, n_chunks * N) tensor so that
no guard on n_chunks != 1 is needed (issue 16).
"""
from __future__ import annotations

import pytest
import torch
from torch.export import Dim, export

import mvpp_kernels as mk
from mvpp_kernels import _library

pytestmark = pytest.mark.skipif(not _library.compiled_loaded(), reason="needs the C++ extension")


def _check(module, example, dynamic_shapes, other_inputs, rtol=0.0, atol=0.0):
    ep = export(module, example, dynamic_shapes=dynamic_shapes)
    for inputs in other_inputs:
        got = ep.module()(*inputs)
        want = module(*inputs)
        got = got if isinstance(got, tuple) else (got,)
        want = want if isinstance(want, tuple) else (want,)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=rtol, atol=atol)
    return ep


class SelectiveScan(torch.nn.Module):
    def forward(self, u, delta, A, B, C, D):
        return mk.selective_scan(u, delta, A, B, C, D, None, None, True, True, backend="cpu")


def _ss_inputs(L, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, L, generator=g), torch.rand(2, 4, L, generator=g), -torch.rand(4, 8, generator=g) - 0.1,
            torch.randn(2, 8, L, generator=g), torch.randn(2, 8, L, generator=g), torch.randn(4, generator=g))


def test_selective_scan_dynamic_length_spanning_chunk():
    L = Dim("L", min=1, max=4096)
    shapes = ({2: L}, {2: L}, None, {2: L}, {2: L}, None)
    _check(SelectiveScan(), _ss_inputs(100, 0), shapes, [_ss_inputs(n, n) for n in (1, 37, 64, 65, 200)])


class MHPScan(torch.nn.Module):
    def forward(self, u, delta, A, B, C, dt, dt_end):
        return mk.mhp_scan(u, delta, A, B, C, dt, dt_end=dt_end, delta_softplus=True, backend="cpu")


def _mhp_inputs(L, seed):
    g = torch.Generator().manual_seed(seed)
    u, delta, A, B, C, _ = _ss_inputs(L, seed)
    return (u, delta, A, B, C, torch.rand(2, L, generator=g), torch.rand(2, generator=g))


def test_mhp_scan_dynamic_length_spanning_chunk():
    L = Dim("L", min=1, max=4096)
    shapes = ({2: L}, {2: L}, None, {2: L}, {2: L}, {1: L}, None)
    _check(MHPScan(), _mhp_inputs(100, 1), shapes, [_mhp_inputs(n, n) for n in (1, 63, 64, 65, 129)])


class HawkesLoglik(torch.nn.Module):
    def forward(self, u, delta, A, B, C, dt, mu, W, marks):
        T = 5.0
        out = mk.mhp_scan(u, delta.neg(), A, B, C, dt, delta_softplus=True, dt_end=T - dt.sum(1), backend="cpu")
        return mk.hawkes_loglik(out, marks, mu, W, T)


def test_hawkes_loglik():
    g = torch.Generator().manual_seed(2)
    u, delta, A, B, C, dt, _ = _mhp_inputs(30, 2)
    K = 3
    # u, B, C >= 0 and W >= 0 keep the intensity positive (the Hawkes model's constraints)
    args = (u.abs(), delta, A, B.abs(), C.abs(), dt * 0.1, torch.rand(K, generator=g) + 0.1, torch.rand(K, 4, generator=g),
            torch.randint(0, K, (2, 30), generator=g))
    _check(HawkesLoglik(), args, None, [args], rtol=1e-6, atol=1e-6)  # its torch glue may be regrouped


class FrameScore(torch.nn.Module):
    def forward(self, frames, weight, lengths):
        return mk.frame_score(frames, weight, None, lengths, k=3, backend="cpu")


def test_frame_score_dynamic_frames():
    g = torch.Generator().manual_seed(3)

    def inputs(F):
        return (torch.randn(2, F, 16, generator=g), torch.randn(16, generator=g), torch.tensor([F, max(F - 2, 3)]))

    F = Dim("F", min=4, max=512)
    _check(FrameScore(), inputs(20), ({1: F}, None, None), [inputs(n) for n in (5, 64, 130)])


class ExactSearch(torch.nn.Module):
    def forward(self, queries, keys):
        return mk.exact_search(keys, queries, 4, backend="cpu")


def test_exact_search_dynamic_bank():
    g = torch.Generator().manual_seed(4)
    n = Dim("n", min=8, max=100_000)
    _check(ExactSearch(), (torch.randn(3, 16, generator=g), torch.randn(50, 16, generator=g)), (None, {0: n}),
           [(torch.randn(3, 16, generator=g), torch.randn(m, 16, generator=g)) for m in (9, 333)])


def _bank():
    from mvpp_kernels.memory_bank import HierarchicalIndex
    from mvpp_kernels.testing import make_memory_bank_data

    keys, queries = make_memory_bank_data(600, 16, 5, "clustered", seed=5)
    g = torch.Generator().manual_seed(6)
    return HierarchicalIndex.build(keys, torch.randn(600, 3, generator=g), branching=(6, 4), seed=0), queries


class ClusterLookup(torch.nn.Module):
    def forward(self, queries, cc, co, fc, fo, mk_, mi):
        return mk.cluster_lookup(queries, cc, co, fc, fo, mk_, mi, 5, (2, 3), backend="cpu")


def test_cluster_lookup_dynamic_queries():
    index, queries = _bank()
    tree = (index.coarse_centroids, index.coarse_offsets, index.fine_centroids, index.fine_offsets,
            index.member_keys, index.member_ids)
    q = Dim("q", min=1, max=10_000)
    _check(ClusterLookup(), (queries, *tree), ({0: q},) + (None,) * 6,
           [(queries[:1], *tree), (torch.cat([queries, queries]), *tree)])


class ClusterUpdate(torch.nn.Module):
    def forward(self, new_keys, new_values, cc, co, fc, mean, sq, vmean, counts):
        return mk.cluster_update(new_keys, new_values, cc, co, fc, mean, sq, vmean, counts, backend="cpu")


def test_cluster_update_dynamic_batch():
    index, queries = _bank()
    state = (index.coarse_centroids, index.coarse_offsets, index.fine_centroids, index.fine_mean, index.fine_sq,
             index.fine_value_mean, index.fine_counts)
    g = torch.Generator().manual_seed(7)
    m = Dim("m", min=1, max=10_000)
    vals = torch.randn(5, 3, generator=g)
    _check(ClusterUpdate(), (queries, vals, *state), ({0: m}, {0: m}) + (None,) * 7,
           [(queries[:2], vals[:2], *state), (torch.cat([queries, queries]), torch.cat([vals, vals]), *state)])


class _ModelOnTensors(torch.nn.Module):
    """torch.export takes tensors, not the model's batch dict: the same model behind positional inputs."""

    def __init__(self, model, keys):
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, *tensors):
        return self.model(dict(zip(self.keys, tensors)))["pred"]


def test_full_model_export():
    """The full MVPPModel (frame scoring, memory bank, MHP encoder) exports with a dynamic batch and
    gives eager's predictions on a batch of another size."""
    from mvpp.data import generate, iterate_batches
    from mvpp.models import ModelConfig, build_model

    data = generate("tiny", seed=1)
    torch.manual_seed(0)
    model = build_model("MVPPModel", data, ModelConfig(d=16)).eval()
    model.attach_bank(data, torch.arange(40, len(data)))
    both = next(iterate_batches(data, torch.arange(19), 19))  # one padding, so only the batch size differs
    batch = {k: (v[:12] if torch.is_tensor(v) else v) for k, v in both.items()}
    other = {k: (v[12:] if torch.is_tensor(v) else v) for k, v in both.items()}
    keys = sorted(k for k, v in batch.items() if torch.is_tensor(v))
    wrapped = _ModelOnTensors(model, keys)
    b = Dim("batch", min=2, max=1024)
    shapes = {"tensors": tuple({0: b} for _ in keys)}
    with torch.no_grad():
        ep = export(wrapped, tuple(batch[k] for k in keys), dynamic_shapes=shapes)
        got = ep.module()(*(other[k] for k in keys))
        want = wrapped(*(other[k] for k in keys))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
