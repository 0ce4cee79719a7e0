"""MicroLens-100k layout loader, video sampling (decord and PyAV) and transformers features, on a tiny
fixture the tests write themselves (videos with PyAV, models from tiny random configs; nothing is
downloaded)."""
import json
import math
import os

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

from mvpp.data.microlens import event_streams, load_microlens, read_microlens  # noqa: E402
from mvpp.data.video import (VideoReadError, dense_indices, sample_video, sample_videos,  # noqa: E402
                             uniform_indices)


def write_video(path, n_frames, w=32, h=24):
    c = av.open(str(path), "w")
    s = c.add_stream("mpeg4", rate=10)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    for i in range(n_frames):
        img = np.full((h, w, 3), (i * 9) % 250, np.uint8)
        for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    root = tmp_path_factory.mktemp("microlens")
    (root / "videos").mkdir()
    titles = {1: "a cat, jumping", 2: "cooking fail", 3: "dance trend", 4: "no comments here", 5: "missing video",
              6: "corrupt video"}
    with open(root / "MicroLens-100k_title_en.csv", "w") as f:
        f.write("item,title\n")
        for k, v in titles.items():
            f.write(f'{k},"{v}"\n')
    with open(root / "MicroLens-100k_likes_and_views.txt", "w") as f:
        for k in titles:
            f.write(f"{k}\t{10 * k}\t{100 * k}\n")
    comments = {1: 3, 2: 1, 3: 8, 5: 2, 6: 4}  # video 4: zero comments -> dropped
    with open(root / "MicroLens-100k_comment_en.txt", "w") as f:
        for k, n in comments.items():
            for u in range(n):
                f.write(f"{100 + u}\t{k}\tnice video {u}\n")
    t0 = 1_600_000_000_000
    with open(root / "MicroLens-100k_pairs.csv", "w") as f:
        f.write("user,item,timestamp\n")
        for k in titles:
            for j in range(k + 1):  # video k: k + 1 interactions, one hour apart, shuffled order
                f.write(f"{j},{k},{t0 + ((j * 7) % (k + 1)) * 3_600_000}\n")
    for k, n in ((1, 12), (2, 30), (3, 5), (4, 8)):
        write_video(root / "videos" / f"{k}.mp4", n)
    (root / "videos" / "6.mp4").write_bytes(b"this is not an mp4 file" * 10)
    return root


def test_read_layout_labels_and_drop(layout):
    t = read_microlens(str(layout))
    assert t.ids == ["1", "2", "3", "5", "6"]  # video 4 has no comments: dropped
    assert t.dropped_zero_comment == 1
    np.testing.assert_allclose(t.label, np.log2([3, 1, 8, 2, 4]))
    assert t.titles["1"] == "a cat, jumping"
    assert t.likes["3"] == 30 and t.views["3"] == 300
    assert np.all(np.diff(t.interactions["3"]) >= 0) and t.interactions["3"].size == 4


def test_event_streams(layout):
    t = read_microlens(str(layout))
    dt, marks, lengths, dt_end, window = event_streams(t, max_events=3, window_hours=10.0)
    # video "1": 2 interactions 1 h apart -> gaps [0, 1], window 10 h
    assert lengths[0] == 2 and dt[0, :2].tolist() == [0.0, 1.0] and dt_end[0] == pytest.approx(9.0)
    # video "3": 4 interactions, L = 3 -> cut just before the 4th (at 3 h)
    assert lengths[2] == 3 and window[2] == pytest.approx(3.0) and dt_end[2] == pytest.approx(1.0)
    np.testing.assert_allclose(dt.sum(1) + dt_end, window, atol=1e-6)


def test_missing_file_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="MicroLens-100k_title_en.csv is missing"):
        read_microlens(str(tmp_path))


def test_mmra_split_of_kept_videos():
    from mvpp.data.microlens import microlens_split

    sp = microlens_split(50)
    assert sorted(torch.cat([sp["train"], sp["val"], sp["test"]]).tolist()) == list(range(50))
    assert len(sp["test"]) == 5 and len(sp["val"]) == 5


@pytest.mark.parametrize("backend", ["av", "decord"])
def test_sample_video_backends(layout, backend):
    if backend == "decord":
        pytest.importorskip("decord")
    s = sample_video(str(layout / "videos" / "2.mp4"), samples=10, dense_every=4, dense_cap=5, backend=backend)
    assert s["n_frames"] == 30
    assert s["uniform"].shape == (10, 24, 32, 3) and s["dense"].shape == (5, 24, 32, 3)
    # frame i has gray level 9 i (mpeg4 is lossy: compare loosely)
    exp = (uniform_indices(30, 10) * 9) % 250
    np.testing.assert_allclose(s["uniform"][:, 5, 5, 0].astype(float), exp, atol=12)
    np.testing.assert_allclose(s["dense"][:, 5, 5, 0].astype(float), (np.arange(0, 20, 4) * 9) % 250, atol=12)


