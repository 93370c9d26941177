"""Test mode: a checkpoint in, metrics.json, samples.png and reconstructions.png out; bad files refused."""
import json
import pickle

import pytest
import torch
from PIL import Image

import run_vae
from run_vae import CheckpointError, load_checkpoint, train
from conftest import tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from conftest import make_image_folder
    tmp = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(tmp, make_image_folder(tmp / "images"), model={"conditional": True})
    summary = train(cfg)
    return cfg, summary["best_checkpoint"]


def test_test_mode_writes_metrics_samples_and_reconstructions(trained, tmp_path):
    cfg, ckpt = trained
    test_cfg = run_vae.load_config(None, {
        "run": {"mode": "test", "name": "tiny", "log_dir": cfg["run"]["log_dir"]},
        "data": {"root": cfg["data"]["root"], "cache_dir": cfg["data"]["cache_dir"]},
        "test": {"checkpoint": ckpt, "out_dir": str(tmp_path / "out"), "samples_per_class": 5},
        "fid": {"enabled": False}})
    metrics = run_vae.test(test_cfg)
    out = tmp_path / "out"
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("val_recon", "val_kl", "val_neg_elbo", "val_bits_per_dim"):
        assert key in saved and saved[key] == pytest.approx(metrics[key])
    assert saved["num_val_images"] == 7  # 20% of 36, the images training never saw
    samples = Image.open(out / "samples.png")
    # one row per class: 3 rows of 16px images with 2px padding, plus a label margin on the left
    assert samples.height == 3 * 18 + 2 and samples.width > 5 * 18
    recon = Image.open(out / "reconstructions.png")
    assert recon.height == 2 * 18 + 2  # 7 images + 7 reconstructions = 14, 8 per row


def test_checkpoint_rebuilds_the_model_from_its_own_config(trained):
    _, ckpt_path = trained
    ckpt = load_checkpoint(ckpt_path)
    model = run_vae.model_from_checkpoint(ckpt)
    assert model.num_classes == 3 and model.latent_dim == 8 and not model.training


def test_missing_checkpoint_says_how_to_train(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist.*train_demo"):
        load_checkpoint(tmp_path / "none.pt")


def test_corrupt_checkpoint_is_a_clear_error(trained, tmp_path):
    _, ckpt_path = trained
    bad = tmp_path / "bad.pt"
    bad.write_bytes(open(ckpt_path, "rb").read()[:1000])
    with pytest.raises(CheckpointError, match="truncated copy"):
        load_checkpoint(bad)


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"format": "run_vae/1", "x": Payload()}, evil)
    with pytest.raises(CheckpointError, match="refused: it holds Python objects that would run code"):
        load_checkpoint(evil)
    assert "this must never run" not in capsys.readouterr().out


def test_foreign_checkpoint_is_rejected(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, other)
    with pytest.raises(CheckpointError, match="not a run_vae.py checkpoint"):
        load_checkpoint(other)


def test_weights_that_do_not_match_the_config_are_reported(trained, tmp_path):
    _, ckpt_path = trained
    ckpt = load_checkpoint(ckpt_path)
    ckpt["config"]["model"]["latent_dim"] = 16
    with pytest.raises(CheckpointError, match="do not match"):
        run_vae.model_from_checkpoint(ckpt)


def test_a_resize_decoder_run_loads_from_its_checkpoint_and_an_older_one_without_the_key_as_transposed(
        tmp_path, image_folder):
    summary = run_vae.train(tiny_config(tmp_path, image_folder, train={"epochs": 1}, model={"upsample": "resize"}))
    ckpt = load_checkpoint(summary["best_checkpoint"])
    model = run_vae.model_from_checkpoint(ckpt)
    assert any(isinstance(m, torch.nn.Upsample) for m in model.decoder)
    del ckpt["config"]["model"]["upsample"]  # a checkpoint from before the option: the original decoder
    with pytest.raises(CheckpointError, match="do not match"):
        run_vae.model_from_checkpoint(ckpt)
    ckpt["model"] = run_vae.VAE(16, 8).state_dict()
    assert any(isinstance(m, torch.nn.ConvTranspose2d) for m in run_vae.model_from_checkpoint(ckpt).decoder)


