"""frame_score: batched frame scoring -- dense perception and sparse highlight frames in one pass.

Order, as in Liger: fakes and autograd glue for the compiled op pair, backend dispatch, the public
function. Kernels live in csrc/cpu/frame_score.cpp, csrc/cuda/frame_score.cu (+ the torch-free core
csrc/include/mvpp/frame_score.cuh) and triton.py.
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import _library  # noqa: F401  (defines the mvpp::frame_score_* schemas)
from ..._backend import BackendUnavailableError, register_op_info, resolve_backend
from ..._checks import FLOAT_DTYPES, check_finite, check_lengths, check_same_device, check_tensor
from .reference import compute_dtype, frame_score_ref

__all__ = ["frame_score", "frame_score_ref", "MAX_HIDDEN", "MAX_K"]

# The MLP scorer's hidden width the kernels keep on chip (the contract: H <= 128).
MAX_HIDDEN = 128
# The running top-k list the Triton/CUDA kernels keep on chip per program; the reference and the C++
# path have no limit, and the wrapper refuses larger k on the GPU kernels.
MAX_K = 256

_KERNEL_NAME = "frame_score_fwd"
_IMPLEMENTED = ("cuda", "triton", "cpu", "reference")
register_op_info("frame_score", _KERNEL_NAME, _IMPLEMENTED)


# ---------------------------------------------------------------------------------------------
# Fakes (shapes only), shared by the compiled op pair and the Triton op pair.
# ---------------------------------------------------------------------------------------------
def _fwd_fake(frames, weight, bias, lengths, W1, b1, k, temperature):
    batch, T, F = frames.shape
    ct = compute_dtype(frames.dtype)
    return (
        frames.new_empty((batch, T), dtype=ct),
        frames.new_empty((batch, F)),
        frames.new_empty((batch, k), dtype=torch.int64),
        frames.new_empty((batch, k, F)),
        frames.new_empty((batch,), dtype=ct),
    )


def _bwd_fake(dscores, ddense, dtopk_frames, frames, weight, W1, b1, lengths, scores, lse, topk_idx, temperature):
    batch, T, F = frames.shape
    ct = compute_dtype(frames.dtype)
    mlp = W1 is not None
    H = W1.shape[1] if mlp else 0
    return (
        frames.new_empty((batch, T, F)),
        frames.new_empty((batch, H if mlp else F), dtype=ct),
        frames.new_empty((batch,), dtype=ct),
        frames.new_empty((batch, F, H) if mlp else (0,), dtype=ct),
        frames.new_empty((batch, H) if mlp else (0,), dtype=ct),
    )


torch.library.register_fake("mvpp::frame_score_fwd")(_fwd_fake)
torch.library.register_fake("mvpp::frame_score_bwd")(_bwd_fake)


def _setup_context(ctx, inputs, output):
    frames, weight, bias, lengths, W1, b1, k, temperature = inputs
    scores, _dense, topk_idx, _topk_frames, lse = output
    ctx.save_for_backward(frames, weight, W1, b1, lengths, scores, lse, topk_idx)
    ctx.temperature = temperature
    ctx.has_bias = bias is not None
    ctx.bias_shape = tuple(bias.shape) if bias is not None else None


def make_backward(bwd_op):
    """Autograd for a fwd op with frame_score_fwd's schema, given its bwd op."""

    def backward(ctx, dscores, ddense, _dtopk_idx, dtopk_frames, _dlse):
        frames, weight, W1, b1, lengths, scores, lse, topk_idx = ctx.saved_tensors
        dframes, dweight, dbias, dW1, db1 = bwd_op(
            dscores.contiguous(), ddense.contiguous(), dtopk_frames.contiguous(), frames, weight, W1, b1, lengths,
            scores, lse, topk_idx, ctx.temperature,
        )
        # Per-video partials -> totals (a fixed-order sum: deterministic, no atomics in any kernel).
        return (
            dframes,
            dweight.sum(0).to(weight.dtype),
            dbias.sum(0).reshape(ctx.bias_shape).to(scores.dtype) if ctx.has_bias else None,
            None,
            dW1.sum(0).to(W1.dtype) if W1 is not None else None,
            db1.sum(0).to(b1.dtype) if b1 is not None else None,
            None,
            None,
        )

    return backward


torch.library.register_autograd(
    "mvpp::frame_score_fwd", make_backward(torch.ops.mvpp.frame_score_bwd), setup_context=_setup_context
)


