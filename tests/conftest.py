"""Shared fixtures: tiny generated image folders and configs, so tests need no download and run in seconds."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, os.cpu_count() or 1))

import run_vae  # noqa: E402

CLASS_COLOURS = {"Golden": (230, 200, 60), "Golden-Red": (220, 120, 50), "Red": (170, 20, 30)}


def make_image_folder(root, per_class=12, size=24, seed=0, classes=CLASS_COLOURS):
    """Coloured discs of varying radius/position on white, one folder per class, mixed sizes and modes."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for name, colour in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            s = size + (i % 3) * 4  # not all the same size: loading must resize
            yy, xx = np.mgrid[0:s, 0:s]
            (cx, cy), r = rng.uniform(0.4, 0.6, 2) * s, rng.uniform(0.25, 0.4) * s
            img = np.full((s, s, 3), 255, np.uint8)
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2] = colour
            ext = ".png" if i % 2 else ".jpg"
            Image.fromarray(img).save(root / name / f"{i:03d}{ext}")
    return root


def tiny_config(tmp_path, data_root, **sections):
    """A config that trains in about a second: 16x16 images, latent 8, FID off, all outputs in tmp_path."""
    updates = {
        "run": {"name": "tiny", "log_dir": str(tmp_path / "logs"), "best_dir": str(tmp_path / "best")},
        "data": {"root": str(data_root), "image_size": 16, "val_fraction": 0.2, "cache_dir": str(tmp_path / "cache")},
        "model": {"latent_dim": 8},
        # constant lr, no EMA or warm-ups: a few steps must visibly change the model
        "train": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "log_every": 2, "precision": "fp32",
                  "lr_schedule": "constant", "lr_warmup": 0.0, "ema": 0.0, "beta_warmup": 0},
        "fid": {"enabled": False},
    }
    for section, values in sections.items():
        updates.setdefault(section, {}).update(values)
    return run_vae.load_config(None, updates)


def tiny_features():
    """A fixed random conv net standing in for Inception: fast, still sees colour and shape, and counts
    the images it ran on (cache tests). The class is defined inside this function so that it is pickled
    by value: Ray's workers cannot import the test modules."""

    class TinyFeatures(nn.Module):
        num_features = 24
        name = "tiny-random-conv"

        def __init__(self):
            super().__init__()
            torch.manual_seed(123)
            self.net = nn.Sequential(nn.Conv2d(3, 12, 3, 2), nn.ReLU(), nn.Conv2d(12, 24, 3, 2), nn.ReLU(),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.calls = 0

        @torch.no_grad()
        def forward(self, x):
            self.calls += len(x)
            return self.net(x.float() / 255)

    return TinyFeatures()


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "images")


@pytest.fixture
def cfg(tmp_path, image_folder):
    return tiny_config(tmp_path, image_folder)
