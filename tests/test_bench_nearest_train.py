"""bench/nearest_train.py on tiny images: distances to the nearest training image, and the probe of a run."""
import sys

import torch

from conftest import ROOT, make_image_folder, tiny_config

sys.path.insert(0, str(ROOT / "bench"))
import nearest_train  # noqa: E402
import run_vae  # noqa: E402


def test_a_training_image_is_at_distance_zero_and_others_at_their_nearest():
    train = torch.tensor([0, 255], dtype=torch.uint8)[:, None, None, None].expand(-1, 3, 2, 2)
    images = torch.tensor([0, 255, 51], dtype=torch.uint8)[:, None, None, None].expand(-1, 3, 2, 2)
    d = nearest_train.nearest_distances(images, train)
    assert torch.allclose(d, torch.tensor([0.0, 0.0, 0.2 * 12 ** 0.5]))  # 12 values, each 0.2 from black


def test_probe_reports_real_reconstructions_and_each_prior(tmp_path):
    images = make_image_folder(tmp_path / "images", per_class=8)
    cfg = tiny_config(tmp_path, images, model={"conditional": True}, train={"epochs": 1})
    summary = run_vae.train(cfg)
    rows = nearest_train.probe(f"{summary['run_dir']}/last.pt", str(images), components=[2], n=12)
    assert list(rows) == ["held-out real", "reconstructions", "samples, 1 per class", "samples, 2 per class"]
    for q in rows.values():
        assert 0 <= q["p10"] <= q["median"] <= q["p90"]
    assert rows["samples, 1 per class"] != rows["samples, 2 per class"]
