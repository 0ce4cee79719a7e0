"""The whole models: one training step and inference of MVPPModel and MMRABaseline on the CPU.

    pytest benchmarks/test_bench_model.py --benchmark-only            # time for real ("small" preset)
    pytest benchmarks/test_bench_model.py                             # smoke ("tiny" preset, 1 round)

Providers: `mvpp` (MVPPModel) and `mmra` (MMRABaseline), both with the default config, so every
mvpp_kernels op picks its backend automatically (backend=None). Each model is built as `mvpp demo`
builds it: a data set generated once per module (seed 0), MMRA's 80/10/10 split, label statistics
and `prepare` from the training split, the retrieval bank attached over the training videos (and,
for MVPPModel, the bank's trajectory descriptors refreshed). Nothing of that is timed.

Modes:
- `train_step`: one optimizer step exactly as `mvpp.train.train_model` takes it -- forward, loss
  (MSE plus the Hawkes NLL for MVPPModel), zero_grad, backward, gradient clipping at
  TrainConfig().grad_clip, AdamW step -- on a fixed batch of 64 training videos.
  extra_info["samples_per_s"] = batch / median time.
- `inference`: model.eval() + torch.no_grad() forward at batch 1 and batch 256 of held-out
  (val + test) videos; when fewer held-out videos exist (the tiny preset has 60) the largest batch
  available is used and extra_info records it (`requested_batch` vs `batch`).
  extra_info["latency_ms"] = median time in ms.
Batches are formed by `mvpp.data.iterate_batches` (trimmed to the batch's longest sequence), once,
outside the timed call.
"""
from __future__ import annotations

import os

import pytest
import torch

from mvpp.data import generate, iterate_batches, split_indices
from mvpp.models import ModelConfig, OpUnavailableError, build_model
from mvpp.train import TrainConfig

from .conftest import run_pedantic

SMOKE = os.environ.get("MVPP_BENCH_SMOKE", "0") == "1"
PRESET = "tiny" if SMOKE else "small"
DEVICE = "cpu"
TRAIN_BATCH = 64
INFER_BATCHES = [1, 256]
ROUNDS = 1 if SMOKE else 20

MODELS = {"mvpp": "MVPPModel", "mmra": "MMRABaseline"}


@pytest.fixture(scope="module")
def data_and_splits():
    data = generate(PRESET, seed=0)
    return data, split_indices(len(data), "mmra")


@pytest.fixture(scope="module", params=list(MODELS), ids=list(MODELS))
def built(request, data_and_splits):
    """(name, model, data, splits) with the model ready for forward, built once per module and model."""
    name = request.param
    data, splits = data_and_splits
    torch.manual_seed(0)
    try:
        model = build_model(MODELS[name], data, ModelConfig())
    except OpUnavailableError as e:
        pytest.skip(str(e))
    train_idx = splits["train"]
    y = data.label[train_idx]
    model.set_label_stats(float(y.mean()), float(y.std()))
    model.prepare(data, train_idx)
    model.to(DEVICE)
    model.attach_bank(data, train_idx)
    model.refresh_bank()
    return name, model, data, splits


def _batch(data, idx, size):
    return next(iterate_batches(data, idx[:size], size, device=DEVICE))


def _info(benchmark, name, batch, mode, **extra):
    benchmark.extra_info.update(op="model", provider=name, device=DEVICE, dtype="float32",
                                shape=f"batch={batch}", mode=mode, preset=PRESET, batch=batch, **extra)


def _median(benchmark):
    return benchmark.stats.stats.median if benchmark.stats is not None else float("nan")


def test_bench_model_train_step(benchmark, built):
    name, model, data, splits = built
    cfg = TrainConfig()
    batch = _batch(data, splits["train"], TRAIN_BATCH)
    B = int(batch["label"].shape[0])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def step():
        out = model(batch)
        loss = model.loss(batch, out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        return loss

    try:
        loss = step()  # first call outside the timing: AdamW state allocation, any lazy op loading
    except OpUnavailableError as e:
        pytest.skip(str(e))
    assert torch.isfinite(loss.detach()), f"{name}: non-finite training loss {float(loss)}"
    run_pedantic(benchmark, step, DEVICE, rounds=ROUNDS)
    med = _median(benchmark)
    _info(benchmark, name, B, "train_step", samples_per_s=(B / med) if med == med and med > 0 else None,
          has_nll=name == "mvpp" and model.config.nll_weight > 0)


@pytest.mark.parametrize("requested", INFER_BATCHES, ids=lambda b: f"batch={b}")
def test_bench_model_inference(benchmark, built, requested):
    name, model, data, splits = built
    held_out = torch.cat([splits["val"], splits["test"]])
    batch = _batch(data, held_out, requested)
    B = int(batch["label"].shape[0])
    model.eval()

    def fwd():
        with torch.no_grad():
            return model(batch)["pred"]

    try:
        pred = fwd()
    except OpUnavailableError as e:
        pytest.skip(str(e))
    assert pred.shape == (B,) and torch.isfinite(pred).all()
    run_pedantic(benchmark, fwd, DEVICE, rounds=ROUNDS)
    med = _median(benchmark)
    _info(benchmark, name, B, "inference", requested_batch=requested,
          latency_ms=med * 1e3 if med == med else None)
