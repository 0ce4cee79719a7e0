"""Backend choice: MVPP_BACKEND=auto|cuda|triton|cpu|reference, or a `backend=` keyword.

`auto` picks, per op and per device: the CUDA extension if it implements the op, else Triton on a
GPU, else the reference; on CPU tensors the C++ extension if it implements the op, else the
reference. A backend asked for by name that cannot run raises `BackendUnavailableError` saying why.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")


class BackendUnavailableError(RuntimeError):
    """A backend was requested by name but cannot run the op on these inputs."""


def requested_backend(backend: Optional[str] = None) -> str:
    name = backend if backend is not None else os.environ.get("MVPP_BACKEND", "auto")
    name = str(name).strip().lower()
    if name not in BACKENDS:
        src = "backend=" if backend is not None else "MVPP_BACKEND="
        raise ValueError(f"{src}{name!r} is not a backend; expected one of {', '.join(BACKENDS)}")
    return name


@functools.lru_cache(maxsize=1)
def triton_status() -> tuple[bool, str]:
    """(importable, description). Importing triton is deferred to the first call."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return False, f"triton not importable ({type(e).__name__}: {e})"
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return True, f"triton {triton.__version__}" + (" (TRITON_INTERPRET=1: kernels run on the CPU)" if interp else "")


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def has_compiled_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the compiled extension registered `mvpp::<op>` for `dispatch_key` ("CPU"/"CUDA")."""
    from . import _library

    if not _library.compiled_loaded():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"mvpp::{op}", dispatch_key)
    except RuntimeError:
        return False


def _available(name: str, op: str, device: torch.device) -> Optional[str]:
    """None if `name` can run `op` on `device`, else the reason it cannot."""
    from . import _library

    if name == "reference":
        return None
    if name == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device.type} tensors"
        if not has_compiled_kernel(op, "CUDA"):
            return f"the CUDA extension is not built or has no kernel for {op} ({_library.compiled_status()})"
        return None
    if name == "cpu":
        if device.type != "cpu":
            return f"the cpu backend needs CPU tensors, got {device.type} tensors"
        if not has_compiled_kernel(op, "CPU"):
            return f"the C++ extension is not built or has no kernel for {op} ({_library.compiled_status()})"
        return None
    if name == "triton":
        ok, why = triton_status()
        if not ok:
            return why
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpret():
            return None
        return f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device.type}"
    raise AssertionError(name)


def auto_backend(op: str, device: torch.device, implemented: tuple[str, ...]) -> str:
    if device.type == "cuda":
        order = ("cuda", "triton", "reference")
    else:
        order = ("cpu", "reference")
    for name in order:
        if name in implemented and _available(name, op, device) is None:
            return name
    return "reference"


def resolve_backend(
    op: str,
    device: torch.device,
    backend: Optional[str] = None,
    implemented: tuple[str, ...] = ("cuda", "triton", "cpu", "reference"),
    dtype: Optional[torch.dtype] = None,
    gpu_float64: tuple[str, ...] = ("reference",),
) -> str:
    """The backend that will run `op` on `device`.

    `op` is the name the compiled extension registers its kernel under (e.g. "selective_scan_fwd");
    `implemented` lists the backends this op has at all. With `dtype` float64 on a GPU, `auto` keeps
    to the backends in `gpu_float64` (the GPU kernels compute in float32 at most).

    Traceable by torch.compile(fullgraph=True): the answer depends only on the device, the request
    and what is built -- none of which changes inside a compiled region -- so dynamo evaluates it
    once at trace time (the dispatcher-registry query inside is not traceable) and bakes it in.
    """
    return _resolve_backend_constant(op, str(torch.device(device)), backend, tuple(implemented),
                                     dtype == torch.float64, tuple(gpu_float64))


@torch._dynamo.assume_constant_result
def _resolve_backend_constant(op: str, device: str, backend: Optional[str], implemented: tuple[str, ...],
                              float64: bool, gpu_float64: tuple[str, ...]) -> str:
    dev = torch.device(device)
    name = requested_backend(backend)
    if name == "auto":
        if float64 and dev.type == "cuda":
            implemented = tuple(b for b in implemented if b in gpu_float64) or ("reference",)
        return auto_backend(op, dev, implemented)
    if name not in implemented:
        raise BackendUnavailableError(f"{op} has no {name} backend; it has {', '.join(implemented)}")
    why = _available(name, op, dev)
    if why is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run {op}: {why}")
    return name


# Ops that report in backend_info(): (public name, compiled kernel name, implemented backends).
# Each op module appends itself on import via register_op_info.
_OP_INFO: dict[str, tuple[str, tuple[str, ...]]] = {}


def register_op_info(public_name: str, kernel_name: str, implemented: tuple[str, ...]) -> None:
    _OP_INFO[public_name] = (kernel_name, implemented)


def backend_info() -> dict:
    """What is built, and what `auto` picks for each op on each device type.

    >>> import mvpp_kernels; mvpp_kernels.backend_info()["auto"]["cpu"]["selective_scan"]
    'cpu'
    """
    from . import _library

    tri_ok, tri_desc = triton_status()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    auto = {}
    for dev in devices:
        d = torch.device(dev)
        auto[dev] = {name: auto_backend(k, d, impl) for name, (k, impl) in sorted(_OP_INFO.items())}
    kernels = {
        name: {key: has_compiled_kernel(k, key) for key in ("CPU", "CUDA")} for name, (k, _) in sorted(_OP_INFO.items())
    }
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "compiled_extension": _library.compiled_status(),
        "compiled_kernels": kernels,
        "triton": tri_desc if tri_ok else f"unavailable: {tri_desc}",
        "requested": os.environ.get("MVPP_BACKEND", "auto"),
        "auto": auto,
    }


def format_backend_info(info: Optional[dict] = None) -> str:
    info = info or backend_info()
    lines = [
        f"torch {info['torch']} (CUDA {info['torch_cuda']}), GPU: {info['gpu'] or 'none'}",
        f"compiled extension: {info['compiled_extension']}",
        f"triton: {info['triton']}",
        f"MVPP_BACKEND={info['requested']}",
    ]
    for dev, picks in info["auto"].items():
        lines.append(f"auto on {dev}: " + ", ".join(f"{k} -> {v}" for k, v in picks.items()))
    return "\n".join(lines)
