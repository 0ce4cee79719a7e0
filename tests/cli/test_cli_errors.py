"""The CLI's one error boundary (mvpp.cli._run_command): every error is one line on stderr, never a
traceback; errors a user can fix exit 2 and say what to change, anything else exits 1 and says it is
probably a bug. Issue 16: library ValueErrors, an unwritable --out, --batch-size 0 and --epochs 0
used to print tracebacks (exit 1) or claim a checkpoint that was never written."""
import os
import subprocess
import sys

import pytest

from mvpp import cli
from mvpp.cli import main

TRAIN = ["train", "--model", "NoRetrievalMLP", "--data", "synthetic:tiny", "--quiet", "--d", "8"]


def run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_line_error(err: str, command: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {err!r}"
    assert lines[0].startswith(f"mvpp {command}: error: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("flags, fragment", [
    (["--batch-size", "0"], "--batch-size (train.batch_size) must be an integer >= 1, got 0"),
    (["--epochs", "0"], "--epochs (train.epochs) must be an integer >= 1"),
    (["--epochs", "-3"], "--epochs (train.epochs) must be an integer >= 1"),
    (["--patience", "0"], "--patience (train.patience) must be an integer >= 1"),
    (["--lr", "nan"], "--lr (train.lr) must be a finite number >= 0"),
    (["--lr", "-1"], "--lr (train.lr) must be a finite number >= 0"),
])
def test_bad_training_settings_are_refused_before_training(flags, fragment, tmp_path, capsys):
    ck = tmp_path / "m.safetensors"
    rc, out, err = run(TRAIN + ["--out", str(ck)] + flags, capsys)
    assert rc == 2
    assert fragment in one_line_error(err, "train")
    assert not ck.exists() and out == ""  # nothing trained, no checkpoint claimed or written


def test_bad_settings_from_a_config_file_name_the_field(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\nbatch_size = 0\n")
    rc, _, err = run(TRAIN + ["--out", str(tmp_path / "m.safetensors"), "--config", str(cfg)], capsys)
    assert rc == 2 and "train.batch_size" in one_line_error(err, "train")


def test_unwritable_out_is_refused_up_front(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    rc, _, err = run(TRAIN + ["--out", str(afile / "m.safetensors")], capsys)
    assert rc == 2 and "is a file, not a folder" in one_line_error(err, "train")
    rc, _, err = run(TRAIN + ["--out", str(tmp_path)], capsys)
    assert rc == 2 and "is a directory" in one_line_error(err, "train")
    rc, _, err = run(["demo", "--preset", "tiny", "--out", str(afile)], capsys)
    assert rc == 2 and "--out" in one_line_error(err, "demo")
    rc, _, err = run(["bank", "build", "--index", str(afile / "b.safetensors"), "--data", "synthetic:tiny"], capsys)
    assert rc == 2 and "--index" in one_line_error(err, "bank")


def test_os_errors_raised_inside_a_command_are_one_line_exit_2(monkeypatch, tmp_path, capsys):
    # the boundary, not only the up-front check: an OSError from deep inside a command (disk full,
    # permissions changed mid-run) is one line and exit 2
    def fail(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "m.safetensors"))

    monkeypatch.setattr(cli, "cmd_info", fail)
    rc, _, err = run(["info"], capsys)
    line = one_line_error(err, "info")
    assert rc == 2 and "Permission denied" in line and "m.safetensors" in line


def test_library_value_errors_are_one_line_exit_2(tmp_path, capsys):
    idx = str(tmp_path / "bank.safetensors")
    rc, _, _ = run(["bank", "build", "--index", idx, "--data", "synthetic:tiny"], capsys)
    assert rc == 0
    # k = 0 reaches HierarchicalIndex.search, whose ValueError names the argument
    rc, _, err = run(["bank", "search", "--index", idx, "--data", "synthetic:tiny", "--k", "0"], capsys)
    assert rc == 2 and "k" in one_line_error(err, "bank")


def test_a_corrupt_input_file_is_one_line_exit_2(tmp_path, capsys):
    keys = tmp_path / "keys.safetensors"
    keys.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    rc, _, err = run(["bank", "build", "--index", str(tmp_path / "b.safetensors"), "--keys", str(keys)], capsys)
    assert rc == 2 and "internal error" not in one_line_error(err, "bank")


def test_a_corrupt_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    ck = tmp_path / "m.safetensors"
    rc, _, _ = run(TRAIN + ["--out", str(ck), "--epochs", "1"], capsys)
    assert rc == 0
    blob = bytearray(ck.read_bytes())
    blob[-5] ^= 0x10  # one bit of the last tensor
    ck.write_bytes(bytes(blob))
    rc, _, err = run(["eval", "--checkpoint", str(ck), "--data", "synthetic:tiny"], capsys)
    assert rc == 2 and "checksum mismatch" in one_line_error(err, "eval")


def test_unexpected_errors_are_one_line_exit_1_and_debuggable(monkeypatch, capsys):
    def boom(args):
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setattr(cli, "cmd_info", boom)
    monkeypatch.delenv("MVPP_TRACEBACK", raising=False)
    rc, _, err = run(["info"], capsys)
    assert rc == 1
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == ["mvpp info: internal error: RuntimeError: kernel exploded second line (probably a bug in "
                     "mvpp; MVPP_TRACEBACK=1 shows the traceback)"]
    monkeypatch.setenv("MVPP_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="kernel exploded"):
        main(["info"])


def test_console_script_prints_no_traceback(tmp_path):
    # the real process: stderr is exactly one line and the exit status is 2
    r = subprocess.run([sys.executable, "-m", "mvpp.cli"] + TRAIN + ["--out", str(tmp_path / "m.s"),
                                                                     "--batch-size", "0"],
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, MVPP_TRACEBACK="0"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == ["mvpp train: error: --batch-size (train.batch_size) must be an "
                                             "integer >= 1, got 0"]
