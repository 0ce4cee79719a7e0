"""Stress the frame_score tie-break: many seeds x thread counts x backends x scorers.

For each run: inputs with duplicated frames (bitwise-equal rows), then
  * every pair of bitwise-equal valid frames must get bitwise-equal scores;
  * the top-k must equal the (value desc, index asc) order of the kernel's own scores;
  * the top-k must equal the float64 reference's (exact float64 ties -> lower index).
Prints one line per failure and a final count; exit status 1 if any run failed.

    TRITON_INTERPRET=1 .venv/bin/python scripts/tie_loop.py --seeds 100 --threads 1,2
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402


def expected_topk(scores: torch.Tensor, lengths, k: int) -> list[list[int]]:
    out = []
    for b in range(scores.shape[0]):
        n = int(lengths[b]) if lengths is not None else scores.shape[1]
        order = sorted(range(n), key=lambda t: (-float(scores[b, t]), t))[:k]
        out.append(order + [-1] * (k - len(order)))
    return out


def one(seed: int, backend: str, H, T: int = 100, F: int = 64, k: int = 16) -> list[str]:
    from mvpp_kernels import frame_score
    from mvpp_kernels.testing import make_frame_score_inputs

    inp = make_frame_score_inputs(3, T, F, H=H, ties=True, seed=seed)
    out = frame_score(inp["frames"], inp["weight"], inp["bias"], inp["lengths"], k, 0.8, inp["hidden"],
                      backend=backend)
    scores, idx = out[0], out[2]
    errs = []
    fr = inp["frames"]
    for b in range(fr.shape[0]):
        n = int(inp["lengths"][b])
        rows = {}
        for t in range(n):
            key = fr[b, t].numpy().tobytes()
            if key in rows:
                t0 = rows[key]
                if scores[b, t].item() != scores[b, t0].item():
                    errs.append(f"seed {seed} {backend} H={H} video {b}: frames {t0} and {t} are equal but "
                                f"scored {scores[b, t0].item()!r} vs {scores[b, t].item()!r}")
            else:
                rows[key] = t
    exp = expected_topk(scores, inp["lengths"], k)
    if idx.tolist() != exp:
        errs.append(f"seed {seed} {backend} H={H}: top-k {idx.tolist()} != own-score order {exp}")
    # float64 reference order (exact ties only between duplicated frames)
    inp64 = {key: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for key, v in inp.items()}
    if inp["hidden"] is not None:
        inp64["hidden"] = tuple(h.double() for h in inp["hidden"])
    ref = frame_score(inp64["frames"], inp64["weight"], inp64["bias"], inp64["lengths"], k, 0.8, inp64["hidden"],
                      backend="reference")
    ref_exp = expected_topk(ref[0], inp["lengths"], k)
    # Only the tie rule is checked against float64: positions whose kernel and reference scores are
    # separated by more than float32 rounding must agree; exact reference ties must pick the lower index.
    for b in range(len(exp)):
        for j, (i_k, i_r) in enumerate(zip(idx[b].tolist(), ref_exp[b])):
            if i_k != i_r and i_k >= 0 and i_r >= 0 and ref[0][b, i_k].item() == ref[0][b, i_r].item():
                errs.append(f"seed {seed} {backend} H={H} video {b} rank {j}: exact tie broken toward {i_k} not {i_r}")
    return errs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--seed0", type=int, default=0)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--backends", default="triton,cpu")
    a = ap.parse_args(argv)
    runs = fails = 0
    for nt in [int(x) for x in a.threads.split(",")]:
        torch.set_num_threads(nt)
        for backend in a.backends.split(","):
            for H in (None, 16):
                for s in range(a.seed0, a.seed0 + a.seeds):
                    errs = one(s, backend, H)
                    runs += 1
                    if errs:
                        fails += 1
                        print(f"[threads={nt}]", *errs[:3], sep="\n  ", flush=True)
    print(f"tie_loop: {runs} runs, {fails} failed (threads {a.threads}, backends {a.backends}, "
          f"seeds {a.seed0}..{a.seed0 + a.seeds - 1}, scorer linear and MLP H=16)")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
