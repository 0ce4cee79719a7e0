"""Input validation shared by the public ops: every error names the argument and what was expected.

The kernels assume valid input; the public wrappers call these first so bad input is a clear
ValueError/TypeError, never an illegal memory access or a silent wrong answer.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fmt_shape(shape: Sequence) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def check_tensor(
    name: str,
    t,
    *,
    ndim: Optional[int | tuple[int, ...]] = None,
    shape: Optional[Sequence[Optional[int]]] = None,
    dims: Optional[str] = None,
    dtypes: Optional[Iterable[torch.dtype]] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Check one argument. `shape` entries of None match any size; `dims` names them for messages."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            extra = f" {dims}" if dims else ""
            raise ValueError(f"{name} must be {want}{extra}, got shape {_fmt_shape(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != ts for s, ts in zip(shape, t.shape)):
            want = _fmt_shape(["*" if s is None else s for s in shape])
            extra = f" {dims}" if dims else ""
            raise ValueError(f"{name} must have shape {want}{extra}, got {_fmt_shape(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device.type != torch.device(device).type:
        raise ValueError(f"{name} must be on {device}, like the other inputs, got {t.device}")
    if device is not None and t.device != torch.device(device) and torch.device(device).index is not None:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    return t


def check_same_device(ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; all inputs must share a device")


def check_finite(name: str, t: Optional[torch.Tensor]) -> None:
    if t is None or t.numel() == 0:
        return
    if not t.is_floating_point():
        return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        n = int(bad.sum())
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} has {n} non-finite value(s) (NaN or inf), first at index {first}")


def check_lengths(name: str, lengths: Optional[torch.Tensor], batch: int, max_len: int, device) -> Optional[torch.Tensor]:
    """Validate per-sequence lengths and return them as int64 on `device`."""
    if lengths is None:
        return None
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integers, got {type(lengths).__name__}")
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {str(lengths.dtype).replace('torch.', '')}")
    if lengths.dim() != 1 or lengths.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch},) (one length per sequence), got {_fmt_shape(lengths.shape)}")
    if lengths.device != torch.device(device) and not (lengths.device.type == torch.device(device).type):
        raise ValueError(f"{name} is on {lengths.device} but the inputs are on {device}")
    if lengths.numel():
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 0 or hi > max_len:
            raise ValueError(f"{name} must lie in [0, {max_len}] (the sequence length), got values in [{lo}, {hi}]")
    return lengths.to(device=device, dtype=torch.int64)


def dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")
