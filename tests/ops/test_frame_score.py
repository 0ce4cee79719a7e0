"""frame_score: every backend against the float64 reference, gradients, opcheck, torch.compile, bad input.

Grid: the issue's T in {1, 7, 100, 1000, 4097}, F in {64, 768, 1000}, k in {1, 8, 16}. The full cross
product with both scorers is 90 cases of up to 3 x 4097 x 1000 frames; instead a pairwise covering:
15 (T, F, k) triples in which every (T, F), (T, k) and (F, k) pair occurs, each with both scorers (30
cases); k > length comes from T in {1, 7} and from the padded videos. Batches are padded (one full, one short, one empty video). Triton runs a smaller subset
in test_frame_score_triton.py (the interpreter is slow).
"""
from __future__ import annotations


import pytest
import torch

import mvpp_kernels
from mvpp_kernels import BackendUnavailableError, frame_score, frame_score_ref
from mvpp_kernels._backend import has_compiled_kernel
from mvpp_kernels.testing import assert_close, make_frame_score_inputs, poisoned_allocations, tolerance

HAS_CPP = has_compiled_kernel("frame_score_fwd", "CPU")
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="the C++ extension (frame_score) is not built")

T_VALUES = (1, 7, 100, 1000, 4097)
F_VALUES = (64, 768, 1000)
K_VALUES = (1, 8, 16)


def _grid():
    """A pairwise covering of T x F x k in 15 triples -- T index a, k index c, F index (a + c) mod 3, so
    every (T, k), (T, F) and (F, k) pair occurs -- each run with the linear and the MLP scorer (H
    alternating 16 / 128)."""
    cases = []
    for a, T in enumerate(T_VALUES):
        for c, k in enumerate(K_VALUES):
            F = F_VALUES[(a + c) % 3]
            for H in (None, (16, 128)[(a + c) % 2]):
                cases.append(pytest.param(T, F, k, H, id=f"T{T}-F{F}-k{k}-{'mlp' + str(H) if H else 'linear'}"))
    return cases


GRID = _grid()


def to_f64(inp: dict, requires_grad: bool = False) -> dict:
    out = dict(inp)
    for key in ("frames", "weight", "bias"):
        if inp[key] is not None:
            out[key] = inp[key].detach().to("cpu", torch.float64).requires_grad_(requires_grad)
    if inp["hidden"] is not None:
        out["hidden"] = tuple(t.detach().to("cpu", torch.float64).requires_grad_(requires_grad) for t in inp["hidden"])
    if inp["lengths"] is not None:
        out["lengths"] = inp["lengths"].cpu()
    return out


def call(inp: dict, k: int, temperature: float = 0.8, backend=None):
    return frame_score(inp["frames"], inp["weight"], inp["bias"], inp["lengths"], k, temperature, inp["hidden"],
                       backend=backend)


