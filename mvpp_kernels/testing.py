"""Test and benchmark helpers: the per-dtype tolerance table, input makers, NaN poisoning and
comparison against a float64 reference. Used by tests/ and benchmarks/ (and by downstream users
checking their own builds).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

# (atol, rtol) for a kernel's output against the float64 reference, per *input* dtype. Kernels
# accumulate in float32 for every input dtype, so the low-precision rows reflect rounding of the
# inputs/outputs, not of the accumulation.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (2e-5, 2e-4),
    torch.float16: (3e-3, 5e-3),
    torch.bfloat16: (2e-2, 3e-2),
}

# Gradients go through a longer chain of roundings (recomputation, reductions over L).
GRAD_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-9, 1e-7),
    torch.float32: (1e-4, 1e-3),
    torch.float16: (1e-2, 2e-2),
    torch.bfloat16: (5e-2, 8e-2),
}


def tolerance(dtype: torch.dtype, grad: bool = False) -> tuple[float, float]:
    table = GRAD_TOLERANCES if grad else TOLERANCES
    if dtype not in table:
        raise KeyError(f"no tolerance for dtype {dtype}")
    return table[dtype]


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a tensor with NaN (floats) or a sentinel (ints) so an element a kernel forgets to write shows."""
    if t.is_floating_point():
        t.fill_(float("nan"))
    elif t.dtype == torch.bool:
        t.fill_(True)
    else:
        t.fill_(-(2**31) + 7 if t.dtype != torch.uint8 else 255)
    return t


@contextlib.contextmanager
def poisoned_allocations(device: str | torch.device = "cpu"):
    """Within the block, every uninitialised allocation (torch.empty, new_empty, empty_like, and
    at::empty inside C++ kernels) is filled with NaN for floats and the max value for ints, so an
    output element a kernel forgets to write shows. Uses torch's own mechanism:
    deterministic mode (warn-only) + `torch.utils.deterministic.fill_uninitialized_memory`."""
    import torch.utils.deterministic as det

    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_fill = det.fill_uninitialized_memory
    # With deterministic mode on and fill_uninitialized_memory set, torch.empty* fill floats with NaN
    # and ints with their max value -- in Python and in C++ (at::empty) alike.
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    try:
        yield
    finally:
        det.fill_uninitialized_memory = old_fill
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 (inf if actual has NaN)."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    if torch.isnan(a).any() and not torch.isnan(e).any():
        return float("inf")
    den = e.norm().item()
    num = (a - e).norm().item()
    return num / den if den > 0 else num


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: Optional[torch.dtype] = None,
    *,
    grad: bool = False,
    name: str = "output",
    scale: float = 1.0,
) -> None:
    """Compare `actual` with a (float64) reference using the tolerance of `dtype` (default actual's).

    NaN in `actual` where `expected` is finite always fails (an unwritten, poisoned element); ±inf must
    match exactly, and the magnitude-relative tolerance is taken over the finite reference values only.
    `scale` multiplies both tolerances (e.g. for long reductions).
    """
    dtype = dtype or actual.dtype
    atol, rtol = tolerance(dtype, grad)
    atol, rtol = atol * scale, rtol * scale
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if (nan_a & ~nan_e).any():
        idx = tuple(int(i) for i in (nan_a & ~nan_e).nonzero()[0])
        raise AssertionError(f"{name}: NaN at {idx} (unwritten or poisoned element) where the reference is finite")
    # Infinities must match exactly (position and sign); they do not enter the magnitude below, which
    # would otherwise become inf and let every finite element pass.
    inf_a, inf_e = torch.isinf(a), torch.isinf(e)
    bad_inf = (inf_a | inf_e) & ~nan_e & ~(inf_a & inf_e & (torch.sign(a) == torch.sign(e)))
    if bad_inf.any():
        idx = tuple(int(i) for i in bad_inf.nonzero()[0])
        raise AssertionError(f"{name}: {a[idx].item()} at {idx} where the reference is {e[idx].item()}")
    # Tolerance relative to the tensor's own magnitude as well as elementwise: values near zero in a
    # large-magnitude output are judged against the output's scale.
    fin_e = torch.isfinite(e)
    mag = e[fin_e].abs().max().item() if fin_e.any() else 0.0
    torch.testing.assert_close(a, e, atol=atol + rtol * 0.1 * mag, rtol=rtol, equal_nan=True, msg=lambda m: f"{name} ({dtype}): {m}")


def seeded_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=torch.device(device).type)
    g.manual_seed(seed)
    return g


