"""The one place the model layer looks up `mvpp_kernels` ops (public API only).

A component whose op is missing from the installed `mvpp_kernels` raises `OpUnavailableError`
naming the op and the component, instead of an AttributeError deep inside a forward pass.
"""
from __future__ import annotations

import mvpp_kernels


class OpUnavailableError(RuntimeError):
    """A model component needs an mvpp_kernels op that this installation does not provide."""


def has_op(name: str) -> bool:
    return getattr(mvpp_kernels, name, None) is not None


def op(name: str, component: str = "this model"):
    fn = getattr(mvpp_kernels, name, None)
    if fn is None:
        raise OpUnavailableError(
            f"{component} needs mvpp_kernels.{name}, which this installation of mvpp_kernels does not "
            f"provide (version {getattr(mvpp_kernels, '__version__', '?')}). Update mvpp_kernels, or leave "
            f"{component} out (e.g. the demo's ablation flags).")
    return fn
