"""Data-parallel training (mvpp.train.train_model under torchrun + DDP, gloo on loopback, 2 ranks) against
the single-process run with the same seed and global batch.

Each job is a `python -m torch.distributed.run` subprocess of tests/distributed/ddp_helpers.py with a
bounded timeout, so a failing or stuck rank fails the test instead of hanging CI.

Tolerances (float32, stated in docs/scaleout.md): validation metrics within 1e-5 relative, parameters
within 2e-3 absolute. The data order and the global-batch gradient are identical by construction; what
differs is the order of float additions (DDP's all-reduce of two half-batch gradients vs one full-batch
sum), which AdamW magnifies on near-zero gradient entries.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "ddp_helpers.py")
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(mode, nproc, out_dir, bank="flat", epochs=2):
    res = os.path.join(out_dir, "result.pt")
    env = dict(os.environ, MVPP_TEST_BANK=bank, OMP_NUM_THREADS="1", MVPP_DIST_TIMEOUT="60")
    if nproc == 1:
        cmd = [sys.executable, WORKER, mode, out_dir, res, str(epochs)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", WORKER, mode, out_dir, res, str(epochs)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    return p, (torch.load(res, weights_only=False) if p.returncode == 0 and os.path.exists(res) else None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for n in (1, 2):
        d = str(tmp_path_factory.mktemp(f"ddp{n}"))
        p, r = _run("train", n, d)
        assert p.returncode == 0, f"N={n} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        out[n] = (d, r)
    return out


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def test_two_ranks_match_one_process(runs):
    r1, r2 = runs[1][1], runs[2][1]
    assert r1["world"] == 1 and r2["world"] == 2
    for key, v in r1["val"].items():
        assert _rel(r2["val"][key], v) < 1e-5, (key, r2["val"][key], v)
    for k, v in r1["params"].items():
        if v.is_floating_point():
            assert torch.allclose(r2["params"][k], v, atol=2e-3, rtol=0), (k, float((r2["params"][k] - v).abs().max()))


def test_only_rank0_writes_and_checkpoint_loads_at_world_one(runs):
    d2, r2 = runs[2]
    writes = r2["checkpoint_writes"]
    assert len(writes) == 2 and writes[0] >= 1 and writes[1] == 0, writes
    files = sorted(os.listdir(d2))
    assert "ck.safetensors" in files and not [f for f in files if ".tmp" in f], files
    # a checkpoint written by the 2-rank job loads in a single process and reproduces the job's weights
    sys.path.insert(0, HERE)
    try:
        import ddp_helpers
        import mvpp.train as T

        data, splits, model, cfg = ddp_helpers.setup(2)
        T.load_checkpoint(os.path.join(d2, "ck.safetensors"), model, which="best")
    finally:
        sys.path.remove(HERE)
    for k, v in model.state_dict().items():
        if v.is_floating_point() and k in r2["params"]:
            assert torch.equal(v, r2["params"][k]), k


def test_failing_rank_fails_the_job_with_its_error(tmp_path):
    p, _ = _run("fail", 2, str(tmp_path), epochs=1)
    assert p.returncode != 0
    assert "injected failure on rank 1" in (p.stdout + p.stderr)
