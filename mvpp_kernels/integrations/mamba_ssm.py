"""mamba-ssm's ``Mamba`` block (``mamba_ssm.modules.mamba_simple``) on mvpp's selective scan.

With ``use_fast_path=False`` (or without causal-conv1d), ``Mamba.forward`` calls the module-level
``selective_scan_fn`` of ``mamba_ssm.modules.mamba_simple``; ``Mamba.step`` (decoding) calls its
``selective_state_update`` (mamba-ssm's Triton kernel, GPU only). :func:`patch_mamba_ssm` replaces both
with mvpp's op and :func:`use_mvpp_in_mamba_ssm` is the context-manager form. The fused
``mamba_inner_fn`` fast path (CUDA + causal-conv1d) is not routed: set ``use_fast_path=False``.

On a CPU-only install of mamba-ssm (``MAMBA_SKIP_CUDA_BUILD=TRUE``), ``import mamba_ssm`` fails because
its package ``__init__`` and ``ops.selective_scan_interface`` import the CUDA extension
``selective_scan_cuda`` unconditionally. :func:`import_mamba_simple` imports ``mamba_simple`` there by
registering a placeholder ``selective_scan_cuda`` module whose every attribute raises a clear error (so
mamba-ssm's own CUDA path can never be reached by accident) and by skipping the package ``__init__``
(which would also import Mamba2/Mamba3). After :func:`patch_mamba_ssm` the block runs on mvpp.

Usage::

    from mvpp_kernels.integrations import use_mvpp_in_mamba_ssm
    from mvpp_kernels.integrations.mamba_ssm import import_mamba_simple

    Mamba = import_mamba_simple().Mamba
    block = Mamba(d_model=64, use_fast_path=False)
    with use_mvpp_in_mamba_ssm():
        y = block(x)                     # x: (batch, L, d_model)
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
from typing import Iterator, Optional

from ._common import PatchHandle, apply_patch, check_version, scan, state_update

#: mamba-ssm versions (major.minor) the tests in tests/integrations ran against.
TESTED_VERSIONS = ("2.3",)


class _MissingCudaExtension(types.ModuleType):
    """Stands in for mamba-ssm's `selective_scan_cuda` on a CPU-only install."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise RuntimeError(
            f"selective_scan_cuda.{name}: mamba-ssm was installed without its CUDA extension, so its own "
            "CUDA selective scan is unavailable. Route the block through mvpp with "
            "mvpp_kernels.integrations.patch_mamba_ssm() and construct Mamba(..., use_fast_path=False).")


def _installed_version() -> str:
    try:
        from importlib.metadata import version
        return version("mamba-ssm")
    except Exception:  # pragma: no cover
        raise ImportError("patch_mamba_ssm needs mamba-ssm (pip install mamba-ssm==2.3.2.post1, "
                          "MAMBA_SKIP_CUDA_BUILD=TRUE on a machine without CUDA)") from None


def import_mamba_simple():
    """``mamba_ssm.modules.mamba_simple``, importable with or without mamba-ssm's CUDA extension."""
    if "mamba_ssm.modules.mamba_simple" in sys.modules:
        return sys.modules["mamba_ssm.modules.mamba_simple"]
    try:
        return importlib.import_module("mamba_ssm.modules.mamba_simple")
    except ImportError as e:
        if "selective_scan_cuda" not in str(e):
            raise
    # CPU-only install: the CUDA extension is missing.
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or not spec.submodule_search_locations:  # pragma: no cover
        raise ImportError("mamba-ssm is not installed")
    for name in [n for n in sys.modules if n == "mamba_ssm" or n.startswith("mamba_ssm.")]:
        del sys.modules[name]  # the half-imported modules of the failed attempt
    sys.modules.setdefault("selective_scan_cuda", _MissingCudaExtension("selective_scan_cuda"))
    pkg = types.ModuleType("mamba_ssm")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__spec__ = spec  # importlib.util.find_spec("mamba_ssm") keeps working for everyone else
    pkg.__file__ = spec.origin
    pkg.__version__ = _installed_version()
    sys.modules["mamba_ssm"] = pkg
    return importlib.import_module("mamba_ssm.modules.mamba_simple")


def patch_mamba_ssm(backend: Optional[str] = None, *, allow_untested: bool = False) -> PatchHandle:
    """Route mamba-ssm's ``Mamba`` block (non-fused path) scan and decoding step through mvpp's op.

    Args:
        backend: mvpp backend ("auto"/None, "cuda", "triton", "cpu", "reference").
        allow_untested: patch a mamba-ssm version outside :data:`TESTED_VERSIONS` anyway.
    """
    check_version("mamba-ssm", _installed_version(), TESTED_VERSIONS, allow_untested)
    ms = import_mamba_simple()
    return apply_patch("mamba-ssm", {
        (ms, "selective_scan_fn"): scan(backend),
        (ms, "selective_state_update"): state_update(backend),
    })


@contextlib.contextmanager
def use_mvpp_in_mamba_ssm(backend: Optional[str] = None, *, allow_untested: bool = False) -> Iterator[PatchHandle]:
    """Context-manager form of :func:`patch_mamba_ssm`."""
    handle = patch_mamba_ssm(backend, allow_untested=allow_untested)
    try:
        yield handle
    finally:
        handle.unpatch()
