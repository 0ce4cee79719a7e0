"""Issue 16 regressions for frame_score: non-finite inputs and float32 overflow, on every backend.

The rule all backends share (docs/frame_score.md, "Non-finite inputs"), checked here against an
independent float64 oracle that applies torch.softmax / torch.sort to each video's valid frames:

- frames past a video's length never reach an output or a gradient, whatever they hold;
- dense = torch.softmax(s[:n] / tau) @ f[:n]: NaN (every feature) when a valid score is NaN or +inf,
  or when every valid score is -inf; zeros for a length-0 video;
- top-k = torch.sort(s[:n], descending, stable): NaN above +inf above finite above -inf, ties (NaN
  ties included) -> lower index; a valid -inf frame is still selectable, padding never;
- no float32 overflow where float64 is finite: the softmax is max-subtracted in score units,
  (s - max s) / tau, and the running weighted sum is kept normalised.

Backends: reference, cpu (the C++ kernel), triton (TRITON_INTERPRET=1) and cuda_emulated (the CUDA
kernels of csrc/include/mvpp/frame_score.cuh compiled for the host, with the binding's ATen steps
replayed, as in test_frame_score_cuda_emulated.py).
"""
from __future__ import annotations

import shutil

import pytest
import torch

from mvpp_kernels import frame_score
from mvpp_kernels._backend import has_compiled_kernel, triton_status

import test_frame_score_cuda_emulated as emu

NAN, INF = float("nan"), float("inf")

