"""Triton backend of frame_score: `mvpp::frame_score_fwd_triton` / `mvpp::frame_score_bwd_triton`.

Same argument lists, outputs, shapes and dtypes as the compiled pair `mvpp::frame_score_fwd/_bwd`
(schemas in `mvpp_kernels/_library.py`), so the autograd glue in `__init__.py` serves both.

Forward (frames read once, as in flash-decoding's split-K):
- `_fwd_split_kernel`, grid (batch, n_split): each program walks its chunk of frames in tiles of
  (BLOCK_T, F). Per tile: the scores (linear: a row reduction; MLP: `tl.dot` of the tile with W1 in
  H-chunks, on tensor cores for bf16/fp16), the online-softmax update of its running (max, sum,
  weighted frame sum) and a merge of the tile into its running top-k list -- all in registers.
  It writes the scores and a small partial state (m, l, acc (F,), top-k list).
- `_fwd_merge_kernel`, grid (batch,): combines the n_split partials (rescaling by exp(m_i - M)),
  picks the global top-k from the n_split * k candidates and gathers those k frames.
  Splitting each video over several programs keeps a GPU busy for small batches of long videos.
Backward: `_bwd_dot_kernel` (g_t = ddense . f_t and per-chunk sums of p_t g_t), then for the MLP
scorer `_bwd_mlp_kernel` (recomputes W1ᵀ f_t with tl.dot, writes ds, dL/da and gelu(a)) and two
batched GEMMs in torch for dW1, then `_bwd_frames_kernel` (dframes, and the linear scorer's dweight
partials). No float atomics: partial sums have one owner and are summed in a fixed order.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _bwd_fake, _fwd_fake, _setup_context, make_backward

__all__ = ["frame_score_fwd_triton", "frame_score_bwd_triton"]

_BIG = tl.constexpr(2**30)  # an index larger than any frame index: "no frame" inside the top-k lists
_EMPTY = tl.constexpr(-(2**31))  # a top-k key below every score's key (-inf included): "no frame"


@triton.jit
def _order_key(s, valid):
    """int32 keys in torch.sort's order of the scores: NaN (any payload) > +inf > finite > -inf, with
    -0.0 == 0.0; _EMPTY for frames that are not valid. Float compares cannot rank NaN, and a NaN
    score must still be selectable (as torch.topk selects it) -- docs/frame_score.md."""
    sc = tl.where(s == 0.0, 0.0, s)
    bits = sc.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = tl.where(s != s, 0x7FFFFFFF, key)
    return tl.where(valid, key, _EMPTY)


@triton.jit
def _gelu(a):
    return 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))


@triton.jit
def _gelu_grad(a):
    cdf = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476))
    return cdf + a * tl.exp(-0.5 * a * a) * 0.3989422804014327


@triton.jit
def _mlp_scores(x, W1, b1, w, H, offs_f, mask_f, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                IEEE: tl.constexpr, ROWWISE: tl.constexpr):
    """s = weight . gelu(W1ᵀ x + b1) for a (BLOCK_T, BLOCK_F) tile x in its storage dtype.

    Every row must get the same bits from the same frame wherever it sits in the tile: the top-k
    breaks equal scores toward the lower index, so two identical frames have to score identically.
    A GPU tl.dot computes each row the same way; the interpreter's tl.dot is numpy.matmul, i.e.
    OpenBLAS sgemm, whose micro-kernel rounds rows differently by their position in the tile (and by
    its thread count), so duplicated frames came out 1 ulp apart and the later one could win the
    "tie". ROWWISE (interpreter only) forms the same product as a broadcast multiply and a sum over
    F, which numpy evaluates in one order for every row.
    """
    s = tl.zeros((BLOCK_T,), dtype=tl.float32)
    offs_h = tl.arange(0, BLOCK_H)
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + offs_h
        mh = hh < H
        Wc = tl.load(W1 + offs_f[:, None] * H + hh[None, :], mask=mask_f[:, None] & mh[None, :], other=0.0)
        if ROWWISE:
            a = tl.sum(x.to(tl.float32)[:, :, None] * Wc[None, :, :], 1)
        elif IEEE:
            a = tl.dot(x.to(tl.float32), Wc, input_precision="ieee")
        else:
            a = tl.dot(x, Wc.to(x.dtype))
        a += tl.load(b1 + hh, mask=mh, other=0.0)[None, :]
        wc = tl.load(w + hh, mask=mh, other=0.0)
        s += tl.sum(_gelu(a) * wc[None, :], 1)
    return s


@triton.jit
def _fwd_split_kernel(
    X, w, bias, lengths, W1, b1,
    S, part_ml, part_acc, part_v, part_i,
    T, F, H, k, n_split, chunk, inv_tau,
    HAS_BIAS: tl.constexpr, HAS_LEN: tl.constexpr, MLP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_H: tl.constexpr, K_PAD: tl.constexpr,
    ROWWISE: tl.constexpr = False,
):
    b = tl.program_id(0)
    sp = tl.program_id(1)
    t0 = sp * chunk
    t1 = tl.minimum(T, t0 + chunk)
    n_valid = T
    if HAS_LEN:
        n_valid = tl.load(lengths + b).to(tl.int32)
    offs_f = tl.arange(0, BLOCK_F)
    mask_f = offs_f < F
    offs_k = tl.arange(0, K_PAD)
    if not MLP:
        wv = tl.load(w + offs_f, mask=mask_f, other=0.0)
    bias_v = 0.0
    if HAS_BIAS:
        bias_v = tl.load(bias)
    m = -float("inf")
    l = 0.0
    bad = 0
    acc = tl.zeros((BLOCK_F,), dtype=tl.float32)
    topv = tl.full((K_PAD,), _EMPTY, tl.int32)
    topi = tl.full((K_PAD,), _BIG, tl.int32)
    Xb = X + b.to(tl.int64) * T * F
    for tb in range(t0, t1, BLOCK_T):
        offs_t = tb + tl.arange(0, BLOCK_T)
        in_chunk = offs_t < t1
        valid = in_chunk & (offs_t < n_valid)
        x = tl.load(Xb + offs_t[:, None].to(tl.int64) * F + offs_f[None, :], mask=valid[:, None] & mask_f[None, :],
                    other=0.0)
        xf = x.to(tl.float32)
        if MLP:
            s = _mlp_scores(x, W1, b1, w, H, offs_f, mask_f, BLOCK_T, BLOCK_H, IEEE, ROWWISE)
        else:
            s = tl.sum(xf * wv[None, :], 1)
        s = tl.where(valid, s + bias_v, -float("inf"))
        tl.store(S + b * T + offs_t, s, mask=in_chunk)
        # A NaN or +inf valid score poisons the video's dense output (stored as l = NaN below).
        bad = tl.maximum(bad, tl.max(tl.where(valid & ((s != s) | (s == float("inf"))), 1, 0), 0))
        # Online softmax in score units ((s - m) / tau cannot overflow where float64 is finite); m_safe
        # keeps exp() finite while no valid frame has been seen. acc is the running weighted *mean*
        # (an unnormalised sum of up to T frames can overflow float32).
        m_new = tl.maximum(m, tl.max(tl.where(s == s, s, -float("inf")), 0))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp((m - m_safe) * inv_tau)
        p = tl.where(valid, tl.exp((s - m_safe) * inv_tau), 0.0)
        l_new = l * alpha + tl.sum(p, 0)
        inv_l = tl.where(l_new > 0, 1.0 / tl.where(l_new > 0, l_new, 1.0), 0.0)
        acc = acc * (l * alpha * inv_l) + tl.sum((p * inv_l)[:, None] * xf, 0)
        l = l_new
        m = m_new
        # Running top-k on int32 order keys: merge the tile only if it can change the list (a later
        # frame never wins a tie against an earlier one, so "greater than the k-th" is the exact test).
        s = _order_key(s, valid)
        kth = tl.max(tl.where(offs_k == k - 1, topv, _EMPTY), 0)
        if tl.max(s, 0) > kth:
            si = tl.where(valid, offs_t, _BIG)
            newv = tl.full((K_PAD,), _EMPTY, tl.int32)
            newi = tl.full((K_PAD,), _BIG, tl.int32)
            for j in range(0, k):
                a_max = tl.max(topv, 0)
                a_idx = tl.min(tl.where(topv == a_max, topi, _BIG), 0)
                b_max = tl.max(s, 0)
                b_idx = tl.min(tl.where(s == b_max, si, _BIG), 0)
                take_a = (a_max > b_max) | ((a_max == b_max) & (a_idx < b_idx))
                v = tl.where(take_a, a_max, b_max)
                i = tl.where(take_a, a_idx, b_idx)
                newv = tl.where(offs_k == j, v, newv)
                newi = tl.where(offs_k == j, i, newi)
                # Remove the winner from the list it came from (indices are unique across both).
                # (Its index goes too: a valid -inf frame's key sits just above _EMPTY, so a removed
                # entry must not keep a real index that a later round could pick among the empties.)
                gone_a = (topi == i) & take_a
                gone_b = (si == i) & ~take_a
                topv = tl.where(gone_a, _EMPTY, topv)
                topi = tl.where(gone_a, _BIG, topi)
                s = tl.where(gone_b, _EMPTY, s)
                si = tl.where(gone_b, _BIG, si)
            topv = newv
            topi = newi
    # Frames past the length inside this chunk but past its last tile are already -inf; the tiles
    # above covered [t0, t1) entirely.
    pid = b * n_split + sp
    tl.store(part_ml + pid * 2, m)
    tl.store(part_ml + pid * 2 + 1, tl.where(bad > 0, float("nan"), l))
    tl.store(part_acc + pid.to(tl.int64) * F + offs_f, acc, mask=mask_f)
    tl.store(part_v + pid * K_PAD + offs_k, topv)
    tl.store(part_i + pid * K_PAD + offs_k, topi)


@triton.jit
def _fwd_merge_kernel(
    X, part_ml, part_acc, part_v, part_i, lengths,
    D, I, G, LSE,
    T, F, k, n_split, inv_tau,
    HAS_LEN: tl.constexpr, BLOCK_F: tl.constexpr, K_PAD: tl.constexpr, NS_PAD: tl.constexpr,
):
    b = tl.program_id(0)
    n_valid = T
    if HAS_LEN:
        n_valid = tl.load(lengths + b).to(tl.int32)
    offs_s = tl.arange(0, NS_PAD)
    ms = tl.load(part_ml + (b * n_split + offs_s) * 2, mask=offs_s < n_split, other=-float("inf"))
    ls = tl.load(part_ml + (b * n_split + offs_s) * 2 + 1, mask=offs_s < n_split, other=0.0)
    M = tl.max(tl.where(ls > 0, ms, -float("inf")), 0)
    M_safe = tl.where(M == -float("inf"), 0.0, M)
    L = tl.sum(tl.where(ls > 0, ls * tl.exp((ms - M_safe) * inv_tau), 0.0), 0)
    # Poisoned (dense and lse NaN): a chunk saw a NaN or +inf score (l = NaN), or the video has valid
    # frames but all score -inf (L = 0) -- torch.softmax's non-finite behaviour.
    poisoned = (tl.max(tl.where(ls != ls, 1, 0), 0) > 0) | ((n_valid > 0) & (L == 0.0))
    offs_f = tl.arange(0, BLOCK_F)
    mask_f = offs_f < F
    L_safe = tl.where(L > 0, L, 1.0)  # a length-0 video: dense 0, lse -inf, without dividing by 0
    inv_L = tl.where(L > 0, 1.0 / L_safe, 0.0)
    acc = tl.zeros((BLOCK_F,), dtype=tl.float32)
    for sp in range(0, n_split):
        m_i = tl.load(part_ml + (b * n_split + sp) * 2)
        l_i = tl.load(part_ml + (b * n_split + sp) * 2 + 1)
        # Each chunk's acc is its weighted mean; its share of the video is l_i e^((m_i - M)/tau) / L.
        scale = tl.where(l_i > 0, l_i * tl.exp((m_i - M_safe) * inv_tau) * inv_L, 0.0)
        a_i = tl.load(part_acc + (b * n_split + sp).to(tl.int64) * F + offs_f, mask=mask_f, other=0.0)
        acc += scale * a_i
    acc = tl.where(poisoned, float("nan"), acc)
    tl.store(D + b * F + offs_f, acc.to(D.dtype.element_ty), mask=mask_f)
    # lse = log sum_t exp((s_t - max s) / tau); the backward takes max s again from the scores.
    tl.store(LSE + b, tl.where(poisoned, float("nan"), tl.where(L > 0, tl.log(L_safe), -float("inf"))))
    # Global top-k from the n_split lists of order keys (each frame index appears in exactly one list).
    offs_c = tl.arange(0, NS_PAD * K_PAD)
    mask_c = offs_c < n_split * K_PAD
    cv = tl.load(part_v + b * n_split * K_PAD + offs_c, mask=mask_c, other=_EMPTY)
    ci = tl.load(part_i + b * n_split * K_PAD + offs_c, mask=mask_c, other=_BIG)
    Xb = X + b.to(tl.int64) * T * F
    for j in range(0, k):
        v = tl.max(cv, 0)
        i = tl.min(tl.where(cv == v, ci, _BIG), 0)
        ok = i < _BIG  # a valid -inf frame is selectable too (torch.topk's order), padding never
        idx = tl.where(ok, i, -1)
        tl.store(I + b * k + j, idx.to(tl.int64))
        # (A scalar mask broadcast with `&` trips the interpreter, so fold it into the bound.)
        row = tl.load(Xb + tl.maximum(idx, 0).to(tl.int64) * F + offs_f, mask=offs_f < tl.where(ok, F, 0), other=0.0)
        tl.store(G + (b * k + j).to(tl.int64) * F + offs_f, row, mask=mask_f)
        gone = ci == i
        cv = tl.where(gone, _EMPTY, cv)
        ci = tl.where(gone, _BIG, ci)


@triton.jit
def _bwd_dot_kernel(
    X, dD, S, LSE, lengths, Gs, Cpart,
    T, F, n_split, chunk, inv_tau,
    HAS_LEN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """g_t = ddense . f_t (saved), and this chunk's share of c = sum_t p_t g_t."""
    b = tl.program_id(0)
    sp = tl.program_id(1)
    t0 = sp * chunk
    t1 = tl.minimum(T, t0 + chunk)
    n_valid = T
    if HAS_LEN:
        n_valid = tl.load(lengths + b).to(tl.int32)
    offs_f = tl.arange(0, BLOCK_F)
    mask_f = offs_f < F
    dd = tl.load(dD + b * F + offs_f, mask=mask_f, other=0.0).to(tl.float32)
    lse = tl.load(LSE + b)
    c = 0.0
    Xb = X + b.to(tl.int64) * T * F
    for tb in range(t0, t1, BLOCK_T):
        offs_t = tb + tl.arange(0, BLOCK_T)
        valid = (offs_t < t1) & (offs_t < n_valid)
        x = tl.load(Xb + offs_t[:, None].to(tl.int64) * F + offs_f[None, :], mask=valid[:, None] & mask_f[None, :],
                    other=0.0).to(tl.float32)
        g = tl.sum(x * dd[None, :], 1)
        s = tl.load(S + b * T + offs_t, mask=valid, other=0.0)
        p = tl.where(valid, tl.exp(s * inv_tau - lse), 0.0)
        c += tl.sum(p * g, 0)
        tl.store(Gs + b * T + offs_t, g, mask=offs_t < t1)
    tl.store(Cpart + b * n_split + sp, c)


