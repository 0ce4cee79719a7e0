"""MVPPModel: temporal enlargement + MHP encoder + topology memory bank + cross-modal fusion + MLP head.

Tokens (each (batch, d)): text, retrieval-vector content, frames (TemporalEnlargement, or uniform
10-frame pooling without frame scoring), engagement (MHPEncoder), memory (TopologyMemoryBank, queried
with the content plus the MHP trajectory). A one-layer multi-head self-attention over the tokens
fuses the modalities (cross-modal fusion), attentive pooling summarises them, and an MLP reads the
pooled vector, the tokens and the memory's aggregated label. Loss = MSE on the (standardised) label +
nll_weight * the Hawkes negative log-likelihood per event of the engagement stream.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mvpp_kernels import nvtx_range

from .common import MLP, AttentivePooling, ModelConfig, PopularityModel
from .memory import TopologyMemoryBank
from .mhp import MHPEncoder
from .temporal import TemporalEnlargement, UniformFramePooling

__all__ = ["MVPPModel", "bank_values"]


def bank_values(data, idx) -> torch.Tensor:
    """What the bank stores per past video: [label, text feature]."""
    idx = torch.as_tensor(idx, dtype=torch.long)
    return torch.cat([data.label[idx, None], data.text[idx]], dim=1).float()


class MVPPModel(PopularityModel):
    def __init__(self, frame_dim: int, text_dim: int, retrieval_dim: int, n_marks: int = 3,
                 config: ModelConfig | None = None):
        super().__init__()
        cfg = self.config = config or ModelConfig()
        d = cfg.d
        self.dims = dict(frame_dim=frame_dim, text_dim=text_dim, retrieval_dim=retrieval_dim, n_marks=n_marks)
        self.text_proj = nn.Sequential(nn.Linear(text_dim, d), nn.ReLU())
        self.ret_proj = nn.Sequential(nn.Linear(retrieval_dim, d), nn.ReLU())
        if cfg.use_frame_scoring:
            self.frames = TemporalEnlargement(frame_dim, d, k=cfg.k_frames, hidden=cfg.scorer_hidden,
                                              backend=cfg.backend)
        else:
            self.frames = UniformFramePooling(frame_dim, d, samples=cfg.uniform_frames)
        self.mhp = (MHPEncoder(n_marks, d_model=d, d_state=cfg.d_state, d_out=d, time_scale=cfg.time_scale,
                               backend=cfg.backend) if cfg.use_mhp else None)
        traj_dim = 2 * d + 2 if cfg.use_mhp else 0
        self.memory = (TopologyMemoryBank(retrieval_dim, 1 + text_dim, d, traj_dim=traj_dim, k=cfg.k_retrieval,
                                          traj_weight=cfg.traj_weight, hierarchical=cfg.hierarchical_bank,
                                          branching=cfg.bank_branching, nprobe=cfg.bank_nprobe, backend=cfg.backend,
                                          shard=getattr(cfg, "bank_shard", "auto"))
                       if cfg.use_memory else None)
        n_tok = 3 + (self.mhp is not None) + (self.memory is not None)
        self.type_emb = nn.Parameter(torch.randn(n_tok, d) * 0.02)
        self.fusion = nn.MultiheadAttention(d, num_heads=4, dropout=cfg.dropout, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.pool = AttentivePooling(d)
        self.head = MLP(d * (n_tok + 1) + (1 if self.memory is not None else 0), 2 * d, 1, cfg.dropout)
        self._bank_items: list = []
        self._bank_pos = None

    @torch.no_grad()
    def prepare(self, data, train_idx) -> None:
        """Start the Hawkes head's base rates mu_k at half the empirical rate of mark k in the training
        windows (the excitation carries the rest), instead of a mark-blind constant."""
        if self.mhp is None:
            return
        idx = torch.as_tensor(train_idx, dtype=torch.long)
        L = data.event_marks.shape[1]
        valid = torch.arange(L)[None] < data.event_lengths[idx, None]
        counts = torch.stack([((data.event_marks[idx] == k) & valid).sum() for k in range(self.mhp.n_marks)]).double()
        span = float(data.window[idx].double().sum()) * self.mhp.time_scale
        rate = (0.5 * counts / max(span, 1e-12)).clamp(min=1e-3)
        self.mhp.head.mu_raw.copy_(torch.log(torch.expm1(rate - self.mhp.head.eps)).to(self.mhp.head.mu_raw))

    # -- memory bank ------------------------------------------------------------------------------
    def attach_bank(self, data, train_idx) -> None:
        """Build the bank over the training videos (item i of train_idx gets bank id i)."""
        if self.memory is None:
            return
        idx = torch.as_tensor(train_idx, dtype=torch.long)
        self._bank_items = [(data, idx)]
        pos = torch.full((len(data),), -1, dtype=torch.long)
        pos[idx] = torch.arange(idx.numel())
        self._bank_pos = pos
        self.memory.build(data.retrieval[idx], bank_values(data, idx))

    @torch.no_grad()
    def _trajectories(self, data, idx, batch_size: int = 512) -> torch.Tensor:
        was = self.training
        self.eval()
        dev = next(self.parameters()).device
        out = []
        for s in range(0, idx.numel(), batch_size):
            j = idx[s: s + batch_size]
            L = max(1, int(data.event_lengths[j].max()))
            r = self.mhp(data.event_dt[j, :L].to(dev), data.event_marks[j, :L].to(dev), data.event_lengths[j].to(dev),
                         data.dt_end[j].to(dev))
            out.append(r["traj"])
        self.train(was)
        return torch.cat(out)

    @torch.no_grad()
    def refresh_bank(self) -> None:
        """Recompute every bank item's trajectory descriptor with the current MHP encoder."""
        if self.memory is None or self.mhp is None or not self._bank_items:
            return
        self.memory.set_trajectories(torch.cat([self._trajectories(d, i) for d, i in self._bank_items]))

    def update_bank(self, data, idx) -> None:
        """Fold newly arrived videos (labels known) into the hierarchical bank via cluster_update."""
        if self.memory is None:
            return
        idx = torch.as_tensor(idx, dtype=torch.long)
        traj = self._trajectories(data, idx) if self.mhp is not None else None
        ids = self.memory.update(data.retrieval[idx], bank_values(data, idx), traj)
        self._bank_items.append((data, idx))
        if self._bank_pos is not None and data is self._bank_items[0][0]:
            self._bank_pos[idx] = ids.cpu()  # a video never retrieves itself

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict:
        with nvtx_range("mvpp.model.temporal"):
            tokens = [self.text_proj(batch["text"]), self.ret_proj(batch["retrieval"]),
                      self.frames(batch["frames"], batch["frame_lengths"])["rep"]]
        out = {}
        traj = None
        if self.mhp is not None:
            with nvtx_range("mvpp.model.mhp"):
                m = self.mhp(batch["event_dt"], batch["event_marks"], batch["event_lengths"], batch["dt_end"])
            tokens.append(m["rep"])
            traj = m["traj"]
            out["nll"] = -m["loglik"] / batch["event_lengths"].clamp(min=1).float()
        extra = []
        if self.memory is not None:
            exclude = None
            if self._bank_pos is not None:
                exclude = self._bank_pos.to(batch["index"].device)[batch["index"]]
            with nvtx_range("mvpp.model.memory"):
                r = self.memory(batch["retrieval"], traj, exclude)
            tokens.append(r["rep"])
            extra.append((r["agg"][:, :1] - self.label_mean) / self.label_std)
        with nvtx_range("mvpp.model.fusion"):
            x = torch.stack(tokens, dim=1) + self.type_emb
            h, _ = self.fusion(x, x, x, need_weights=False)
            x = self.norm(x + h)
            feats = torch.cat([self.pool(x), x.flatten(1)] + extra, dim=1)
        out["pred"] = self.head(feats).squeeze(-1) * self.label_std + self.label_mean
        return out
