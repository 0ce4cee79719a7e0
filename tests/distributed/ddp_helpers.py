"""Worker script for tests/distributed/test_ddp_train.py, launched by `python -m torch.distributed.run`.

    ddp_helpers.py train OUT_DIR RESULT_FILE EPOCHS   train the tiny model; rank 0 saves the result
    ddp_helpers.py fail  OUT_DIR RESULT_FILE EPOCHS   rank 1 raises in its 2nd training step

Run as a plain `python ddp_helpers.py ...` it is the single-process baseline (no process group).
MVPP_TEST_BANK=flat uses the flat (exact_search) bank, =hier (default) the hierarchical one; under
torchrun either is sharded across the ranks (TopologyMemoryBank(shard="auto")).
"""
import os
import sys

import torch
import torch.distributed as dist

import mvpp.train as T
from mvpp import distributed as D
from mvpp.data import generate, split_indices
from mvpp.models import ModelConfig, build_model

DATA_SEED, SEED, BATCH = 2, 0, 64


def setup(epochs):
    data = generate("tiny", seed=DATA_SEED)
    splits = split_indices(len(data), "mmra")
    T.seed_everything(SEED)
    model = build_model("MVPPModel", data, ModelConfig(d=8, dropout=0.0,
                                                      hierarchical_bank=os.environ.get("MVPP_TEST_BANK", "hier") != "flat"))
    cfg = T.TrainConfig(epochs=epochs, batch_size=BATCH, patience=99, progress=False, seed=SEED, eval_batch_size=50)
    return data, splits, model, cfg


def main():
    mode, out_dir, result, epochs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    D.init_from_env("cpu", timeout_s=60)
    data, splits, model, cfg = setup(epochs)
    writes = {"checkpoint": 0}
    real_save = T.save_checkpoint

    def counting_save(*a, **k):
        writes["checkpoint"] += 1
        return real_save(*a, **k)

    T.save_checkpoint = counting_save
    if mode == "fail" and D.rank() == 1:
        real_loss, calls = model.loss, [0]

        def failing_loss(*a, **k):
            calls[0] += 1
            if calls[0] == 2:
                raise RuntimeError("ddp_helpers: injected failure on rank 1")
            return real_loss(*a, **k)

        model.loss = failing_loss
    hist = T.train_model(model, data, splits, cfg, checkpoint=f"{out_dir}/ck.safetensors")
    val = T.evaluate(model, data, splits["val"], 50)
    per_rank = [writes["checkpoint"]]
    if D.world_size() > 1:
        per_rank = [None] * D.world_size()
        dist.all_gather_object(per_rank, writes["checkpoint"])
    if D.is_rank0():
        params = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save({"hist": hist, "val": val, "checkpoint_writes": per_rank, "world": D.world_size(),
                    "params": params}, result)
    D.shutdown()


if __name__ == "__main__":
    main()
