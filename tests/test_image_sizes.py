"""data.image_size 128 and 256 end to end on a few tiny images: training with FID, test mode, the UI, and the
FID network's own resizing of such images."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import run_vae
from conftest import make_image_folder, tiny_config, tiny_features
from test_ui import expected_samples, start_app


@pytest.mark.parametrize("size", [128, 256])
def test_large_images_train_score_test_and_show_in_the_ui(tmp_path, monkeypatch, size):
    images = make_image_folder(tmp_path / "images", per_class=2, size=40)  # 6 images, upscaled to `size`
    cfg = tiny_config(tmp_path, images, data={"image_size": size, "val_fraction": 0.34}, model={"conditional": True},
                      train={"epochs": 1, "batch_size": 4},
                      fid={"enabled": True, "every": 1, "num_samples": 6, "real_max": 4, "batch_size": 3},
                      test={"samples_per_class": 2, "num_reconstructions": 2})
    summary = run_vae.train(cfg, fid_features=tiny_features())
    assert math.isfinite(summary["fid"]) and summary["val_neg_elbo"] > 0
    best = run_vae.load_checkpoint(summary["best_checkpoint"])
    assert run_vae.model_from_checkpoint(best).image_size == size
    test_cfg = run_vae.merge_config(cfg, {"run": {"mode": "test"}}, "test")
    metrics = run_vae.test(test_cfg, fid_features=tiny_features())
    assert math.isfinite(metrics["fid"])
    with Image.open(tmp_path / "logs/tiny/test/samples.png") as im:
        assert im.height == 3 * (size + 2) + 2  # one row of `size` px samples per class
    at = start_app(monkeypatch, tmp_path, "--checkpoint", summary["best_checkpoint"])  # the gallery
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    assert np.array_equal(at.session_state["samples_grid"], expected_samples(Path(summary["best_checkpoint"]), 6, 0, 1.0))


def test_the_fid_network_takes_128_and_256_pixel_images():
    net = run_vae.load_fid_network("", "cpu")
    for size in (128, 256):
        images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
        features = net(images)
        assert features.shape == (2, 2048) and torch.isfinite(features).all()