@pytest.mark.parametrize("upsample", ["resize", "bilinear"])
def test_a_final_conv_run_loads_from_its_checkpoint_and_an_older_one_without_the_key_as_before(
        tmp_path, image_folder, upsample):
    summary = run_vae.train(tiny_config(tmp_path, image_folder, train={"epochs": 1},
                                        model={"upsample": upsample, "final_conv": True, "res_blocks": 1}))
    ckpt = load_checkpoint(summary["best_checkpoint"])
    model = run_vae.model_from_checkpoint(ckpt)
    assert model.decoder[-2].in_channels == 32
    assert sum(isinstance(m, run_vae.ResBlock) for m in model.decoder) == 2
    assert {m.mode for m in model.decoder if isinstance(m, torch.nn.Upsample)} == {
        "nearest" if upsample == "resize" else "bilinear"}
    images, _, _ = run_vae.sample_grid(model, ckpt["classes"], 2, 0)
    assert images.shape[1:] == (3, 16, 16) and torch.isfinite(images).all()
    del ckpt["config"]["model"]["final_conv"]  # a checkpoint from before the options: pixels from the last doubling
    del ckpt["config"]["model"]["res_blocks"]
    ckpt["model"] = run_vae.VAE(16, 8, upsample=upsample).state_dict()
    assert run_vae.model_from_checkpoint(ckpt).decoder[-2].in_channels == 64


def test_a_narrow_run_loads_at_its_width_and_an_older_checkpoint_without_the_key_at_64(tmp_path, image_folder):
    summary = run_vae.train(tiny_config(tmp_path, image_folder, train={"epochs": 1}, model={"channels": 16}))
    ckpt = load_checkpoint(summary["best_checkpoint"])
    model = run_vae.model_from_checkpoint(ckpt)
    assert model.encoder[0].out_channels == 16 and model.decoder[0].in_channels == 128
    images, _, _ = run_vae.sample_grid(model, ckpt["classes"], 2, 0)
    assert images.shape[1:] == (3, 16, 16) and torch.isfinite(images).all()
    del ckpt["config"]["model"]["channels"]  # a checkpoint from before the option: the original widths
    with pytest.raises(CheckpointError, match="do not match"):
        run_vae.model_from_checkpoint(ckpt)
    ckpt["model"] = run_vae.VAE(16, 8).state_dict()
    assert run_vae.model_from_checkpoint(ckpt).encoder[0].out_channels == 64


def test_a_noisy_decoder_run_reproduces_its_samples_and_an_older_checkpoint_loads_without_noise(
        tmp_path, image_folder):
    summary = run_vae.train(tiny_config(tmp_path, image_folder, train={"epochs": 1}, model={"noise": True}))
    ckpt = load_checkpoint(summary["best_checkpoint"])
    model = run_vae.model_from_checkpoint(ckpt)
    noises = [m for m in model.decoder if isinstance(m, run_vae.NoiseInjection)]
    assert noises and any(n.weight.abs().sum() > 0 for n in noises)  # trained away from the silent start
    first, _, _ = run_vae.sample_grid(model, ckpt["classes"], 2, seed=5)
    again, _, _ = run_vae.sample_grid(model, ckpt["classes"], 2, seed=5)
    assert torch.equal(first, again)  # the same seed draws the same decoder noise too
    del ckpt["config"]["model"]["noise"]  # a checkpoint from before the option
    with pytest.raises(CheckpointError, match="do not match"):
        run_vae.model_from_checkpoint(ckpt)
    ckpt["model"] = run_vae.VAE(16, 8).state_dict()
    assert not any(isinstance(m, run_vae.NoiseInjection) for m in run_vae.model_from_checkpoint(ckpt).decoder)


