"""The `mvpp` command line.

    mvpp demo      the main job on the embedded synthetic data: train the full model, its ablations and
                   the baselines, print the metrics table, write metrics.json and plots to --out
    mvpp train     train one model (synthetic preset or MicroLens features) and write a checkpoint
    mvpp eval      score a checkpoint on a split
    mvpp features  extract frame/text features of a MicroLens-layout folder with local transformers models
    mvpp bank      build | search | update a hierarchical memory bank
    mvpp check     run every available backend of every op against the float64 reference
    mvpp info      what is built and which backend `auto` picks

Settings come from flags or from a YAML/TOML file (--config) with sections `data`, `model`
(mvpp.models.ModelConfig fields) and `train` (mvpp.train.TrainConfig fields); flags win.
"""
from __future__ import annotations

import argparse
import builtins
import json
import os
import sys
import time


class UsageError(Exception):
    """A problem the user can fix; printed without a traceback."""


# ---------------------------------------------------------------------------------------------------
# config files
# ---------------------------------------------------------------------------------------------------
def load_config_file(path: str | None) -> dict:
    if not path:
        return {}
    if not os.path.exists(path):
        raise UsageError(f"config file {path!r} does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if path.endswith(".toml"):
            import tomllib

            cfg = tomllib.loads(raw.decode())
        elif path.endswith((".yaml", ".yml")):
            import yaml

            cfg = yaml.safe_load(raw) or {}
        else:
            raise UsageError(f"config file {path!r}: use a .yaml, .yml or .toml file")
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"config file {path!r} could not be parsed: {e}") from e
    if not isinstance(cfg, dict):
        raise UsageError(f"config file {path!r} must hold a mapping with sections data/model/train")
    bad = set(cfg) - {"data", "model", "train"}
    if bad:
        raise UsageError(f"config file {path!r}: unknown section(s) {sorted(bad)}; use data, model, train")
    return cfg


def _configs(args, train_defaults: dict | None = None):
    from mvpp.models import ModelConfig
    from mvpp.train import TrainConfig

    file_cfg = load_config_file(getattr(args, "config", None))
    try:
        mc = ModelConfig.from_dict(file_cfg.get("model", {}))
    except (TypeError, ValueError) as e:
        raise UsageError(f"[model] section: {e}") from e
    tkw = dict(train_defaults or {})
    tkw.update(file_cfg.get("train", {}))
    try:
        tc = TrainConfig(**tkw)
    except TypeError as e:
        raise UsageError(f"[train] section: {e}") from e
    for flag, field in (("epochs", "epochs"), ("batch_size", "batch_size"), ("lr", "lr"), ("patience", "patience"),
                        ("device", "device"), ("seed", "seed")):
        v = getattr(args, flag, None)
        if v is not None:
            tc.__dict__[field] = v
    if getattr(args, "quiet", False):
        tc.progress = False
    _check_train_config(tc)
    if getattr(args, "backend", None):
        mc.backend = args.backend
    if getattr(args, "d", None):
        mc.d = args.d
    data_cfg = dict(file_cfg.get("data", {}))
    return mc, tc, data_cfg


def _check_train_config(tc) -> None:
    """Refuse training settings that would crash deep in a run or silently train nothing."""
    import math

    def need(ok, field, what):
        if not ok:
            flag = "--" + field.replace("_", "-")
            raise UsageError(f"{flag} (train.{field}) must be {what}, got {getattr(tc, field)!r}")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    need(is_int(tc.epochs) and tc.epochs >= 1, "epochs", "an integer >= 1 (0 epochs trains nothing and writes "
                                                         "no checkpoint)")
    need(is_int(tc.batch_size) and tc.batch_size >= 1, "batch_size", "an integer >= 1")
    need(is_int(tc.eval_batch_size) and tc.eval_batch_size >= 1, "eval_batch_size", "an integer >= 1")
    need(is_int(tc.patience) and tc.patience >= 1, "patience", "an integer >= 1")
    need(is_num(tc.lr) and tc.lr >= 0, "lr", "a finite number >= 0")
    need(is_num(tc.weight_decay) and tc.weight_decay >= 0, "weight_decay", "a finite number >= 0")
    need(tc.grad_clip is None or (is_num(tc.grad_clip) and tc.grad_clip >= 0), "grad_clip", "a finite number >= 0")
    need(is_int(tc.seed), "seed", "an integer")


