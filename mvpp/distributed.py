"""Data-parallel helpers over torch.distributed (gloo on CPU, NCCL on CUDA), launched by `torchrun`.

Without a process group (a plain `python`/`mvpp` run) every helper is the identity of one process:
rank 0 of world size 1, so single-process code paths are unchanged. Under `torchrun` the
environment holds RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; `init_from_env()` opens the group
(with a bounded timeout, so a dead peer makes collectives fail instead of hanging forever).

See docs/distributed_training.md.
"""
from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["init_from_env", "is_distributed", "rank", "world_size", "is_rank0", "barrier", "broadcast_object",
           "all_reduce_sum", "gather_rows", "shutdown", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 60.0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_rank0() -> bool:
    return rank() == 0


def init_from_env(device: str = "cpu", timeout_s: float | None = None) -> bool:
    """Open the default process group from torchrun's environment variables when WORLD_SIZE > 1.

    Returns True when this process is part of a group of more than one rank. Backend: NCCL when
    `device` is CUDA (each rank takes GPU LOCAL_RANK), gloo otherwise. `timeout_s` (default
    MVPP_DIST_TIMEOUT or 60 s) bounds the rendezvous and every collective."""
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if dist.is_initialized():
        return dist.get_world_size() > 1
    for v in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if v not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={ws} but environment variable {v} is unset; launch with "
                               f"`torchrun --nproc_per_node=N ...`")
    if timeout_s is None:
        timeout_s = float(os.environ.get("MVPP_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return True


def quiet(*args, **kwargs) -> None:
    """A print/log stand-in for ranks other than 0 (one log per job)."""
    return None


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (picklable objects)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(values) -> list[float]:
    """Element-wise sum over ranks of a list of numbers, in float64 (exact for counts, sums of losses)."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.cpu().tolist()


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate in rank order the equal-shaped tensors `x` of every rank (all_gather), on x's device."""
    if not is_distributed():
        return x
    dev = _comm_device()
    xs = x.to(dev).contiguous()
    out = [torch.empty_like(xs) for _ in range(world_size())]
    dist.all_gather(out, xs)
    return torch.cat(out).to(x.device)