def check_topk(idx, topk_frames, frames, ref_scores, ref_idx, lengths, rel_tol=1e-5):
    """Top-k equal to the reference's up to float32 rounding of near-equal scores.

    Exact float64 ties (duplicated frames) must resolve to the lower index, so where the reference's
    scores at the kernel's and the reference's choice are exactly equal the indices must match.
    """
    idx, ref_idx = idx.cpu(), ref_idx.cpu()
    assert idx.dtype == torch.int64 and idx.shape == ref_idx.shape
    assert torch.equal(idx == -1, ref_idx == -1), f"padding differs:\n{idx}\n{ref_idx}"
    batch, k = idx.shape
    T = frames.shape[1]
    lens = lengths.cpu() if lengths is not None else torch.full((batch,), T)
    scale = ref_scores[torch.isfinite(ref_scores)].abs().max().item() if torch.isfinite(ref_scores).any() else 1.0
    tol = rel_tol * max(scale, 1.0)
    for b in range(batch):
        sel = idx[b][idx[b] >= 0]
        assert len(set(sel.tolist())) == len(sel), f"video {b}: repeated indices {sel.tolist()}"
        assert bool((sel < lens[b]).all()), f"video {b}: selected a frame past its length: {sel.tolist()}"
        for j in range(k):
            i, r = int(idx[b, j]), int(ref_idx[b, j])
            if i == r or r < 0:
                continue
            si, sr = ref_scores[b, i].item(), ref_scores[b, r].item()
            assert si != sr, f"video {b} rank {j}: tie broken toward index {i} instead of the lower {r}"
            assert abs(si - sr) <= tol, f"video {b} rank {j}: picked frame {i} (score {si}), reference {r} ({sr})"
    # The gathered frames are exact copies (or zeros where padded).
    safe = idx.clamp_min(0).to(frames.device)
    gathered = torch.gather(frames, 1, safe.unsqueeze(-1).expand(-1, -1, frames.shape[2]))
    expect = torch.where((idx >= 0).to(frames.device).unsqueeze(-1), gathered, torch.zeros_like(gathered))
    assert torch.equal(topk_frames, expect), "topk_frames are not the frames at topk_idx (zeros where padded)"


def check_forward(out, inp, k, temperature=0.8, dtype=None, scale=1.0, score_dtype=None):
    ref = frame_score_ref(**{**to_f64(inp), "k": k, "temperature": temperature})
    scores, dense, idx, topk_frames = out
    ct = torch.float64 if inp["frames"].dtype == torch.float64 else torch.float32
    assert scores.dtype == ct and dense.dtype == inp["frames"].dtype and topk_frames.dtype == inp["frames"].dtype
    finite = torch.isfinite(ref[0])
    assert torch.equal(torch.isfinite(scores).cpu(), finite), "-inf pattern of scores differs from the lengths"
    assert bool((scores.cpu()[~finite] == float("-inf")).all())
    # Scores are computed in float32 from (possibly low-precision) frames: judge them by float32's table.
    sd = score_dtype or (torch.float32 if ct == torch.float32 else torch.float64)
    assert_close(torch.where(finite, scores.cpu().double(), 0.0), torch.where(finite, ref[0], 0.0),
                 dtype=sd, name="scores", scale=scale * 4)
    assert_close(dense, ref[1], dtype=dtype, name="dense", scale=scale)
    check_topk(idx, topk_frames, inp["frames"], ref[0], ref[2], inp["lengths"],
               rel_tol=1e-5 if score_dtype is None else 8 * sum(tolerance(score_dtype)))


# ---------------------------------------------------------------------------------------------
# Forward against the float64 reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T,F,k,H", GRID)
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=[pytest.mark.cpp, needs_cpp])])
def test_forward_grid(backend, T, F, k, H):
    inp = make_frame_score_inputs(3, T, F, H=H, seed=T * 31 + F + k)
    with poisoned_allocations():
        out = call(inp, k, backend=backend)
    check_forward(out, inp, k)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H", [None, 32])
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=[pytest.mark.cpp, needs_cpp])])
def test_forward_dtypes(backend, dtype, H):
    inp = make_frame_score_inputs(4, 63, 96, H=H, dtype=dtype, seed=5)
    with poisoned_allocations():
        out = call(inp, 8, backend=backend)
    check_forward(out, inp, 8, scale=2.0)


