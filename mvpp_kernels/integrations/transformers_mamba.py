"""Hugging Face transformers' Mamba (``MambaMixer``) on mvpp's selective scan.

In transformers 5.x, ``MambaMixer.forward`` runs its scan through two module-level functions of
``transformers.models.mamba.modeling_mamba`` that it looks up by name on every call:

* ``mamba_selective_scan`` — the whole-sequence scan (prefill and training). Without mamba-ssm's CUDA
  kernels (every CPU user) it is a Python loop over the sequence.
* ``mamba_selective_state_update`` — one decoding step of ``generate`` with its cache.

:func:`patch_transformers_mamba` replaces both with mvpp's op (any device, any mvpp backend) and returns a
handle whose ``unpatch()`` restores the originals; :func:`use_mvpp_in_transformers_mamba` is the same as
a context manager. Everything else (projections, the causal conv, caching, ``mamba_inner_fn`` on CUDA with
mamba-ssm installed) stays the client's own. The training fast path ``mamba_inner_fn`` only exists with
mamba-ssm's CUDA kernels; where it runs, it bypasses the scan and this patch does not change it.

Usage::

    from transformers import MambaConfig, MambaForCausalLM
    from mvpp_kernels.integrations import use_mvpp_in_transformers_mamba

    model = MambaForCausalLM(MambaConfig(...))
    with use_mvpp_in_transformers_mamba():          # or backend="cpu" / "triton" / "cuda"
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from ._common import PatchHandle, apply_patch, check_version, scan, state_update

#: transformers versions (major.minor) the tests in tests/integrations ran against.
TESTED_VERSIONS = ("5.25",)


def _client_module(allow_untested: bool):
    try:
        import transformers
        from transformers.models.mamba import modeling_mamba
    except ImportError as e:  # pragma: no cover - exercised only without transformers
        raise ImportError("patch_transformers_mamba needs Hugging Face transformers "
                          "(pip install 'mvpp[test]' or transformers==5.25.0)") from e
    check_version("transformers", transformers.__version__, TESTED_VERSIONS, allow_untested)
    return modeling_mamba


def patch_transformers_mamba(backend: Optional[str] = None, *, allow_untested: bool = False) -> PatchHandle:
    """Route every transformers ``MambaMixer``'s selective scan and decoding step through mvpp's op.

    Args:
        backend: mvpp backend for the scan ("auto"/None, "cuda", "triton", "cpu", "reference").
        allow_untested: patch a transformers version outside :data:`TESTED_VERSIONS` anyway.

    Returns:
        A :class:`PatchHandle`; ``handle.unpatch()`` restores transformers' own functions.
    """
    mm = _client_module(allow_untested)
    step = state_update(backend)

    # transformers orders the optional arguments of its state update (D, dt_bias, dt_softplus, z)
    # differently from mamba-ssm's (D, z, dt_bias, dt_softplus): keep transformers' positional order.
    def mamba_selective_state_update_mvpp(state, hidden_states, dt, A, B, C, D=None, dt_bias=None,
                                          dt_softplus=False, z=None, **kwargs):
        return step(state, hidden_states, dt, A, B, C, D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, **kwargs)

    mamba_selective_state_update_mvpp.__wrapped__ = step
    handle = apply_patch("transformers", {
        (mm, "mamba_selective_scan"): scan(backend),
        (mm, "mamba_selective_state_update"): mamba_selective_state_update_mvpp,
    })
    return handle


@contextlib.contextmanager
def use_mvpp_in_transformers_mamba(backend: Optional[str] = None, *,
                                   allow_untested: bool = False) -> Iterator[PatchHandle]:
    """Context-manager form of :func:`patch_transformers_mamba`."""
    handle = patch_transformers_mamba(backend, allow_untested=allow_untested)
    try:
        yield handle
    finally:
        handle.unpatch()
