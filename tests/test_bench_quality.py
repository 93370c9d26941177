"""bench/quality.py on tiny images with the shipped Inception and EfficientNet networks: train then score
every metric, re-score a finished run from its checkpoint alone (loaded once, with its own config), and
the protocols' table and data checks."""
import sys

import pytest
import torch
import yaml
from PIL import Image

from conftest import ROOT, make_image_folder, tiny_config

sys.path.insert(0, str(ROOT / "bench"))
import quality  # noqa: E402
import run_vae  # noqa: E402


@pytest.fixture
def tiny_run(tmp_path):
    try:
        quality.run_vae.load_fid_network("", torch.device("cpu"))
        quality.run_vae.find_efficientnet_weights()
    except quality.run_vae.ConfigError as e:
        pytest.skip(f"a shipped evaluation network is not installed ({e})")
    images = make_image_folder(tmp_path / "images", per_class=8)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"image_size": 16, "cache_dir": str(tmp_path / "cache")},
        "model": {"latent_dim": 8, "conditional": True},
        "train": {"batch_size": 8, "precision": "fp32"}}))
    return images, config, tmp_path / "out"


def test_measure_trains_scores_and_rescoring_the_checkpoint_agrees(tiny_run, monkeypatch):
    images, config, out = tiny_run
    monkeypatch.setattr(run_vae, "cpu_has_native_bf16", lambda: True)  # where fid.precision=auto means bf16
    row = quality.measure(str(config), str(images), [], epochs=2, num_samples=12, num_real=10,
                          name="q", out_dir=str(out), recon=True, standard_prior=True)
    assert row["epochs"] == 2 and row["num_generated"] == 12 and row["num_real"] == 10
    # samples come from the prior fitted at the end of training; N(0, I) is scored beside it on request
    assert row["prior"] == "fitted at epoch 2"
    # on 12 samples of a 2-epoch model both score ~410 and may lie within 0.1 %; different samples still
    # never give the identical float
    assert row["standard_prior_fid"] > 0 and row["standard_prior_fid"] != row["fid"]
    assert row["fid"] > 0 and row["extractor"].startswith("tf-inception")
    assert not row["extractor"].endswith("+bf16")  # the protocol scores in fp32, like its published rows
    # the second feature space and the CVAE's class probe, on the same samples
    assert row["fd_eff"] > 0 and row["fd_eff_extractor"].startswith("efficientnet-lite0")
    assert row["pr_num"] == 10 and all(0 <= row[k] <= 1 for k in ("precision", "recall", "coverage", "class_acc_gen"))
    assert 0 <= row["class_acc_real"] <= 1 and "standard_prior_fd_eff" in row
    assert (out / "q" / "samples.png").is_file() and list((out.parent / "cache").glob("fid_real_*.pt"))
    # a decoder can follow the label under one prior and not the other, so N(0, I) gets its own class probe
    # and grid
    assert 0 <= row["standard_prior_class_acc_gen"] <= 1
    standard_grid = out / "q" / "samples_standard.png"
    assert standard_grid.is_file() and standard_grid.read_bytes() != (out / "q" / "samples.png").read_bytes()
    # the same weights scored again from the checkpoint: same z, same real set, same FID
    again = quality.measure(str(config), str(images), [], epochs=99, num_samples=12, num_real=10,
                            name="ignored", out_dir=str(out), checkpoint=str(out / "q" / "last.pt"), recon=True)
    assert again["epochs"] == 2 and again["fid"] == pytest.approx(row["fid"], rel=1e-6)
    for key in ("fd_eff", "precision", "recall", "density", "coverage", "class_acc_gen", "class_acc_real"):
        assert again[key] == pytest.approx(row[key], rel=1e-6), key
    table = quality.format_table([row, {**again, "variant": "again", "class_acc_gen": None}]).splitlines()
    assert table[0].split()[:3] == ["variant", "FID", "FD_eff"] and len(table) == 3
    assert f"{row['fid']:.2f}" in table[1] and f"{row['fd_eff']:.2f}" in table[1]
    assert " - " in table[2]  # a metric a row lacks
    assert f"class acc. {row['standard_prior_class_acc_gen']:.3f}" in table[1] and "class acc." not in table[2]
    # reconstructions: a separate score of the same weights, as reproducible as the sample FID
    assert row["recon_fid"] > 0 and row["recon_fid"] != pytest.approx(row["fid"], rel=1e-3)
    assert again["recon_fid"] == pytest.approx(row["recon_fid"], rel=1e-6)
    # the same noise at other temperatures: 1 reproduces the main score, a narrower prior gives other samples
    tempered = quality.measure(str(config), str(images), [], epochs=99, num_samples=12, num_real=10, name="t",
                               out_dir=str(out), checkpoint=str(out / "q" / "last.pt"), temperatures=[1.0, 0.25],
                               prior_components=[2])
    assert tempered["temperature_1"]["fid"] == pytest.approx(row["fid"], rel=1e-6)
    assert tempered["temperature_1"]["class_acc_gen"] == pytest.approx(row["class_acc_gen"], rel=1e-6)
    assert set(tempered["temperature_0.25"]) == set(quality.TEMPERED)
    assert tempered["temperature_0.25"]["fid"] != pytest.approx(row["fid"], rel=1e-6)
    lines = quality.format_table([tempered]).splitlines()
    assert lines[2].split()[:3] == ["at", "temperature", "1:"] and lines[3].split()[:3] == ["at", "temperature", "0.25:"]
    assert f"fid {tempered['temperature_0.25']['fid']:.3f}" in lines[3]
    # a grid per temperature beside samples.png: the same picture at 1, another at 0.25
    grid = Image.open(tempered["samples"]).tobytes()
    assert Image.open(tempered["samples_t1"]).tobytes() == grid
    assert Image.open(tempered["samples_t0.25"]).tobytes() != grid
    # the same weights with the prior refitted as a mixture: its own scores, line and grid
    assert set(tempered["components_2"]) == set(quality.TEMPERED)
    assert tempered["components_2"]["fid"] != pytest.approx(row["fid"], rel=1e-6)
    assert lines[4].split()[:4] == ["with", "2", "Gaussians", "per"]
    assert f"fid {tempered['components_2']['fid']:.3f}" in lines[4]
    assert Image.open(tempered["samples_k2"]).tobytes() != grid
    assert "recon_fid" not in quality.measure(str(config), str(images), [], epochs=1, num_samples=12,
                                              num_real=10, name="q1", out_dir=str(out))


