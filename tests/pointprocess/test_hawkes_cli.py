"""`mvpp hawkes fit | sample | gof | predict` end to end on a small events file, and its input errors."""
import json

import pytest
import torch

from mvpp.cli import main
from mvpp.pointprocess import ExpHawkes, sample
from mvpp.pointprocess.fit import EventData, read_events_csv, write_events_csv


@pytest.fixture(scope="module")
def events(tmp_path_factory):
    m = ExpHawkes([0.6, 0.4], [[0.3, 0.1], [0.2, 0.3]], 2.0)
    r = sample(m, 10.0, 20, generator=torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("ev") / "events.csv"
    write_events_csv(str(path), EventData(r.times, r.marks, r.lengths, r.T, [f"s{i}" for i in range(20)],
                                          ["like", "share"]))
    return path, r


def test_roundtrip_csv(events):
    path, r = events
    d = read_events_csv(str(path), horizon=10.0)
    assert d.mark_names == ["like", "share"]
    keep = r.lengths > 0
    assert torch.equal(d.lengths, r.lengths[keep])
    assert torch.allclose(d.times, r.times[keep][:, :d.times.shape[1]])


def test_fit_sample_gof_predict(events, tmp_path, capsys):
    path, _ = events
    model = tmp_path / "h.safetensors"
    assert main(["hawkes", "fit", str(path), "--out", str(model), "--epochs", "3", "--holdout", "0.25",
                 "--horizon", "10"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["marks"] == ["like", "share"] and rep["test_n"] > 0 and 0 <= rep["test_mark_acc"] <= 1
    out = tmp_path / "s.csv"
    assert main(["hawkes", "sample", str(model), "--n", "3", "--horizon", "5", "--out", str(out)]) == 0
    s = read_events_csv(str(out), mark_names=["like", "share"], horizon=5.0)
    assert bool((s.times.max() < 5.0))
    qq = tmp_path / "qq.png"
    js = tmp_path / "g.json"
    assert main(["hawkes", "gof", str(model), str(path), "--horizon", "10", "--qq", str(qq), "--json", str(js)]) == 0
    table = json.loads(js.read_text())
    assert set(table) == {"all marks", "like", "share"} and 0 <= table["all marks"]["p_value"] <= 1
    assert qq.read_bytes()[:4] == b"\x89PNG"
    assert main(["hawkes", "predict", str(model), str(path)]) == 0
    assert json.loads(capsys.readouterr().out.split("QQ plot")[-1].split("\n", 1)[-1])["n"] > 0


@pytest.mark.parametrize("rows,msg", [
    ("seq,time,mark\na,1.0,x\na,0.5,x\n", "not sorted"),
    ("seq,time,mark\na,-1.0,x\n", ">= 0"),
    ("seq,time,mark\na,abc,x\n", "not a number"),
    ("id,t,mark\na,1.0,x\n", "seq, time, mark"),
])
def test_bad_events_file(tmp_path, capsys, rows, msg):
    p = tmp_path / "bad.csv"
    p.write_text(rows)
    assert main(["hawkes", "fit", str(p), "--out", str(tmp_path / "m.safetensors"), "--epochs", "1"]) == 2
    assert msg in capsys.readouterr().err


def test_unknown_mark(events, tmp_path, capsys):
    path, _ = events
    model = tmp_path / "h.safetensors"
    assert main(["hawkes", "fit", str(path), "--out", str(model), "--epochs", "1"]) == 0
    bad = tmp_path / "u.csv"
    bad.write_text("seq,time,mark\na,1.0,like\na,2.0,comment\n")
    capsys.readouterr()
    assert main(["hawkes", "gof", str(model), str(bad)]) == 2
    assert "unknown to the model" in capsys.readouterr().err
