"""Baselines, trained by the same loop as MVPPModel: MMRABaseline and NoRetrievalMLP; plus a
gradient-boosted-trees feature baseline (scikit-learn) fitted directly.

MMRABaseline follows seed 002 (MMRA, SIGIR 2024) on the inputs the synthetic data has:
  * visual tokens X_v = ReLU(W_v E_v) from 10 uniformly sampled frames (linspace);
  * textual tokens X_t = ReLU(W_t e_t) reshaped into `text_tokens` tokens (our text feature is one
    pooled vector, MMRA's is a word sequence);
  * cross-modal bipolar interaction: positive attention Softmax(alpha QK^T/sqrt d)V and negative
    attention Softmax(-(1 - alpha) QK^T/sqrt d)V in both directions, the FFN fusion
    T~ = ReLU(X_t + (V^P (+) V^N) W_1) W_2 (and the visual counterpart), attentive pooling;
  * retrieval: flat exact top-k maximum inner product search (`mvpp_kernels.exact_search`, self
    excluded) over the training videos' retrieval vectors; the retrieved videos' visual/textual
    inputs and labels are aggregated with eq. 4's softmax of the similarity scores
    (`mvpp_kernels.retrieval_aggregate`). Deviation, for cost: we aggregate the retrieved raw inputs
    and run the interaction network once on the aggregate, instead of aggregating per-instance token
    embeddings (identical for the linear label encoder);
  * interactions: inner products of every pair of [V, T, V^r, T^r, L^r]; MLP head; MSE loss.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ._ops import op
from .common import MLP, AttentivePooling, ModelConfig, PopularityModel
from .temporal import uniform_frame_indices

__all__ = ["MMRABaseline", "NoRetrievalMLP", "BipolarInteraction", "gbt_features", "fit_gbt"]


def sample_uniform_frames(frames: torch.Tensor, lengths: torch.Tensor, samples: int) -> torch.Tensor:
    idx = uniform_frame_indices(lengths, samples)
    return frames.gather(1, idx[:, :, None].expand(-1, -1, frames.shape[-1]))


class BipolarInteraction(nn.Module):
    """MMRA's cross-modal bipolar interaction network (eqs. 2-3 and the modified FFN)."""

    def __init__(self, d: int, alpha: float = 0.6):
        super().__init__()
        self.d, self.alpha, self.beta = d, alpha, -(1.0 - alpha)
        self.qkv = nn.ModuleDict({n: nn.Linear(d, 3 * d, bias=False) for n in ("vp", "vn", "tp", "tn")})
        self.ffn_t = nn.ModuleList([nn.Linear(2 * d, d), nn.Linear(d, d)])
        self.ffn_v = nn.ModuleList([nn.Linear(2 * d, d), nn.Linear(d, d)])
        self.pool_v, self.pool_t = AttentivePooling(d), AttentivePooling(d)

    def _att(self, name, xq, xkv, scale):
        Wq, Wk, Wv = self.qkv[name].weight.chunk(3, dim=0)
        q, k, v = xq @ Wq.T, xkv @ Wk.T, xkv @ Wv.T
        a = torch.softmax(scale * (q @ k.transpose(1, 2)) / math.sqrt(self.d), dim=-1)
        return a @ v

    def forward(self, xv, xt):  # (batch, nv, d), (batch, nt, d)
        vp = self._att("vp", xt, xv, self.alpha)  # textually guided positive visual features (nt rows)
        vn = self._att("vn", xt, xv, self.beta)
        tp = self._att("tp", xv, xt, self.alpha)  # visually guided positive textual features (nv rows)
        tn = self._att("tn", xv, xt, self.beta)
        t = self.ffn_t[1](F.relu(xt + self.ffn_t[0](torch.cat([vp, vn], -1))))
        v = self.ffn_v[1](F.relu(xv + self.ffn_v[0](torch.cat([tp, tn], -1))))
        return self.pool_v(v), self.pool_t(t)


