"""Crash-safe files: one atomic writer and one checksummed container, used by every file mvpp writes
that it later trusts (memory banks, training checkpoints).

Atomic write (`atomic_write_bytes`): the bytes go to a temporary file in the target's directory, are
flushed and fsync'ed, the temporary is `os.replace`d over the target and the directory is fsync'ed.
A process killed at any moment (SIGKILL included) leaves the old file or the new one under the real
name, never a partial one. What a killed writer can leave is its temporary file, named

    .tmp-<target name>.<host>.<pid>.<random>.part

so that a later write can tell our leftovers from anything else and clean them safely
(`clean_stale_tmp`): only names matching that exact pattern, and only when the writer is certainly gone
(same host and its pid no longer exists) or the file is older than `STALE_AFTER_S`. A file of another
live process, or one on a shared folder written from another host, is left alone until it is old.

Checksummed container (`write_checked` / `read_checked`): a safetensors file whose metadata holds one
JSON header under a caller-chosen key, with `format`, `version` and a SHA-256 over the canonical
header JSON (every field but the digest itself) and every tensor (name, dtype, shape, bytes). So an
edited header field (a bank's `next_id`, a checkpoint's epoch or optimizer settings), a flipped weight
bit, a truncated file, a foreign safetensors file and another format or version are all refused at
load with a `ValueError` that says which.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
import time
from typing import Iterable, Optional

import torch

__all__ = ["atomic_write_bytes", "clean_stale_tmp", "tmp_prefix", "write_checked", "read_checked",
           "tensors_digest", "STALE_AFTER_S", "DIGEST_FIELD"]

STALE_AFTER_S = 24 * 3600.0  # a temporary this old is stale even if its pid looks alive (pid reuse)
DIGEST_FIELD = "sha256"
_MAX_NAME = 120  # the target name is cut in the temporary's name so it stays under NAME_MAX (255)
_LEGACY_CKPT_RE = re.compile(r"^\.tmp-[a-z0-9_]{8}\.part$")
_MKSTEMP_RE = re.compile(r"^[a-z0-9_]{8}$")
_TMP_RE = re.compile(r"^\.tmp-(?P<name>.*)\.(?P<host>[A-Za-z0-9-]{1,32})\.(?P<pid>[0-9]{1,10})\.[A-Za-z0-9_]+\.part$")


def _host() -> str:
    h = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname() or "host")[:32]
    return h or "host"


def tmp_prefix(path: str | os.PathLike) -> str:
    """The prefix of this process's temporary files for `path` (the random part and `.part` follow)."""
    name = os.path.basename(os.fspath(path))[:_MAX_NAME]
    return f".tmp-{name}.{_host()}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True  # unknown: assume alive (never delete a file a writer may still be filling)
    return True


def _legacy_tmp(name: str, target: Optional[str]) -> bool:
    """Temporaries of mvpp's earlier writers, which carried no pid: `.tmp-<8 random>.part` (checkpoints,
    feature caches) and `.tmp-<target name>.<8 random>` (memory banks; only for the target being written)."""
    if _LEGACY_CKPT_RE.match(name):
        return True
    if target:
        base = os.path.basename(target)
        return name.startswith(f".tmp-{base}.") and bool(_MKSTEMP_RE.match(name[len(base) + 6:]))
    return False


def clean_stale_tmp(directory: str | os.PathLike, max_age_s: float = STALE_AFTER_S,
                    now: Optional[float] = None, target: Optional[str] = None) -> list[str]:
    """Delete the stale temporaries of our atomic writes in `directory`; return the names deleted.

    A name is ours only if it matches `.tmp-<name>.<host>.<pid>.<random>.part` exactly. It is stale if it
    was written on this host by a pid that no longer exists (a SIGKILLed save), or if it is older than
    `max_age_s` (any host; guards against pid reuse). Temporaries of mvpp's earlier writers (no pid in
    the name) are removed only when older than `max_age_s`. Everything else is left alone. Never raises
    for a file that vanished or cannot be removed (another cleaner may race us)."""
    directory = os.fspath(directory)
    now = time.time() if now is None else now
    me, host, removed = os.getpid(), _host(), []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = _TMP_RE.match(name)
        legacy = not m and _legacy_tmp(name, target)
        if not m and not legacy:
            continue
        p = os.path.join(directory, name)
        try:
            st = os.lstat(p)
        except OSError:
            continue
        if not os.path.isfile(p) or os.path.islink(p):
            continue
        if legacy:
            if now - st.st_mtime > max_age_s:
                try:
                    os.unlink(p)
                    removed.append(name)
                except OSError:
                    pass
            continue
        pid = int(m.group("pid"))
        same_host = m.group("host") == host
        if same_host and pid == me:
            continue  # our own, possibly in flight in another thread
        stale = (same_host and not _pid_alive(pid)) or (now - st.st_mtime > max_age_s)
        if not stale:
            continue
        try:
            os.unlink(p)
            removed.append(name)
        except OSError:
            pass
    return removed