# ---------------------------------------------------------------------------------------------
# Validation and dispatch
# ---------------------------------------------------------------------------------------------
def _validate(frames, weight, bias, lengths, k, temperature, hidden, check_inputs, backend):
    check_tensor("frames", frames, ndim=3, dims="(batch, T, F)", dtypes=FLOAT_DTYPES)
    batch, T, F = frames.shape
    dev = frames.device
    if T < 1 or F < 1:
        raise ValueError(f"frames must have T >= 1 frame slots and F >= 1 features, got shape {tuple(frames.shape)}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1 (the number of highlight frames), got {k}")
    if isinstance(temperature, torch.Tensor):
        raise TypeError("temperature must be a Python float, not a tensor")
    temperature = float(temperature)
    if not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    W1 = b1 = None
    if hidden is not None:
        if not isinstance(hidden, (tuple, list)) or len(hidden) != 2:
            raise TypeError("hidden must be a pair (W1 (F, H), b1 (H,)) for the MLP scorer, or None")
        W1, b1 = hidden
        check_tensor("hidden[0] (W1)", W1, ndim=2, dims="(F, H)", dtypes=FLOAT_DTYPES)
        H = W1.shape[1]
        if W1.shape[0] != F:
            raise ValueError(f"hidden[0] (W1) must have shape (F={F}, H) to match frames' feature size, got {tuple(W1.shape)}")
        if H < 1 or H > MAX_HIDDEN:
            raise ValueError(f"the MLP scorer's hidden width H = W1.shape[1] must lie in [1, {MAX_HIDDEN}], got {H}")
        check_tensor("hidden[1] (b1)", b1, shape=(H,), dims="(H,)", dtypes=FLOAT_DTYPES)
        check_tensor("weight", weight, ndim=1, dtypes=FLOAT_DTYPES)
        if weight.shape[0] != H:
            raise ValueError(f"weight must have shape (H={H},) for the MLP scorer, got {tuple(weight.shape)}")
    else:
        check_tensor("weight", weight, ndim=1, dtypes=FLOAT_DTYPES)
        if weight.shape[0] != F:
            raise ValueError(f"weight must have shape (F={F},) to match frames' feature size, got {tuple(weight.shape)}")
    if isinstance(bias, torch.Tensor):
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES)
        if bias.numel() != 1 or bias.dim() > 1:
            raise ValueError(f"bias must be a scalar (shape () or (1,)), got shape {tuple(bias.shape)}")
    elif bias is not None and not isinstance(bias, (int, float)):
        raise TypeError(f"bias must be a scalar tensor, a Python number or None, got {type(bias).__name__}")
    check_same_device("frames", frames, weight=weight, W1=W1, b1=b1,
                      bias=bias if isinstance(bias, torch.Tensor) else None)
    if backend in ("triton", "cuda"):
        if frames.dtype == torch.float64:
            raise BackendUnavailableError(f"the {backend} backend does not take float64 frames; use backend='cpu' "
                                          "or 'reference' for float64")
        if k > MAX_K:
            raise ValueError(f"k = {k} exceeds the {backend} kernels' on-chip top-k size {MAX_K}; "
                             "use backend='reference' for larger k")
    compiling = torch.compiler.is_compiling()
    if lengths is not None:
        if compiling:
            check_tensor("lengths", lengths, shape=(batch,), dims="(batch,)")
            lengths = lengths.to(device=dev, dtype=torch.int64)
        else:
            if isinstance(lengths, torch.Tensor) and lengths.device.type != dev.type:
                raise ValueError(f"lengths is on {lengths.device} but frames is on {dev}")
            lengths = check_lengths("lengths", lengths, batch, T, dev)
    if check_inputs and not compiling:
        for name, X in (("frames", frames), ("weight", weight), ("W1", W1), ("b1", b1),
                        ("bias", bias if isinstance(bias, torch.Tensor) else None)):
            check_finite(name, X)
    return lengths, W1, b1, temperature


