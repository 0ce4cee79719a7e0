"""Run other projects' Mamba layers on mvpp's `selective_scan`, unchanged.

One module per client, each with a permanent form and a context manager:

* :mod:`mvpp_kernels.integrations.transformers_mamba` — Hugging Face transformers' ``MambaMixer``
  (``MambaModel``, ``MambaForCausalLM``): :func:`patch_transformers_mamba` /
  :func:`use_mvpp_in_transformers_mamba`.
* :mod:`mvpp_kernels.integrations.mamba_ssm` — mamba-ssm's ``Mamba`` block
  (``mamba_ssm.modules.mamba_simple``): :func:`patch_mamba_ssm` / :func:`use_mvpp_in_mamba_ssm`.

Each patch replaces only module-level functions that the client looks up by name when it runs (its
selective scan and its one-step state update), keeps the originals, and restores them exactly on
``unpatch()`` / leaving the context. No client code is copied. A client version outside the tested range
raises :class:`UntestedClientVersionError` unless ``allow_untested=True`` is passed.

The clients are optional: importing this package imports neither of them.
"""
from ._common import PatchHandle, UntestedClientVersionError
from .mamba_ssm import patch_mamba_ssm, use_mvpp_in_mamba_ssm
from .transformers_mamba import patch_transformers_mamba, use_mvpp_in_transformers_mamba

__all__ = [
    "PatchHandle",
    "UntestedClientVersionError",
    "patch_mamba_ssm",
    "patch_transformers_mamba",
    "use_mvpp_in_mamba_ssm",
    "use_mvpp_in_transformers_mamba",
]