def make_selective_scan_inputs(
    batch: int,
    dim: int,
    N: int,
    L: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    B_layout: str = "variable",  # "constant" (dim, N) | "variable" (batch, N, L) | "grouped" (batch, G, N, L)
    groups: int = 2,
    with_D: bool = True,
    with_z: bool = True,
    with_delta_bias: bool = True,
    with_initial_state: bool = False,
    seed: int = 0,
    requires_grad: bool = False,
) -> dict:
    """Random (never zero) inputs for selective_scan in mamba's conventions.

    A is real negative (the S4D-real init: A_n = -(n+1)) with a random perturbation; delta is
    positive-ish so softplus(delta + bias) spans small and large steps. Weights (A, D, delta_bias)
    are float32 unless dtype is float64, as mamba keeps them.
    """
    g = seeded_generator(seed)
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32

    def rnd(*shape, dt=dtype, lo=None, hi=None):
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        if lo is not None:
            x = lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)
        return x.to(device=device, dtype=dt)

    u = rnd(batch, dim, L)
    delta = 0.5 * rnd(batch, dim, L, lo=-1.0, hi=1.0)
    A = (-(torch.arange(1, N + 1, dtype=torch.float64)).repeat(dim, 1) * (0.5 + torch.rand(dim, N, generator=g, dtype=torch.float64))).to(device=device, dtype=wdtype)
    if B_layout == "constant":
        B, C = rnd(dim, N, dt=wdtype), rnd(dim, N, dt=wdtype)
    elif B_layout == "variable":
        B, C = rnd(batch, N, L), rnd(batch, N, L)
    elif B_layout == "grouped":
        B, C = rnd(batch, groups, N, L), rnd(batch, groups, N, L)
    else:
        raise ValueError(f"B_layout must be constant, variable or grouped, got {B_layout!r}")
    inputs = dict(u=u, delta=delta, A=A, B=B, C=C)
    inputs["D"] = rnd(dim, dt=wdtype) if with_D else None
    inputs["z"] = rnd(batch, dim, L) if with_z else None
    inputs["delta_bias"] = (0.5 * rnd(dim, dt=wdtype, lo=-1.0, hi=1.0)) if with_delta_bias else None
    inputs["initial_state"] = rnd(batch, dim, N, dt=wdtype) if with_initial_state else None
    if requires_grad:
        for v in inputs.values():
            if v is not None:
                v.requires_grad_(True)
    return inputs


def to_reference(inputs: dict, dtype: torch.dtype = torch.float64) -> dict:
    """Detached float64 (or `dtype`) CPU copies that require grad where the originals did."""
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            c = v.detach().to("cpu", dtype)
            c.requires_grad_(v.requires_grad)
            out[k] = c
        elif isinstance(v, torch.Tensor):
            out[k] = v.detach().cpu()
        else:
            out[k] = v
    return out


