"""Data: the synthetic MicroLens-like generator (default), the real MicroLens-100k layout, video frames."""
from .synthetic import PRESETS, SyntheticConfig, VideoData, generate, simulate_hawkes_exp
from .dataset import VideoDataset, collate_videos, iterate_batches, split_indices

__all__ = [
    "PRESETS",
    "SyntheticConfig",
    "VideoData",
    "VideoDataset",
    "collate_videos",
    "generate",
    "iterate_batches",
    "simulate_hawkes_exp",
    "split_indices",
]
