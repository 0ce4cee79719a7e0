"""NVTX ranges around every public op and model stage, so an Nsight Systems profile reads well.

Uses the `nvtx` package when installed, else `torch.cuda.nvtx` on a CUDA build of torch, else
nothing. Off unless a GPU is present or MVPP_NVTX=1; MVPP_NVTX=0 turns it off. Ranges are skipped
while torch.compile traces (a range around a traced region would time the tracing, not the op).
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

_PUSH_POP = None  # (push, pop) callables, resolved on first use


def _resolve():
    global _PUSH_POP
    if _PUSH_POP is not None:
        return _PUSH_POP
    mode = os.environ.get("MVPP_NVTX", "auto").lower()
    enabled = mode in ("1", "true", "on") or (mode == "auto" and torch.cuda.is_available())
    impl = (None, None)
    if enabled:
        try:
            import nvtx  # the NVIDIA package: cheap, works without a CUDA torch

            impl = (lambda name: nvtx.push_range(name, domain="mvpp"), lambda: nvtx.pop_range(domain="mvpp"))
        except Exception:
            if torch.cuda.is_available():
                impl = (torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop)
    _PUSH_POP = impl
    return impl


@contextlib.contextmanager
def nvtx_range(name: str):
    if torch.compiler.is_compiling():
        yield
        return
    push, pop = _resolve()
    if push is None:
        yield
        return
    push(name)
    try:
        yield
    finally:
        pop()


def annotate(name: str):
    """Decorator: run the function inside an NVTX range `name` (a no-op when NVTX is off)."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            # Checked first: nothing below may be traced by dynamo (imports, module state).
            if torch.compiler.is_compiling():
                return fn(*args, **kwargs)
            push, pop = _resolve()
            if push is None:
                return fn(*args, **kwargs)
            push(name)
            try:
                return fn(*args, **kwargs)
            finally:
                pop()

        return wrapper

    return deco
