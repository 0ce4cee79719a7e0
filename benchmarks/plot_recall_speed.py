"""Recall@10 against queries/s for the memory-bank benchmark (one panel per data kind, one curve per
provider), from a pytest-benchmark JSON written by benchmarks/test_bench_cluster_lookup.py; also
prints the table that benchmarks/RESULTS.md quotes.

    python benchmarks/plot_recall_speed.py [benchmarks/results/cluster_lookup_full.json] [--out benchmarks/recall_speed.png]
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))

STYLE = {
    "ours_hier": ("tab:red", "o", "-"),
    "ours_hier_norefine": ("tab:orange", "x", ":"),
    "faiss_ivf_flat": ("tab:blue", "s", "-"),
    "ours_exact": ("tab:red", "*", ""),
    "faiss_flat_ip": ("tab:blue", "*", ""),
    "torch_matmul_topk": ("tab:gray", "*", ""),
}


def load_rows(path):
    with open(path) as f:
        doc = json.load(f)
    rows = []
    for b in doc["benchmarks"]:
        e = b.get("extra_info", {})
        if "recall_at_10" not in e:
            continue
        median = b["stats"]["median"]
        rows.append(dict(e, median_s=median, qps=e["queries"] / median))
    return doc, rows


def table(rows):
    lines = ["| kind | provider | nprobe | recall@10 | queries/s | build s | memory MB | members scanned |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["kind"], r["provider"], r["recall_at_10"])):
        scanned = r.get("members_scanned")
        lines.append(f"| {r['kind']} | {r['provider']} | {r['nprobe']} | {r['recall_at_10']:.4f} | {r['qps']:.0f} | "
                     f"{r['build_s']:.1f} | {r['memory_bytes'] / 2**20:.0f} | "
                     f"{'-' if scanned is None else f'{scanned:.0f}'} |")
    return "\n".join(lines)


def refinement_table(rows):
    """Recall@10 (and members scanned, queries/s) at each nprobe with and without the refinement."""
    by = {(r["kind"], r["provider"], r["nprobe"]): r for r in rows}
    lines = ["| kind | nprobe | recall@10 plain | recall@10 refined | gain (points) | scanned plain | scanned refined "
             "| q/s plain | q/s refined |", "|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(k, p) for k, prov, p in by if prov == "ours_hier"},
                  key=lambda kp: (kp[0], [int(v) for v in kp[1].strip("()").split(",")]))
    for kind, p in keys:
        a, b = by.get((kind, "ours_hier_norefine", p)), by[(kind, "ours_hier", p)]
        if a is None:
            continue
        lines.append(f"| {kind} | {p} | {a['recall_at_10']:.4f} | {b['recall_at_10']:.4f} | "
                     f"{100 * (b['recall_at_10'] - a['recall_at_10']):+.2f} | {a.get('members_scanned') or 0:.0f} | "
                     f"{b.get('members_scanned') or 0:.0f} | {a['qps']:.0f} | {b['qps']:.0f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="?", default=os.path.join(HERE, "results", "cluster_lookup_full.json"))
    ap.add_argument("--out", default=os.path.join(HERE, "recall_speed.png"))
    args = ap.parse_args(argv)
    doc, rows = load_rows(args.json)
    if not rows:
        raise SystemExit(f"{args.json}: no memory-bank rows (run benchmarks/test_bench_cluster_lookup.py)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({r["kind"] for r in rows})
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        by = defaultdict(list)
        for r in rows:
            if r["kind"] == kind:
                by[r["provider"]].append(r)
        for prov, rs in sorted(by.items()):
            rs = sorted(rs, key=lambda r: r["recall_at_10"])
            color, marker, ls = STYLE.get(prov, ("black", ".", "-"))
            ax.plot([r["recall_at_10"] for r in rs], [r["qps"] for r in rs], marker=marker, linestyle=ls or "none",
                    color=color, label=prov, markersize=9 if marker == "*" else 5)
        ax.axvline(0.95, color="k", lw=0.5, ls="--")
        ax.set_yscale("log")
        ax.set_xlabel("recall@10 vs exact")
        ax.set_ylabel("queries / s")
        r0 = rows[0]
        nq = max(r["queries"] for r in rows)  # the exact providers may be timed on fewer queries
        ax.set_title(f"{kind}: n={r0['n']:,} d={r0['d']} q={nq:,} k={r0['k']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    mi = doc.get("machine_info", {})
    fig.suptitle(f"{mi.get('cpu', {}).get('brand_raw', mi.get('processor', 'cpu'))}, "
                 f"{mi.get('mvpp', {}).get('torch_threads', '?')} threads; "
                 f"{'REDUCED size' if rows[0].get('reduced') else 'full size'}", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(table(rows))
    ref = refinement_table(rows)
    if ref:
        print("\nTopology refinement at fixed nprobe:\n" + ref)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