@pytest.mark.parametrize("H", [None, 16])
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=[pytest.mark.cpp, needs_cpp])])
def test_ties_prefer_lower_index(backend, H):
    inp = make_frame_score_inputs(3, 100, 64, H=H, ties=True, seed=11)
    with poisoned_allocations():
        out = call(inp, 16, backend=backend)
    check_forward(out, inp, 16)
    # Every frame identical: every score ties, so the top-k is 0, 1, 2, ... in order.
    same = dict(inp, frames=inp["frames"][:, :1].expand(3, 100, 64).contiguous(), lengths=torch.tensor([100, 5, 3]))
    _, dense, idx, _ = call(same, 8, backend=backend)
    assert idx[0].tolist() == list(range(8))
    assert idx[1].tolist() == [0, 1, 2, 3, 4, -1, -1, -1]
    assert idx[2].tolist() == [0, 1, 2, -1, -1, -1, -1, -1]
    assert_close(dense, same["frames"][:, 0].double())


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=[pytest.mark.cpp, needs_cpp])])
def test_empty_and_unpadded(backend):
    inp = make_frame_score_inputs(3, 20, 64, seed=3)
    inp["lengths"] = torch.tensor([0, 0, 0])
    scores, dense, idx, tf = call(inp, 4, backend=backend)
    assert bool((scores == float("-inf")).all()) and bool((dense == 0).all()) and bool((idx == -1).all())
    assert bool((tf == 0).all())
    inp = make_frame_score_inputs(2, 20, 64, padded=False, with_bias=False, seed=4)
    check_forward(call(inp, 25, backend=backend), inp, 25)


@needs_cpp
@pytest.mark.cpp
def test_cpu_splits_long_videos_across_threads():
    # batch 1 with a long video takes the (video, chunk) split path and the per-video merge.
    inp = make_frame_score_inputs(1, 3000, 64, padded=False, seed=8)
    inp["frames"][0, 2500] += 3.0  # a late maximum: the merge must rescale the early chunks
    check_forward(call(inp, 8, backend="cpu"), inp, 8)
    inp["lengths"] = torch.tensor([1700])
    check_forward(call(inp, 8, backend="cpu"), inp, 8)


@needs_cpp
@pytest.mark.cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_cpu_split_by_valid_frames(threads, dtype):
    # The forward cuts the batch's valid frames into one equal share per thread, so the share
    # boundaries move with the thread count and fall inside videos, next to empty ones, or on a video's
    # first/last frame. The best frame is duplicated all over two videos: the exact ties straddle the
    # boundaries and the per-video merge must still return the lowest indices. F = 200 walks every
    # vector path (a 128-wide register tile, single 16-wide vectors, a scalar tail).
    inp = make_frame_score_inputs(6, 331, 200, dtype=dtype, seed=21 + threads)
    inp["lengths"] = torch.tensor([331, 0, 1, 330, 0, 97])
    for b in (0, 3):
        best = int(frame_score_ref(**{**to_f64(inp), "k": 1, "temperature": 1.0})[2][b, 0])
        inp["frames"][b, 5::9] = inp["frames"][b, best]
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        with poisoned_allocations():
            out = call(inp, 40, temperature=0.6, backend="cpu")
    finally:
        torch.set_num_threads(old)
    check_forward(out, inp, 40, temperature=0.6, scale=2.0 if dtype == torch.bfloat16 else 1.0)
    ref_idx = frame_score_ref(**{**to_f64(inp), "k": 40, "temperature": 0.6})[2]
    for b in (0, 3):  # the duplicated best frame wins 30+ exact ties: lowest indices first
        assert torch.equal(out[2][b, :30], ref_idx[b, :30])


