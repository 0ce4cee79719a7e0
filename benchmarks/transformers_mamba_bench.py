"""Hugging Face transformers' Mamba on CPU: stock `slow_forward`-style torch path vs mvpp's patched scan.

One command, one process, both sides timed interleaved on the same weights and inputs:

    .venv/bin/python benchmarks/transformers_mamba_bench.py            # writes benchmarks/results/transformers_mamba.md
    .venv/bin/python benchmarks/transformers_mamba_bench.py --smoke    # tiny shapes, no file written

Model: `transformers.MambaModel` with mamba-130m-shaped layers (hidden 768, intermediate 1536, state 16,
conv 4, dt rank 48) at reduced depth and a small vocabulary (the embedding is not what is measured),
batch 1, L = 1024 by default, float32. Rows:

* `model fwd` / `model fwd+bwd`: the whole `MambaModel` (projections, conv, scan, norms), eval/train mode;
  fwd+bwd = forward, `.sum()` of the last hidden state, backward of every parameter.
* `scan fwd` / `scan fwd+bwd`: only `modeling_mamba.mamba_selective_scan` (stock) vs mvpp's op on the
  tensors one layer hands it (u, dt, A, B, C, D, z, dt bias, softplus), to separate the scan from the
  GEMMs that both sides share.

Each row also records the largest relative difference between the two sides' outputs (and gradients).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import transformers  # noqa: E402
from transformers.models.mamba import modeling_mamba  # noqa: E402

from mvpp_kernels.integrations import use_mvpp_in_transformers_mamba  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def build_model(layers: int, hidden: int, state: int, vocab: int, seed: int) -> transformers.MambaModel:
    cfg = transformers.MambaConfig(vocab_size=vocab, hidden_size=hidden, state_size=state, num_hidden_layers=layers,
                                   expand=2, conv_kernel=4, time_step_rank=max(1, hidden // 16), use_cache=False,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return transformers.MambaModel(cfg)


def interleave(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Time each callable `repeats` times, alternating between them so load drift hits both sides."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--state", type=int, default=16)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--backend", default="cpu", help="mvpp backend for the patched side (default: cpu)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 1 repeat, no results file")
    p.add_argument("--out", default=os.path.join(HERE, "results", "transformers_mamba.md"))
    a = p.parse_args(argv)
    if a.smoke:
        a.layers, a.hidden, a.state, a.vocab, a.seqlen, a.repeats = 1, 32, 4, 64, 40, 1
    if a.threads:
        torch.set_num_threads(a.threads)

    model = build_model(a.layers, a.hidden, a.state, a.vocab, seed=0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, a.vocab, (a.batch, a.seqlen), generator=g)
    rows = []  # (name, stock_times, ours_times, max rel diff)
    t_start = time.perf_counter()

    # ---- whole model, forward (eval)
    model.eval()

    def fwd():
        with torch.no_grad():
            return model(ids).last_hidden_state

    def fwd_ours():
        with use_mvpp_in_transformers_mamba(a.backend):
            return fwd()

    ref = fwd()
    with use_mvpp_in_transformers_mamba(a.backend) as h:
        got = fwd()
        assert h.calls["mamba_selective_scan"] == a.layers, h.calls  # the patched op really ran
    t = interleave({"stock": fwd, "ours": fwd_ours}, a.repeats)
    rows.append(("model fwd", t["stock"], t["ours"], rel(got, ref)))
    print(f"model fwd done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    # ---- whole model, forward + backward (train mode)
    model.train()
    params = [p_ for p_ in model.parameters() if p_.requires_grad]

    def fwdbwd():
        model.zero_grad(set_to_none=True)
        model(ids).last_hidden_state.sum().backward()
        return [p_.grad.clone() for p_ in params]

    def fwdbwd_ours():
        with use_mvpp_in_transformers_mamba(a.backend):
            return fwdbwd()

    gref = fwdbwd()
    ggot = fwdbwd_ours()
    grad_rel = max(rel(x, y) for x, y in zip(ggot, gref))
    t = interleave({"stock": fwdbwd, "ours": fwdbwd_ours}, a.repeats)
    rows.append(("model fwd+bwd", t["stock"], t["ours"], grad_rel))
    print(f"model fwd+bwd done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    # ---- the scan alone, on the tensors layer 0 hands it
    captured = {}
    stock_scan = modeling_mamba.mamba_selective_scan

    def capture(*args, **kwargs):
        captured.setdefault("args", (args, kwargs))
        return stock_scan(*args, **kwargs)

    modeling_mamba.mamba_selective_scan = capture
    try:
        model.eval()
        fwd()
    finally:
        modeling_mamba.mamba_selective_scan = stock_scan
    args, kwargs = captured["args"]
    args = [x.detach().clone() if torch.is_tensor(x) else x for x in args]
    kwargs = {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()}
    with use_mvpp_in_transformers_mamba(a.backend):
        our_scan = modeling_mamba.mamba_selective_scan

    def scan_f(fn):
        def run():
            with torch.no_grad():
                return fn(*args, **kwargs)
        return run

    o_ref = scan_f(stock_scan)()
    o_got = scan_f(our_scan)()
    o_ref = o_ref[0] if isinstance(o_ref, tuple) else o_ref
    o_got = o_got[0] if isinstance(o_got, tuple) else o_got
    t = interleave({"stock": scan_f(stock_scan), "ours": scan_f(our_scan)}, a.repeats)
    rows.append(("scan fwd", t["stock"], t["ours"], rel(o_got, o_ref)))

    grad_idx = [i for i, x in enumerate(args) if torch.is_tensor(x) and x.is_floating_point()]
    dout = torch.randn(o_ref.shape, generator=torch.Generator().manual_seed(2))

    def scan_fb(fn):
        def run():
            leaves = [x.detach().requires_grad_(True) if i in grad_idx else x for i, x in enumerate(args)]
            kw = {k: (v.detach().requires_grad_(True) if torch.is_tensor(v) and v.is_floating_point() else v)
                  for k, v in kwargs.items()}
            o = fn(*leaves, **kw)
            o = o[0] if isinstance(o, tuple) else o
            ins = [leaves[i] for i in grad_idx] + [v for v in kw.values() if torch.is_tensor(v) and v.requires_grad]
            return torch.autograd.grad(o, ins, dout)
        return run

    gs_ref = scan_fb(stock_scan)()
    gs_got = scan_fb(our_scan)()
    t = interleave({"stock": scan_fb(stock_scan), "ours": scan_fb(our_scan)}, a.repeats)
    rows.append(("scan fwd+bwd", t["stock"], t["ours"], max(rel(x, y) for x, y in zip(gs_got, gs_ref))))
    total = time.perf_counter() - t_start

    cmd = "python benchmarks/transformers_mamba_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# transformers Mamba on CPU: stock torch path vs mvpp's patched scan",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Device: CPU ({platform.machine()}, {os.cpu_count()} cores; torch threads {torch.get_num_threads()}), "
        f"torch {torch.__version__}, transformers {transformers.__version__}, mvpp backend `{a.backend}`. "
        f"The 2 cores were shared with other jobs during the run, so absolute times are noisy; the two sides "
        f"are timed interleaved in one process (median of {a.repeats}), so the ratio is the number to read. "
        f"Total {total:.0f} s.  ",
        f"Model: `transformers.MambaModel`, mamba-130m-shaped layers (hidden {a.hidden}, intermediate "
        f"{2 * a.hidden}, state {a.state}, conv 4, dt rank {max(1, a.hidden // 16)}), {a.layers} layers, vocab "
        f"{a.vocab}; batch {a.batch}, L = {a.seqlen}, float32, random init (seed 0). Stock = transformers' own "
        f"CPU path (`mamba_selective_scan`: discretise the whole sequence, then a Python loop over L); "
        f"ours = the same model inside `use_mvpp_in_transformers_mamba('{a.backend}')`.",
        "",
        "| what | stock median s | mvpp median s | speedup | max rel diff (out or grads) |",
        "|---|---|---|---|---|",
    ]
    for name, ts, to, d in rows:
        ms, mo = statistics.median(ts), statistics.median(to)
        lines.append(f"| {name} | {ms:.4f} | {mo:.4f} | {ms / mo:.1f}x | {d:.1e} |")
    lines += ["", "The `scan` rows time only `mamba_selective_scan` on the tensors layer 0 passes to it "
              "(u, dt, A, B, C, D, z, dt bias, softplus; gradients of every float input); the `model` rows add "
              "the projections, conv and norms that both sides run identically.", ""]
    text = "\n".join(lines)
    print(text)
    if not a.smoke:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, a.out)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
