"""Regenerate benchmarks/RESULTS.md (and per-op PNG plots) from pytest-benchmark JSON files.

    pytest benchmarks --benchmark-only --benchmark-json=benchmarks/results/<name>.json
    python -m benchmarks.report                      # every JSON in benchmarks/results/
    python -m benchmarks.report a.json b.json --out benchmarks/RESULTS.md

Markdown sections written by scripts that are not pytest-benchmark runs (`benchmarks/results/*.md`)
are appended after the tables, then the hand-written `benchmarks/NOTES.md`.

Each JSON becomes one section (its device, versions, commit and the command are taken from the
file). Within an op, rows that differ only by provider sit together, with the speedup against the
run's own baseline provider (the first of BASELINES present) and, where the benchmark recorded the
bytes it must move, the achieved GB/s.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
from collections import OrderedDict, defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")

# Baseline providers, most preferred first: speedups are "baseline time / provider time".
BASELINES = (
    "mamba_selective_scan_ref",
    "mamba_ref",
    "eager_baseline",
    "eager",
    "torch_eager",
    "faiss_ivf",
    "faiss_flat",
    "torch_matmul_topk",
    "tick",
    "reference",
)


# extra_info keys that define a case (rows differing only by provider share a case) ...
CASE_KEYS = ("shape", "dtype", "mode", "kind", "n", "d", "queries", "k")
# ... and measured quantities shown beside the time when a benchmark records them.
METRIC_KEYS = (("recall_at_10", "recall@10 {:.3f}"), ("queries_per_s", "{:,.0f} q/s"), ("build_s", "build {:.1f} s"),
               ("gflops", "{:.1f} GFLOP/s"))


def _metrics(extra: dict) -> str:
    out = []
    for key, fmt in METRIC_KEYS:
        v = extra.get(key)
        if isinstance(v, (int, float)) and not (key == "build_s" and v == 0):
            out.append(fmt.format(v))
    return ", ".join(out) or "-"


def _provider(bench: dict) -> str:
    extra = bench.get("extra_info") or {}
    params = bench.get("params") or {}
    for key in ("provider", "impl", "backend"):
        if key in extra:
            return str(extra[key])
        if key in params:
            return str(params[key])
    m = re.search(r"\[([^\]-]+)", bench.get("name", ""))
    return m.group(1) if m else bench.get("name", "?")


def _case(bench: dict) -> tuple:
    extra = bench.get("extra_info") or {}
    params = dict(bench.get("params") or {})
    for key in ("provider", "impl", "backend"):
        params.pop(key, None)
    keys = {}
    for k in CASE_KEYS:
        if k in extra and extra[k] is not None:
            keys[k] = extra[k]
    for k, v in params.items():
        keys.setdefault(k, v)
    return tuple(sorted((k, str(v)) for k, v in keys.items()))


def _op(bench: dict) -> str:
    extra = bench.get("extra_info") or {}
    if "op" in extra:
        return str(extra["op"])
    full = bench.get("fullname", "")
    m = re.search(r"test_bench_([a-z0-9_]+)\.py", full)
    return m.group(1) if m else (bench.get("group") or "misc")


def _fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.1f} µs"


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def render_run(data: dict, path: str, plot_dir: str | None) -> str:
    mi = data.get("machine_info", {})
    mv = mi.get("mvpp", {})
    device = mv.get("gpu") or f"CPU ({mi.get('cpu', {}).get('brand_raw', mv.get('cpu', '?'))}, {mv.get('cpu_count', '?')} cores)"
    lines = [
        f"## {os.path.basename(path)}",
        "",
        f"- device: **{device}**",
        f"- torch {mv.get('torch')} (CUDA {mv.get('torch_cuda')}), triton {mv.get('triton')}, torch threads {mv.get('torch_threads')}",
        f"- commit {mv.get('commit', data.get('commit_info', {}).get('id', '?'))}, date {data.get('datetime', '?')}",
        f"- command: `{data.get('mvpp_command') or 'pytest benchmarks --benchmark-only --benchmark-json=' + os.path.relpath(path, os.path.dirname(HERE))}`",
        "",
    ]
    by_op: dict[str, dict[tuple, list]] = defaultdict(lambda: OrderedDict())
    for b in data.get("benchmarks", []):
        by_op[_op(b)].setdefault(_case(b), []).append(b)
    for op in sorted(by_op):
        lines += [f"### {op}", "", "| case | provider | median | mean ± std | rounds | speedup vs baseline | GB/s | measured |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        plot_rows = []
        for case, benches in by_op[op].items():
            times = {_provider(b): b["stats"]["median"] for b in benches}
            base = next((p for p in BASELINES if p in times), None)
            case_s = ", ".join(f"{k}={v}" for k, v in case) or "-"
            for b in sorted(benches, key=lambda b: b["stats"]["median"]):
                p = _provider(b)
                st = b["stats"]
                extra = b.get("extra_info") or {}
                speed = f"{times[base] / st['median']:.1f}x vs {base}" if base and p != base else ("baseline" if p == base else "-")
                nbytes = extra.get("bytes") or extra.get("bytes_moved")
                gbs = f"{nbytes / st['median'] / 1e9:.1f}" if nbytes else "-"
                lines.append(
                    f"| {case_s} | {p} | {_fmt_time(st['median'])} | {_fmt_time(st['mean'])} ± {_fmt_time(st['stddev'])} "
                    f"| {st['rounds']} | {speed} | {gbs} | {_metrics(extra)} |"
                )
                plot_rows.append((case_s, p, st["median"]))
        lines.append("")
        if plot_dir and plot_rows:
            png = _plot(op, plot_rows, plot_dir, os.path.splitext(os.path.basename(path))[0])
            if png:
                lines += [f"![{op}]({os.path.relpath(png, HERE)})", ""]
    return "\n".join(lines)


def _plot(op: str, rows, plot_dir: str, tag: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    cases = list(OrderedDict.fromkeys(r[0] for r in rows))
    providers = list(OrderedDict.fromkeys(r[1] for r in rows))
    t = {(c, p): s for c, p, s in rows}
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases) + 2), 4.5))
    width = 0.8 / max(1, len(providers))
    for i, p in enumerate(providers):
        xs = [j + i * width for j, c in enumerate(cases) if (c, p) in t]
        ys = [t[(c, p)] * 1e3 for c in cases if (c, p) in t]
        ax.bar(xs, ys, width=width, label=p)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels([c.replace(", ", "\n") for c in cases], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("median time (ms, log scale)")
    ax.set_title(f"{op} ({tag})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(plot_dir, exist_ok=True)
    out = os.path.join(plot_dir, f"{op}_{tag}.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


HEADER = """# Benchmark results