# ----------------------------------------------------------------------------------------------
# frame_score (issue: frame_score)
# ----------------------------------------------------------------------------------------------
def make_frame_score_inputs(
    batch: int,
    T: int,
    F: int,
    *,
    H: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    padded: bool = True,
    ties: bool = False,
    with_bias: bool = True,
    seed: int = 0,
    requires_grad: bool = False,
) -> dict:
    """Random (never zero) inputs for frame_score: frames (batch, T, F), weight, bias, lengths, hidden.

    Scores come out O(1) (weight ~ N(0, 1/F)). `padded` gives varied lengths including T, a short
    one and, for batch >= 3, an empty video; `ties` copies some frames onto later positions so equal
    scores occur (the top-k must then prefer the lower index). Parameters are float32 unless
    dtype is float64.
    """
    g = seeded_generator(seed)
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32
    frames = torch.randn(batch, T, F, generator=g, dtype=torch.float64)
    if ties and T >= 2:
        n_dup = max(1, T // 4)
        src = torch.randint(0, T, (n_dup,), generator=g)
        dst = torch.randint(0, T, (n_dup,), generator=g)
        frames[:, dst] = frames[:, src]
    weight_dim = H if H is not None else F
    weight = torch.randn(weight_dim, generator=g, dtype=torch.float64) / weight_dim**0.5
    out = dict(frames=frames.to(device=device, dtype=dtype), weight=weight.to(device=device, dtype=wdtype))
    out["bias"] = (0.5 + torch.rand((), generator=g, dtype=torch.float64)).to(device=device, dtype=wdtype) if with_bias else None
    if padded:
        lengths = torch.randint(1, T + 1, (batch,), generator=g)
        lengths[0] = T
        if batch >= 2:
            lengths[1] = min(T, 1 + int(torch.randint(0, 8, (1,), generator=g)))
        if batch >= 3:
            lengths[2] = 0
        out["lengths"] = lengths.to(device)
    else:
        out["lengths"] = None
    if H is not None:
        W1 = torch.randn(F, H, generator=g, dtype=torch.float64) / F**0.5
        b1 = 0.1 * torch.randn(H, generator=g, dtype=torch.float64)
        out["hidden"] = (W1.to(device=device, dtype=wdtype), b1.to(device=device, dtype=wdtype))
    else:
        out["hidden"] = None
    if requires_grad:
        for key in ("frames", "weight", "bias"):
            if out[key] is not None:
                out[key].requires_grad_(True)
        if out["hidden"] is not None:
            for t in out["hidden"]:
                t.requires_grad_(True)
    return out
# ---------------------------------------------------------------------------------------------- end frame_score


# ----------------------------------------------------------------------------------------------
# memory bank (issue 5): synthetic banks for exact_search / cluster_lookup / HierarchicalIndex
# ----------------------------------------------------------------------------------------------
def make_memory_bank_data(
    n: int,
    d: int,
    n_queries: int,
    kind: str = "clustered",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    manifold_dim: int = 16,
    bandwidth: float = 0.45,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys (n, d), queries (n_queries, d)), unit-norm rows, drawn from one distribution:

    - "clustered": a mixture of max(8, n // 2000) Gaussians on the sphere (noise norm ~0.6).
    - "hard": a continuous `manifold_dim`-dimensional manifold (default 16) embedded in d dimensions by
      random Fourier features of a Gaussian latent, x = cos(z W + b) with z ~ N(0, I_m),
      W ~ N(0, bandwidth^2) (m, d), b ~ U[0, 2 pi), then normalised. <x, x'> approximates
      exp(-bandwidth^2 |z - z'|^2 / 2): a smooth embedding with no cluster structure for k-means to
      find and a density that varies (dense core, sparse tails), like real embeddings. Queries are
      fresh draws of z, not copies of keys. Calibrated so faiss IndexIVFFlat (nlist = 4 sqrt(n))
      needs nprobe ~ 96 for recall@10 = 0.95 at 1M x 256 (docs/memory_bank.md, "Synthetic data").
    - "integer": small integers in [-2, 2] (not normalised): every score is exact in every dtype, so
      all backends must agree bit for bit, ties included.
    """
    g = seeded_generator(seed)
    total = n + n_queries
    if kind == "clustered":
        nc = max(8, n // 2000)
        centers = torch.randn(nc, d, generator=g, dtype=torch.float64)
        centers = centers / centers.norm(dim=1, keepdim=True)
        lab = torch.randint(nc, (total,), generator=g)
        x = centers[lab] + 0.6 * torch.randn(total, d, generator=g, dtype=torch.float64) / d**0.5
    elif kind == "hard":
        m = int(manifold_dim)
        if m < 1:
            raise ValueError(f"manifold_dim must be >= 1, got {manifold_dim}")
        W = float(bandwidth) * torch.randn(m, d, generator=g, dtype=torch.float64)
        b = 2 * torch.pi * torch.rand(d, generator=g, dtype=torch.float64)
        z = torch.randn(total, m, generator=g, dtype=torch.float64)
        # float64 maths in row blocks written straight into the output dtype: a float64 (n, d) copy
        # of a 1M x 256 bank would be 2 GB
        x = torch.empty(total, d, dtype=dtype)
        for a in range(0, total, 1 << 16):
            xb = torch.cos(torch.addmm(b, z[a:a + (1 << 16)], W))
            x[a:a + (1 << 16)] = xb / xb.norm(dim=1, keepdim=True).clamp_min(1e-12)
        x = x.to(device=device)
        return x[:n].contiguous(), x[n:].contiguous()
    elif kind == "integer":
        x = torch.randint(-2, 3, (total, d), generator=g).to(torch.float64)
    else:
        raise ValueError(f"kind must be 'clustered', 'hard' or 'integer', got {kind!r}")
    if kind != "integer":
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    x = x.to(device=device, dtype=dtype)
    return x[:n].contiguous(), x[n:].contiguous()


def recall_at_k(found_ids: torch.Tensor, true_ids: torch.Tensor) -> float:
    """Mean fraction of each row of true_ids (q, k) found in the same row of found_ids (q, k')."""
    hit = (found_ids[:, :, None] == true_ids[:, None, :]) & (true_ids[:, None, :] >= 0)
    return float(hit.any(1).sum(1).double().div(true_ids.shape[1]).mean())


# ---------------------------------------------------------------------------------------------
# Peer: mamba-ssm's own selective_scan_ref (the CPU path its users have), when installed
# ---------------------------------------------------------------------------------------------
def load_mamba_selective_scan_ref():
    """mamba-ssm's `selective_scan_ref`, or None when mamba-ssm is not installed.

    mamba_ssm's package __init__ and its selective_scan_interface import the CUDA extension
    `selective_scan_cuda` at the top, which a CPU-only install (MAMBA_SKIP_CUDA_BUILD=TRUE) lacks:
    load the interface module with that import stubbed and the package __init__ bypassed; the stubs
    are removed afterwards. Nothing of mamba-ssm is copied into this package."""
    import importlib
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or not spec.submodule_search_locations:
        return None
    added = []
    try:
        if "selective_scan_cuda" not in sys.modules:
            try:
                import selective_scan_cuda  # noqa: F401  (a CUDA build of mamba-ssm)
            except ImportError:
                sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
                added.append("selective_scan_cuda")
        if "mamba_ssm" not in sys.modules:
            pkg = types.ModuleType("mamba_ssm")
            pkg.__path__ = list(spec.submodule_search_locations)
            sys.modules["mamba_ssm"] = pkg
            added.append("mamba_ssm")
        return importlib.import_module("mamba_ssm.ops.selective_scan_interface").selective_scan_ref
    except Exception:
        return None
    finally:
        for name in added:
            sys.modules.pop(name, None)
