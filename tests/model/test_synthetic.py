import numpy as np
import pytest
import torch

from mvpp.data import PRESETS, VideoDataset, collate_videos, generate, iterate_batches, simulate_hawkes_exp, split_indices
from mvpp.data.synthetic import uniform_frame_grid


@pytest.fixture(scope="module")
def tiny():
    return generate("tiny", seed=3)


def test_deterministic_and_seeded(tiny):
    again = generate("tiny", seed=3)
    for f in tiny.TENSOR_FIELDS:
        assert torch.equal(getattr(tiny, f), getattr(again, f)), f
    other = generate("tiny", seed=4)
    assert not torch.equal(tiny.label, other.label)


def test_shapes_and_padding(tiny):
    cfg = PRESETS["tiny"]
    n, T, F = len(tiny), cfg.frames, cfg.frame_dim
    assert tiny.frames.shape == (n, T, F)
    assert ((tiny.frame_lengths >= T // 2) & (tiny.frame_lengths <= T)).all()
    L = cfg.max_events
    assert tiny.event_dt.shape == (n, L) and tiny.event_marks.shape == (n, L)
    valid = torch.arange(L)[None] < tiny.event_lengths[:, None]
    assert (tiny.event_dt[~valid] == 0).all() and (tiny.event_dt[valid] >= 0).all()
    assert set(tiny.event_marks[valid].unique().tolist()) <= {0, 1, 2}
    # the window: gaps + last gap add up to it
    total = tiny.event_dt.sum(1) + tiny.dt_end
    assert torch.allclose(total, tiny.window, atol=1e-5)
    assert (tiny.window <= cfg.t_obs + 1e-6).all()
    # frames past each length are zero
    pad = torch.arange(T)[None] >= tiny.frame_lengths[:, None]
    assert (tiny.frames[pad] == 0).all()
    assert torch.allclose(tiny.retrieval.norm(dim=1), torch.ones(n), atol=1e-5)


def test_highlights_off_the_uniform_grid(tiny):
    hi = tiny.latents["highlight_idx"]
    for i in range(len(tiny)):
        grid = set(uniform_frame_grid(int(tiny.frame_lengths[i]), 10).tolist())
        assert not (set(hi[i].tolist()) & grid)
        assert (hi[i] < tiny.frame_lengths[i]).all()


def test_label_depends_on_each_hidden_factor():
    d = generate("small", seed=0)
    y = d.label.numpy()
    for k in ("quality", "highlight", "topic_pop"):
        assert np.corrcoef(d.latents[k].numpy(), y)[0, 1] > 0.3, k
    assert np.corrcoef(np.log(1 - d.latents["branching"].numpy()), y)[0, 1] < -0.3
    assert y.std() > 1.0


def test_hawkes_simulation_matches_theory():
    # univariate, constant baseline: E[N(T)] ~ mu T / (1 - n) for T >> 1 / beta
    rng = np.random.default_rng(0)
    n, mu, br, beta, H = 400, 2.0, 0.5, 5.0, 50.0
    out = simulate_hawkes_exp(np.full((n, 1), mu), np.full((n, 1), mu), np.full((n, 1, 1), br * beta),
                              np.full(n, beta), t_obs=H, horizon=H, max_events=4, rng=rng, count_mark=0)
    expected = mu * H / (1 - br) - mu * br / (beta * (1 - br) ** 2)  # stationary mean minus the start-up transient
    got = out["count"].mean()
    se = out["count"].std() / np.sqrt(n)
    assert abs(got - expected) < 4 * se, (got, expected, se)
    # the stored window times are increasing and within [0, H]
    t = out["times"][:, :4]
    assert (np.diff(t, axis=1)[~np.isnan(np.diff(t, axis=1))] >= 0).all()


def test_dataset_collate_and_batches(tiny):
    ds = VideoDataset(tiny, torch.arange(5))
    items = [ds[i] for i in range(5)]
    b = collate_videos(items)
    m = int(tiny.event_lengths[:5].max())
    assert b["event_dt"].shape == (5, max(1, m))
    assert torch.equal(b["frame_lengths"], tiny.frame_lengths[:5])
    fb = next(iterate_batches(tiny, torch.arange(5), 5))
    assert torch.equal(fb["event_dt"], b["event_dt"]) and torch.equal(fb["frames"][:, : b["frames"].shape[1]], b["frames"])


@pytest.mark.parametrize("n", [1000, 2000, 17, 19738])
def test_mmra_split_equals_sklearn(n):
    from sklearn.model_selection import train_test_split

    sp = split_indices(n, "mmra")
    tr, rest = train_test_split(np.arange(n), test_size=0.2, random_state=9)
    va, te = train_test_split(rest, test_size=0.5, random_state=18)
    for k, ref in (("train", tr), ("val", va), ("test", te)):
        assert sp[k].tolist() == sorted(ref.tolist()), k
    if n == 1000:
        assert [len(sp[k]) for k in ("train", "val", "test")] == [800, 100, 100]
    with pytest.raises(ValueError, match="unknown split scheme"):
        split_indices(10, "nope")


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        generate("huge")