def test_non_contiguous_and_python_bias():
    inp = make_frame_score_inputs(3, 50, 64, seed=9)
    frames = inp["frames"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not frames.is_contiguous()
    out = frame_score(frames, inp["weight"], 0.25, inp["lengths"], 8, 1.0)
    ref = frame_score_ref(frames.double(), inp["weight"].double(), 0.25, inp["lengths"], 8, 1.0)
    assert_close(out[1], ref[1])
    assert torch.equal(out[2], ref[2])


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------
def _differentiable(fn):
    """scores with -inf replaced by 0 (so finite differences stay finite), dense and topk_frames."""

    def wrapped(*args):
        s, d, _, g = fn(*args)
        return torch.where(torch.isfinite(s), s, torch.zeros_like(s)), d, g

    return wrapped


@pytest.mark.parametrize("H", [None, 3])
@pytest.mark.parametrize("k", [3, 9])
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=[pytest.mark.cpp, needs_cpp])])
def test_gradcheck(backend, H, k):
    inp = make_frame_score_inputs(3, 7, 5, H=H, dtype=torch.float64, seed=12, requires_grad=True)
    inp["lengths"] = torch.tensor([7, 2, 0])
    params = [inp["frames"], inp["weight"], inp["bias"]] + (list(inp["hidden"]) if H else [])

    def fn(frames, weight, bias, *hidden):
        return frame_score(frames, weight, bias, inp["lengths"], k, 0.7, tuple(hidden) if hidden else None,
                           backend=backend)

    assert torch.autograd.gradcheck(_differentiable(fn), params, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("T,F,H", [(100, 64, None), (100, 64, 16), (1000, 768, None), (63, 1000, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=[pytest.mark.cpp, needs_cpp])])
def test_grads_vs_reference(backend, T, F, H, dtype):
    grads_vs_reference(backend, T, F, H, dtype, k=8)


@needs_cpp
@pytest.mark.cpp
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("H", [None, 8])
def test_cpu_grads_split_by_valid_frames(threads, H):
    # The backward splits the valid frames like the forward: with 1 thread no video is cut, with 3
    # threads two videos are (a continuation run's parameter partials are added to its video's slot).
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        grads_vs_reference("cpu", 301, 200, H, torch.float32, k=8, batch=4)
    finally:
        torch.set_num_threads(old)


def grads_vs_reference(backend, T, F, H, dtype, k, batch=3, device="cpu"):
    inp = make_frame_score_inputs(batch, T, F, H=H, dtype=dtype, seed=T + F, requires_grad=True, device=device)
    ref_inp = to_f64(inp, requires_grad=True)
    g = torch.Generator().manual_seed(1)
    with poisoned_allocations():
        out = call(inp, k, backend=backend)
    ref = frame_score_ref(**{**ref_inp, "k": k, "temperature": 0.8})
    finite = torch.isfinite(ref[0])
    ws = torch.randn(ref[0].shape, generator=g, dtype=torch.float64) * finite
    wd = torch.randn(ref[1].shape, generator=g, dtype=torch.float64)
    wt = torch.randn(ref[3].shape, generator=g, dtype=torch.float64)

    def loss(o):
        s = torch.where(torch.isfinite(o[0]), o[0], torch.zeros_like(o[0]))
        return (s.double().cpu() * ws).sum() + (o[1].double().cpu() * wd).sum() + (o[3].double().cpu() * wt).sum()

    with poisoned_allocations():
        loss(out).backward()
    loss(ref).backward()
    names = ["frames", "weight", "bias"] + (["W1", "b1"] if H else [])
    mine = [inp["frames"], inp["weight"], inp["bias"]] + (list(inp["hidden"]) if H else [])
    theirs = [ref_inp["frames"], ref_inp["weight"], ref_inp["bias"]] + (list(ref_inp["hidden"]) if H else [])
    for name, a, b in zip(names, mine, theirs):
        assert a.grad is not None, name
        # Parameter gradients sum over every frame of the batch: allow for the length of the sum.
        assert_close(a.grad, b.grad, dtype=dtype, grad=True, name=f"d{name}", scale=1.0 if name == "frames" else 4.0)


# ---------------------------------------------------------------------------------------------
# opcheck, torch.compile
# ---------------------------------------------------------------------------------------------
def _op_args(H, dtype=torch.float32, device="cpu"):
    inp = make_frame_score_inputs(3, 9, 16, H=H, dtype=dtype, seed=21, requires_grad=True, device=device)
    W1, b1 = inp["hidden"] if H else (None, None)
    return inp, (inp["frames"], inp["weight"], inp["bias"], inp["lengths"], W1, b1, 4, 0.9)


@pytest.mark.parametrize("H", [None, 4])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_opcheck_compiled(device, H):
    key = "CPU" if device == "cpu" else "CUDA"
    if not has_compiled_kernel("frame_score_fwd", key):
        pytest.skip(f"no compiled {key} kernel for frame_score")
    inp, args = _op_args(H, device=device)
    torch.library.opcheck(torch.ops.mvpp.frame_score_fwd.default, args)
    scores, dense, idx, tf, lse = torch.ops.mvpp.frame_score_fwd(*args)
    W1, b1 = args[4], args[5]
    bwd_args = (torch.randn_like(scores), torch.randn_like(dense), torch.randn_like(tf), args[0].detach(),
                args[1].detach(), W1.detach() if W1 is not None else None, b1.detach() if b1 is not None else None,
                args[3], scores.detach(), lse.detach(), idx, 0.9)
    torch.library.opcheck(torch.ops.mvpp.frame_score_bwd.default, bwd_args)


class _Pool(torch.nn.Module):
    def __init__(self, F, H, backend):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(H or F) / F**0.5)
        self.hidden = (torch.nn.Parameter(torch.randn(F, H) / F**0.5), torch.nn.Parameter(0.1 * torch.randn(H))) if H else None
        if H:
            self.W1, self.b1 = self.hidden
        self.backend = backend

    def forward(self, frames, lengths):
        hidden = (self.W1, self.b1) if self.hidden is not None else None
        scores, dense, idx, tf = frame_score(frames, self.weight, None, lengths, 4, 1.0, hidden, backend=self.backend)
        return dense + tf.mean(1)


