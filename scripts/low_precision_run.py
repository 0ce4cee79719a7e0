"""Low-precision stability run of the full MVPPModel on the synthetic data (CPU autocast).

Trains for --steps optimizer steps under torch.autocast("cpu", dtype=bf16|fp16) with the same loop
as mvpp.train.train_model (AdamW, grad clipping, the bank refreshed each epoch) and records, per step,
the loss, the global grad norm (before clipping) and whether any loss/grad value was NaN/inf. Writes
a JSON (per-step records + a summary) and, if matplotlib is importable, a PNG plot.

    .venv/bin/python scripts/low_precision_run.py --steps 3000 --dtype bf16 --out runs/lp_bf16

Exit status 1 if any step had a non-finite loss or gradient. With fp16 the GradScaler's scaled
gradient may overflow (the scaler skips that step and halves its scale, as on a GPU); such steps are
listed as `scaler_skipped_steps`, and their unscaled gradient is recomputed and must be finite.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch


def run(steps: int, dtype: str = "bf16", preset: str = "tiny", batch_size: int = 64, lr: float = 2e-3,
        seed: int = 0, d: int = 16, log_every: int = 0) -> dict:
    from mvpp.data import generate, split_indices
    from mvpp.data.dataset import iterate_batches
    from mvpp.models import ModelConfig, build_model
    from mvpp.train import seed_everything

    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    seed_everything(seed)
    data = generate(preset, seed=seed)
    splits = split_indices(len(data), "mmra")
    train_idx = splits["train"]
    model = build_model("MVPPModel", data, ModelConfig(d=d))
    y = data.label[train_idx]
    model.set_label_stats(float(y.mean()), float(y.std()))
    model.prepare(data, train_idx)
    model.attach_bank(data, train_idx)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    # fp16 has a narrow exponent range: scale the loss as one would on a GPU (bf16 needs no scaler).
    scaler = torch.amp.GradScaler("cpu", enabled=(amp == torch.float16))
    gen = torch.Generator().manual_seed(seed)
    records, step, epoch = [], 0, 0
    t0 = time.perf_counter()
    while step < steps:
        gen.manual_seed(seed + 1000003 * epoch)
        model.train()
        model.refresh_bank()
        for batch in iterate_batches(data, train_idx, batch_size, shuffle=True, generator=gen):
            if step >= steps:
                break
            with torch.autocast("cpu", dtype=amp):
                out = model(batch)
                loss = model.loss(batch, out)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward(retain_graph=scaler.is_enabled())
            scaler.unscale_(opt)
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            finite_grads = all(bool(torch.isfinite(g).all()) for g in grads)
            scaler_overflow = False
            if scaler.is_enabled() and not finite_grads:
                # The loss scale made the scaled gradient overflow fp16 (the scaler then skips this step
                # and lowers the scale, by design). Whether the model's own gradient is finite is a
                # separate question: recompute it from the same graph without scaling and check.
                scaler_overflow = True
                true_grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.grad is not None],
                                                 allow_unused=True)
                finite_grads = all(g is None or bool(torch.isfinite(g).all()) for g in true_grads)
            gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
            scaler.step(opt)
            scaler.update()
            lv = float(loss.detach().float())
            rec = {"step": step, "epoch": epoch, "loss": lv, "grad_norm": gnorm,
                   "loss_finite": math.isfinite(lv), "grads_finite": finite_grads,
                   "scaler_overflow": scaler_overflow,
                   "loss_dtype": str(loss.dtype).replace("torch.", ""), "scale": float(scaler.get_scale())
                   if scaler.is_enabled() else 1.0}
            records.append(rec)
            if log_every and step % log_every == 0:
                print(f"step {step} epoch {epoch} loss {lv:.4f} grad_norm {gnorm:.4f} "
                      f"({time.perf_counter() - t0:.0f}s)", flush=True)
            step += 1
        epoch += 1
    bad = [r["step"] for r in records if not (r["loss_finite"] and r["grads_finite"])]
    losses = [r["loss"] for r in records if r["loss_finite"]]
    gn = [r["grad_norm"] for r in records if math.isfinite(r["grad_norm"])]
    first = losses[: max(1, len(losses) // 20)]
    last = losses[-max(1, len(losses) // 20):]
    summary = {
        "dtype": dtype, "preset": preset, "steps": len(records), "epochs": epoch, "batch_size": batch_size,
        "lr": lr, "seed": seed, "d": d, "nonfinite_steps": bad,
        "scaler_skipped_steps": [r["step"] for r in records if r["scaler_overflow"]],
        "loss_first5pct_mean": sum(first) / len(first) if first else None,
        "loss_last5pct_mean": sum(last) / len(last) if last else None,
        "loss_min": min(losses) if losses else None, "loss_max": max(losses) if losses else None,
        "grad_norm_max": max(gn) if gn else None, "grad_norm_median": sorted(gn)[len(gn) // 2] if gn else None,
        "wall_s": time.perf_counter() - t0, "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    return {"summary": summary, "records": records}


def plot(result: dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    recs = result["records"]
    fig, ax = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax[0].plot([r["step"] for r in recs], [r["loss"] for r in recs], lw=0.6)
    ax[0].set_ylabel("loss")
    ax[1].semilogy([r["step"] for r in recs], [max(r["grad_norm"], 1e-12) for r in recs], lw=0.6)
    ax[1].set_ylabel("grad norm (pre-clip)")
    ax[1].set_xlabel("step")
    s = result["summary"]
    fig.suptitle(f"MVPPModel, autocast {s['dtype']}, {s['steps']} steps, non-finite steps: {len(s['nonfinite_steps'])}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--d", type=int, default=16)
    ap.add_argument("--out", default="runs/low_precision")
    ap.add_argument("--log-every", type=int, default=100)
    a = ap.parse_args(argv)
    res = run(a.steps, a.dtype, a.preset, a.batch_size, a.lr, a.seed, a.d, a.log_every)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)) or ".", exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump(res, f)
    plotted = plot(res, a.out + ".png")
    print(json.dumps(res["summary"], indent=1))
    print(f"wrote {a.out}.json" + (f" and {a.out}.png" if plotted else " (matplotlib missing: no plot)"))
    return 1 if res["summary"]["nonfinite_steps"] else 0


if __name__ == "__main__":
    sys.exit(main())