def test_mixtures_of_several_sizes_share_one_encoding_of_the_training_images(tiny_run, monkeypatch):
    images, config, out = tiny_run
    quality.measure(str(config), str(images), [], epochs=1, num_samples=6, num_real=6, name="m", out_dir=str(out))
    calls = []
    encode = run_vae.encode_posteriors
    monkeypatch.setattr(run_vae, "encode_posteriors", lambda *a, **kw: calls.append(1) or encode(*a, **kw))
    row = quality.measure(str(config), str(images), [], epochs=1, num_samples=6, num_real=6, name="m2",
                          out_dir=str(out), checkpoint=str(out / "m" / "last.pt"), prior_components=[2, 3])
    assert len(calls) == 1 and {"components_2", "components_3"} <= set(row)


def test_extrapolated_labels_reach_the_decoder_only_and_leave_the_model_as_it_was():
    cfg = run_vae.load_config(None, {"data": {"image_size": 16}, "model": {"latent_dim": 8, "conditional": True,
                                                                           "class_norm": True}})
    model = run_vae.build_model(cfg, 3).eval()
    # a prior per class far apart: z drawn for class 0 must not be drawn from a blend of the classes
    model.set_prior(torch.arange(3.0)[:, None].expand(3, 8) * 5, torch.eye(8).expand(3, 8, 8))
    z, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 0])
    plain = model.decode(z, y)
    sampler = quality.with_extrapolated_labels(model, 2.0)
    # 1/3 + 2 (one-hot - 1/3): 5/3 for the class, -1/3 for the others, worked out by hand
    by_hand = torch.tensor([[5, -1, -1], [-1, 5, -1], [-1, -1, 5], [5, -1, -1]]) / 3
    with torch.no_grad():
        pushed = sampler.decode(z, y)
        assert torch.allclose(pushed, model.decode(z, by_hand), atol=1e-6) and not torch.allclose(pushed, plain)
        drawn = sampler.sample(4, y, generator=torch.Generator().manual_seed(0))
        eps = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(drawn, model.decode(model.prior_z(eps, y, None), by_hand), atol=1e-6)
        grid, _, _ = run_vae.sample_grid(sampler, ["a", "b", "c"], 2, seed=0)
        assert not torch.allclose(grid, run_vae.sample_grid(model, ["a", "b", "c"], 2, seed=0)[0])
        assert torch.allclose(quality.with_extrapolated_labels(model, 1.0).decode(z, y), plain, atol=1e-6)
    # the probe is a view: the model keeps its own decoder, weights and prior
    assert "decode" not in vars(model) and torch.equal(model.decode(z, y), plain)
    assert sampler.prior_mean.data_ptr() == model.prior_mean.data_ptr()


