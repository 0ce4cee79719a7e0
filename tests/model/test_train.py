"""Training loop: seeded determinism, atomic safetensors checkpoints, exact resume, early stopping."""
import os

import pytest
import torch

from mvpp.data import generate, split_indices
from mvpp.models import ModelConfig, build_model, fit_gbt, gbt_features
from mvpp.train import (TrainConfig, atomic_write_bytes, evaluate, load_checkpoint, save_checkpoint,
                        seed_everything, train_model)


@pytest.fixture(scope="module")
def tiny():
    return generate("tiny", seed=2)


@pytest.fixture(scope="module")
def splits(tiny):
    return split_indices(len(tiny), "mmra")


def fresh(name, data, seed=0, **over):
    seed_everything(seed)
    return build_model(name, data, ModelConfig(d=8, **over))


def same_state(a, b):
    return all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_seeded_training_is_deterministic(tiny, splits):
    cfg = TrainConfig(epochs=1, batch_size=64, progress=False, seed=5)
    a, b = fresh("MVPPModel", tiny), fresh("MVPPModel", tiny)
    train_model(a, tiny, splits, cfg)
    train_model(b, tiny, splits, cfg)
    assert same_state(a, b)
    c, d = fresh("NoRetrievalMLP", tiny), fresh("NoRetrievalMLP", tiny)
    train_model(c, tiny, splits, TrainConfig(epochs=1, batch_size=64, progress=False, seed=5))
    train_model(d, tiny, splits, TrainConfig(epochs=1, batch_size=64, progress=False, seed=6))
    assert not same_state(c, d)


def test_resume_equals_uninterrupted(tiny, splits, tmp_path):
    ck = str(tmp_path / "ck.safetensors")
    full = fresh("NoRetrievalMLP", tiny)
    h_full = train_model(full, tiny, splits, TrainConfig(epochs=4, patience=99, progress=False))
    part = fresh("NoRetrievalMLP", tiny)
    train_model(part, tiny, splits, TrainConfig(epochs=2, patience=99, progress=False), checkpoint=ck)
    resumed = fresh("NoRetrievalMLP", tiny, seed=123)  # different init: everything must come from the file
    logs = []
    h_res = train_model(resumed, tiny, splits, TrainConfig(epochs=4, patience=99, progress=False), checkpoint=ck,
                        resume=True, log=logs.append)
    assert any("resumed" in line for line in logs)
    assert h_res["epochs_run"] == 4
    assert h_res["train_loss"] == pytest.approx(h_full["train_loss"], rel=1e-6)
    assert same_state(full, resumed)  # the best weights, restored at the end of both runs


def test_checkpoint_round_trip_and_refusals(tiny, tmp_path):
    m = fresh("NoRetrievalMLP", tiny)
    opt = torch.optim.AdamW(m.parameters())
    m(dict(frames=tiny.frames[:4], frame_lengths=tiny.frame_lengths[:4], text=tiny.text[:4],
           retrieval=tiny.retrieval[:4]))["pred"].sum().backward()
    opt.step()
    p = str(tmp_path / "m.safetensors")
    save_checkpoint(p, m, opt, {"epoch": 3})
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")] == []  # no temp file left behind
    m2 = fresh("NoRetrievalMLP", tiny, seed=9)
    opt2 = torch.optim.AdamW(m2.parameters())
    assert load_checkpoint(p, m2, opt2) == {"epoch": 3}
    assert same_state(m, m2)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], opt2.state_dict()["state"][0]["exp_avg"])
    # a torn file, a foreign safetensors file and a checkpoint of another model are refused
    blob = open(p, "rb").read()
    torn = str(tmp_path / "torn.safetensors")
    open(torn, "wb").write(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="not a valid mvpp checkpoint: cannot parse it as safetensors"):
        load_checkpoint(torn, m2)
    from safetensors.torch import save_file

    foreign = str(tmp_path / "foreign.safetensors")
    save_file({"x": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="not a valid mvpp checkpoint: it has no .mvpp. header"):
        load_checkpoint(foreign, m2)
    other = fresh("MVPPModel", tiny, use_memory=False)
    with pytest.raises(ValueError, match="does not fit this model"):
        load_checkpoint(p, other)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(str(tmp_path / "absent.safetensors"), m2)


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    p = str(tmp_path / "f.bin")
    atomic_write_bytes(p, b"old")

    def boom(*a):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(p, b"new contents")
    assert open(p, "rb").read() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_early_stopping(tiny, splits):
    m = fresh("NoRetrievalMLP", tiny)
    h = train_model(m, tiny, splits, TrainConfig(epochs=20, lr=0.0, weight_decay=0.0, patience=2, progress=False))
    assert h["epochs_run"] == 3  # epoch 1 sets the best, two more without improvement


def test_hawkes_base_rates_start_from_the_data(tiny, splits):
    m = fresh("MVPPModel", tiny, use_memory=False)
    m.prepare(tiny, splits["train"])
    mu = m.mhp.mu.detach()
    assert mu[0] > mu[1] > mu[2]  # likes are the most frequent mark, shares the least


def test_gbt_baseline(tiny, splits):
    pytest.importorskip("sklearn")
    g = fit_gbt(tiny, splits["train"], max_iter=30)
    pred = g.predict(gbt_features(tiny, splits["test"]))
    assert pred.shape == (len(splits["test"]),) and torch.isfinite(torch.as_tensor(pred)).all()