BACKENDS = [
    "reference",
    pytest.param("cpu", marks=pytest.mark.skipif(not has_compiled_kernel("frame_score_fwd", "CPU"),
                                                 reason="the C++ extension is not built")),
    pytest.param("triton", marks=[pytest.mark.triton,
                                  pytest.mark.skipif(not triton_status()[0], reason="triton is not importable")]),
    pytest.param("cuda_emulated", marks=pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")),
]


@pytest.fixture(scope="module")
def emul_lib(tmp_path_factory):
    return emu.build_emulation(tmp_path_factory.mktemp("fs_emul16"))


def _cotangents(B, T, F, k, seed=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, generator=g), torch.randn(B, F, generator=g), torch.randn(B, k, F, generator=g)


def run(backend, request, frames, weight, lengths, k, tau, hidden=None, bias=None):
    """(scores, dense, idx, topk_frames, grads) with the loss sum(ds * finite scores) + sum(dd * dense)
    + sum(dt * topk_frames); grads maps frames/weight(/W1/b1) to their gradients."""
    B, T, F = frames.shape
    dsc, dd, dt = _cotangents(B, T, F, k)
    if backend == "cuda_emulated":
        lib = request.getfixturevalue("emul_lib")
        inp = dict(frames=frames, weight=weight, bias=bias, lengths=lengths, hidden=hidden)
        out, saved = emu.emul_forward(lib, inp, k, tau, n_warps=2)
        fin = torch.isfinite(out["scores"])
        grads = emu.emul_backward(lib, saved, out, (dsc * fin).contiguous(), dd, dt, tau, n_warps=2)
        return out["scores"], out["dense"], out["idx"], out["tf"], grads
    leaves = dict(frames=frames.clone().requires_grad_(True), weight=weight.clone().requires_grad_(True))
    hid = None
    if hidden is not None:
        leaves["W1"] = hidden[0].clone().requires_grad_(True)
        leaves["b1"] = hidden[1].clone().requires_grad_(True)
        hid = (leaves["W1"], leaves["b1"])
    s, d, i, tf = frame_score(leaves["frames"], leaves["weight"], bias, lengths, k, tau, hid, backend=backend)
    loss = (torch.where(torch.isfinite(s), s, 0.0) * dsc.to(s.dtype)).sum() + (d * dd.to(d.dtype)).sum() \
        + (tf * dt.to(tf.dtype)).sum()
    loss.backward()
    return s.detach(), d.detach(), i, tf.detach(), {n: t.grad for n, t in leaves.items()}


def oracle(frames, weight, lengths, k, tau, hidden=None):
    """The documented rule in float64, one video at a time with torch.softmax and torch.sort."""
    B, T, F = frames.shape
    f64 = frames.double()
    lens = lengths.tolist() if lengths is not None else [T] * B
    dense = torch.zeros(B, F, dtype=torch.float64)
    idx = torch.full((B, k), -1, dtype=torch.int64)
    for b, n in enumerate(lens):
        if n == 0:
            continue
        x = f64[b, :n]
        if hidden is not None:
            s = torch.nn.functional.gelu(x @ hidden[0].double() + hidden[1].double()) @ weight.double()
        else:
            s = x @ weight.double()
        dense[b] = torch.softmax(s / tau, dim=0) @ x
        order = torch.sort(s, descending=True, stable=True).indices[:k]
        idx[b, : len(order)] = order
    return dense, idx


def check_forward(out, frames, weight, lengths, k, tau, hidden=None, rtol=1e-4):
    s, d, i, tf = out[:4]
    d_ref, i_ref = oracle(frames, weight, lengths, k, tau, hidden)
    d = d.double()
    assert torch.equal(torch.isnan(d), torch.isnan(d_ref)), f"NaN pattern of dense differs:\n{d}\n{d_ref}"
    fin = ~torch.isnan(d_ref)
    assert torch.isfinite(d[fin]).all(), f"dense not finite where the float64 oracle is:\n{d}\n{d_ref}"
    scale = d_ref[fin].abs().max().item() if fin.any() else 1.0
    assert torch.allclose(d[fin], d_ref[fin], rtol=rtol, atol=rtol * max(scale, 1e-30)), (d, d_ref)
    assert torch.equal(i.cpu(), i_ref), f"top-k differs:\n{i}\n{i_ref}"
    sel = i.clamp_min(0)
    want = torch.gather(frames, 1, sel.unsqueeze(-1).expand(-1, -1, frames.shape[2]))
    want = torch.where((i >= 0).unsqueeze(-1), want, 0.0)
    assert torch.equal(torch.isnan(tf), torch.isnan(want)) and torch.equal(tf.nan_to_num(), want.nan_to_num())


def _inputs(B=3, T=40, F=12, seed=0, H=None):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(B, T, F, generator=g)
    weight = torch.randn(H or F, generator=g) / (H or F) ** 0.5
    hidden = None
    if H is not None:
        hidden = (torch.randn(F, H, generator=g) / F**0.5, torch.randn(H, generator=g) * 0.1)
    lengths = torch.tensor([T, T - 13, 0][:B] + [T] * max(0, B - 3))
    return frames, weight, lengths, hidden


def _sign_inf(weight, f, positive):
    """A frame value that drives the linear score to +inf (positive) or -inf through feature f."""
    return INF if (weight[f] > 0) == positive else -INF


# Placement of the non-finite values: (name, T, mutate(frames, weight) -> (frames, weight)).
def _place(name, frames, weight):
    frames, weight = frames.clone(), weight.clone()
    T = frames.shape[1]
    if name == "nan_first_frame":
        frames[0, 0, 3] = NAN
    elif name == "nan_mid_frame":
        frames[0, T // 2, 1] = NAN
    elif name == "nan_last_valid_frame":
        frames[1, T - 14, 0] = NAN  # video 1 has T - 13 valid frames
    elif name == "two_nan_frames":
        frames[0, 7, 2] = NAN
        frames[0, 3, 5] = NAN  # two NaN scores: the lower index first
    elif name == "nan_weight":
        weight[2] = NAN
    elif name == "posinf_score":
        frames[0, 5, 0] = _sign_inf(weight, 0, True)
    elif name == "neginf_score":
        frames[0, 5, 0] = _sign_inf(weight, 0, False)
    elif name == "all_neginf_video":
        frames[1, : T - 13, 0] = _sign_inf(weight, 0, False)
    elif name == "neginf_first_block":
        # A whole leading cpu block (8 rows) and every CUDA warp's first frames score -inf: weight 0, but
        # their inf features still make dense[0, 0] NaN (0 * inf), as torch's softmax(s) @ f.
        frames[0, :8, 0] = _sign_inf(weight, 0, False)
    elif name == "inf_feature_nan_score":
        frames[0, 4, :] = INF  # mixed-sign weights: inf - inf = NaN score
    elif name == "nan_padded":
        frames[1, T - 13:, :] = NAN
    elif name == "inf_padded":
        frames[1, T - 13:, 0] = INF
    elif name == "nan_and_inf_padded":
        frames[1, T - 13:, :] = NAN
        frames[1, T - 5:, 2] = -INF
    else:
        raise AssertionError(name)
    return frames, weight


PLACEMENTS = ["nan_first_frame", "nan_mid_frame", "nan_last_valid_frame", "two_nan_frames", "nan_weight",
              "posinf_score", "neginf_score", "all_neginf_video", "neginf_first_block", "inf_feature_nan_score",
              "nan_padded", "inf_padded", "nan_and_inf_padded"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("k", [4, 40])
def test_nonfinite_rule_same_on_every_backend(backend, placement, k, request):
    """Item 1: one documented NaN/inf rule on every backend (the cpu kernel gave dense 0 and dropped the
    NaN frame from the top-k; triton dropped it too, and never selected a valid -inf frame)."""
    frames, weight, lengths, _ = _inputs()
    frames, weight = _place(placement, frames, weight)
    out = run(backend, request, frames, weight, lengths, k, 0.7)
    check_forward(out, frames, weight, lengths, k, 0.7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("placement", ["nan_mid_frame", "two_nan_frames", "all_neginf_video"])
def test_nonfinite_rule_across_splits(backend, placement, request):
    """Item 1 where the video is cut between threads / programs / warps (T = 700: two cpu runs, two
    interpreter chunks of 512, several CUDA warps and splits): the merge must keep the poison."""
    frames, weight, lengths, _ = _inputs(B=2, T=700, F=6, seed=3)
    frames, weight = _place(placement, frames, weight)
    frames[0, 600, 4] = NAN if placement == "two_nan_frames" else frames[0, 600, 4]  # a NaN in the 2nd chunk
    out = run(backend, request, frames, weight, lengths, 8, 1.3)
    check_forward(out, frames, weight, lengths, 8, 1.3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("placement", ["nan_mid_frame", "huge_frame"])
def test_nonfinite_rule_mlp(backend, placement, request):
    frames, weight, lengths, hidden = _inputs(H=16, seed=5)
    frames = frames.clone()
    if placement == "nan_mid_frame":
        frames[0, 11, 3] = NAN
    else:
        frames[0, 11] = 1e30  # a score ~1e30: s / tau stays finite only after the max is subtracted
    out = run(backend, request, frames, weight, lengths, 8, 0.9, hidden=hidden)
    check_forward(out, frames, weight, lengths, 8, 0.9, hidden=hidden)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("H", [None, 16])
def test_padded_nonfinite_frames_reach_no_output_or_gradient(backend, H, request):
    """Item 2: NaN/inf past `lengths` leaves every output and gradient exactly as with zeros there
    (the reference multiplied padded frames by p = 0: 0 * NaN = NaN in dense and in the gradients)."""
    frames, weight, lengths, hidden = _inputs(H=H, seed=7)
    clean = frames.clone()
    clean[1, lengths[1]:] = 0.0
    clean[2] = 0.0
    dirty = frames.clone()
    dirty[1, lengths[1]:, ::2] = NAN
    dirty[1, lengths[1]:, 1::2] = INF
    dirty[2, :, :] = NAN  # the length-0 video
    k = 40
    a = run(backend, request, dirty, weight, lengths, k, 0.6, hidden=hidden)
    b = run(backend, request, clean, weight, lengths, k, 0.6, hidden=hidden)
    for x, y, name in zip(a[:4], b[:4], ("scores", "dense", "topk_idx", "topk_frames")):
        assert torch.equal(x, y), f"{name} depends on the padded frames"
    for name in b[4]:
        ga, gb = a[4][name], b[4][name]
        assert torch.isfinite(ga).all(), f"d{name} not finite: padded NaN leaked"
        assert torch.equal(ga, gb), f"d{name} depends on the padded frames"
    assert torch.equal(a[4]["frames"][1, lengths[1]:], torch.zeros_like(a[4]["frames"][1, lengths[1]:]))
    check_forward(a, dirty, weight, lengths, k, 0.6, hidden=hidden)


@pytest.mark.parametrize("backend", BACKENDS)
def test_poisoned_video_gradients(backend, request):
    """Item 1, backward: a NaN score poisons its own video only -- NaN in that video's valid rows of
    dframes and in the (summed) parameter gradients, zeros in its padded rows, and the other videos'
    rows equal the float64 reference's."""
    frames, weight, lengths, _ = _inputs(seed=9)
    frames[1, 4, 2] = NAN  # video 1: T - 13 valid frames
    s, d, i, tf, grads = run(backend, request, frames, weight, lengths, 8, 0.8)
    gf = grads["frames"]
    n1 = int(lengths[1])
    assert torch.isnan(gf[1, :n1]).all(), "the poisoned video's valid rows must be NaN"
    assert torch.equal(gf[1, n1:], torch.zeros_like(gf[1, n1:]))
    assert torch.isnan(grads["weight"]).all()
    # Video 0 is unaffected: as in the float64 reference run without the NaN.
    clean = frames.clone()
    clean[1, 4, 2] = 0.0
    ref = run("reference", request, clean.double(), weight.double(), lengths, 8, 0.8)
    assert torch.allclose(gf[0].double(), ref[4]["frames"][0], rtol=1e-4, atol=1e-5)
    assert torch.equal(gf[2], torch.zeros_like(gf[2]))


def _overflow_case(name):
    frames, weight, lengths, _ = _inputs(B=2, T=20, F=8, seed=11)
    if name == "score_over_tiny_temperature":
        return frames * 300.0, weight, lengths, 1e-36  # s / tau ~ 1e38.. overflows float32
    if name == "large_score_small_temperature":
        return frames * 1e36, weight, lengths, 1e-3
    if name == "large_equal_frames":
        # 20 equal frames of 3e37: an unnormalised running sum reaches 6e38 > float32 max.
        return torch.full_like(frames, 3e37), weight.abs() / weight.abs().sum() * 1e-37, lengths, 1.0
    raise AssertionError(name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["score_over_tiny_temperature", "large_score_small_temperature",
                                  "large_equal_frames"])
def test_float32_overflow_corners(backend, case, request):
    """Item 3: finite in float64 -> finite and close in float32 (the reference computed s / tau
    before subtracting the max: inf - inf = NaN; the kernels summed unnormalised weighted frames)."""
    frames, weight, lengths, tau = _overflow_case(case)
    d64, i64 = oracle(frames, weight, lengths, 8, tau)
    assert torch.isfinite(d64).all()
    out = run(backend, request, frames, weight, lengths, 8, tau)
    check_forward(out, frames, weight, lengths, 8, tau)
    ref = run("reference", request, frames.double(), weight.double(), lengths, 8, tau)
    for name, gr in out[4].items():
        if name not in ref[4]:  # the emulation also reports dbias (no bias here)
            continue
        representable = ref[4][name].abs() < 1e37
        assert torch.isfinite(gr[representable]).all(), f"d{name} not finite where float64's is ~< 1e37"
