"""data.image_size 128 and 256 end to end on a few tiny images: training with FID, test mode, the UI, and the
FID network's own resizing of such images."""
import math
import sys

import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

import run_vae
from conftest import ROOT, make_image_folder, tiny_config, tiny_features


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
    monkeypatch.setattr(sys, "argv", ["ui.py", "--best-dir", str(tmp_path / "best"), "--logs-dir",
                                      str(tmp_path / "logs"), "--checkpoint", summary["best_checkpoint"]])
    at = AppTest.from_file(str(ROOT / "ui.py"), default_timeout=120).run()
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    assert at.session_state["samples_grid"].shape[0] == 3 * (size + 2) + 2  # 3 classes of 8 samples
    assert len(at.image) == 3  # samples, reconstructions, interpolation


def test_the_fid_network_takes_128_and_256_pixel_images():
    net = run_vae.load_fid_network("", "cpu")
    for size in (128, 256):
        images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
        features = net(images)
        assert features.shape == (2, 2048) and torch.isfinite(features).all()
