"""The main job: synthetic data -> bank -> the full model, its ablations and the baselines -> table + plots.

`run_demo` is what `mvpp demo` calls. Every model is trained by the same loop (`mvpp.train`) on
MMRA's split of the synthetic default; the bank of the full model is built over the training videos,
and the validation videos are folded into it with `cluster_update` before the test set is scored
(new videos arriving). A model whose mvpp_kernels op is missing from this installation is reported
as unavailable instead of failing the whole run.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import replace

import numpy as np
import torch

from .data import generate, split_indices
from .metrics import all_metrics
from .models import ModelConfig, OpUnavailableError, build_model, fit_gbt, gbt_features, has_op
from .train import TrainConfig, predict, seed_everything, train_model

__all__ = ["DEMO_MODELS", "DEMO_TRAIN_DEFAULTS", "run_demo", "format_table"]

# name -> (model class, config overrides, mvpp_kernels ops it needs)
DEMO_MODELS = {
    "MVPPModel": ("MVPPModel", {}, ("frame_score", "mhp_scan", "HawkesHead", "HierarchicalIndex",
                                    "retrieval_aggregate")),
    "w/o frame scoring": ("MVPPModel", {"use_frame_scoring": False},
                          ("mhp_scan", "HawkesHead", "HierarchicalIndex", "retrieval_aggregate")),
    "w/o memory bank": ("MVPPModel", {"use_memory": False}, ("frame_score", "mhp_scan", "HawkesHead")),
    "w/o MHP": ("MVPPModel", {"use_mhp": False}, ("frame_score", "HierarchicalIndex", "retrieval_aggregate")),
    "MMRABaseline": ("MMRABaseline", {}, ("exact_search", "retrieval_aggregate")),
    "NoRetrievalMLP": ("NoRetrievalMLP", {}, ()),
    "GBT (sklearn)": ("gbt", {}, ()),
}

# The demo's training budget (the documented 3-seed table was produced with these).
DEMO_TRAIN_DEFAULTS = {"epochs": 15, "patience": 4}

METRIC_KEYS = ("nmse", "mae", "src", "batch_nmse", "batch_mae", "batch_src")


def _missing_ops(ops) -> list[str]:
    return [o for o in ops if not has_op(o)]


def _sklearn_available() -> bool:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return False
    return True


def run_one_seed(preset: str, seed: int, models: list[str], model_config: ModelConfig, train_config: TrainConfig,
                 log=print, keep_models: bool = False) -> dict:
    t0 = time.perf_counter()
    data = generate(preset, seed=seed)
    splits = split_indices(len(data), "mmra")
    log(f"[seed {seed}] generated {len(data)} videos ({preset}) in {time.perf_counter() - t0:.1f}s; "
        f"split {len(splits['train'])}/{len(splits['val'])}/{len(splits['test'])}")
    results, trained = {}, {}
    test = splits["test"]
    y_test = data.label[test]
    for name in models:
        cls, over, ops = DEMO_MODELS[name]
        missing = _missing_ops(ops)
        if cls == "gbt" and not _sklearn_available():
            missing = ["scikit-learn"]
        if missing:
            results[name] = {"unavailable": f"needs {', '.join(missing)}"}
            log(f"[seed {seed}] {name}: skipped (needs {', '.join(missing)}, not in this installation)")
            continue
        t1 = time.perf_counter()
        try:
            if cls == "gbt":
                gbt = fit_gbt(data, splits["train"], seed=seed)
                pred = torch.from_numpy(gbt.predict(gbt_features(data, test))).float()
                hist = {"epochs_run": int(gbt.n_iter_)}
            else:
                seed_everything(seed, train_config.deterministic)  # initial weights depend only on the seed
                model = build_model(cls, data, replace(model_config, **over))
                hist = train_model(model, data, splits, replace(train_config, seed=seed), log=log)
                if getattr(model, "memory", None) is not None and model.memory.hierarchical:
                    model.update_bank(data, splits["val"])  # the validation videos arrive (cluster_update)
                pred = predict(model, data, test, train_config.eval_batch_size, train_config.device)
                if keep_models:
                    trained[name] = model
        except OpUnavailableError as e:
            results[name] = {"unavailable": str(e)}
            log(f"[seed {seed}] {name}: skipped ({e})")
            continue
        m = all_metrics(pred, y_test)
        m["train_seconds"] = time.perf_counter() - t1
        m["epochs"] = hist.get("epochs_run")
        results[name] = m
        results[name]["_pred"] = pred.tolist()
        log(f"[seed {seed}] {name:<18} nMSE {m['nmse']:.4f}  MAE {m['mae']:.4f}  SRC {m['src']:.4f}  "
            f"({m['train_seconds']:.0f}s)")
    return {"results": results, "data": data, "splits": splits, "models": trained}


def summarise(per_seed: list[dict], models: list[str]) -> dict:
    table = {}
    for name in models:
        rows = [r[name] for r in per_seed if name in r and "unavailable" not in r[name]]
        if not rows:
            reasons = {r[name]["unavailable"] for r in per_seed if name in r}
            table[name] = {"unavailable": "; ".join(sorted(reasons))}
            continue
        entry = {"n_seeds": len(rows)}
        for k in METRIC_KEYS:
            v = np.array([r[k] for r in rows], dtype=float)
            entry[k] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                        "values": v.tolist()}
        entry["train_seconds"] = float(np.mean([r["train_seconds"] for r in rows]))
        table[name] = entry
    return table


def format_table(table: dict) -> str:
    head = f"{'model':<20}{'nMSE':>18}{'MAE':>18}{'SRC':>18}{'batch nMSE':>18}{'time/s':>9}"
    lines = [head, "-" * len(head)]
    for name, e in table.items():
        if "unavailable" in e:
            lines.append(f"{name:<20}  unavailable: {e['unavailable']}")
            continue

        def cell(k):
            m, s = e[k]["mean"], e[k]["std"]
            return f"{m:.4f} ± {s:.4f}" if e["n_seeds"] > 1 else f"{m:.4f}"

        lines.append(f"{name:<20}{cell('nmse'):>18}{cell('mae'):>18}{cell('src'):>18}{cell('batch_nmse'):>18}"
                     f"{e['train_seconds']:>9.0f}")
    return "\n".join(lines)


def _plots(out_dir: str, seed_result: dict, log=print) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    res, data, splits = seed_result["results"], seed_result["data"], seed_result["splits"]
    y = data.label[splits["test"]].numpy()
    shown = [n for n in ("MVPPModel", "MMRABaseline", "NoRetrievalMLP") if n in res and "_pred" in res[n]]
    if shown:
        fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 4), squeeze=False)
        lo, hi = float(y.min()), float(y.max())
        for ax, n in zip(axes[0], shown):
            p = np.asarray(res[n]["_pred"])
            ax.scatter(y, p, s=6, alpha=0.5)
            ax.plot([lo, hi], [lo, hi], "k--", lw=1)
            ax.set_title(f"{n}\nnMSE {res[n]['nmse']:.3f}  SRC {res[n]['src']:.3f}")
            ax.set_xlabel("true log2(1 + comments)")
            ax.set_ylabel("predicted")
        fig.tight_layout()
        path = os.path.join(out_dir, "pred_vs_true.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    model = seed_result["models"].get("MVPPModel")
    if model is not None and model.mhp is not None and has_op("hawkes_intensity"):
        try:
            files.append(_intensity_plot(out_dir, model, data, splits["test"][:4], plt))
        except OpUnavailableError as e:
            log(f"intensity plot skipped: {e}")
    return files


@torch.no_grad()
def _intensity_plot(out_dir, model, data, idx, plt):
    model.eval()
    fig, axes = plt.subplots(len(idx), 1, figsize=(8, 2.0 * len(idx)), squeeze=False)
    names = ("likes", "comments", "shares")
    for ax, i in zip(axes[:, 0], idx.tolist()):
        L = max(1, int(data.event_lengths[i]))
        T = float(data.window[i])
        q = torch.linspace(0, T, 400)[None]
        lam = model.mhp.intensity(data.event_dt[i:i + 1, :L], data.event_marks[i:i + 1, :L],
                                  data.event_lengths[i:i + 1], data.dt_end[i:i + 1], q)
        lam = lam[0].float().T * model.mhp.time_scale  # (marks, Q), per unit of data time
        times = torch.cumsum(data.event_dt[i, :L], 0)[: int(data.event_lengths[i])]
        marks = data.event_marks[i, : int(data.event_lengths[i])]
        for k in range(lam.shape[0]):
            line, = ax.plot(q[0].numpy(), lam[k].numpy(), lw=1, label=names[k] if k < 3 else str(k))
            tk = times[marks == k].numpy()
            ax.plot(tk, np.zeros_like(tk), "|", color=line.get_color(), ms=10)
        ax.set_ylabel("intensity")
        ax.set_title(f"video {data.ids[i]}: label {float(data.label[i]):.2f}", fontsize=9)
    axes[0, 0].legend(fontsize=8, loc="upper right")
    axes[-1, 0].set_xlabel("time in the observation window")
    fig.tight_layout()
    path = os.path.join(out_dir, "hawkes_intensity.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_demo(out_dir: str, preset: str = "small", seeds=(0,), models=None, model_config: ModelConfig | None = None,
             train_config: TrainConfig | None = None, plots: bool = True, log=print) -> dict:
    models = list(models or DEMO_MODELS)
    unknown = [m for m in models if m not in DEMO_MODELS]
    if unknown:
        raise ValueError(f"unknown demo model(s) {unknown}; choose from {list(DEMO_MODELS)}")
    model_config = model_config or ModelConfig()
    train_config = train_config or TrainConfig()
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    per_seed, first = [], None
    for i, seed in enumerate(seeds):
        r = run_one_seed(preset, seed, models, model_config, train_config, log=log, keep_models=(i == 0))
        per_seed.append(r["results"])
        if i == 0:
            first = r
    table = summarise(per_seed, models)
    from . import distributed as D

    # under torchrun every rank trains and scores (collectives); rank 0 alone writes plots and metrics.json
    files = _plots(out_dir, first, log) if plots and first is not None and D.is_rank0() else []
    report = {
        "preset": preset, "seeds": list(seeds), "table": table,
        "per_seed": [{k: {kk: vv for kk, vv in v.items() if kk != "_pred"} for k, v in r.items()} for r in per_seed],
        "model_config": model_config.to_dict(), "train_config": vars(train_config).copy(),
        "seconds": time.perf_counter() - t0, "plots": [os.path.basename(f) for f in files],
    }
    full, mmra = table.get("MVPPModel", {}), table.get("MMRABaseline", {})
    if "nmse" in full and "nmse" in mmra:
        report["mvpp_vs_mmra"] = {
            "nmse_reduction": 1 - full["nmse"]["mean"] / mmra["nmse"]["mean"],
            "src_gain": full["src"]["mean"] - mmra["src"]["mean"],
        }
    from .train import atomic_write_bytes

    if D.is_distributed():
        report["world_size"] = D.world_size()
    if D.is_rank0():
        atomic_write_bytes(os.path.join(out_dir, "metrics.json"), json.dumps(report, indent=2, default=float).encode())
    D.barrier()  # metrics.json is on disk before any rank returns
    return report