@pytest.mark.parametrize("H", [None, 8])
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=[pytest.mark.cpp, needs_cpp])])
def test_torch_compile_fullgraph(backend, H):
    torch._dynamo.reset()
    mod = _Pool(32, H, backend)
    frames = torch.randn(3, 12, 32, requires_grad=True)
    lengths = torch.tensor([12, 5, 0])
    eager = mod(frames, lengths)
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    out = compiled(frames, lengths)
    assert_close(out, eager.double())
    out.sum().backward()
    g = frames.grad.clone()
    frames.grad = None
    eager.sum().backward()
    assert_close(g, frames.grad.double(), grad=True)


# ---------------------------------------------------------------------------------------------
# Backend choice and bad input
# ---------------------------------------------------------------------------------------------
def test_backend_info_and_auto():
    info = mvpp_kernels.backend_info()
    assert info["auto"]["cpu"]["frame_score"] == ("cpu" if HAS_CPP else "reference")
    inp = make_frame_score_inputs(2, 10, 16, seed=1)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        call(inp, 2, backend="cuda")


def _bad(**over):
    inp = make_frame_score_inputs(2, 10, 16, seed=2)
    args = dict(frames=inp["frames"], weight=inp["weight"], bias=inp["bias"], lengths=inp["lengths"], k=4,
                temperature=1.0, hidden=None)
    args.update(over)
    return args


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=[pytest.mark.cpp, needs_cpp])])
@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(k=0), ValueError, "k must be >= 1"),
        (dict(k=-3), ValueError, "k must be >= 1"),
        (dict(k=2.5), TypeError, "k must be an int"),
        (dict(lengths=torch.tensor([11, 3])), ValueError, r"lengths must lie in \[0, 10\]"),
        (dict(lengths=torch.tensor([-1, 3])), ValueError, r"lengths must lie in \[0, 10\]"),
        (dict(lengths=torch.tensor([1.0, 3.0])), TypeError, "lengths must be an integer tensor"),
        (dict(lengths=torch.tensor([1, 2, 3])), ValueError, r"lengths must have shape \(2,\)"),
        (dict(weight=torch.randn(15)), ValueError, r"weight must have shape \(F=16,\)"),
        (dict(hidden=(torch.randn(15, 8), torch.randn(8))), ValueError, r"W1\) must have shape \(F=16, H\)"),
        (dict(hidden=(torch.randn(16, 8), torch.randn(7))), ValueError, r"b1\) must have shape \(8\)"),
        (dict(hidden=(torch.randn(16, 8), torch.randn(8))), ValueError, r"weight must have shape \(H=8,\)"),
        (dict(hidden=(torch.randn(16, 129), torch.randn(129)), weight=torch.randn(129)), ValueError, r"\[1, 128\]"),
        (dict(hidden=torch.randn(16, 8)), TypeError, "hidden must be a pair"),
        (dict(frames=torch.randint(0, 5, (2, 10, 16))), TypeError, "frames must have dtype"),
        (dict(weight=torch.randint(0, 5, (16,))), TypeError, "weight must have dtype"),
        (dict(frames=torch.randn(10, 16)), ValueError, r"frames must be 3-D"),
        (dict(frames=torch.randn(2, 0, 16)), ValueError, "T >= 1"),
        (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature=-1.0), ValueError, "temperature must be a finite number > 0"),
        (dict(bias=torch.randn(3)), ValueError, "bias must be a scalar"),
        (dict(bias="x"), TypeError, "bias must be a scalar tensor"),
        (dict(weight=torch.randn(16, device="meta")), ValueError, "weight is on meta but frames is on cpu"),
        (dict(lengths=torch.tensor([1, 2], device="meta")), ValueError, "lengths is on meta but frames is on cpu"),
    ],
)
def test_bad_input(backend, over, exc, match):
    args = _bad(**over)
    with pytest.raises(exc, match=match):
        frame_score(**args, backend=backend)


