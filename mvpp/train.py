"""Training: AdamW, early stopping on validation, seeded, safetensors checkpoints written atomically, resume.

A checkpoint is one safetensors file holding the model's and the optimizer's tensors plus a JSON
header (metadata) with the epoch, the best validation score, the RNG states' fingerprints and the
model's config, so `resume=True` continues where a killed run stopped, and a SHA-256 over the header
and every tensor (mvpp_kernels._io). Writes go to a temporary file in the same folder, are fsync'ed,
then os.replace'd over the old file: a crash mid-write never leaves a torn checkpoint, and a torn or
altered file is refused at load.
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch

from mvpp_kernels import _io

from . import distributed as D
from .data.dataset import iterate_batches, shuffled
from .metrics import all_metrics

__all__ = ["TrainConfig", "train_model", "predict", "evaluate", "seed_everything", "save_checkpoint",
           "load_checkpoint", "atomic_write_bytes"]

CHECKPOINT_FORMAT = "mvpp.checkpoint"
CHECKPOINT_VERSION = 2
_CHECKPOINT_KEY = "mvpp"
_OLD_CHECKPOINTS = {("mvpp-checkpoint/1", None): "it is a version-1 mvpp checkpoint, written without a checksum; "
                                                 "this mvpp only loads checksummed (version 2) checkpoints: "
                                                 "retrain with `mvpp train --out ...`"}


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-2
    patience: int = 5
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "cpu"
    deterministic: bool = True
    progress: bool = True
    eval_batch_size: int = 256


def seed_everything(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    if deterministic:
        # warn_only: an op without a deterministic implementation warns instead of failing the run
        torch.use_deterministic_algorithms(True, warn_only=True)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` atomically (see mvpp_kernels._io: temp file, fsync, os.replace, directory
    fsync; stale temporaries of killed writers are cleaned first)."""
    _io.atomic_write_bytes(path, data)


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        meta["state"][str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous()
                meta["state"][str(pid)][k] = "tensor"
            else:
                meta["state"][str(pid)][k] = v
    return tensors, meta


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state = {}
    for pid, st in meta["state"].items():
        state[int(pid)] = {k: (tensors[f"optim.{pid}.{k}"] if v == "tensor" else v) for k, v in st.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: str, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    extra: Optional[dict] = None, best_state: Optional[dict] = None) -> None:
    """Atomically write model (+ optimizer, + the best weights so far) tensors and a JSON header to a
    safetensors file, with a SHA-256 over the header and every tensor (mvpp_kernels._io.write_checked)."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if best_state is not None:
        tensors.update({f"best.{k}": v.detach().cpu().contiguous() for k, v in best_state.items()})
    tensors["rng.torch"] = torch.get_rng_state()  # dropout draws continue exactly on resume
    meta = {"extra": extra or {}}
    if optimizer is not None:
        t, m = _flatten_optimizer(optimizer)
        tensors.update(t)
        meta["optimizer"] = m
    _io.write_checked(path, tensors, meta, key=_CHECKPOINT_KEY, fmt=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION)


def load_checkpoint(path: str, model: Optional[torch.nn.Module] = None,
                    optimizer: Optional[torch.optim.Optimizer] = None, map_location="cpu", which: str = "model") -> dict:
    """Load a checkpoint written by save_checkpoint into model/optimizer; returns its `extra` dict.

    which="model": the weights at the end of the last epoch (to resume); "best": the best weights
    (to evaluate; falls back to "model" when the file has none). The whole file is verified first
    (format, version, SHA-256 over header and tensors): a torn, altered or foreign file raises
    ValueError, a missing one FileNotFoundError, before anything is loaded into model/optimizer."""
    if which not in ("model", "best"):
        raise ValueError(f"which must be 'model' or 'best', got {which!r}")
    what = "mvpp checkpoint"
    tensors, meta = _io.read_checked(path, key=_CHECKPOINT_KEY, fmt=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION,
                                     what=what, old=_OLD_CHECKPOINTS)
    if not isinstance(meta.get("extra", {}), dict) or not isinstance(meta.get("optimizer", {}), dict):
        raise ValueError(f"{path!r} is not a valid {what}: malformed header")
    tensors = {k: v.to(map_location) for k, v in tensors.items()}
    if model is not None:
        pre = "best." if which == "best" and any(k.startswith("best.") for k in tensors) else "model."
        sd = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint {path!r} does not fit this model: missing {missing}, unexpected "
                             f"{unexpected} (was it written by another model or config?)")
    if optimizer is not None and "optimizer" in meta:
        try:
            optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"checkpoint {path!r}: its optimizer state does not fit this optimizer ({e})") from e
        if "rng.torch" in tensors:
            torch.set_rng_state(tensors["rng.torch"].cpu())
    return meta.get("extra", {})


@torch.no_grad()
def predict(model, data, idx, batch_size: int = 256, device="cpu") -> torch.Tensor:
    model.eval()
    model.refresh_bank()
    if D.is_distributed():
        return _predict_distributed(model, data, idx, batch_size, device)
    out = [model(b)["pred"].float().cpu() for b in iterate_batches(data, idx, batch_size, device=device)]
    return torch.cat(out) if out else torch.zeros(0)


def _predict_distributed(model, data, idx, batch_size, device) -> torch.Tensor:
    """Every rank scores a contiguous chunk of `idx` of the same length m = ceil(n / world) (the last
    chunks padded with idx[0]), so every rank calls the model forward the same number of times (a
    sharded memory bank's search is a collective); the chunks are all-gathered in rank order and the
    padded rows dropped: the result is the prediction for every item of idx, in idx order, on every rank."""
    idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
    n, w, r = idx.numel(), D.world_size(), D.rank()
    if n == 0:
        return torch.zeros(0)
    m = -(-n // w)
    local = idx[r * m: (r + 1) * m]
    local = torch.cat([local, idx[:1].expand(m - local.numel())])
    out = torch.cat([model(b)["pred"].float() for b in iterate_batches(data, local, batch_size, device=device)])
    return D.gather_rows(out).cpu()[:n]

def evaluate(model, data, idx, batch_size: int = 256, device="cpu") -> dict:
    pred = predict(model, data, idx, batch_size, device)
    return all_metrics(pred, data.label[torch.as_tensor(idx)])


def _rank_batches(data, train_idx, batch_size, gen, dev, rank, world):
    """This rank's slice of each global batch, with its loss weight.

    One global permutation from `gen` (`shuffled`, the single-process iterate_batches(shuffle=True)
    order); global batch g = perm[s:s + batch_size] is cut into `world` contiguous slices of
    ceil(len(g) / world) rows and rank r takes slice r. Weight len(slice) * world / len(g) makes
    DDP's average over ranks of the weighted per-rank mean losses the mean loss over the global batch,
    so the gradient is the single-process gradient (up to float summation order). A rank whose slice
    of a short last batch is empty still runs forward/backward (DDP and a sharded bank are collectives)
    on one row with weight 0."""
    idx = torch.as_tensor(train_idx, dtype=torch.long)
    perm = shuffled(idx, gen)
    for s in range(0, perm.numel(), batch_size):
        g = perm[s: s + batch_size]
        c = -(-g.numel() // world)
        local = g[rank * c: (rank + 1) * c]
        weight = local.numel() * world / g.numel()
        if local.numel() == 0:
            local, weight = g[:1], 0.0
        yield next(iterate_batches(data, local, local.numel(), device=dev)), weight


def train_model(model, data, splits: dict, config: TrainConfig | None = None, checkpoint: Optional[str] = None,
                resume: bool = False, log=print) -> dict:
    """Train `model` on splits["train"], early-stop on splits["val"] nMSE; the best weights are kept
    (and in `checkpoint` if given). Returns a history dict (per-epoch train loss and val metrics)."""
    cfg = config or TrainConfig()
    seed_everything(cfg.seed, cfg.deterministic)
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no GPU; use --device cpu")
    world, rank = D.world_size(), D.rank()
    if world > 1:
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())  # init_from_env set it to LOCAL_RANK
        if rank != 0:  # one log and one progress bar per job
            log = D.quiet
    train_idx, val_idx = splits["train"], splits["val"]
    y = data.label[train_idx]
    model.set_label_stats(float(y.mean()), float(y.std()))
    model.prepare(data, train_idx)
    model.to(dev)
    model.attach_bank(data, train_idx)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    start, best, best_state, bad = 0, math.inf, None, 0
    history = {"train_loss": [], "val": [], "epochs_run": 0}
    if resume and checkpoint and os.path.exists(checkpoint):
        extra = load_checkpoint(checkpoint, model, opt)
        start, best, bad = extra["epoch"] + 1, extra["best"], extra["bad"]
        history = extra.get("history", history)
        cur = {k: v.clone() for k, v in model.state_dict().items()}
        load_checkpoint(checkpoint, model, which="best")
        best_state = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(cur)
        log(f"resumed from {checkpoint} at epoch {start} (best val nMSE {best:.4f})")
    fwd = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # broadcasts rank 0's weights (equal anyway: same seed); gradients are averaged over ranks
        fwd = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                      find_unused_parameters=True)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        tqdm = None
    for epoch in range(start, cfg.epochs):
        gen.manual_seed(cfg.seed + 1000003 * epoch)  # the epoch's shuffle does not depend on resume
        model.train()
        model.refresh_bank()
        n_batches = math.ceil(len(train_idx) / cfg.batch_size)
        if world > 1:
            it = _rank_batches(data, train_idx, cfg.batch_size, gen, dev, rank, world)
        else:
            it = ((b, 1.0) for b in iterate_batches(data, train_idx, cfg.batch_size, shuffle=True, generator=gen,
                                                    device=dev))
        bar = tqdm(it, total=n_batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not cfg.progress or rank != 0) if tqdm else it
        total, count = 0.0, 0
        t0 = time.perf_counter()
        for batch, weight in bar:
            out = fwd(batch)
            loss = model.loss(batch, out)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss at epoch {epoch + 1}; lower --lr or check inputs")
            opt.zero_grad(set_to_none=True)
            (loss * weight if world > 1 else loss).backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            n_real = batch["label"].shape[0] if weight else 0
            total += float(loss.detach()) * n_real
            count += n_real
            if tqdm and count:
                bar.set_postfix(loss=f"{total / count:.4f}")
        if world > 1:
            total, count = D.all_reduce_sum([total, count])
        val = evaluate(model, data, val_idx, cfg.eval_batch_size, dev)
        history["train_loss"].append(total / max(count, 1))
        history["val"].append(val)
        history["epochs_run"] = epoch + 1
        improved = D.broadcast_object(val["nmse"] < best - 1e-4)  # decided once, on rank 0
        if improved:
            best, bad = val["nmse"], 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
        if cfg.progress:
            log(f"epoch {epoch + 1}: train loss {total / max(count, 1):.4f}  val nMSE {val['nmse']:.4f}  "
                f"SRC {val['src']:.4f}  ({time.perf_counter() - t0:.1f}s){'  *' if improved else ''}")
        if checkpoint and rank == 0:
            extra = {"epoch": epoch, "best": best, "bad": bad, "history": history,
                     "train_config": asdict(cfg),
                     "model_config": model.config.to_dict(),
                     "model_class": type(model).__name__,
                     "model_dims": getattr(model, "dims", {}),
                     "label_stats": [model.label_mean, model.label_std]}
            if world > 1:
                extra["world_size"] = world
            save_checkpoint(checkpoint, model, opt, extra, best_state=best_state)
        if checkpoint:
            D.barrier()  # no rank reads or outlives a checkpoint rank 0 is still writing
        if D.broadcast_object(bad >= cfg.patience):
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    history["best_val_nmse"] = best
    return history