def frame_score(
    frames: torch.Tensor,
    weight: torch.Tensor,
    bias=None,
    lengths: Optional[torch.Tensor] = None,
    k: int = 8,
    temperature: float = 1.0,
    hidden: Optional[tuple] = None,
    *,
    backend: Optional[str] = None,
    check_inputs: bool = False,
):
    """Score every frame of a batch of videos, pool them by softmax of the scores, and pick the top-k.

    One pass over `frames` computes, per video b and valid frame t < lengths[b]::

        s_t   = weight · f_t + bias                                  (linear scorer)
        s_t   = weight · gelu(W1ᵀ f_t + b1) + bias                   (MLP scorer, hidden=(W1, b1))
        dense = Σ_t softmax(s / temperature)_t f_t                    (over the valid frames only)
        topk  = the k valid frames with the highest s_t, best first, ties -> lower frame index

    gelu is the exact (erf) GELU, as torch.nn.functional.gelu.

    Args:
        frames: (batch, T, F) float32/bfloat16/float16 (float64 on the cpu and reference backends).
        weight: (F,) for the linear scorer, (H,) for the MLP scorer. Any float dtype (the kernels
            compute in float32, float64 for float64 frames).
        bias: optional scalar (0-d or (1,) tensor, or a Python number). It shifts the scores only:
            the softmax and the top-k do not depend on it.
        lengths: optional (batch,) integers in [0, T]: frames at or past a video's length are
            ignored (score -inf, weight 0, never selected). Default: every frame is valid.
        k: number of highlight frames, >= 1 (may exceed a video's length: the rest is padding).
            The triton/cuda kernels take k <= MAX_K (256).
        temperature: softmax temperature tau > 0 of the dense path.
        hidden: optional (W1 (F, H), b1 (H,)) for the MLP scorer, 1 <= H <= 128.
        backend: "auto" (default: $MVPP_BACKEND or auto), "cuda", "triton", "cpu" or "reference".
        check_inputs: also reject NaN/inf inputs (costs a pass over the inputs).

    Returns:
        scores: (batch, T) float32 (float64 for float64 frames); -inf past each video's length.
        dense: (batch, F) in frames' dtype (accumulated in float32); zeros for a length-0 video.
        topk_idx: (batch, k) int64 frame indices in descending score order (NaN first, as
            torch.topk), -1 where a video has fewer than k valid frames.
        topk_frames: (batch, k, F) in frames' dtype, frames[b, topk_idx[b, j]], zeros where padded.

    Non-finite inputs (the same on every backend; docs/frame_score.md, "Non-finite inputs"): frames
    past a video's length never reach an output or a gradient, whatever they hold. On the valid
    frames the outputs are torch's: dense = torch.softmax(s[:n] / temperature) @ f[:n], i.e. NaN in
    every feature when a valid score is NaN or +inf or all valid scores are -inf (that video only),
    and the top-k is torch.sort(s[:n], descending, stable): NaN above +inf above finite above -inf,
    ties -> lower index. The softmax is max-subtracted in score units, (s - max s) / temperature, so
    float32 does not overflow where float64 is finite. check_inputs=True rejects NaN/inf instead.

    Gradients flow to frames, weight, bias, W1 and b1 through `scores` and `dense`, and through
    `topk_frames` to the gathered frames (the selection itself is piecewise constant). Gradients of
    `scores` past a video's length are ignored. Inputs may be non-contiguous.
    """
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"frames must be a torch.Tensor, got {type(frames).__name__}")
    name = resolve_backend(_KERNEL_NAME, frames.device, backend, _IMPLEMENTED, dtype=frames.dtype)
    lengths, W1, b1, temperature = _validate(frames, weight, bias, lengths, k, temperature, hidden, check_inputs, name)
    if name == "reference":
        return frame_score_ref(frames, weight, bias, lengths, k, temperature, hidden)
    ct = compute_dtype(frames.dtype)
    # The kernels take the (small) parameters in the compute dtype; autograd casts their gradients back.
    weight_k = weight.to(ct).contiguous()
    if bias is not None and not isinstance(bias, torch.Tensor):
        bias = torch.tensor(float(bias), dtype=ct, device=frames.device)
    bias_k = bias.to(ct).reshape(()) if bias is not None else None
    W1_k = W1.to(ct).contiguous() if W1 is not None else None
    b1_k = b1.to(ct).contiguous() if b1 is not None else None
    if name == "triton":
        from . import triton as _triton

        fwd = _triton.frame_score_fwd_triton
    else:
        fwd = torch.ops.mvpp.frame_score_fwd
    scores, dense, topk_idx, topk_frames, _lse = fwd(frames, weight_k, bias_k, lengths, W1_k, b1_k, int(k), temperature)
    return scores, dense, topk_idx, topk_frames