class MMRABaseline(PopularityModel):
    def __init__(self, frame_dim: int, text_dim: int, retrieval_dim: int, config: ModelConfig | None = None,
                 text_tokens: int = 4):
        super().__init__()
        cfg = self.config = config or ModelConfig()
        d = cfg.d
        self.samples, self.text_tokens, self.frame_dim = cfg.uniform_frames, text_tokens, frame_dim
        self.dims = dict(frame_dim=frame_dim, text_dim=text_dim, retrieval_dim=retrieval_dim)
        self.vis = nn.Linear(frame_dim, d)
        self.txt = nn.Linear(text_dim, text_tokens * d)
        self.label_enc = nn.Linear(1, d)
        self.net = BipolarInteraction(d, cfg.mmra_alpha)
        self.head = MLP(5 * d + 10, 2 * d, 1, cfg.dropout)
        self._bank_keys = self._bank_values = self._bank_pos = None

    def attach_bank(self, data, train_idx) -> None:
        idx = torch.as_tensor(train_idx, dtype=torch.long)
        frames = sample_uniform_frames(data.frames[idx], data.frame_lengths[idx], self.samples)
        self._bank_keys = F.normalize(data.retrieval[idx].float(), dim=1)
        self._bank_values = torch.cat([frames.flatten(1), data.text[idx], data.label[idx, None]], dim=1).float()
        pos = torch.full((len(data),), -1, dtype=torch.long)
        pos[idx] = torch.arange(idx.numel())
        self._bank_pos = pos

    def _encode(self, frames10, text):
        xv = F.relu(self.vis(frames10))
        xt = F.relu(self.txt(text)).view(text.shape[0], self.text_tokens, -1)
        return self.net(xv, xt)

    def forward(self, batch: dict) -> dict:
        exact_search = op("exact_search", "MMRABaseline")
        retrieval_aggregate = op("retrieval_aggregate", "MMRABaseline")
        if self._bank_keys is None:
            raise RuntimeError("MMRABaseline needs attach_bank(data, train_idx) before forward")
        dev = batch["text"].device
        frames10 = sample_uniform_frames(batch["frames"], batch["frame_lengths"], self.samples)
        V, T = self._encode(frames10, batch["text"])
        keys = self._bank_keys.to(dev)
        exclude = self._bank_pos.to(dev)[batch["index"]]
        k = min(self.config.k_retrieval, keys.shape[0] - 1)
        scores, ids = exact_search(keys, F.normalize(batch["retrieval"].float(), dim=1), k, metric="ip",
                                   exclude=exclude, backend=self.config.backend)
        valid = ids >= 0
        vals = self._bank_values.to(dev)[ids.clamp(min=0)]
        agg = retrieval_aggregate(batch["retrieval"].float(), torch.where(valid, scores, torch.zeros_like(scores)),
                                  vals, valid=valid)
        nf = self.samples * self.frame_dim
        rf = agg[:, :nf].view(-1, self.samples, self.frame_dim)
        rt = agg[:, nf:-1]
        rl = (agg[:, -1:] - self.label_mean) / self.label_std
        Vr, Tr = self._encode(rf, rt)
        Lr = self.label_enc(rl)
        reps = [V, T, Vr, Tr, Lr]
        inter = [(reps[i] * reps[j]).sum(-1, keepdim=True) / math.sqrt(V.shape[1])
                 for i in range(5) for j in range(i + 1, 5)]
        pred = self.head(torch.cat(reps + inter, dim=1)).squeeze(-1)
        return {"pred": pred * self.label_std + self.label_mean}


class NoRetrievalMLP(PopularityModel):
    """Content only: text, retrieval vector and the mean of 10 uniformly sampled frames -> MLP."""

    def __init__(self, frame_dim: int, text_dim: int, retrieval_dim: int, config: ModelConfig | None = None):
        super().__init__()
        cfg = self.config = config or ModelConfig()
        self.samples = cfg.uniform_frames
        self.dims = dict(frame_dim=frame_dim, text_dim=text_dim, retrieval_dim=retrieval_dim)
        self.mlp = MLP(frame_dim + text_dim + retrieval_dim, 2 * cfg.d, 1, cfg.dropout)

    def forward(self, batch: dict) -> dict:
        f = sample_uniform_frames(batch["frames"], batch["frame_lengths"], self.samples).mean(1)
        x = torch.cat([f, batch["text"], batch["retrieval"]], dim=1)
        return {"pred": self.mlp(x).squeeze(-1) * self.label_std + self.label_mean}


def gbt_features(data, idx) -> np.ndarray:
    """Hand-made features: content, mean/max-pooled frames, per-mark event counts, first/last gaps."""
    idx = torch.as_tensor(idx, dtype=torch.long)
    fr = data.frames[idx]
    lens = data.frame_lengths[idx].clamp(min=1)
    mask = (torch.arange(fr.shape[1])[None, :] < lens[:, None]).unsqueeze(-1)
    mean = (fr * mask).sum(1) / lens[:, None]
    mx = fr.masked_fill(~mask, float("-inf")).amax(1)
    el = data.event_lengths[idx]
    valid = torch.arange(data.event_marks.shape[1])[None, :] < el[:, None]
    counts = torch.stack([((data.event_marks[idx] == m) & valid).sum(1) for m in range(data.n_marks)], 1)
    dt = data.event_dt[idx]
    first = dt[:, 0]
    span = (dt * valid).sum(1)
    feats = [data.text[idx], data.retrieval[idx], mean, mx, torch.log1p(counts.float()),
             torch.log1p(el.float())[:, None], first[:, None], span[:, None], data.window[idx, None]]
    return torch.cat([f.float() for f in feats], dim=1).numpy()


def fit_gbt(data, train_idx, seed: int = 0, max_iter: int = 200):
    """Fit sklearn's HistGradientBoostingRegressor (early stopping on an internal split).

    Raises ImportError naming the package if scikit-learn is missing."""
    try:
        from sklearn.ensemble import HistGradientBoostingRegressor
    except ImportError as e:
        raise ImportError("the gradient-boosted-trees baseline needs scikit-learn (pip install scikit-learn)") from e
    model = HistGradientBoostingRegressor(max_iter=max_iter, learning_rate=0.05, early_stopping=True,
                                          random_state=seed)
    model.fit(gbt_features(data, train_idx), data.label[torch.as_tensor(train_idx)].numpy())
    return model
