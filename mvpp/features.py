"""Frame and text features with transformers models loaded from LOCAL paths only.

* frames: a ViT or CLIP vision encoder; the feature of a frame is its CLS token (last hidden state
  at position 0; for CLIP the pooled, post-layernorm CLS). Frames are resized to the model's
  image size and normalised with its image processor's mean/std when it has one (else 0.5/0.5).
* text: a text encoder (BERT-like); the feature is the attention-masked mean of the last hidden state.

Models are only ever read from disk: the path must exist, every `from_pretrained` call passes
`local_files_only=True`, and `HF_HUB_OFFLINE=1` is set for the process if the user has not set it, so
nothing is downloaded at run time.

Cache: one safetensors file per (model, video) under `<cache>/<model key>/<video id>.safetensors`,
where the model key is the model folder's name plus a hash of its config.json; a re-run reads the
cached files and only computes what is missing. `extract_microlens_features` also writes the
assembled table `<cache>/features.safetensors` that `mvpp train --data microlens:<dir> --features
<cache>` reads.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

__all__ = ["model_key", "load_vision_model", "load_text_model", "frame_features", "text_features",
           "extract_microlens_features", "load_feature_table", "FeatureCache"]


def _require_local(path: str, what: str) -> str:
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"{what} {path!r} is not a local folder. mvpp loads models from local paths only "
                                f"(nothing is downloaded): save one with model.save_pretrained(DIR) and pass DIR")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{what} {path!r} has no config.json: is it a transformers model folder?")
    return path


def model_key(path: str) -> str:
    with open(os.path.join(path, "config.json"), "rb") as f:
        h = hashlib.sha256(f.read()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(os.path.normpath(path))) or "model"
    return f"{name}-{h}"


def _import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("features need transformers: pip install transformers (the mvpp[video] extra)") from e
    return transformers


def load_vision_model(path: str, device="cpu"):
    """(model, preprocess info) for a local ViT/CLIP vision model folder."""
    tr = _import_transformers()
    _require_local(path, "vision model")
    cfg = tr.AutoConfig.from_pretrained(path, local_files_only=True)
    if cfg.model_type == "clip":
        model = tr.CLIPVisionModel.from_pretrained(path, local_files_only=True)
        vcfg = cfg.vision_config
    elif cfg.model_type == "clip_vision_model":
        model = tr.CLIPVisionModel.from_pretrained(path, local_files_only=True)
        vcfg = cfg
    else:
        model = tr.AutoModel.from_pretrained(path, local_files_only=True)
        vcfg = cfg
    mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    if os.path.exists(os.path.join(path, "preprocessor_config.json")):
        with open(os.path.join(path, "preprocessor_config.json")) as f:
            pp = json.load(f)
        mean, std = pp.get("image_mean", mean), pp.get("image_std", std)
    size = int(getattr(vcfg, "image_size", 224))
    info = {"size": size, "mean": torch.tensor(mean).view(1, 3, 1, 1), "std": torch.tensor(std).view(1, 3, 1, 1),
            "clip": cfg.model_type.startswith("clip")}
    return model.to(device).eval(), info


def load_text_model(path: str, device="cpu"):
    tr = _import_transformers()
    _require_local(path, "text model")
    tok = tr.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = tr.AutoModel.from_pretrained(path, local_files_only=True)
    return model.to(device).eval(), tok


@torch.no_grad()
def frame_features(model, info, frames: np.ndarray, batch_size: int = 16, device="cpu") -> torch.Tensor:
    """frames (k, H, W, 3) uint8 -> (k, hidden) float32 CLS features."""
    out = []
    for s in range(0, len(frames), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(frames[s: s + batch_size])).permute(0, 3, 1, 2).float() / 255.0
        x = torch.nn.functional.interpolate(x, size=(info["size"], info["size"]), mode="bilinear", align_corners=False)
        x = ((x - info["mean"]) / info["std"]).to(device)
        o = model(pixel_values=x)
        if info["clip"] and getattr(o, "pooler_output", None) is not None:
            out.append(o.pooler_output.float().cpu())
        else:
            out.append(o.last_hidden_state[:, 0].float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def text_features(model, tokenizer, texts: list, batch_size: int = 32, max_length: int = 64, device="cpu"):
    out = []
    for s in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[s: s + batch_size]), padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(device)
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        out.append(((h * m).sum(1) / m.sum(1).clamp(min=1)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


class FeatureCache:
    """<root>/<model key>/<video id>.safetensors holding the tensors of one (model, video)."""

    def __init__(self, root: str, key: str):
        self.dir = os.path.join(root, key)
        os.makedirs(self.dir, exist_ok=True)

    def path(self, vid: str) -> str:
        return os.path.join(self.dir, re.sub(r"[^A-Za-z0-9_.-]", "_", str(vid)) + ".safetensors")

    def get(self, vid: str):
        from safetensors.torch import load_file

        p = self.path(vid)
        if not os.path.exists(p):
            return None
        try:
            return load_file(p)
        except Exception:  # a torn/corrupt cache entry is recomputed
            return None

    def put(self, vid: str, tensors: dict) -> None:
        from safetensors.torch import save

        from .train import atomic_write_bytes

        atomic_write_bytes(self.path(vid), save({k: v.contiguous() for k, v in tensors.items()}))


def extract_microlens_features(root: str, out: str, vision_model: str, text_model: str, frames: int = 10,
                               dense_every: int = 0, dense_cap: int = 128, batch_size: int = 16, device="cpu",
                               video_backend: str = "auto", progress: bool = True) -> dict:
    """Features of every kept video of a MicroLens-layout folder; unreadable/missing videos are skipped
    and counted. Writes the per-video cache and `<out>/features.safetensors`; returns a summary."""
    from tqdm.auto import tqdm

    from .data.microlens import find_video, read_microlens
    from .data.video import VideoReadError, sample_video

    table = read_microlens(root)
    vmodel, vinfo = load_vision_model(vision_model, device)
    tmodel, tok = load_text_model(text_model, device)
    vcache = FeatureCache(out, model_key(vision_model) + f"-u{frames}-d{dense_every}x{dense_cap}")
    tcache = FeatureCache(out, model_key(text_model))
    ids, feats, texts, skipped = [], [], [], {}
    for vid in tqdm(table.ids, desc="videos", disable=not progress):
        cached = vcache.get(vid)
        if cached is None:
            path = find_video(root, vid)
            if path is None:
                skipped[vid] = f"{vid}.mp4 not found under {root!r}"
                continue
            try:
                s = sample_video(path, frames, dense_every, dense_cap, backend=video_backend)
            except VideoReadError as e:
                skipped[vid] = str(e)
                continue
            fr = s["dense"] if dense_every else s["uniform"]
            cached = {"frames": frame_features(vmodel, vinfo, fr, batch_size, device)}
            vcache.put(vid, cached)
        t = tcache.get(vid)
        if t is None:
            t = {"text": text_features(tmodel, tok, [table.titles.get(vid, "")], device=device)[0]}
            tcache.put(vid, t)
        ids.append(vid)
        feats.append(cached["frames"])
        texts.append(t["text"])
    if not ids:
        raise RuntimeError(f"no video of {root!r} could be read ({len(skipped)} skipped); first reasons: "
                           f"{list(skipped.values())[:3]}")
    T = max(f.shape[0] for f in feats)
    F = feats[0].shape[1]
    fr = torch.zeros(len(ids), T, F)
    for i, f in enumerate(feats):
        fr[i, : f.shape[0]] = f
    from safetensors.torch import save

    from .train import atomic_write_bytes

    table_t = {"frames": fr, "frame_lengths": torch.tensor([f.shape[0] for f in feats]), "text": torch.stack(texts)}
    atomic_write_bytes(os.path.join(out, "features.safetensors"),
                       save(table_t, metadata={"ids": json.dumps(ids), "vision_model": vcache.dir,
                                               "text_model": tcache.dir}))
    return {"videos": len(ids), "skipped": len(skipped), "skipped_reasons": skipped,
            "dropped_zero_comment": table.dropped_zero_comment, "frames_per_video": T, "frame_dim": F,
            "text_dim": int(table_t["text"].shape[1]), "table": os.path.join(out, "features.safetensors")}


def load_feature_table(out: str) -> dict:
    from safetensors import safe_open

    p = os.path.join(out, "features.safetensors")
    if not os.path.exists(p):
        raise FileNotFoundError(f"{p!r} not found: run `mvpp features --root ... --out {out}` first")
    with safe_open(p, framework="pt") as f:
        meta = f.metadata() or {}
        t = {k: f.get_tensor(k) for k in f.keys()}
    t["ids"] = json.loads(meta.get("ids", "[]"))
    return t