def _check_writable(path: str, flag: str, folder: bool = False) -> None:
    """Fail before a long run, not after it, when the output path (a file, or a folder) cannot be written."""
    target = os.path.abspath(path)
    if folder:
        if os.path.exists(target) and not os.path.isdir(target):
            raise UsageError(f"{flag} {path!r} is a file; give a folder")
        target = os.path.join(target, "x")
    elif os.path.isdir(target):
        raise UsageError(f"{flag} {path!r} is a directory; give a file path")
    d = os.path.dirname(target)
    while not os.path.exists(d):  # the first existing ancestor must be a writable folder (makedirs)
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        raise UsageError(f"{flag} {path!r} cannot be created: {d!r} is a file, not a folder")
    if not os.access(d, os.W_OK | os.X_OK) or (os.path.exists(target) and not os.access(target, os.W_OK)):
        raise UsageError(f"{flag} {path!r} is not writable (no write permission in {d!r})")


def _check_device(dev: str | None):
    if dev and dev.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for, but torch sees no GPU; use --device cpu")


def _load_data(spec: str, seed: int, features: str | None = None):
    """'synthetic:<preset>' or 'microlens:<dir>' (needs --features with the extracted features)."""
    from mvpp.data import PRESETS, generate

    kind, _, arg = spec.partition(":")
    if kind == "synthetic":
        preset = arg or "small"
        if preset not in PRESETS:
            raise UsageError(f"unknown synthetic preset {preset!r}; choose from {', '.join(PRESETS)}")
        return generate(preset, seed=seed)
    if kind == "microlens":
        from mvpp.data.microlens import load_microlens_features

        if not arg:
            raise UsageError("--data microlens:<dir> needs the folder of the MicroLens-100k files")
        if not features:
            raise UsageError("--data microlens:... needs --features DIR (run `mvpp features` first)")
        return load_microlens_features(arg, features)
    raise UsageError(f"--data {spec!r}: expected synthetic:<preset> or microlens:<dir>")


# ---------------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------------
def _backend_check(args) -> int:
    import torch

    import mvpp_kernels as mk
    from mvpp_kernels.testing import make_selective_scan_inputs, rel_error

    print(mk.format_backend_info())
    print()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [b for b in backends if b not in ("reference", "cpu", "triton", "cuda")]
    if bad:
        raise UsageError(f"--backends: unknown {bad}; choose from reference, cpu, triton, cuda")
    if args.length < 1:
        raise UsageError("--length must be >= 1")
    inputs = make_selective_scan_inputs(4, 32, 16, args.length, dtype=torch.float32, seed=args.seed)
    ref = mk.selective_scan_ref(**{k: v.double() if v is not None and v.is_floating_point() else v
                                   for k, v in inputs.items() if k != "initial_state"}, delta_softplus=True)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    failures = 0
    print(f"{'op':<16}{'device':<8}{'backend':<11}{'rel. error vs float64':>22}{'time':>12}")
    for dev in devices:
        for backend in backends:
            kw = {k: (v.to(dev) if v is not None else None) for k, v in inputs.items() if k != "initial_state"}
            try:
                t0 = time.perf_counter()
                out = mk.selective_scan(**kw, delta_softplus=True, backend=backend)
                if dev == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
            except mk.BackendUnavailableError as e:
                print(f"{'selective_scan':<16}{dev:<8}{backend:<11}{'unavailable':>22}   ({str(e)[:70]})")
                continue
            err = rel_error(out.cpu(), ref)
            ok = err < 1e-4
            failures += not ok
            print(f"{'selective_scan':<16}{dev:<8}{backend:<11}{err:>22.2e}{dt * 1e3:>10.1f}ms{'' if ok else '  FAIL'}")
    return 1 if failures else 0


def cmd_check(args) -> int:
    return _backend_check(args)


def cmd_info(args) -> int:
    import mvpp_kernels as mk

    print(mk.format_backend_info())
    return 0


