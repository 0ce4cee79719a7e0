"""Shared pieces of the client integrations: version gate, patch bookkeeping, the scan adapters."""
from __future__ import annotations

import threading
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch


class UntestedClientVersionError(RuntimeError):
    """The installed client is a version the integration was not tested with."""


def _version_tuple(v: str) -> Tuple[int, ...]:
    out: List[int] = []
    for part in v.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if digits == "":
            break
        out.append(int(digits))
        if not part.isdigit():
            break
    return tuple(out)


def check_version(client: str, version: str, tested: Iterable[str], allow_untested: bool) -> None:
    """Refuse a client version whose major.minor is not in `tested` (unless allow_untested)."""
    tested = tuple(tested)
    key = _version_tuple(version)[:2]
    if any(_version_tuple(t)[:2] == key for t in tested) or allow_untested:
        return
    raise UntestedClientVersionError(
        f"{client} {version} is installed, but mvpp's integration was tested with {client} "
        f"{', '.join(tested)} only: the functions it replaces may have moved or changed their contract. "
        f"Pass allow_untested=True to patch anyway (and run tests/integrations against it), or install "
        f"a tested version.")


_LOCK = threading.Lock()


class PatchHandle:
    """What a patch changed; `unpatch()` puts the client's own functions back (idempotent).

    Patches nest: each handle restores what was there when it was applied, so handles must be undone in
    reverse order (the context managers do that by construction)."""

    def __init__(self, client: str, saved: Dict[Tuple[object, str], object],
                 installed: Optional[Dict[Tuple[object, str], object]] = None):
        self.client = client
        self._saved = saved
        self._installed = installed or {}
        self.active = True

    @property
    def calls(self) -> Dict[str, int]:
        """How many times the client called each replaced function through this patch (a way to check
        that the client really runs on mvpp, e.g. that it did not take a fused path that bypasses it)."""
        return {name: getattr(getattr(fn, "__wrapped__", fn), "calls", 0)
                for (_, name), fn in self._installed.items()}

    def unpatch(self) -> None:
        with _LOCK:
            if not self.active:
                return
            for (owner, name), original in self._saved.items():
                setattr(owner, name, original)
            self.active = False

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.unpatch()

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        names = ", ".join(f"{getattr(o, '__name__', o)}.{n}" for (o, n) in self._saved)
        return f"PatchHandle({self.client}: {names}; {state})"


def apply_patch(client: str, replacements: Dict[Tuple[object, str], object]) -> PatchHandle:
    with _LOCK:
        saved = {}
        for (owner, name), new in replacements.items():
            if not hasattr(owner, name):
                raise UntestedClientVersionError(
                    f"{client}: {getattr(owner, '__name__', owner)}.{name} does not exist in this version; "
                    "the integration cannot patch it")
            saved[(owner, name)] = getattr(owner, name)
            setattr(owner, name, new)
    return PatchHandle(client, saved, dict(replacements))


# Keyword arguments some clients pass that only choose among the client's own fallbacks (transformers:
# which pure-torch scan to use); they have no meaning for mvpp's op and are ignored. Any other extra
# keyword is refused, so a client contract change shows as an error instead of being dropped silently.
_IGNORED_KWARGS = frozenset({"use_mambapy", "use_associative_scan"})


def _check_extra_kwargs(fn: str, kwargs: dict) -> None:
    unknown = sorted(set(kwargs) - _IGNORED_KWARGS)
    if unknown:
        raise TypeError(f"{fn} (mvpp integration): unsupported keyword argument(s) {', '.join(unknown)}; "
                        "the client passed arguments this integration was not written for (untested version?)")


def scan(backend: Optional[str]) -> Callable:
    """mamba-ssm's `selective_scan_fn` contract on mvpp's op (the same argument names and order)."""
    from ..ops.selective_scan import selective_scan

    def selective_scan_mvpp(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                            return_last_state=False, **kwargs):
        _check_extra_kwargs("selective_scan_fn", kwargs)
        selective_scan_mvpp.calls += 1
        if torch.is_complex(A):
            raise TypeError("selective_scan (mvpp): complex A is not supported (real A only, like mamba-ssm's "
                            "Mamba and transformers' MambaMixer); got A of dtype "
                            f"{A.dtype}")
        return selective_scan(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                              bool(return_last_state), backend=backend)

    selective_scan_mvpp.__mvpp_backend__ = backend
    selective_scan_mvpp.calls = 0
    return selective_scan_mvpp


def state_update(backend: Optional[str]) -> Callable:
    """One decoding step on mvpp's op: `selective_state_update(state, x, dt, A, B, C, D, z, dt_bias,
    dt_softplus)` with `state` (batch, dim, N) updated in place and y (batch, dim) returned, as in
    mamba-ssm's Triton `selective_state_update` and transformers' torch fallback (single-head form)."""
    from ..ops.selective_scan import selective_scan

    def selective_state_update_mvpp(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                                    **kwargs):
        _check_extra_kwargs("selective_state_update", kwargs)
        selective_state_update_mvpp.calls += 1
        if state.dim() != 3 or x.dim() != 2:
            raise ValueError("selective_state_update (mvpp): expected state (batch, dim, N) and x (batch, dim), "
                             f"got state {tuple(state.shape)} and x {tuple(x.shape)} (the multi-head form is "
                             "not supported)")
        y, last = selective_scan(
            x.unsqueeze(-1), dt.unsqueeze(-1), A, B.unsqueeze(-1), C.unsqueeze(-1), D,
            None if z is None else z.unsqueeze(-1), dt_bias, bool(dt_softplus), True,
            initial_state=state.to(torch.float64 if x.dtype == torch.float64 else torch.float32),
            backend=backend)
        state.copy_(last.to(state.dtype))
        return y.squeeze(-1)

    selective_state_update_mvpp.__mvpp_backend__ = backend
    selective_state_update_mvpp.calls = 0
    return selective_state_update_mvpp
