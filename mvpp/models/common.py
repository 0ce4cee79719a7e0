"""Pieces shared by the models: configs, the MLP head, attentive pooling, the model interface."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ModelConfig", "MLP", "AttentivePooling", "PopularityModel"]


@dataclass
class ModelConfig:
    """Hyper-parameters of every model (each uses the ones it needs).

    use_frame_scoring / use_memory / use_mhp switch MVPPModel's modules off for the ablations.
    """

    d: int = 32
    dropout: float = 0.1
    k_frames: int = 4
    scorer_hidden: int = 16
    k_retrieval: int = 8
    d_state: int = 8
    time_scale: float = 10.0
    nll_weight: float = 0.02
    traj_weight: float = 0.5
    use_frame_scoring: bool = True
    use_memory: bool = True
    use_mhp: bool = True
    hierarchical_bank: bool = True
    bank_branching: tuple = ()  # () = chosen from the bank size
    bank_nprobe: tuple = ()
    bank_shard: object = "auto"  # "auto": shard the bank across ranks when a process group is up; True / False
    mmra_alpha: float = 0.6
    uniform_frames: int = 10
    backend: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bank_branching"] = list(self.bank_branching)
        d["bank_nprobe"] = list(self.bank_nprobe)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; known: {sorted(names)}")
        d = dict(d)
        for k in ("bank_branching", "bank_nprobe"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


class MLP(nn.Sequential):
    def __init__(self, d_in: int, d_hidden: int, d_out: int = 1, dropout: float = 0.1):
        super().__init__(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_hidden, d_hidden // 2),
                         nn.GELU(), nn.Linear(d_hidden // 2, d_out))


class AttentivePooling(nn.Module):
    """softmax(w . tanh(W x_t)) weighted sum over tokens (MMRA's pooling, after [26] there)."""

    def __init__(self, d: int):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.w = nn.Linear(d, 1, bias=False)

    def forward(self, x, mask=None):  # x (batch, n, d), mask (batch, n) bool
        a = self.w(torch.tanh(self.proj(x))).squeeze(-1)
        if mask is not None:
            a = a.masked_fill(~mask, -1e9)
        return (torch.softmax(a, dim=1).unsqueeze(-1) * x).sum(1)


class PopularityModel(nn.Module):
    """Interface of the trainable models.

    forward(batch) -> dict with "pred" (batch,) and optionally "nll" (batch,) (Hawkes negative
    log-likelihood per event); loss(batch, out) -> scalar. Models with a memory bank implement
    attach_bank(data, train_idx) (called once before training) and refresh_bank() (before each epoch
    and before evaluation).
    """

    config: ModelConfig
    label_mean: float = 0.0
    label_std: float = 1.0

    def set_label_stats(self, mean: float, std: float) -> None:
        self.label_mean, self.label_std = float(mean), float(std) if std > 0 else 1.0

    def loss(self, batch: dict, out: dict) -> torch.Tensor:
        y = (batch["label"].float() - self.label_mean) / self.label_std
        p = (out["pred"] - self.label_mean) / self.label_std
        loss = F.mse_loss(p, y)
        if "nll" in out and self.config.nll_weight > 0:
            loss = loss + self.config.nll_weight * out["nll"].mean()
        return loss

    def prepare(self, data, train_idx) -> None:
        """Data-dependent initialisation before training (default: none)."""
        return None

    def attach_bank(self, data, train_idx) -> None:  # no bank by default
        return None

    def refresh_bank(self) -> None:
        return None

    def update_bank(self, data, idx) -> None:
        return None