def test_check_inputs_rejects_nan():
    args = _bad()
    args["frames"] = args["frames"].clone()
    args["frames"][1, 3, 2] = float("nan")
    with pytest.raises(ValueError, match="frames has 1 non-finite"):
        frame_score(**args, check_inputs=True)


def test_bad_backend_name():
    with pytest.raises(ValueError, match="not a backend"):
        frame_score(**_bad(), backend="gpu")


# ---------------------------------------------------------------------------------------------
# The CUDA kernel (run on a GPU only; auto-skipped here)
# ---------------------------------------------------------------------------------------------
def _needs_cuda_kernel():
    if not has_compiled_kernel("frame_score_fwd", "CUDA"):
        pytest.skip("the CUDA extension has no frame_score kernel")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,F,k,H", [pytest.param(*p.values, id=p.id) for p in GRID[::3]])
def test_cuda_forward(T, F, k, H, dtype):
    _needs_cuda_kernel()
    inp = make_frame_score_inputs(3, T, F, H=H, dtype=dtype, seed=T + F + k, device="cuda")
    with poisoned_allocations():
        out = call(inp, k, backend="cuda")
    check_forward(out, inp, k, scale=1.0 if dtype == torch.float32 else 2.0)


@pytest.mark.cuda
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("T,F,H,k", [(100, 64, None, 8), (1000, 768, None, 16), (63, 1000, 16, 8), (40, 64, 128, 9)])
def test_cuda_grads_vs_reference(T, F, H, k, ties):
    _needs_cuda_kernel()
    if ties:
        inp = make_frame_score_inputs(3, T, F, H=H, ties=True, seed=2, device="cuda")
        check_forward(call(inp, k, backend="cuda"), inp, k)
    else:
        grads_vs_reference("cuda", T, F, H, torch.float32, k, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("H", [None, 8])
def test_cuda_torch_compile_fullgraph(H):
    _needs_cuda_kernel()
    torch._dynamo.reset()
    mod = _Pool(32, H, "cuda").cuda()
    frames = torch.randn(3, 12, 32, device="cuda", requires_grad=True)
    lengths = torch.tensor([12, 5, 0], device="cuda")
    eager = mod(frames, lengths)
    out = torch.compile(mod, fullgraph=True)(frames, lengths)
    assert_close(out, eager.double())
