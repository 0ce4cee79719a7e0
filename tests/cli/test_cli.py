"""The `mvpp` command line: help, errors that say what to fix, the demo end to end, train/eval/resume."""
import json
import os
import subprocess
import sys

import pytest

from mvpp.cli import main


def run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "train", "eval", "features", "bank", "check", "info"):
        assert cmd in out
    assert main([]) == 2


def test_info_and_check(capsys):
    rc, out, _ = run(["info"], capsys)
    assert rc == 0 and "auto on cpu" in out
    # the Triton interpreter is slow on CPU: the quick backends here (the full check is the same code)
    rc, out, _ = run(["check", "--backends", "reference,cpu,cuda", "--length", "33"], capsys)
    assert rc == 0 and "selective_scan" in out and "FAIL" not in out
    rc, _, err = run(["check", "--backends", "gpu"], capsys)
    assert rc == 2 and "choose from reference" in err


def test_console_script_entry_point():
    # `python -m mvpp.cli` is what the console script `mvpp` (mvpp.cli:main) runs
    r = subprocess.run([sys.executable, "-m", "mvpp.cli", "demo", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--out" in r.stdout and "--seeds" in r.stdout


def test_errors_say_what_to_fix(capsys, tmp_path):
    rc, _, err = run(["demo", "--preset", "gigantic", "--out", str(tmp_path)], capsys)
    assert rc == 2 and "choose from" in err and "tiny" in err
    rc, _, err = run(["demo", "--config", str(tmp_path / "missing.yaml")], capsys)
    assert rc == 2 and "does not exist" in err
    bad = tmp_path / "bad.toml"
    bad.write_text("[modle]\nd = 8\n")
    rc, _, err = run(["demo", "--config", str(bad)], capsys)
    assert rc == 2 and "unknown section" in err
    bad.write_text("[model]\nwidth = 8\n")
    rc, _, err = run(["demo", "--config", str(bad)], capsys)
    assert rc == 2 and "unknown model config keys ['width']" in err
    rc, _, err = run(["demo", "--models", "Nope", "--out", str(tmp_path)], capsys)
    assert rc == 2 and "MMRABaseline" in err
    rc, _, err = run(["train", "--data", "imagenet:/x", "--out", str(tmp_path / "m.safetensors")], capsys)
    assert rc == 2 and "synthetic:<preset> or microlens:<dir>" in err
    rc, _, err = run(["eval", "--checkpoint", str(tmp_path / "none.safetensors")], capsys)
    assert rc == 2 and "mvpp train --out" in err
    rc, _, err = run(["train", "--device", "cuda", "--data", "synthetic:tiny", "--out", str(tmp_path / "m.s")], capsys)
    import torch

    if not torch.cuda.is_available():
        assert rc == 2 and "--device cpu" in err


def test_demo_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    cfg = tmp_path / "demo.yaml"
    cfg.write_text("model:\n  d: 16\ntrain:\n  epochs: 1\n  batch_size: 64\n")
    rc, stdout, _ = run(["demo", "--preset", "tiny", "--out", str(out), "--config", str(cfg), "--quiet"], capsys)
    assert rc == 0
    assert "NoRetrievalMLP" in stdout and "nMSE" in stdout
    report = json.loads((out / "metrics.json").read_text())
    assert report["preset"] == "tiny" and report["model_config"]["d"] == 16
    assert report["train_config"]["epochs"] == 1
    table = report["table"]
    assert set(table) == {"MVPPModel", "w/o frame scoring", "w/o memory bank", "w/o MHP", "MMRABaseline",
                          "NoRetrievalMLP", "GBT (sklearn)"}
    ran = [k for k, v in table.items() if "unavailable" not in v]
    assert "NoRetrievalMLP" in ran
    for k in ran:
        assert 0 < table[k]["nmse"]["mean"] < 5 and -1 <= table[k]["src"]["mean"] <= 1
    assert (out / "pred_vs_true.png").stat().st_size > 1000


def test_train_eval_resume(tmp_path, capsys):
    ck = tmp_path / "m.safetensors"
    args = ["train", "--model", "NoRetrievalMLP", "--data", "synthetic:tiny", "--out", str(ck), "--epochs", "2",
            "--quiet", "--d", "8"]
    rc, out, _ = run(args, capsys)
    assert rc == 0 and ck.exists()
    first = json.loads(out[out.index("{"):])
    rc, out, _ = run(["eval", "--checkpoint", str(ck), "--data", "synthetic:tiny"], capsys)
    assert rc == 0
    ev = json.loads(out[out.index("{"):])
    assert ev["test"]["nmse"] == pytest.approx(first["test"]["nmse"], rel=1e-5)
    rc, out, _ = run(args[:-5] + ["--epochs", "3", "--quiet", "--d", "8", "--resume"], capsys)
    assert rc == 0 and "resumed from" in out
    assert json.loads(out[out.index("{\n"):])["epochs"] == 3


def test_bank_build_search_update(tmp_path, capsys):
    idx = str(tmp_path / "bank.safetensors")
    rc, out, _ = run(["bank", "build", "--index", idx, "--data", "synthetic:tiny"], capsys)
    assert rc == 0
    built = json.loads(out)
    assert built["items"] == 240 and os.path.exists(idx)
    rc, out, _ = run(["bank", "search", "--index", idx, "--data", "synthetic:tiny", "--k", "5", "--limit", "2"], capsys)
    assert rc == 0
    found = json.loads(out)
    assert found["queries"] == 30 and len(found["results"]) == 2 and 0.5 <= found["recall@5"] <= 1.0
    # all probes: recall 1 (the hierarchical search is then exact)
    rc, out, _ = run(["bank", "search", "--index", idx, "--data", "synthetic:tiny", "--k", "5", "--nprobe",
                      str(built["coarse_clusters"]), str(built["fine_clusters"])], capsys)
    assert json.loads(out)["recall@5"] == 1.0
    rc, out, _ = run(["bank", "update", "--index", idx, "--data", "synthetic:tiny"], capsys)
    up = json.loads(out)
    assert rc == 0 and up["added"] == 30 and up["items_seen"] == 270
    rc, _, err = run(["bank", "build", "--index", idx], capsys)
    assert rc == 2 and "--keys FILE or --data" in err
    from safetensors.torch import save_file
    import torch

    kf = str(tmp_path / "k.safetensors")
    save_file({"vectors": torch.randn(20, 4)}, kf)
    rc, _, err = run(["bank", "build", "--index", idx, "--keys", kf], capsys)
    assert rc == 2 and "has no tensor 'keys'" in err