@triton.jit
def _bwd_mlp_kernel(
    X, W1, b1, w, S, LSE, dS, Gs, C, lengths, DS, DA, GA,
    T, F, H, n_split, chunk, inv_tau,
    HAS_LEN: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """MLP scorer: ds_t, dL/da_t = ds_t w * gelu'(a_t) and gelu(a_t) (a_t recomputed with tl.dot)."""
    b = tl.program_id(0)
    sp = tl.program_id(1)
    t0 = sp * chunk
    t1 = tl.minimum(T, t0 + chunk)
    n_valid = T
    if HAS_LEN:
        n_valid = tl.load(lengths + b).to(tl.int32)
    offs_f = tl.arange(0, BLOCK_F)
    mask_f = offs_f < F
    offs_h = tl.arange(0, BLOCK_H)
    lse = tl.load(LSE + b)
    c = tl.load(C + b)
    Xb = X + b.to(tl.int64) * T * F
    for tb in range(t0, t1, BLOCK_T):
        offs_t = tb + tl.arange(0, BLOCK_T)
        in_chunk = offs_t < t1
        valid = in_chunk & (offs_t < n_valid)
        x = tl.load(Xb + offs_t[:, None].to(tl.int64) * F + offs_f[None, :], mask=valid[:, None] & mask_f[None, :],
                    other=0.0)
        s = tl.load(S + b * T + offs_t, mask=valid, other=0.0)
        g = tl.load(Gs + b * T + offs_t, mask=valid, other=0.0)
        p = tl.where(valid, tl.exp(s * inv_tau - lse), 0.0)
        ds = tl.where(valid, tl.load(dS + b * T + offs_t, mask=valid, other=0.0) + p * (g - c) * inv_tau, 0.0)
        tl.store(DS + b * T + offs_t, ds, mask=in_chunk)
        for h0 in range(0, H, BLOCK_H):
            hh = h0 + offs_h
            mh = hh < H
            Wc = tl.load(W1 + offs_f[:, None] * H + hh[None, :], mask=mask_f[:, None] & mh[None, :], other=0.0)
            if IEEE:
                a = tl.dot(x.to(tl.float32), Wc, input_precision="ieee")
            else:
                a = tl.dot(x, Wc.to(x.dtype))
            a += tl.load(b1 + hh, mask=mh, other=0.0)[None, :]
            wc = tl.load(w + hh, mask=mh, other=0.0)
            da = ds[:, None] * wc[None, :] * _gelu_grad(a)
            ga = tl.where(valid[:, None], _gelu(a), 0.0)
            o = (b * T + offs_t[:, None]).to(tl.int64) * H + hh[None, :]
            mo = in_chunk[:, None] & mh[None, :]
            tl.store(DA + o, da, mask=mo)
            tl.store(GA + o, ga, mask=mo)


@triton.jit
def _bwd_frames_kernel(
    X, w, W1, dD, dTop, I, S, LSE, dS, Gs, C, DA, lengths,
    dX, dWpart, dBpart,
    T, F, H, k, n_split, chunk, inv_tau,
    HAS_LEN: tl.constexpr, MLP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """df_t = p_t ddense + ds_t w (linear) or p_t ddense + W1 dL/da_t (MLP), + dtopk_frames where
    frame t was selected; linear scorer: this chunk's dweight and dbias partials."""
    b = tl.program_id(0)
    sp = tl.program_id(1)
    t0 = sp * chunk
    t1 = tl.minimum(T, t0 + chunk)
    n_valid = T
    if HAS_LEN:
        n_valid = tl.load(lengths + b).to(tl.int32)
    offs_f = tl.arange(0, BLOCK_F)
    mask_f = offs_f < F
    dd = tl.load(dD + b * F + offs_f, mask=mask_f, other=0.0).to(tl.float32)
    lse = tl.load(LSE + b)
    c = tl.load(C + b)
    if not MLP:
        wv = tl.load(w + offs_f, mask=mask_f, other=0.0)
    dw = tl.zeros((BLOCK_F,), dtype=tl.float32)
    dbias = 0.0
    Xb = X + b.to(tl.int64) * T * F
    dXb = dX + b.to(tl.int64) * T * F
    for tb in range(t0, t1, BLOCK_T):
        offs_t = tb + tl.arange(0, BLOCK_T)
        in_chunk = offs_t < t1
        valid = in_chunk & (offs_t < n_valid)
        s = tl.load(S + b * T + offs_t, mask=valid, other=0.0)
        p = tl.where(valid, tl.exp(s * inv_tau - lse), 0.0)
        df = p[:, None] * dd[None, :]
        if MLP:
            offs_h = tl.arange(0, BLOCK_H)
            for h0 in range(0, H, BLOCK_H):
                hh = h0 + offs_h
                mh = hh < H
                da = tl.load(DA + (b * T + offs_t[:, None]).to(tl.int64) * H + hh[None, :],
                             mask=valid[:, None] & mh[None, :], other=0.0)
                # W1ᵀ chunk (BLOCK_H, BLOCK_F): df += dL/da W1ᵀ
                Wt = tl.load(W1 + offs_f[None, :] * H + hh[:, None], mask=mh[:, None] & mask_f[None, :], other=0.0)
                df += tl.dot(da, Wt, input_precision="ieee")
        else:
            x = tl.load(Xb + offs_t[:, None].to(tl.int64) * F + offs_f[None, :],
                        mask=valid[:, None] & mask_f[None, :], other=0.0).to(tl.float32)
            g = tl.load(Gs + b * T + offs_t, mask=valid, other=0.0)
            ds = tl.where(valid, tl.load(dS + b * T + offs_t, mask=valid, other=0.0) + p * (g - c) * inv_tau, 0.0)
            df += ds[:, None] * wv[None, :]
            dw += tl.sum(ds[:, None] * x, 0)
            dbias += tl.sum(ds, 0)
        for j in range(0, k):
            ij = tl.load(I + b * k + j).to(tl.int32)
            if (ij >= tb) & (ij < tb + BLOCK_T) & (ij >= t0) & (ij < t1):
                gj = tl.load(dTop + (b * k + j).to(tl.int64) * F + offs_f, mask=mask_f, other=0.0).to(tl.float32)
                df += tl.where((offs_t == ij)[:, None], gj[None, :], 0.0)
        df = tl.where(valid[:, None], df, 0.0)
        tl.store(dXb + offs_t[:, None].to(tl.int64) * F + offs_f[None, :], df.to(dX.dtype.element_ty),
                 mask=in_chunk[:, None] & mask_f[None, :])
    if not MLP:
        pid = b * n_split + sp
        tl.store(dWpart + pid.to(tl.int64) * F + offs_f, dw, mask=mask_f)
        tl.store(dBpart + pid, dbias)


# ---------------------------------------------------------------------------------------------
# Launch plan and launchers
# ---------------------------------------------------------------------------------------------
def _plan(batch: int, T: int, F: int, mlp: bool, device: torch.device):
    """(BLOCK_T, BLOCK_F, chunk, n_split, num_warps)."""
    block_f = triton.next_power_of_2(F)
    budget = 8192 if device.type == "cuda" else 16384  # elements of one (BLOCK_T, F) tile
    block_t = max(1, min(budget // block_f, triton.next_power_of_2(T)))
    if mlp:
        block_t = max(16, block_t)  # tl.dot needs M >= 16
        block_t = min(block_t, 64)
    if device.type == "cuda":
        # Enough programs to fill the GPU: ~4 per SM, each video split into chunks of whole tiles.
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = max(1, -(-4 * sms // max(batch, 1)))
        tiles = -(-T // block_t)
        n_split = max(1, min(want, tiles))
        chunk = -(-tiles // n_split) * block_t
    else:
        # The interpreter runs programs one by one: few, long chunks (but long videos still take the
        # split + merge path, so it is exercised by the CPU tests).
        chunk = -(-512 // block_t) * block_t
    n_split = -(-T // chunk)
    num_warps = 4 if block_t * block_f <= 4096 else 8
    return block_t, block_f, chunk, n_split, num_warps


def _ieee_dot(frames: torch.Tensor) -> bool:
    """Whether the MLP's tl.dot runs in float32 ("ieee": float32 frames, whose tolerance tf32 would
    break) or in the frames' bf16/fp16 on tensor cores. The interpreter's tl.dot mishandles bf16
    operands, so there float32 is used throughout."""
    return frames.dtype == torch.float32 or frames.device.type != "cuda"


def _rowwise_scores(frames: torch.Tensor) -> bool:
    """The interpreter (frames on the CPU) scores the MLP rows without tl.dot; see _mlp_scores."""
    return frames.device.type != "cuda"


def _block_h(H: int) -> int:
    return max(16, min(64, triton.next_power_of_2(H)))


@torch.library.triton_op("mvpp::frame_score_fwd_triton", mutates_args=())
def frame_score_fwd_triton(
    frames: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lengths: Optional[torch.Tensor],
    W1: Optional[torch.Tensor],
    b1: Optional[torch.Tensor],
    k: int,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward: (scores (batch, T) f32, dense (batch, F), topk_idx (batch, k) int64, topk_frames
    (batch, k, F), lse (batch,) f32); see _library.py's frame_score section."""
    frames = frames.contiguous()
    batch, T, F = frames.shape
    mlp = W1 is not None
    H = W1.shape[1] if mlp else 0
    scores = frames.new_empty((batch, T), dtype=torch.float32)
    dense = frames.new_empty((batch, F))
    topk_idx = frames.new_empty((batch, k), dtype=torch.int64)
    topk_frames = frames.new_empty((batch, k, F))
    lse = frames.new_empty((batch,), dtype=torch.float32)
    if batch == 0:
        return scores, dense, topk_idx, topk_frames, lse
    block_t, block_f, chunk, n_split, num_warps = _plan(batch, T, F, mlp, frames.device)
    k_pad = triton.next_power_of_2(k)
    part_ml = frames.new_empty((batch, n_split, 2), dtype=torch.float32)
    part_acc = frames.new_empty((batch, n_split, F), dtype=torch.float32)
    part_v = frames.new_empty((batch, n_split, k_pad), dtype=torch.int32)  # order keys (_order_key)
    part_i = frames.new_empty((batch, n_split, k_pad), dtype=torch.int32)
    dummy = weight
    ieee = _ieee_dot(frames)
    torch.library.wrap_triton(_fwd_split_kernel)[(batch, n_split)](
        frames, weight, bias if bias is not None else dummy, lengths if lengths is not None else dummy,
        W1 if mlp else dummy, b1 if mlp else dummy,
        scores, part_ml, part_acc, part_v, part_i,
        T, F, H, k, n_split, chunk, 1.0 / temperature,
        HAS_BIAS=bias is not None, HAS_LEN=lengths is not None, MLP=mlp, IEEE=ieee,
        BLOCK_T=block_t, BLOCK_F=block_f, BLOCK_H=_block_h(H), K_PAD=k_pad, ROWWISE=_rowwise_scores(frames),
        num_warps=num_warps,
    )
    torch.library.wrap_triton(_fwd_merge_kernel)[(batch,)](
        frames, part_ml, part_acc, part_v, part_i, lengths if lengths is not None else dummy,
        dense, topk_idx, topk_frames, lse,
        T, F, k, n_split, 1.0 / temperature,
        HAS_LEN=lengths is not None, BLOCK_F=block_f, K_PAD=k_pad, NS_PAD=triton.next_power_of_2(n_split), num_warps=num_warps,
    )
    return scores, dense, topk_idx, topk_frames, lse


@torch.library.triton_op("mvpp::frame_score_bwd_triton", mutates_args=())
def frame_score_bwd_triton(
    dscores: torch.Tensor,
    ddense: torch.Tensor,
    dtopk_frames: torch.Tensor,
    frames: torch.Tensor,
    weight: torch.Tensor,
    W1: Optional[torch.Tensor],
    b1: Optional[torch.Tensor],
    lengths: Optional[torch.Tensor],
    scores: torch.Tensor,
    lse: torch.Tensor,
    topk_idx: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: dframes, dweight (batch, F|H) and dbias (batch,) partials, dW1 (batch, F, H) and db1
    (batch, H) partials (or (0,) for the linear scorer)."""
    frames = frames.contiguous()
    batch, T, F = frames.shape
    k = topk_idx.shape[1]
    mlp = W1 is not None
    H = W1.shape[1] if mlp else 0
    f32 = torch.float32
    dscores = dscores.to(f32).expand(batch, T).contiguous()
    ddense = ddense.expand(batch, F).contiguous()
    dtopk_frames = dtopk_frames.expand(batch, k, F).contiguous()
    # The kernels form p_t = exp(s_t / tau - lse) from what they are given: pass the scores shifted by
    # the forward's softmax shift, the max valid score (lse is log sum exp((s - max s) / tau)), so
    # s / tau never overflows. Past the lengths the kernels mask p, whatever the shift left there.
    scores = (scores - scores.amax(dim=1, keepdim=True)).contiguous()
    lse = lse.contiguous()
    topk_idx = topk_idx.contiguous()
    dframes = torch.empty_like(frames)
    block_t, block_f, chunk, n_split, num_warps = _plan(batch, T, F, mlp, frames.device)
    dummy = weight
    inv_tau = 1.0 / temperature
    ieee = _ieee_dot(frames)
    has_len = lengths is not None
    lens = lengths if has_len else dummy
    Gs = frames.new_empty((batch, T), dtype=f32)
    Cpart = frames.new_empty((batch, n_split), dtype=f32)
    if batch == 0:
        return dframes, frames.new_zeros((0, H if mlp else F), dtype=f32), frames.new_zeros((0,), dtype=f32), \
            frames.new_zeros((0, F, H) if mlp else (0,), dtype=f32), frames.new_zeros((0, H) if mlp else (0,), dtype=f32)
    torch.library.wrap_triton(_bwd_dot_kernel)[(batch, n_split)](
        frames, ddense, scores, lse, lens, Gs, Cpart,
        T, F, n_split, chunk, inv_tau,
        HAS_LEN=has_len, BLOCK_T=block_t, BLOCK_F=block_f, num_warps=num_warps,
    )
    C = Cpart.sum(1)  # fixed-order sum of the chunks' shares: deterministic
    block_h = _block_h(H)
    empty = frames.new_empty((0,), dtype=f32)
    if mlp:
        DS = frames.new_empty((batch, T), dtype=f32)
        DA = frames.new_empty((batch, T, H), dtype=f32)
        GA = frames.new_empty((batch, T, H), dtype=f32)
        torch.library.wrap_triton(_bwd_mlp_kernel)[(batch, n_split)](
            frames, W1, b1, weight, scores, lse, dscores, Gs, C, lens, DS, DA, GA,
            T, F, H, n_split, chunk, inv_tau,
            HAS_LEN=has_len, IEEE=ieee, BLOCK_T=block_t, BLOCK_F=block_f, BLOCK_H=block_h, num_warps=num_warps,
        )
        # Per-video parameter gradients as batched GEMMs / reductions over frames (DA and GA are 0
        # past each length, so padding contributes nothing).
        # Padded frames are replaced (where, not 0 * NaN = NaN) before the GEMM.
        fr = frames if not has_len else torch.where(
            (torch.arange(T, device=frames.device)[None, :] < lengths[:, None])[..., None], frames, 0.0)
        dW1 = torch.bmm(fr.transpose(1, 2).to(f32), DA)
        db1 = DA.sum(1)
        dweight = torch.bmm(DS.unsqueeze(1), GA).squeeze(1)
        dbias = DS.sum(1)
        dWpart = dBpart = None
    else:
        DA = empty
        dWpart = frames.new_empty((batch, n_split, F), dtype=f32)
        dBpart = frames.new_empty((batch, n_split), dtype=f32)
    torch.library.wrap_triton(_bwd_frames_kernel)[(batch, n_split)](
        frames, weight, W1 if mlp else dummy, ddense, dtopk_frames, topk_idx, scores, lse, dscores, Gs, C,
        DA if mlp else dummy, lens,
        dframes, dWpart if not mlp else dummy, dBpart if not mlp else dummy,
        T, F, H, k, n_split, chunk, inv_tau,
        HAS_LEN=has_len, MLP=mlp, IEEE=ieee, BLOCK_T=block_t, BLOCK_F=block_f, BLOCK_H=block_h,
        num_warps=num_warps,
    )
    if not mlp:
        dweight = dWpart.sum(1)
        dbias = dBpart.sum(1)
        dW1, db1 = frames.new_empty((0,), dtype=f32), frames.new_empty((0,), dtype=f32)
    return dframes, dweight, dbias, dW1, db1


# triton_op would use the Python body as the fake, but under TRITON_INTERPRET=1 `wrap_triton` hands
# back the plain interpreted kernel, which then runs on fake tensors and fails; the shape-only fakes
# shared with the compiled op pair work everywhere.
frame_score_fwd_triton.register_fake(_fwd_fake)
frame_score_bwd_triton.register_fake(_bwd_fake)

torch.library.register_autograd(
    "mvpp::frame_score_fwd_triton",
    make_backward(torch.ops.mvpp.frame_score_bwd_triton),
    setup_context=_setup_context,
)