def test_decord_and_av_agree(layout):
    pytest.importorskip("decord")
    p = str(layout / "videos" / "1.mp4")
    a = sample_video(p, 10, backend="av")["uniform"].astype(int)
    d = sample_video(p, 10, backend="decord")["uniform"].astype(int)
    assert np.abs(a - d).max() <= 3
    # repeated batched reads (the leak workaround path) keep returning the same frames
    for _ in range(3):
        assert np.array_equal(sample_video(p, 10, backend="decord")["uniform"].astype(int), d)


def test_bad_videos_are_skipped_and_counted(layout):
    from mvpp.data.video import SampleReport

    rep = SampleReport()
    items = [("1", str(layout / "videos" / "1.mp4")), ("5", str(layout / "videos" / "5.mp4")),
             ("6", str(layout / "videos" / "6.mp4")), ("3", str(layout / "videos" / "3.mp4"))]
    got = [vid for vid, _ in sample_videos(items, samples=4, backend="av", report=rep)]
    assert got == ["1", "3"] and rep.n_skipped == 2
    assert "does not exist" in rep.skipped["5"] and "cannot be decoded" in rep.skipped["6"]
    with pytest.raises(VideoReadError, match="does not exist"):
        sample_video(str(layout / "videos" / "nope.mp4"))


def test_sampling_index_rules():
    assert uniform_indices(100, 10).tolist() == np.linspace(0, 99, 10).round().astype(int).tolist()
    assert dense_indices(10, 3, 100).tolist() == [0, 3, 6, 9]
    assert dense_indices(100, 1, 7).tolist() == list(range(7))
    with pytest.raises(ValueError, match="every >= 1"):
        dense_indices(10, 0, 5)
    with pytest.raises(ValueError, match="no frames"):
        uniform_indices(0)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    tr = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("models")
    vit = tr.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       image_size=32, patch_size=16)
    torch.manual_seed(0)
    tr.ViTModel(vit).save_pretrained(d / "vit")
    clip = tr.CLIPVisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                               image_size=32, patch_size=16, projection_dim=8)
    tr.CLIPVisionModel(clip).save_pretrained(d / "clip")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "jumping", "cooking", "fail", "dance",
             "trend", "video", "missing", "corrupt", "no", "comments", "here", ","]
    (d / "bert").mkdir()
    (d / "bert" / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = tr.BertTokenizerFast(vocab_file=str(d / "bert" / "vocab.txt"))
    tok.save_pretrained(d / "bert")
    bert = tr.BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)
    tr.BertModel(bert).save_pretrained(d / "bert")
    return d


@pytest.mark.parametrize("vision", ["vit", "clip"])
def test_features_end_to_end_and_cache(layout, tiny_models, tmp_path, vision):
    from mvpp.features import extract_microlens_features, load_feature_table

    out = tmp_path / "feats"
    s = extract_microlens_features(str(layout), str(out), str(tiny_models / vision), str(tiny_models / "bert"),
                                   frames=4, dense_every=2, dense_cap=6, progress=False, video_backend="av")
    assert s["videos"] == 3 and s["skipped"] == 2 and s["dropped_zero_comment"] == 1
    t = load_feature_table(str(out))
    assert t["ids"] == ["1", "2", "3"]
    assert t["frames"].shape == (3, 6, 16) and t["text"].shape == (3, 16)
    # video 3 has 5 frames -> dense every 2nd: 0, 2, 4 -> 3 frames; the rest is padding
    assert t["frame_lengths"].tolist() == [6, 6, 3] and (t["frames"][2, 3:] == 0).all()
    assert torch.isfinite(t["frames"]).all() and t["frames"][0, 0].abs().sum() > 0
    # the cache: a second run computes nothing new and gives the same table
    mtimes = {p: os.path.getmtime(p) for p in out.rglob("*.safetensors") if p.name != "features.safetensors"}
    extract_microlens_features(str(layout), str(out), str(tiny_models / vision), str(tiny_models / "bert"),
                               frames=4, dense_every=2, dense_cap=6, progress=False, video_backend="av")
    assert {p: os.path.getmtime(p) for p in mtimes} == mtimes
    assert torch.equal(load_feature_table(str(out))["frames"], t["frames"])
    data = load_microlens(str(layout), t["frames"], t["frame_lengths"], t["text"], t["ids"])
    assert len(data) == 3 and data.ids == ["1", "2", "3"]
    np.testing.assert_allclose(data.label.numpy(), np.log2([3, 1, 8]), rtol=1e-6)


def test_features_refuse_non_local_model(layout, tmp_path):
    pytest.importorskip("transformers")
    from mvpp.features import load_vision_model

    with pytest.raises(FileNotFoundError, match="local paths only"):
        load_vision_model("google/vit-base-patch16-224")
    assert os.environ.get("HF_HUB_OFFLINE") == "1" or "HF_HUB_OFFLINE" in os.environ