def test_label_scales_rescore_under_each_prior_and_scale_1_reproduces_the_run(tiny_run):
    images, config, out = tiny_run
    row = quality.measure(str(config), str(images), [], epochs=1, num_samples=12, num_real=10, name="g",
                          out_dir=str(out), standard_prior=True, label_scales=[1.0, 3.0])
    assert row["labels_1"]["fid"] == pytest.approx(row["fid"], rel=1e-4)
    assert row["labels_1_standard"]["fid"] == pytest.approx(row["standard_prior_fid"], rel=1e-4)
    for key in ("labels_3", "labels_3_standard"):
        assert set(row[key]) == set(quality.TEMPERED)
    assert row["labels_3"]["fid"] != pytest.approx(row["fid"], rel=1e-4)
    assert row["labels_3_standard"]["fid"] != pytest.approx(row["standard_prior_fid"], rel=1e-4)
    grid = Image.open(row["samples"]).tobytes()
    assert Image.open(row["samples_labels3"]).tobytes() != grid
    assert Image.open(row["samples_labels3_standard"]).tobytes() != Image.open(row["samples_standard"]).tobytes()
    lines = quality.format_table([row]).splitlines()
    assert "labels extrapolated x3 from N(0, I): fid" in "\n".join(lines)
    assert any(line.strip().startswith("labels extrapolated x3: fid") for line in lines)


def test_label_scales_on_an_unconditional_run_stop_before_training_or_scoring(tmp_path, monkeypatch):
    images = make_image_folder(tmp_path / "images", per_class=4)
    unconditional = run_vae.train(tiny_config(tmp_path, images, train={"epochs": 1}))
    monkeypatch.setattr(run_vae, "train", lambda cfg: pytest.fail("trained before the check"))
    monkeypatch.setattr(run_vae, "FIDScorer", lambda *a, **kw: pytest.fail("scored before the check"))
    with pytest.raises(run_vae.ConfigError, match="needs a conditional model"):
        quality.measure(None, str(images), ["model.conditional=false"], epochs=1, num_samples=4, num_real=4,
                        name="u", out_dir=str(tmp_path / "out"), label_scales=[2.0])
    with pytest.raises(run_vae.ConfigError, match="needs a conditional model"):
        quality.measure(None, str(images), [], epochs=1, num_samples=4, num_real=4, name="u2",
                        out_dir=str(tmp_path / "out"), checkpoint=f"{unconditional['run_dir']}/last.pt",
                        label_scales=[2.0])
    assert quality.parse_label_scales("1.5, 2") == [1.5, 2.0]
    with pytest.raises(SystemExit, match="greater than 0"):
        quality.parse_label_scales("2,0")