def _fsync_dir(directory: str) -> None:
    try:  # make the rename itself durable; some file systems cannot open or fsync a directory
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that a crash at any moment leaves the old file or the new one.

    Creates the parent folder if needed and first removes stale temporaries left in it by killed
    writers (see `clean_stale_tmp`). On any error the temporary is removed and the old file is kept."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {path!r}: it is a directory")
    os.makedirs(directory, exist_ok=True)
    clean_stale_tmp(directory, target=path)
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(path), suffix=".part", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def _canonical_header(header: dict) -> bytes:
    return json.dumps({k: v for k, v in header.items() if k != DIGEST_FIELD}, sort_keys=True,
                      separators=(",", ":"), allow_nan=True).encode("utf-8")


def tensors_digest(header: dict, tensors: dict) -> str:
    """SHA-256 over the canonical header JSON (without the digest field) and every tensor's name,
    dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    hb = _canonical_header(header)
    h.update(len(hb).to_bytes(8, "little"))
    h.update(hb)
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        for part in (name.encode("utf-8"), str(t.dtype).encode(), str(tuple(t.shape)).encode()):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def write_checked(path: str | os.PathLike, tensors: dict, header: dict, *, key: str, fmt: str,
                  version: int) -> None:
    """Atomically write `tensors` and a JSON `header` (plus format, version and digest) as safetensors."""
    from safetensors.torch import save as st_save

    tensors = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}
    header = dict(header, format=fmt, version=version)
    header.pop(DIGEST_FIELD, None)
    # digest what a reader will see: after a JSON round trip (tuples become lists, int keys strings)
    header = json.loads(json.dumps(header))
    header[DIGEST_FIELD] = tensors_digest(header, tensors)
    blob = st_save(tensors, metadata={key: json.dumps(header, sort_keys=True)})
    atomic_write_bytes(path, blob)


def _read_metadata(blob: bytes) -> Optional[dict]:
    """The `__metadata__` of a safetensors blob (the header is an 8-byte length + JSON)."""
    if len(blob) < 8:
        raise ValueError("file shorter than a safetensors header")
    n = int.from_bytes(blob[:8], "little")
    if n > len(blob) - 8:
        raise ValueError("header length beyond the end of the file")
    meta = json.loads(blob[8:8 + n].decode("utf-8"))
    if not isinstance(meta, dict):
        raise ValueError("safetensors header is not a JSON object")
    return meta.get("__metadata__")


def read_checked(path: str | os.PathLike, *, key: str, fmt: str, version: int, what: str,
                 required: Iterable[str] = (), old: Optional[dict] = None) -> tuple[dict, dict]:
    """Read and verify a file written by `write_checked`; return (tensors, header) on the CPU.

    Raises FileNotFoundError for a missing file and ValueError (the message starts with
    "<path> is not a valid <what>") for a truncated or corrupt file, a foreign safetensors file, another
    format or version, missing tensors, or contents that do not match the digest. `old` maps the
    (format, version) of an earlier layout (version None where it had none) to the message explaining
    why it is refused and what to do."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {what} at {path!r}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a directory, not a {what}")
    with open(path, "rb") as f:
        blob = f.read()
    bad = f"{path!r} is not a valid {what}"
    try:
        meta = _read_metadata(blob)
        tensors = st_load(blob)
    except (SafetensorError, ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{bad}: cannot parse it as safetensors (truncated or corrupt?): {e}") from None
    except Exception as e:  # safetensors' Rust layer may raise other types for malformed input
        raise ValueError(f"{bad}: cannot parse it as safetensors (truncated or corrupt?): "
                         f"{type(e).__name__}: {e}") from None
    if not meta or key not in meta:
        raise ValueError(f"{bad}: it has no {key!r} header (a foreign safetensors file?)")
    try:
        header = json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise ValueError(f"{bad}: its header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{bad}: its header is not a JSON object")
    try:
        why = (old or {}).get((header.get("format"), header.get("version")))
    except TypeError:  # an unhashable format/version value: not an earlier layout either
        why = None
    if why:
        raise ValueError(f"{bad}: {why}")
    if header.get("format") != fmt:
        raise ValueError(f"{bad}: format {header.get('format')!r}, expected {fmt!r}")
    if header.get("version") != version:
        raise ValueError(f"{bad}: format version {header.get('version')!r}; this mvpp reads version {version}")
    missing = [n for n in required if n not in tensors]
    if missing:
        raise ValueError(f"{bad}: missing tensors {missing}")
    if not isinstance(header.get(DIGEST_FIELD), str) or tensors_digest(header, tensors) != header[DIGEST_FIELD]:
        raise ValueError(f"{bad}: checksum mismatch (the file was altered or corrupted)")
    return tensors, header

