"""Model components on mvpp_kernels' public ops (reference/cpu backends): what each guarantees."""
import math

import pytest
import torch
import torch.nn.functional as F

import mvpp_kernels as mk
from mvpp.data import generate, iterate_batches, split_indices
from mvpp.models import (MHPEncoder, MMRABaseline, ModelConfig, MVPPModel, NoRetrievalMLP, TemporalEnlargement,
                         TopologyMemoryBank, build_model)
from mvpp.models.baselines import BipolarInteraction


@pytest.fixture(scope="module")
def tiny():
    return generate("tiny", seed=1)


@pytest.fixture(scope="module")
def splits(tiny):
    return split_indices(len(tiny), "mmra")


def batch_of(data, idx):
    return next(iterate_batches(data, torch.as_tensor(idx), len(idx)))


# ------------------------------------------------------------------------------------------------ MHP
def test_mhp_loglik_is_the_hawkes_formula(tiny):
    torch.manual_seed(0)
    enc = MHPEncoder(3, d_model=8, d_state=4, d_out=8)
    b = batch_of(tiny, range(12))
    r = enc(b["event_dt"], b["event_marks"], b["event_lengths"], b["dt_end"])
    out, T = r["scan"], r["T"]
    assert torch.allclose(T, b["window"] * enc.time_scale, rtol=1e-5)
    mu, W = enc.mu.double(), enc.W.double()
    lam = mu[None, :, None] + torch.einsum("kd,bdl->bkl", W, out.y_left.double())  # (b, K, L)
    L = b["event_marks"].shape[1]
    valid = torch.arange(L)[None] < b["event_lengths"][:, None]
    at = lam.gather(1, b["event_marks"][:, None, :]).squeeze(1)
    expect = (torch.log(at) * valid).sum(1) - (T.double() * mu.sum() + (W @ out.integral.double().T).sum(0))
    assert torch.allclose(r["loglik"].double(), expect, rtol=1e-5, atol=1e-4)


def test_mhp_excitation_non_negative_by_construction(tiny):
    torch.manual_seed(1)
    enc = MHPEncoder(3, d_model=8, d_state=4, d_out=8)
    with torch.no_grad():  # adversarial weights: whatever the parameters, the excitation stays >= 0
        for p in enc.parameters():
            p.normal_(0, 3.0)
    b = batch_of(tiny, range(16))
    r = enc(b["event_dt"], b["event_marks"], b["event_lengths"], b["dt_end"])
    assert (r["scan"].y_left >= 0).all() and (r["scan"].integral >= 0).all()
    assert (enc.mu > 0).all() and (enc.W >= 0).all()
    assert torch.isfinite(r["loglik"]).all()


def test_mhp_is_causal_and_ignores_padding(tiny):
    torch.manual_seed(2)
    enc = MHPEncoder(3, d_model=8, d_state=4, d_out=8)
    i = int(torch.nonzero(tiny.event_lengths >= 5)[0])
    b = batch_of(tiny, [i])
    n = int(b["event_lengths"][0])
    base = enc(b["event_dt"], b["event_marks"], b["event_lengths"], b["dt_end"])["scan"].y_left
    marks = b["event_marks"].clone()
    marks[0, 3] = (marks[0, 3] + 1) % 3  # change event 3: the intensity up to and at t_3 must not move
    alt = enc(b["event_dt"], marks, b["event_lengths"], b["dt_end"])["scan"].y_left
    assert torch.equal(base[..., :4], alt[..., :4])
    assert not torch.allclose(base[..., 4:n], alt[..., 4:n])
    # garbage in the padding changes nothing
    pad_dt = torch.cat([b["event_dt"], torch.full((1, 5), 7.0)], 1)
    pad_mk = torch.cat([b["event_marks"], torch.full((1, 5), 2)], 1)
    p = enc(pad_dt, pad_mk, b["event_lengths"], b["dt_end"])
    q = enc(b["event_dt"], b["event_marks"], b["event_lengths"], b["dt_end"])
    assert torch.allclose(p["loglik"], q["loglik"]) and torch.allclose(p["rep"], q["rep"], atol=1e-6)


