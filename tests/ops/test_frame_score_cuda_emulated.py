"""The CUDA frame_score kernels, run on the CPU.

g++ compiles the kernel functions of csrc/include/mvpp/frame_score.cuh for the host with stand-ins
for the CUDA headers (tests/ops/frame_score_emulation/): every thread of a block is an OS thread,
__syncthreads a barrier, a warp shuffle an exchange between two warp barriers, and the dynamic shared
memory a per-block buffer filled with NaN. The launch geometry follows the launchers (split-T forward
with several warps per block and several splits per video, then the merge; the backward's row and
frame kernels), and the backward's ATen steps of csrc/cuda/frame_score.cu are replayed in torch.
What this cannot check: fp16/bf16 loads, the real launch/shared-memory limits and the torch binding
itself -- tests/ops/test_frame_score.py's cuda-marked tests cover those on a GPU.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as Fn

from mvpp_kernels import frame_score_ref
from mvpp_kernels.testing import assert_close, make_frame_score_inputs

from test_frame_score import check_topk, to_f64

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the host emulation")


def build_emulation(out_dir):
    """Compile the host emulation of the CUDA frame_score kernels into out_dir and load it (ctypes)."""
    out = os.path.join(str(out_dir), "libfs_emul.so")
    cmd = ["g++", "-O2", "-std=c++20", "-pthread", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas", "-Werror",
           "-I", os.path.join(HERE, "frame_score_emulation"), "-I", os.path.join(ROOT, "csrc", "include"),
           os.path.join(HERE, "frame_score_emulation", "frame_score_emul.cpp"), "-o", out]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    so = ctypes.CDLL(out)
    so.fs_emul_fwd.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.c_float, ctypes.POINTER(ctypes.c_void_p)]
    for f in (so.fs_emul_bwd_rows, so.fs_emul_bwd_frames):
        f.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_void_p)]
    return so


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return build_emulation(tmp_path_factory.mktemp("fs_emul"))


def _arr(vals, ctype):
    return (ctype * len(vals))(*vals)


def _ptr(t):
    return None if t is None else t.data_ptr()


def _nan(*shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype) if dtype.is_floating_point else torch.full(shape, -7, dtype=dtype)


def _split(T, B, n_warps, sms=4):
    # As the binding: ~2 blocks per SM (a pretend 4-SM GPU, so videos split), >= 4 frames per warp.
    max_split = max(1, -(-T // (4 * n_warps)))
    n_split = min(max(1, -(-2 * sms // B)), max_split)
    chunk = -(-T // n_split)
    return chunk, -(-T // chunk)


def emul_forward(lib, inp, k, temperature, n_warps):
    frames = inp["frames"].float().contiguous()
    B, T, F = frames.shape
    W1, b1 = inp["hidden"] if inp["hidden"] is not None else (None, None)
    H = W1.shape[1] if W1 is not None else 0
    lengths = inp["lengths"].to(torch.int64).contiguous() if inp["lengths"] is not None else None
    bias = inp["bias"].float().reshape(1) if inp["bias"] is not None else None
    chunk, n_split = _split(T, B, n_warps)
    P = n_split * n_warps
    out = dict(scores=_nan(B, T), dense=_nan(B, F), idx=_nan(B, k, dtype=torch.int64), tf=_nan(B, k, F), lse=_nan(B))
    parts = [_nan(B, P, 2), _nan(B, P, F), _nan(B, P, k), _nan(B, P, k, dtype=torch.int32)]
    keep = [frames, inp["weight"].float().contiguous(), bias, lengths,
            W1.float().contiguous() if W1 is not None else None, b1.float().contiguous() if b1 is not None else None]
    ptrs = [_ptr(t) for t in keep] + [_ptr(out[n]) for n in ("scores", "dense", "idx", "tf", "lse")] + [_ptr(t) for t in parts]
    lib.fs_emul_fwd(_arr([B, T, F, H, k, chunk, n_split, n_warps], ctypes.c_int64), 1.0 / temperature,
                    _arr(ptrs, ctypes.c_void_p))
    return out, dict(frames=frames, lengths=lengths, W1=keep[4], b1=keep[5], weight=keep[1])


def emul_backward(lib, saved, out, dscores, ddense, dtopk, temperature, n_warps):
    """csrc/cuda/frame_score.cu's frame_score_bwd_cuda, with its kernels emulated and its ATen steps in torch."""
    frames, lengths, W1, b1, weight = saved["frames"], saved["lengths"], saved["W1"], saved["b1"], saved["weight"]
    B, T, F = frames.shape
    k = out["idx"].shape[1]
    mlp = W1 is not None
    H = W1.shape[1] if mlp else 0
    chunk, n_split = _split(T, B, 8)
    g = _nan(B, T)
    a_pre = _nan(B, T, H) if mlp else None
    ptrs = [_ptr(frames), _ptr(ddense), _ptr(lengths), _ptr(W1), _ptr(b1), _ptr(g), _ptr(a_pre)]
    lib.fs_emul_bwd_rows(_arr([B, T, F, H, chunk, n_split, n_warps], ctypes.c_int64), _arr(ptrs, ctypes.c_void_p))
    inv_tau = 1.0 / temperature
    valid = torch.arange(T)[None, :] < (lengths[:, None] if lengths is not None else torch.full((B, 1), T))
    smax = out["scores"].amax(1, keepdim=True)
    p = torch.where(valid, torch.exp((out["scores"] - smax) * inv_tau - out["lse"][:, None]), 0.0).contiguous()
    c = (p * g).sum(1, keepdim=True)
    ds = torch.where(valid, dscores + p * (g - c) * inv_tau, 0.0).contiguous()
    extra = None
    if mlp:
        gprime = 0.5 * (1.0 + torch.erf(a_pre * 0.7071067811865476)) + a_pre * torch.exp(-0.5 * a_pre * a_pre) * 0.3989422804014327
        da = ds.unsqueeze(2) * weight.view(1, 1, H) * gprime
        dweight = torch.bmm(ds.unsqueeze(1), Fn.gelu(a_pre)).squeeze(1).sum(0)
        dW1 = torch.bmm(torch.where(valid[..., None], frames, 0.0).transpose(1, 2), da).sum(0)
        db1 = da.sum(1).sum(0)
        extra = torch.matmul(da, W1.t()).contiguous()
    slot = torch.full((B, T + 1), -1, dtype=torch.int32)
    sel = torch.where(out["idx"] >= 0, out["idx"], T)
    slot.scatter_(1, sel, torch.arange(k, dtype=torch.int32).expand(B, k).contiguous())
    slot = slot[:, :T].contiguous()
    t_split = min(max(1, -(-4 * 4 // (B * -(-F // 128)))), T)
    t_chunk = -(-T // t_split)
    t_split = -(-T // t_chunk)
    dframes = _nan(B, T, F)
    dw_part = None if mlp else _nan(B, t_split, F)
    ptrs = [_ptr(frames), _ptr(ddense), _ptr(dtopk), None if mlp else _ptr(weight), _ptr(p), _ptr(ds), _ptr(slot),
            _ptr(extra), _ptr(lengths), _ptr(dframes), _ptr(dw_part)]
    lib.fs_emul_bwd_frames(_arr([B, T, F, k, t_chunk, t_split], ctypes.c_int64), _arr(ptrs, ctypes.c_void_p))
    grads = dict(frames=dframes, bias=ds.sum())
    if mlp:
        grads.update(weight=dweight, W1=dW1, b1=db1)
    else:
        grads["weight"] = dw_part.sum(1).sum(0)
    return grads


@pytest.mark.parametrize(
    "T,F,k,H,n_warps",
    [(1, 64, 8, None, 2), (7, 40, 16, 16, 2), (100, 64, 8, None, 4), (100, 70, 4, 40, 2), (300, 33, 16, None, 8)],
)
def test_emulated_cuda_forward_backward(lib, T, F, k, H, n_warps):
    temperature = 0.8
    inp = make_frame_score_inputs(3, T, F, H=H, ties=T >= 7, seed=T + F)
    out, saved = emul_forward(lib, inp, k, temperature, n_warps)
    ref_inp = to_f64(inp, requires_grad=True)
    ref = frame_score_ref(**{**ref_inp, "k": k, "temperature": temperature})
    finite = torch.isfinite(ref[0])
    assert torch.equal(torch.isfinite(out["scores"]), finite)
    assert_close(torch.where(finite, out["scores"].double(), 0.0), torch.where(finite, ref[0], 0.0), dtype=torch.float32,
                 name="scores", scale=4)
    assert_close(out["dense"], ref[1], name="dense")
    check_topk(out["idx"], out["tf"], inp["frames"], ref[0], ref[2], inp["lengths"])
    # lse = log sum_t exp((s_t - max s) / tau), the shift taken again from the scores in the backward.
    s_ref = torch.where(finite, ref[0], float("-inf"))
    lse_ref = torch.logsumexp((s_ref - s_ref.amax(1, keepdim=True)) / temperature, dim=1)
    assert_close(torch.where(torch.isfinite(lse_ref), out["lse"].double(), 0.0),
                 torch.where(torch.isfinite(lse_ref), lse_ref, 0.0), dtype=torch.float32, name="lse", scale=4)

    g = torch.Generator().manual_seed(3)
    dscores = torch.randn(ref[0].shape, generator=g) * finite
    ddense = torch.randn(ref[1].shape, generator=g)
    dtopk = torch.randn(ref[3].shape, generator=g)
    grads = emul_backward(lib, saved, out, dscores.float(), ddense.float(), dtopk.float(), temperature, n_warps)
    s = torch.where(finite, ref[0], torch.zeros_like(ref[0]))
    ((s * dscores.double()).sum() + (ref[1] * ddense.double()).sum() + (ref[3] * dtopk.double()).sum()).backward()
    names = ["frames", "weight", "bias"] + (["W1", "b1"] if H else [])
    theirs = [ref_inp["frames"], ref_inp["weight"], ref_inp["bias"]] + (list(ref_inp["hidden"]) if H else [])
    for name, t in zip(names, theirs):
        assert_close(grads[name].reshape(t.shape), t.grad, dtype=torch.float32, grad=True, name=f"d{name}",
                     scale=1.0 if name == "frames" else 4.0)
