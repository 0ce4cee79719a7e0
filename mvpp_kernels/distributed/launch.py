"""`spawn_ranks`: run a function on N local gloo ranks (torch.multiprocessing, spawn context) with
bounded timeouts everywhere: a rank that raises makes `spawn_ranks` kill the others and raise a
RuntimeError carrying that rank's traceback, instead of leaving its peers blocked in a collective."""
from __future__ import annotations

import importlib
import os
import pickle
import socket
import sys
import tempfile
import time
import traceback
from datetime import timedelta

from .. import _io

__all__ = ["spawn_ranks", "free_port"]


def free_port() -> int:
    """A free TCP port on the loopback interface (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, module, fn, path, args, outdir, pg_timeout_s):
    try:
        if path and path not in sys.path:
            sys.path.insert(0, path)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=pg_timeout_s))
        # the traceback file is written BEFORE the process group is torn down: tearing it down makes
        # the peers' pending collectives fail, and the parent reports the earliest failure (the cause)
        result = getattr(importlib.import_module(module), fn)(rank, world, *args)
        _io.atomic_write_bytes(os.path.join(outdir, f"ok-{rank}.pkl"), pickle.dumps(result))
        dist.destroy_process_group()
    except BaseException:
        _io.atomic_write_bytes(os.path.join(outdir, f"err-{rank}.txt"), traceback.format_exc().encode())
        raise SystemExit(1)


def _errors(outdir: str) -> list[str]:
    """Traceback files, earliest first (the first rank to fail is the cause; later ones are
    usually peers whose collective broke when it went away)."""
    names = [f for f in os.listdir(outdir) if f.startswith("err-")]
    return sorted(names, key=lambda f: (os.stat(os.path.join(outdir, f)).st_mtime_ns, f))


def spawn_ranks(fn, world: int, *args, timeout_s: float = 120.0, pg_timeout_s: float = 60.0, path: str = ""):
    """Run `fn(rank, world, *args)` (a module-level function) on `world` spawned gloo ranks on
    127.0.0.1; returns the list of per-rank results (picklable). Raises RuntimeError naming the
    first rank that failed (with its traceback) or TimeoutError after `timeout_s`; in both cases every
    remaining rank is killed."""
    import torch.multiprocessing as mp

    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be an int >= 1, got {world!r}")
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="mvpp-ranks-") as outdir:
        procs = [ctx.Process(target=_entry, args=(r, world, port, fn.__module__, fn.__name__, path, args, outdir,
                                                   pg_timeout_s), daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        failed = None
        try:
            while True:
                errs = _errors(outdir)
                if errs:
                    failed = errs[0]
                    break
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:  # died without a traceback file (killed, segfault): fail now, not at the deadline
                    time.sleep(0.2)
                    errs = _errors(outdir)
                    failed = errs[0] if errs else f"exit-{dead[0]}"
                    break
                if all(p.exitcode is not None for p in procs):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"spawn_ranks: {world} ranks of {fn.__name__} did not finish in {timeout_s} s")
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.exitcode is None and (failed or time.monotonic() > deadline):
                    p.kill()
            for p in procs:
                p.join(10)
                if p.exitcode is None:
                    p.kill()
                    p.join(5)
        if failed and failed.startswith("exit-"):
            rank = int(failed[5:])
            raise RuntimeError(f"rank {rank} of {world} died in {fn.__name__} with exit code "
                               f"{procs[rank].exitcode} (no Python traceback)")
        if failed:
            rank = int(failed[4:-4])
            with open(os.path.join(outdir, failed)) as f:
                tb = f.read()
            raise RuntimeError(f"rank {rank} of {world} failed in {fn.__name__}:\n{tb}")
        out = []
        for r, p in enumerate(procs):
            fpath = os.path.join(outdir, f"ok-{r}.pkl")
            if p.exitcode != 0 or not os.path.exists(fpath):
                raise RuntimeError(f"rank {r} of {world} exited with code {p.exitcode} without a result")
            with open(fpath, "rb") as f:
                out.append(pickle.load(f))
        return out