def cmd_demo(args) -> int:
    import torch

    from mvpp.demo import DEMO_MODELS, DEMO_TRAIN_DEFAULTS, format_table, run_demo

    mc, tc, data_cfg = _configs(args, DEMO_TRAIN_DEFAULTS)
    _check_device(tc.device)
    _check_writable(args.out, "--out", folder=True)
    from mvpp import distributed as D

    D.init_from_env(tc.device)  # under torchrun: one process group; rank 0 prints and writes
    print = builtins.print if D.is_rank0() else D.quiet
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = args.preset or data_cfg.get("preset", "small")
    seeds = args.seeds if args.seeds else data_cfg.get("seeds", [0])
    models = args.models.split(",") if args.models else None
    if models:
        unknown = [m for m in models if m not in DEMO_MODELS]
        if unknown:
            raise UsageError(f"--models: unknown {unknown}; choose from: {', '.join(DEMO_MODELS)}")
    from mvpp.data import PRESETS

    if preset not in PRESETS:
        raise UsageError(f"--preset {preset!r} is not a preset; choose from {', '.join(PRESETS)}")
    print(f"mvpp demo: preset {preset}, seeds {list(seeds)}, output in {args.out}")
    report = run_demo(args.out, preset=preset, seeds=seeds, models=models, model_config=mc, train_config=tc,
                      plots=not args.no_plots, log=print)
    print()
    print(format_table(report["table"]))
    if "mvpp_vs_mmra" in report:
        r = report["mvpp_vs_mmra"]
        print(f"\nMVPPModel vs MMRABaseline: nMSE {100 * -r['nmse_reduction']:+.1f}% (negative = better), "
              f"SRC {r['src_gain']:+.4f} (positive = better)")
    print(f"\nwrote {os.path.join(args.out, 'metrics.json')}" +
          "".join(f", {os.path.join(args.out, p)}" for p in report["plots"]) + f"  ({report['seconds']:.0f}s)")
    return 0


def cmd_train(args) -> int:
    import torch

    from mvpp.data import split_indices
    from mvpp.models import build_model
    from mvpp.train import evaluate, train_model

    mc, tc, data_cfg = _configs(args)
    _check_device(tc.device)
    _check_writable(args.out, "--out")
    from mvpp import distributed as D

    D.init_from_env(tc.device)  # under torchrun: one process group; rank 0 prints and writes the checkpoint
    print = builtins.print if D.is_rank0() else D.quiet
    data = _load_data(args.data or data_cfg.get("source", "synthetic:small"), args.data_seed, args.features)
    splits = split_indices(len(data), "mmra")
    from mvpp.train import seed_everything

    seed_everything(tc.seed, tc.deterministic)
    try:
        model = build_model(args.model, data, mc)
    except ValueError as e:
        raise UsageError(str(e)) from e
    hist = train_model(model, data, splits, tc, checkpoint=args.out, resume=args.resume)
    m = evaluate(model, data, splits["test"], tc.eval_batch_size, tc.device)
    # report only a checkpoint that is on disk (train_model writes one per epoch it runs)
    print(json.dumps({"test": m, "best_val_nmse": hist["best_val_nmse"], "epochs": hist["epochs_run"],
                      "checkpoint": args.out if os.path.isfile(args.out) else None}, indent=2))
    return 0


def cmd_eval(args) -> int:
    from mvpp.data import split_indices
    from mvpp.models import ModelConfig, build_model
    from mvpp.train import evaluate, load_checkpoint

    if not os.path.exists(args.checkpoint):
        raise UsageError(f"--checkpoint {args.checkpoint!r} does not exist (write one with `mvpp train --out`)")
    try:  # verifies format, version and checksum before anything is built from the header
        extra = load_checkpoint(args.checkpoint)
    except ValueError as e:
        raise UsageError(f"--checkpoint: {e}") from e
    if not all(k in extra for k in ("model_class", "model_config", "label_stats")):
        raise UsageError(f"{args.checkpoint!r} was not written by `mvpp train` (no model class in its header)")
    data = _load_data(args.data, args.data_seed, args.features)
    mc = ModelConfig.from_dict(extra["model_config"])
    model = build_model(extra["model_class"], data, mc)
    model.set_label_stats(*extra["label_stats"])
    splits = split_indices(len(data), "mmra")
    model.attach_bank(data, splits["train"])
    load_checkpoint(args.checkpoint, model, which="best")
    m = evaluate(model, data, splits[args.split])
    print(json.dumps({args.split: m}, indent=2))
    return 0