def test_mhp_gradients_reach_every_parameter(tiny):
    enc = MHPEncoder(3, d_model=8, d_state=4, d_out=8)
    b = batch_of(tiny, range(8))
    r = enc(b["event_dt"], b["event_marks"], b["event_lengths"], b["dt_end"])
    (r["rep"].sum() - r["loglik"].sum()).backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_mhp_intensity_matches_left_limits(tiny):
    enc = MHPEncoder(3, d_model=8, d_state=4, d_out=8)
    i = int(torch.nonzero(tiny.event_lengths >= 3)[0])
    b = batch_of(tiny, [i])
    r = enc(b["event_dt"], b["event_marks"], b["event_lengths"], b["dt_end"])
    n = int(b["event_lengths"][0])
    t = torch.cumsum(b["event_dt"][0, :n], 0)[None]
    lam = enc.intensity(b["event_dt"], b["event_marks"], b["event_lengths"], b["dt_end"], t)  # (1, n, K)
    expect = enc.mu[None, None] + torch.einsum("kd,bdl->blk", enc.W, r["scan"].y_left[..., :n])
    assert torch.allclose(lam.float(), expect.float(), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------- frame scoring
def test_temporal_enlargement_finds_marked_frames():
    torch.manual_seed(3)
    B, T, Fd = 6, 40, 12
    frames = torch.randn(B, T, Fd)
    marker = F.normalize(torch.randn(Fd), dim=0)
    lengths = torch.tensor([40, 33, 20, 11, 40, 25])
    hi = torch.stack([torch.randperm(int(n))[:2] for n in lengths])
    frames[torch.arange(B)[:, None], hi] += 6 * marker
    te = TemporalEnlargement(Fd, d_out=8, k=2, hidden=0)
    with torch.no_grad():
        te.score_w.copy_(marker * 5)
    out = te(frames, lengths)
    assert out["rep"].shape == (B, 8)
    for b in range(B):
        assert set(out["topk_idx"][b].tolist()) == set(hi[b].tolist())
        assert torch.isinf(out["scores"][b, int(lengths[b]):]).all()


def test_temporal_enlargement_scorer_learns_through_both_paths():
    te = TemporalEnlargement(12, d_out=8, k=3, hidden=6)
    frames, lengths = torch.randn(4, 20, 12), torch.tensor([20, 3, 1, 17])  # k > length for two videos
    out = te(frames, lengths)
    assert torch.isfinite(out["rep"]).all()
    out["rep"].sum().backward()
    for name in ("score_w", "W1", "b1"):
        g = getattr(te, name).grad
        assert g is not None and g.abs().sum() > 0, name
    assert ((out["gate"] > 0) & (out["gate"] < 1)).all()


# ------------------------------------------------------------------------------------------ memory bank
def test_bank_equals_exact_search_with_all_probes(tiny, splits):
    bank = TopologyMemoryBank(tiny.retrieval.shape[1], 1 + tiny.text.shape[1], 8, k=5)
    idx = splits["train"]
    vals = torch.cat([tiny.label[idx, None], tiny.text[idx]], 1)
    bank.build(tiny.retrieval[idx], vals)
    bank.nprobe = (bank.index.n_coarse, bank.index.n_fine)
    q = tiny.retrieval[splits["test"]]
    r = bank(q)
    _, exact = mk.exact_search(F.normalize(tiny.retrieval[idx], dim=1), F.normalize(q, dim=1), 5, metric="ip")
    assert torch.equal(r["ids"], exact)
    # MMRA eq. 4 by hand: softmax of the scaled similarities over the retrieved values
    s = (F.normalize(q, dim=1)[:, None] * F.normalize(tiny.retrieval[idx], dim=1)[exact]).sum(-1)
    w = torch.softmax(s * bank.log_inv_temp.exp(), dim=1)
    assert torch.allclose(r["agg"], (w[..., None] * vals[exact]).sum(1), atol=1e-4)


def test_bank_self_exclusion_update_and_gradient(tiny, splits):
    bank = TopologyMemoryBank(tiny.retrieval.shape[1], 2, 8, k=4)
    idx = splits["train"]
    bank.build(tiny.retrieval[idx], torch.stack([tiny.label[idx], tiny.upload_time[idx]], 1))
    own = torch.arange(10)
    r = bank(tiny.retrieval[idx[:10]], exclude=own)
    assert not (r["ids"] == own[:, None]).any()
    r0 = bank(tiny.retrieval[idx[:10]])
    assert (r0["ids"][:, 0] == own).all()  # without exclusion the video finds itself first
    new = splits["val"][:6]
    new_ids = bank.update(tiny.retrieval[new], torch.stack([tiny.label[new], tiny.upload_time[new]], 1))
    assert new_ids.tolist() == list(range(len(idx), len(idx) + 6))
    r1 = bank(tiny.retrieval[new])
    assert (r1["ids"][:, 0] == new_ids).all()  # the arrived videos are retrievable
    q = tiny.retrieval[splits["test"][:5]].clone().requires_grad_(True)
    bank(q)["rep"].sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ full models
@pytest.mark.parametrize("over", [{}, {"use_frame_scoring": False}, {"use_memory": False}, {"use_mhp": False},
                                  {"hierarchical_bank": False}])
def test_mvpp_model_variants_train_step(tiny, splits, over):
    torch.manual_seed(0)
    m = build_model("MVPPModel", tiny, ModelConfig(d=16, **over))
    m.set_label_stats(float(tiny.label.mean()), float(tiny.label.std()))
    m.attach_bank(tiny, splits["train"])
    m.refresh_bank()
    b = batch_of(tiny, splits["train"][:32])
    out = m(b)
    assert out["pred"].shape == (32,) and torch.isfinite(out["pred"]).all()
    assert ("nll" in out) == m.config.use_mhp
    loss = m.loss(b, out)
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_mvpp_update_bank_folds_new_videos(tiny, splits):
    m = build_model("MVPPModel", tiny, ModelConfig(d=16))
    m.attach_bank(tiny, splits["train"])
    m.refresh_bank()
    n0 = m.memory.size
    m.update_bank(tiny, splits["val"])
    assert m.memory.index.n_items == n0 + len(splits["val"])
    m.refresh_bank()  # trajectories of every item, including the new ones
    assert m.memory.bank_traj.shape[0] == n0 + len(splits["val"])
    m.eval()
    with torch.no_grad():
        out = m(batch_of(tiny, splits["val"][:8]))  # val videos never retrieve themselves
    assert torch.isfinite(out["pred"]).all()


# The full model, memory bank included, on both CPU backends: every op's backend choice is a
# trace-time constant, so nothing of mvpp_kernels breaks the graph.
@pytest.mark.parametrize("backend,over", [("reference", {}), ("cpu", {})])
def test_no_graph_breaks_from_our_ops(tiny, splits, monkeypatch, backend, over):
    monkeypatch.setenv("MVPP_BACKEND", backend)
    torch._dynamo.reset()
    m = build_model("MVPPModel", tiny, ModelConfig(d=16, **over))
    m.attach_bank(tiny, splits["train"])
    m.refresh_bank()
    m.eval()
    ex = torch._dynamo.explain(m)(batch_of(tiny, splits["test"][:8]))
    assert ex.graph_break_count == 0, [str(r.reason)[:200] for r in ex.break_reasons]
    assert ex.graph_count == 1
    torch._dynamo.reset()


def test_mmra_bipolar_attention_and_self_exclusion(tiny, splits):
    net = BipolarInteraction(8, alpha=0.6)
    assert net.beta == pytest.approx(-0.4)
    xv, xt = torch.randn(2, 10, 8), torch.randn(2, 4, 8)
    # the negative branch prefers the least similar keys: its weights are the positive ones' reverse order
    q, k = xt @ net.qkv["vp"].weight.chunk(3)[0].T, xv @ net.qkv["vp"].weight.chunk(3)[1].T
    s = q @ k.transpose(1, 2)
    pos, neg = torch.softmax(0.6 * s / math.sqrt(8), -1), torch.softmax(-0.4 * s / math.sqrt(8), -1)
    assert torch.equal(pos.argmax(-1), neg.argmin(-1))
    V, T = net(xv, xt)
    assert V.shape == (2, 8) and T.shape == (2, 8)
    m = MMRABaseline(tiny.frames.shape[-1], tiny.text.shape[1], tiny.retrieval.shape[1], ModelConfig(d=16))
    m.attach_bank(tiny, splits["train"])
    b = batch_of(tiny, splits["train"][:16])
    seen = {}
    real = mk.exact_search

    def spy(*a, **kw):
        out = real(*a, **kw)
        seen["ids"], seen["exclude"] = out[1], kw["exclude"]
        return out

    import mvpp.models._ops as ops

    orig = ops.op
    ops_mod_getattr = lambda name, comp="": spy if name == "exact_search" else orig(name, comp)  # noqa: E731
    try:
        import mvpp.models.baselines as bl

        bl.op = ops_mod_getattr
        out = m(b)
    finally:
        bl.op = orig
    assert torch.equal(seen["exclude"], torch.arange(16))
    assert not (seen["ids"] == seen["exclude"][:, None]).any()
    out["pred"].sum().backward()


def test_unavailable_op_gives_clear_error(monkeypatch):
    from mvpp.models import OpUnavailableError
    from mvpp.models._ops import op

    monkeypatch.delattr(mk, "frame_score")
    with pytest.raises(OpUnavailableError, match="TemporalEnlargement needs mvpp_kernels.frame_score"):
        op("frame_score", "TemporalEnlargement")
    with pytest.raises(OpUnavailableError):
        TemporalEnlargement(8)(torch.randn(1, 4, 8), torch.tensor([4]))
