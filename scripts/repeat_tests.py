#!/usr/bin/env python3
"""Run test files N times, each in a fresh process, varying what a flaky test would depend on:
thread count (OMP_NUM_THREADS / MKL_NUM_THREADS = 1 or 2, which torch.get_num_threads() follows),
PYTHONHASHSEED, and the order of the files and of the tests inside them (forward, reversed, or
shuffled with a per-run seed, via a tiny plugin that reorders collected items). Prints a table of
pass/fail counts per run configuration and a total; exits non-zero if any run failed.

    .venv/bin/python scripts/repeat_tests.py -n 20 tests/ops/test_frame_score_triton.py tests/fuzz
    .venv/bin/python scripts/repeat_tests.py -n 20 -k tie tests/ops/test_frame_score.py

Each run is a plain `python -m pytest -x -q -p no:cacheprovider <files>`: what CI runs, one process per run.
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import re
import subprocess
import sys
import tempfile
import time

PLUGIN = '''
import os, random
def pytest_collection_modifyitems(session, config, items):
    mode = os.environ.get("MVPP_REPEAT_ORDER", "forward")
    if mode == "reverse":
        items.reverse()
    elif mode.startswith("shuffle:"):
        random.Random(int(mode.split(":", 1)[1])).shuffle(items)
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="test files or folders")
    ap.add_argument("-n", "--runs", type=int, default=20)
    ap.add_argument("-k", default=None, help="pytest -k expression")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--stop-on-fail", action="store_true")
    a = ap.parse_args()

    plugdir = tempfile.mkdtemp(prefix="mvpp_repeat_")
    with open(os.path.join(plugdir, "mvpp_repeat_order.py"), "w") as f:
        f.write(PLUGIN)
    table = collections.OrderedDict()
    failures = []
    t_all = time.time()
    for r in range(a.runs):
        threads = 1 + r % 2
        order = ("forward", "reverse", f"shuffle:{r}")[r % 3]
        files = list(a.files)
        if order == "reverse":
            files.reverse()
        elif order.startswith("shuffle"):
            random.Random(r).shuffle(files)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   PYTHONHASHSEED=str(1000 + r), MVPP_REPEAT_ORDER=order,
                   PYTHONPATH=os.pathsep.join([plugdir] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
        cmd = [a.python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "mvpp_repeat_order", *files]
        if a.k:
            cmd += ["-k", a.k]
        t0 = time.time()
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        dt = time.time() - t0
        tail = (p.stdout.strip().splitlines() or [""])[-1]
        m = re.search(r"(\d+) passed", tail)
        npass = int(m.group(1)) if m else 0
        ok = p.returncode == 0
        key = (threads, order.split(":")[0])
        row = table.setdefault(key, [0, 0, 0])
        row[0 if ok else 1] += 1
        row[2] += npass
        print(f"run {r + 1:3d}/{a.runs}: threads={threads} order={order:<10} {'ok  ' if ok else 'FAIL'} {dt:6.1f}s  {tail}", flush=True)
        if not ok:
            failures.append((r, p.stdout[-4000:] + p.stderr[-2000:]))
            if a.stop_on_fail:
                break
    print()
    print("| threads | order | runs ok | runs failed | tests passed (sum) |")
    print("| --- | --- | --- | --- | --- |")
    for (threads, order), (ok, bad, npass) in table.items():
        print(f"| {threads} | {order} | {ok} | {bad} | {npass} |")
    total_ok = sum(v[0] for v in table.values())
    total_bad = sum(v[1] for v in table.values())
    print(f"\ntotal: {total_ok} ok, {total_bad} failed of {total_ok + total_bad} runs in {time.time() - t_all:.0f}s")
    for r, out in failures:
        print(f"\n---- run {r + 1} output (tail) ----\n{out}")
    return 1 if total_bad else 0


if __name__ == "__main__":
    sys.exit(main())