def cmd_features(args) -> int:
    from mvpp.features import extract_microlens_features

    summary = extract_microlens_features(args.root, args.out, vision_model=args.vision_model,
                                         text_model=args.text_model, frames=args.frames, dense_every=args.dense_every,
                                         dense_cap=args.dense_cap, batch_size=args.batch_size, device=args.device)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_bank(args) -> int:
    import torch

    from mvpp.bank import bank_build, bank_search, bank_update

    if args.bank_command in ("build", "update"):
        _check_writable(args.index, "--index")
    if args.bank_command == "build":
        info = bank_build(args.index, data=args.data, seed=args.data_seed, keys_file=args.keys,
                          branching=tuple(args.branching) if args.branching else None, knn=args.knn)
    elif args.bank_command == "search":
        info = bank_search(args.index, queries_file=args.queries, data=args.data, seed=args.data_seed, k=args.k,
                           nprobe=tuple(args.nprobe) if args.nprobe else None, limit=args.limit)
    else:
        info = bank_update(args.index, keys_file=args.keys, data=args.data, seed=args.data_seed)
    print(json.dumps(info, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------------------------------
def _train_flags(p, with_seed=True):
    g = p.add_argument_group("training")
    g.add_argument("--config", metavar="FILE", help="YAML/TOML file with sections data, model, train")
    g.add_argument("--epochs", type=int, help="maximum epochs (early stopping on validation nMSE)")
    g.add_argument("--batch-size", dest="batch_size", type=int)
    g.add_argument("--lr", type=float, help="AdamW learning rate")
    g.add_argument("--patience", type=int, help="epochs without validation improvement before stopping")
    g.add_argument("--device", help="cpu (default) or cuda")
    g.add_argument("--backend", choices=["auto", "cuda", "triton", "cpu", "reference"],
                   help="mvpp_kernels backend for every op (default: $MVPP_BACKEND or auto)")
    g.add_argument("--d", type=int, help="model width")
    g.add_argument("--quiet", action="store_true", help="no per-epoch lines or progress bars")
    if with_seed:
        g.add_argument("--seed", type=int, help="training seed")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mvpp", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Micro-video popularity prediction on mvpp_kernels' fused ops.",
        epilog="Start with:  mvpp demo --out mvpp-out      (a few minutes on 2 CPU cores)\n"
               "Details of a command:  mvpp COMMAND --help")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="the main job on the embedded synthetic data (table, metrics.json, plots)",
                       description="Generate the synthetic MicroLens-like data, build the memory bank, train "
                                   "MVPPModel, its ablations (without frame scoring / memory bank / MHP) and the "
                                   "baselines (MMRA, no-retrieval MLP, gradient-boosted trees), print the test "
                                   "metrics table and write metrics.json and PNG plots to --out.")
    d.add_argument("--out", default="mvpp-out", help="output folder (default: mvpp-out)")
    d.add_argument("--preset", help="synthetic size: tiny, small (default), medium, large")
    d.add_argument("--seeds", type=int, nargs="+", help="data+training seeds; mean ± std over them (default: 0)")
    d.add_argument("--models", help="comma-separated subset of: MVPPModel, 'w/o frame scoring', 'w/o memory bank', "
                                    "'w/o MHP', MMRABaseline, NoRetrievalMLP, 'GBT (sklearn)'")
    d.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    d.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    _train_flags(d, with_seed=False)
    d.set_defaults(func=cmd_demo)
    d.epilog = "Training defaults of the demo: 15 epochs, early stopping patience 4 (override with flags or --config)."

    t = sub.add_parser("train", help="train one model and write a safetensors checkpoint")
    t.add_argument("--model", default="MVPPModel", help="MVPPModel (default), MMRABaseline or NoRetrievalMLP")
    t.add_argument("--data", help="synthetic:<preset> (default synthetic:small) or microlens:<dir>")
    t.add_argument("--features", help="feature cache folder for microlens data (from `mvpp features`)")
    t.add_argument("--data-seed", dest="data_seed", type=int, default=0, help="synthetic data seed")
    t.add_argument("--out", default="mvpp-model.safetensors", help="checkpoint path (written atomically)")
    t.add_argument("--resume", action="store_true", help="continue from --out if it exists")
    _train_flags(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="score a checkpoint written by `mvpp train`")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data", default="synthetic:small", help="the data the checkpoint was trained on")
    e.add_argument("--features", help="feature cache folder for microlens data")
    e.add_argument("--data-seed", dest="data_seed", type=int, default=0)
    e.add_argument("--split", choices=["train", "val", "test"], default="test")
    e.set_defaults(func=cmd_eval)

    f = sub.add_parser("features", help="frame/text features of a MicroLens-layout folder (local models only)")
    f.add_argument("--root", required=True, help="folder with MicroLens-100k_*.csv/txt and videos/<id>.mp4")
    f.add_argument("--out", required=True, help="feature cache folder (safetensors)")
    f.add_argument("--vision-model", dest="vision_model", required=True,
                   help="LOCAL path of a transformers ViT/CLIP vision model (nothing is downloaded)")
    f.add_argument("--text-model", dest="text_model", required=True, help="LOCAL path of a transformers text model")
    f.add_argument("--frames", type=int, default=10, help="uniform frames per video (MMRA: 10)")
    f.add_argument("--dense-every", dest="dense_every", type=int, default=0,
                   help="also sample every n-th frame (0: no dense frames)")
    f.add_argument("--dense-cap", dest="dense_cap", type=int, default=128, help="at most this many dense frames")
    f.add_argument("--batch-size", dest="batch_size", type=int, default=16)
    f.add_argument("--device", default="cpu")
    f.set_defaults(func=cmd_features)

    b = sub.add_parser("bank", help="build | search | update a hierarchical memory bank (HierarchicalIndex)")
    bs = b.add_subparsers(dest="bank_command", metavar="ACTION")
    bb = bs.add_parser("build", help="build an index from keys (a safetensors file with 'keys') or synthetic data")
    bb.add_argument("--index", required=True, help="where to write the index")
    bb.add_argument("--keys", help="safetensors file with tensors 'keys' (n, d) and optionally 'values' (n, dv)")
    bb.add_argument("--data", help="or synthetic:<preset>: index its training videos' retrieval vectors")
    bb.add_argument("--data-seed", dest="data_seed", type=int, default=0)
    bb.add_argument("--branching", type=int, nargs=2, metavar=("COARSE", "FINE"))
    bb.add_argument("--knn", type=int, default=16, help="kNN-graph degree of the topology refinement")
    bq = bs.add_parser("search", help="top-k search of an index")
    bq.add_argument("--index", required=True)
    bq.add_argument("--queries", help="safetensors file with tensor 'queries' (q, d)")
    bq.add_argument("--data", help="or synthetic:<preset>: query with its test videos")
    bq.add_argument("--data-seed", dest="data_seed", type=int, default=0)
    bq.add_argument("--k", type=int, default=10)
    bq.add_argument("--nprobe", type=int, nargs=2, metavar=("P1", "P2"))
    bq.add_argument("--limit", type=int, default=5, help="queries whose results are printed")
    bu = bs.add_parser("update", help="fold new items into an index (cluster_update) and save it")
    bu.add_argument("--index", required=True)
    bu.add_argument("--keys", help="safetensors file with 'keys' and optionally 'values'")
    bu.add_argument("--data", help="or synthetic:<preset>: add its validation videos")
    bu.add_argument("--data-seed", dest="data_seed", type=int, default=0)
    b.set_defaults(func=cmd_bank)

    c = sub.add_parser("check", help="run every available backend against the float64 reference")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--backends", default="reference,cpu,triton,cuda",
                   help="comma-separated backends to check (default: all; triton on CPU runs the slow interpreter)")
    c.add_argument("--length", type=int, default=257, help="sequence length of the check inputs")
    c.set_defaults(func=cmd_check)
    i = sub.add_parser("info", help="what is built and which backend auto picks")
    i.set_defaults(func=cmd_info)
    from .hawkes_cli import register as _register_hawkes  # mvpp hawkes fit|sample|gof|predict

    _register_hawkes(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.command == "bank" and not getattr(args, "bank_command", None):
        parser.parse_args(["bank", "--help"])
    return _run_command(args)


# The one error boundary of the CLI: whatever a command raises becomes one line on stderr, never a
# traceback. Errors a user can fix (bad flags, values, files; the library's ValueErrors name the argument
# and what was expected) exit 2; anything else is probably an mvpp bug: one line saying so, exit 1.
# MVPP_TRACEBACK=1 re-raises instead, for debugging.
def _user_error_types() -> tuple:
    types = [UsageError, ValueError, OSError, ImportError, FloatingPointError]
    # SafetensorError: an input file (--keys, --queries, a feature cache) that is not valid safetensors
    for mod, name in (("mvpp.models", "OpUnavailableError"), ("mvpp.bank", "BankUsageError"),
                      ("safetensors", "SafetensorError")):
        try:
            types.append(getattr(__import__(mod, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(types)


def _run_command(args) -> int:
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"mvpp {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("MVPP_TRACEBACK", "") not in ("", "0"):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, _user_error_types()):
            if isinstance(e, (OSError, ImportError)) and type(e).__name__ not in msg:
                msg = f"{type(e).__name__}: {msg}"
            print(f"mvpp {args.command}: error: {msg}", file=sys.stderr)
            return 2
        print(f"mvpp {args.command}: internal error: {type(e).__name__}: {msg} (probably a bug in mvpp; "
              f"MVPP_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 1

if __name__ == "__main__":
    sys.exit(main())