def test_protocols_name_their_data_and_a_missing_folder_says_what_to_do(tmp_path, capsys):
    assert quality.PROTOCOLS["impressionism"]["data"].parts[-3:] == ("shared", "data", "impressionism")
    assert quality.PROTOCOLS["apples"]["num_samples"] == quality.PROTOCOLS["apples"]["num_real"] == 2000
    assert all(p["config"].is_file() for p in quality.PROTOCOLS.values())
    with pytest.raises(SystemExit, match="does not exist.*prepare_data.py"):
        quality.resolve_data("apples", str(tmp_path / "nowhere"))
    images = make_image_folder(tmp_path / "images", per_class=2)
    assert quality.resolve_data("impressionism", str(images)) == str(images)


def test_prior_components_parse_and_a_wrong_one_says_what_to_give():
    assert quality.parse_components("") == [] and quality.parse_components("5, 10") == [5, 10]
    for text, says in [("5,x", "numbers separated by commas"), ("2.5", "whole numbers separated by commas"),
                       ("0", r"in \[1, 257\)"), ("300", r"in \[1, 257\)")]:
        with pytest.raises(SystemExit, match=says):
            quality.parse_components(text)


def test_temperatures_parse_and_a_wrong_one_says_what_to_give():
    assert quality.parse_temperatures("") == [] and quality.parse_temperatures("0.7, 0.5") == [0.7, 0.5]
    for text, says in [("0.7,x", "numbers separated by commas"), ("0.5,0", "greater than 0"),
                       ("nan", "greater than 0"), ("0.5,inf", "greater than 0")]:
        with pytest.raises(SystemExit) as e:
            quality.parse_temperatures(text)
        assert says in str(e.value)


def test_two_benches_started_in_the_same_second_get_different_run_names(monkeypatch):
    monkeypatch.setattr(quality.time, "strftime", lambda fmt: "20261203-101500")
    pids = iter([4101, 4102])
    monkeypatch.setattr(quality.os, "getpid", lambda: next(pids))
    first, second = quality.run_stamp(), quality.run_stamp()
    assert first != second and first.startswith("20261203-101500") and second.endswith("4102")


def test_the_loss_recipes_are_variants_and_configure_the_terms():
    import quality
    for name in ("plain", "perceptual", "adversarial", "both", "soft_intro"):
        cfg = run_vae.load_config(None, quality.VARIANTS[name])
        assert {k: cfg["loss"][k] for k in run_vae.LOSS_RECIPES[name]} == run_vae.LOSS_RECIPES[name]
    both = run_vae.load_config(None, quality.VARIANTS["both"])["loss"]
    assert both["perceptual"] > 0 and both["adversarial"] > 0
    assert run_vae.load_config(None, quality.VARIANTS["plain"])["loss"] == run_vae.DEFAULTS["loss"]


def test_a_stopped_or_misconfigured_bench_says_what_to_do_without_a_traceback(tmp_path, monkeypatch, capsys):
    images = make_image_folder(tmp_path / "images", per_class=2)
    argv = ["quality.py", "--data", str(images), "--out", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", argv + ["model.upsample=sideways"])
    with pytest.raises(SystemExit) as e:
        quality.main()
    assert str(e.value.code).startswith("error: model.upsample")

    def stopped(*args, **kwargs):
        raise run_vae.StopRequested("stopped at epoch 2 step 5; continue with --resume (somewhere/last.pt)")
    monkeypatch.setattr(quality, "measure", stopped)
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        quality.main()
    err = capsys.readouterr().err
    assert e.value.code == 130 and "somewhere/last.pt" in err and "--checkpoint" in err