def test_cli_test_mode_on_a_bad_checkpoint_exits_cleanly(tmp_path, capsys):
    (tmp_path / "t.yaml").write_text(f"run:\n  mode: test\ntest:\n  checkpoint: {tmp_path}/missing.pt\n")
    assert run_vae.main(["--config", str(tmp_path / "t.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("components", [0, 2])
def test_a_folder_with_more_classes_than_the_checkpoint_is_a_clear_error(trained, tmp_path, capsys, components):
    """The extra class has one image, which the checkpoint's split puts among the training images: the check
    reads every label, not only the held-out ones, and runs before a refit (test.prior_components) would fit
    a prior to a class the model does not have."""
    import shutil
    cfg, ckpt = trained
    more = tmp_path / "more"
    shutil.copytree(cfg["data"]["root"], more)
    (more / "zz_extra").mkdir()
    shutil.copy(next((more / "Red").glob("*.png")), more / "zz_extra" / "only.png")
    _, train_idx, val_idx = run_vae.load_data({**cfg, "data": {**cfg["data"], "root": str(more)}})
    assert len(train_idx) + len(val_idx) == 37 and 36 in train_idx.tolist()  # the extra image, in training
    (tmp_path / "t.yaml").write_text(
        f"run:\n  mode: test\ndata:\n  root: {more}\n  cache_dir: {tmp_path / 'cache'}\nfid:\n  enabled: false\n"
        f"test:\n  checkpoint: {ckpt}\n  out_dir: {tmp_path / 'out'}\n  prior_components: {components}\n")
    with pytest.warns(UserWarning, match="differ from the checkpoint"):
        assert run_vae.main(["--config", str(tmp_path / "t.yaml")]) == 2
    assert "data has 4 classes but the model knows 3" in capsys.readouterr().err
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_a_class_norm_run_learns_its_per_class_scales_samples_from_best_pt_and_resumes_only_with_them(
        tmp_path, image_folder):
    model = {"conditional": True, "class_norm": True}
    summary = train(tiny_config(tmp_path, image_folder, train={"epochs": 2}, model=model))
    ckpt = load_checkpoint(summary["best_checkpoint"])
    gammas = [v for k, v in ckpt["model"].items() if k.endswith(".gamma")]
    assert len(gammas) == 3 and all(g.abs().sum() > 0 for g in gammas)  # the label's scales were trained
    loaded = run_vae.model_from_checkpoint(ckpt)
    images, per_class, classes = run_vae.sample_grid(loaded, ckpt["classes"], 2, 0)
    assert images.shape[0] == 2 * len(ckpt["classes"]) and torch.isfinite(images).all()
    cfg = tiny_config(tmp_path, image_folder, train={"epochs": 2}, model=model)
    metrics = run_vae.test({**cfg, "test": {**cfg["test"], "checkpoint": summary["best_checkpoint"],
                                            "out_dir": str(tmp_path / "test")}})
    assert metrics["epoch"] == ckpt["epoch"] and (tmp_path / "test/samples.png").is_file()
    last = (tmp_path / "logs/tiny/last.pt").read_bytes()
    without = tiny_config(tmp_path, image_folder, train={"epochs": 3}, model={"conditional": True})
    with pytest.raises(run_vae.ConfigError, match="model.class_norm=True"):
        train(without, resume=True)
    assert (tmp_path / "logs/tiny/last.pt").read_bytes() == last


def test_an_image_only_encoder_run_fits_class_priors_from_its_codes_and_older_checkpoints_keep_the_label(
        tmp_path, image_folder):
    summary = train(tiny_config(tmp_path, image_folder, train={"epochs": 2},
                                model={"conditional": True, "encoder_label": False}))
    ckpt = load_checkpoint(summary["best_checkpoint"])
    model = run_vae.model_from_checkpoint(ckpt)
    assert model.encoder[0].in_channels == 3
    # each class's fitted mean is the mean code of that class's training images, whatever label is given
    images, train_idx, _ = run_vae.load_data(run_vae.merge_config(run_vae.DEFAULTS, ckpt["config"], "test"))
    data = images.subset(train_idx)
    with torch.no_grad():
        codes = model.encode(run_vae.to_float(data.images), torch.zeros(len(data), dtype=torch.long))[0]
    for c in range(len(ckpt["classes"])):
        assert torch.allclose(model.prior_mean[c], codes[data.labels == c].mean(0), atol=1e-4)
    cfg = tiny_config(tmp_path, image_folder, model={"conditional": True, "encoder_label": False})
    metrics = run_vae.test({**cfg, "test": {**cfg["test"], "checkpoint": summary["best_checkpoint"],
                                            "out_dir": str(tmp_path / "test")}})
    assert metrics["epoch"] == ckpt["epoch"] and (tmp_path / "test/samples.png").is_file()
    # a checkpoint written before the setting existed rebuilds the textbook CVAE it was
    textbook = train(tiny_config(tmp_path / "old", image_folder, train={"epochs": 1}, model={"conditional": True}))
    old = load_checkpoint(textbook["best_checkpoint"])
    del old["config"]["model"]["encoder_label"]
    assert run_vae.model_from_checkpoint(old).encoder[0].in_channels == 3 + len(old["classes"])
