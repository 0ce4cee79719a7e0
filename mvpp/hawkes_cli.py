"""`mvpp hawkes fit | sample | gof | predict`: the point-process toolkit (mvpp.pointprocess) on an events file.

Events file: CSV with a header naming columns seq, time, mark (one row per event; rows of a sequence
in time order, times >= 0). Window of a sequence: [0, --horizon] if given, else [0, its last event].

    mvpp hawkes fit events.csv --out hawkes.safetensors [--epochs 20 --holdout 0.2]
    mvpp hawkes sample hawkes.safetensors --n 10 --horizon 50 --out samples.csv [--seed 0]
    mvpp hawkes gof hawkes.safetensors events.csv [--qq qq.png] [--json gof.json]
    mvpp hawkes predict hawkes.safetensors events.csv        (next-event RMSE and mark accuracy)
"""
from __future__ import annotations

import json
import sys


def register(sub) -> None:
    h = sub.add_parser("hawkes", help="fit | sample | gof | predict a Mamba-Hawkes point process on an events CSV",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    hs = h.add_subparsers(dest="hawkes_command", metavar="ACTION")
    f = hs.add_parser("fit", help="fit MHPEncoder + HawkesHead by exact maximum likelihood")
    f.add_argument("events", help="CSV with columns seq, time, mark")
    f.add_argument("--out", default="hawkes.safetensors", help="model file (default: hawkes.safetensors)")
    f.add_argument("--epochs", type=int, default=20)
    f.add_argument("--batch-size", type=int, default=32)
    f.add_argument("--lr", type=float, default=1e-2)
    f.add_argument("--d-model", type=int, default=16)
    f.add_argument("--d-state", type=int, default=4)
    f.add_argument("--horizon", type=float, help="common window end (default: each sequence's last event)")
    f.add_argument("--holdout", type=float, default=0.0, help="fraction of sequences held out for metrics")
    f.add_argument("--seed", type=int, default=0)
    s = hs.add_parser("sample", help="sample sequences from a fitted model (exact Ogata thinning)")
    s.add_argument("model")
    s.add_argument("--n", type=int, default=10, help="number of sequences")
    s.add_argument("--horizon", type=float, required=True, help="window end T of every sequence")
    s.add_argument("--max-events", type=int, default=10000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="-", help="CSV path, or - for stdout")
    g = hs.add_parser("gof", help="time-rescaling goodness of fit: KS per mark and overall, QQ plot")
    g.add_argument("model")
    g.add_argument("events")
    g.add_argument("--horizon", type=float)
    g.add_argument("--qq", help="write the QQ plot to this PNG")
    g.add_argument("--json", help="write the KS table as JSON")
    p = hs.add_parser("predict", help="next-event time RMSE and mark accuracy on an events file")
    p.add_argument("model")
    p.add_argument("events")
    p.add_argument("--horizon", type=float)
    h.set_defaults(func=cmd_hawkes)


def _positive(name, v):
    if v is not None and not v > 0:
        raise ValueError(f"--{name} must be > 0, got {v}")


def cmd_hawkes(args) -> int:
    import torch

    from mvpp.pointprocess import MHPModel, gof, qq_plot, sample
    from mvpp.pointprocess.fit import (EventData, fit_mhp, load_mhp, mhp_loglik_per_event, next_event_metrics,
                                       read_events_csv, save_mhp, write_events_csv)

    act = getattr(args, "hawkes_command", None)
    if act is None:
        raise ValueError("an action is required: fit, sample, gof or predict (see mvpp hawkes --help)")
    if act == "fit":
        for n in ("epochs", "batch_size", "lr", "d_model", "d_state"):
            _positive(n.replace("_", "-"), getattr(args, n))
        if not 0 <= args.holdout < 1:
            raise ValueError(f"--holdout must be in [0, 1), got {args.holdout}")
        data = read_events_csv(args.events, horizon=args.horizon)
        B = data.times.shape[0]
        perm = torch.randperm(B, generator=torch.Generator().manual_seed(args.seed))
        n_test = int(round(args.holdout * B))
        train, test = data.subset(perm[n_test:]), data.subset(perm[:n_test]) if n_test else None
        enc, hist = fit_mhp(train, len(data.mark_names), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                            d_model=args.d_model, d_state=args.d_state, seed=args.seed,
                            log=lambda m: print(m, file=sys.stderr))
        save_mhp(args.out, enc, data.mark_names)
        rep = {"model": args.out, "marks": data.mark_names, "train_sequences": B - n_test,
               "train_loglik_per_event": hist[-1]["loglik_per_event"]}
        if test is not None:
            rep["test_loglik_per_event"] = mhp_loglik_per_event(enc, test)
            rep.update({f"test_{k}": v for k, v in next_event_metrics(MHPModel(enc), test).items()})
        print(json.dumps(rep, indent=1))
        return 0
    enc, names = load_mhp(args.model)
    model = MHPModel(enc)
    if act == "sample":
        _positive("n", args.n)
        _positive("horizon", args.horizon)
        _positive("max-events", args.max_events)
        r = sample(model, args.horizon, args.n, max_events=args.max_events,
                   generator=torch.Generator().manual_seed(args.seed))
        data = EventData(r.times, r.marks, r.lengths, r.T, list(range(args.n)), names)
        if r.truncated:
            print(f"warning: some sequences reached --max-events {args.max_events} before the horizon", file=sys.stderr)
        write_events_csv("/dev/stdout" if args.out == "-" else args.out, data)
        return 0
    data = read_events_csv(args.events, mark_names=names, horizon=args.horizon)
    if act == "predict":
        rep = next_event_metrics(model, data)
        rep["loglik_per_event"] = mhp_loglik_per_event(enc, data)
        print(json.dumps(rep, indent=1))
        return 0
    res = gof(model, data.times, data.marks, data.lengths, data.T)
    table = {("all marks" if k == "overall" else names[k]): {"n": v[0], "ks": v[1], "p_value": v[2]}
             for k, v in res.items() if k != "residuals"}
    print(f"{'mark':>12} {'n':>7} {'KS':>8} {'p-value':>9}")
    for k, v in table.items():
        print(f"{k:>12} {v['n']:>7} {v['ks']:>8.4f} {v['p_value']:>9.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)
    if args.qq:
        res_named = {("overall" if k == "overall" else names[k]): v for k, v in res["residuals"].items()}
        qq_plot(res_named, args.qq)
        print(f"QQ plot: {args.qq}")
    return 0