Generated by `python -m benchmarks.report` from the pytest-benchmark JSON files in
`benchmarks/results/` -- do not edit by hand; re-run the benchmarks and the report instead.
Every section names the device, versions, commit and command that produced it. Speedups compare
providers measured in the same run only. No number here was measured on a GPU unless its section
names one.
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="*", help="pytest-benchmark JSON files (default: benchmarks/results/*.json)")
    ap.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    ap.add_argument("--plots", default=os.path.join(HERE, "plots"), help="folder for PNG plots ('' for none)")
    ap.add_argument("--notes", default=os.path.join(HERE, "NOTES.md"),
                    help="hand-written analysis appended after the generated tables, if the file exists")
    args = ap.parse_args(argv)
    paths = args.json or sorted(glob.glob(os.path.join(RESULTS_DIR, "*.json")))
    if not paths:
        ap.error(f"no JSON files given and none in {RESULTS_DIR}")
    parts = [HEADER]
    for p in paths:
        parts.append(render_run(_load(p), p, args.plots or None))
    # Hand-written sections from scripts that are not pytest-benchmark runs (each names its device,
    # baseline and command itself), in file-name order, before the notes.
    for p in sorted(glob.glob(os.path.join(RESULTS_DIR, "*.md"))):
        with open(p) as f:
            parts.append(f.read())
    if args.notes and os.path.exists(args.notes):
        with open(args.notes) as f:
            parts.append(f.read())
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(parts))
    os.replace(tmp, args.out)
    print(f"wrote {args.out} from {len(paths)} run(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
