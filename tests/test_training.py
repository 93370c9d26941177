"""Training: the loss goes down, resume is exact, checkpoints survive crashes, bad runs stop clearly."""
import contextlib
import os
import pickle
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import run_vae
from run_vae import ConfigError, TrainingDiverged, load_checkpoint, train
from conftest import ROOT, tiny_config


@contextlib.contextmanager
def interrupted_during_step(step):
    """SIGINT delivered while training step `step` (0-based) runs, as a user's Ctrl-C would land."""
    real = run_vae.train_step

    def step_then_interrupt(run, *args):
        out = real(run, *args)
        if run.step == step:
            os.kill(os.getpid(), signal.SIGINT)
        return out
    run_vae.train_step = step_then_interrupt
    try:
        yield
    finally:
        run_vae.train_step = real


def weights(path, key="model"):
    return load_checkpoint(path)[key]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_short_training_lowers_the_loss_and_writes_run_files(cfg):
    cfg["train"]["epochs"] = 4
    losses = []
    summary = train(cfg, report=lambda epoch, m, run_dir: losses.append(m["loss"]))
    assert len(losses) == 4 and losses[-1] < 0.7 * losses[0]
    run_dir = ROOT.__class__(summary["run_dir"])
    assert (run_dir / "last.pt").is_file() and (run_dir / "config.yaml").is_file()
    assert list(run_dir.glob("events.out.tfevents.*"))
    last = load_checkpoint(run_dir / "last.pt")
    assert {k: v for k, v in last["config"].items() if k != "fid"} == {k: v for k, v in cfg.items() if k != "fid"}
    assert last["config"]["fid"]["every"] == 5  # 'auto' is saved resolved: the run records what it did
    assert last["epoch"] == 4 and last["classes"] == ["Golden", "Golden-Red", "Red"]
    assert all(isinstance(v, float) for v in last["metrics"].values())
    best = load_checkpoint(summary["best_checkpoint"])  # chosen by val neg. ELBO since FID is off
    assert best["metrics"]["val_neg_elbo"] == pytest.approx(summary["best"]["value"])


def test_tensorboard_gets_scalars_grids_and_kl_per_dim(cfg):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg["model"]["conditional"] = True
    summary = train(cfg)
    acc = EventAccumulator(summary["run_dir"], size_guidance={"images": 0, "histograms": 0}).Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "train/recon", "train/kl", "train/beta", "train/lr", "epoch/val_neg_elbo",
                "epoch/active_units"):
        assert tag in tags["scalars"], tag
    assert {"samples", "reconstructions"} <= set(tags["images"])
    assert "latent/kl_per_dim" in tags["histograms"]


def test_training_is_reproducible_from_the_seed(tmp_path, image_folder):
    a = train(tiny_config(tmp_path, image_folder, run={"name": "a"}))
    b = train(tiny_config(tmp_path, image_folder, run={"name": "b"}))
    assert_same_weights(weights(a["run_dir"] + "/last.pt"), weights(b["run_dir"] + "/last.pt"))


@pytest.mark.parametrize("extras", [{}, {"train": {"ema": 0.9, "lr_schedule": "cosine", "beta_cycle": 2},
                                         "data": {"hflip": True}, "model": {"conditional": True, "noise": True, "class_norm": True}}])
def test_resume_after_an_epoch_equals_an_uninterrupted_run(tmp_path, image_folder, extras):
    others = {k: v for k, v in extras.items() if k != "train"}
    train_keys = {"epochs": 3, **extras.get("train", {})}
    full = tiny_config(tmp_path, image_folder, run={"name": "full"}, train=train_keys, **others)
    part = tiny_config(tmp_path, image_folder, run={"name": "part"}, train=train_keys, **others)
    train(full)
    train(part, max_epochs=1)
    assert load_checkpoint(tmp_path / "logs/part/last.pt")["epoch"] == 1
    train(part, resume=True)
    for key in ("model", "optimizer"):
        a, b = weights(tmp_path / "logs/full/last.pt", key), weights(tmp_path / "logs/part/last.pt", key)
        if key == "model":
            assert_same_weights(a, b)
        else:
            assert all(torch.equal(a["state"][k]["exp_avg"], b["state"][k]["exp_avg"]) for k in a["state"])


def test_ctrl_c_mid_epoch_saves_and_resume_is_exact(tmp_path, image_folder):
    full = tiny_config(tmp_path, image_folder, run={"name": "full"}, train={"epochs": 3})
    part = tiny_config(tmp_path, image_folder, run={"name": "part"}, train={"epochs": 3})
    train(full)

    with pytest.raises(run_vae.StopRequested, match="--resume"):
        with interrupted_during_step(3):  # epoch 1 has steps 0-2: a Ctrl-C in epoch 2's first step
            train(part)
    saved = load_checkpoint(tmp_path / "logs/part/last.pt")
    assert saved["epoch"] == 1 and saved["batch_in_epoch"] == 1  # stopped inside epoch 2
    best = load_checkpoint(tmp_path / "best/part.pt")  # FID off: fitted on stopping, not every epoch
    assert best["epoch"] == 1 and best["prior_epoch"] == 1
    train(part, resume=True)
    assert_same_weights(weights(tmp_path / "logs/full/last.pt"), weights(tmp_path / "logs/part/last.pt"))


def test_existing_run_folder_is_not_overwritten_without_resume(cfg):
    train(cfg)
    before = (ROOT.__class__(cfg["run"]["log_dir"]) / "tiny" / "last.pt").read_bytes()
    with pytest.raises(ConfigError, match="already holds a checkpoint.*--resume"):
        train(cfg)
    assert (ROOT.__class__(cfg["run"]["log_dir"]) / "tiny" / "last.pt").read_bytes() == before


def test_resume_without_a_checkpoint_is_a_clear_error(cfg):
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(cfg, resume=True)


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(cfg, monkeypatch):
    cfg["train"]["epochs"] = 3
    real_loss, calls = run_vae.vae_loss, {"n": 0}

    def loss_that_explodes_in_epoch_two(x, x_hat, mu, logvar):
        recon, kl, kl_dim = real_loss(x, x_hat, mu, logvar)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] > 4:  # epoch 1 has 3 steps
                recon = recon * float("nan")
        return recon, kl, kl_dim
    monkeypatch.setattr(run_vae, "vae_loss", loss_that_explodes_in_epoch_two)
    with pytest.raises(TrainingDiverged, match="holds epoch 1, the last state with finite metrics"):
        train(cfg)
    last = load_checkpoint(ROOT.__class__(cfg["run"]["log_dir"]) / "tiny" / "last.pt")
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_kill_9_during_checkpoint_writes_leaves_a_loadable_file(tmp_path):
    target = tmp_path / "last.pt"
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from run_vae import atomic_save
        i = 0
        while True:
            i += 1
            atomic_save({{"format": "run_vae/1", "i": i, "w": torch.full((1_000_000,), float(i))}}, {str(target)!r})
            if i == 1:
                print("first", flush=True)
    """)
    for delay in (0.05, 0.2, 0.45):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "first"
        import time
        time.sleep(delay)
        proc.kill()  # SIGKILL: no handler runs
        proc.wait()
        ckpt = torch.load(target, weights_only=True)
        assert torch.all(ckpt["w"] == ckpt["i"])


def test_cuda_request_without_gpu_is_a_clear_error(cfg):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    cfg["run"]["device"] = "cuda"
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        train(cfg)


def test_precision_choices(monkeypatch):
    cpu = torch.device("cpu")
    assert run_vae.pick_precision("fp32", cpu) is None
    assert run_vae.pick_precision("bf16", cpu) is torch.bfloat16
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        run_vae.pick_precision("fp16", cpu)
    monkeypatch.setattr(run_vae, "cpu_has_native_bf16", lambda: False)
    assert run_vae.pick_precision("auto", cpu) is None
    monkeypatch.setattr(run_vae, "cpu_has_native_bf16", lambda: True)
    assert run_vae.pick_precision("auto", cpu) is torch.bfloat16
    assert run_vae.pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_gpu_choices_without_a_gpu(monkeypatch):
    cuda = torch.device("cuda")  # a device object needs no GPU; pick_precision only asks what it supports
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **kw: True)
    assert run_vae.pick_precision("auto", cuda) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **kw: False)  # pre-Ampere: fp16 + scaler
    assert run_vae.pick_precision("auto", cuda) is torch.float16
    assert run_vae.pick_precision("fp16", cuda) is torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert run_vae.pick_device("auto") == cuda


def test_fp16_path_with_its_grad_scaler_trains(cfg, monkeypatch):
    # what an older GPU runs; CPU autocast and GradScaler take float16 too, so the code path runs here
    monkeypatch.setattr(run_vae, "pick_precision", lambda name, device: torch.float16)
    cfg["train"]["epochs"] = 3
    losses = []
    summary = train(cfg, report=lambda e, m, d: losses.append(m["loss"]))
    assert losses[-1] < losses[0]
    scaler = load_checkpoint(summary["run_dir"] + "/last.pt")["scaler"]
    assert scaler["scale"] < 2.0 ** 16  # enabled (a disabled scaler saves {}), and it skipped overflowing steps


def test_bf16_training_runs_and_lowers_the_loss(cfg):
    cfg["train"].update(precision="bf16", epochs=3)
    losses = []
    train(cfg, report=lambda e, m, d: losses.append(m["loss"]))
    assert losses[-1] < losses[0]


def test_cli_trains_from_a_yaml_file(tmp_path, image_folder):
    cfg_file = tmp_path / "t.yaml"
    cfg_file.write_text(f"run:\n  name: cli\n  log_dir: {tmp_path}/logs\n  best_dir: {tmp_path}/best\n"
                        f"data:\n  root: {image_folder}\n  image_size: 16\n  cache_dir: {tmp_path}/c\n"
                        f"fid:\n  enabled: false\n")
    r = subprocess.run([sys.executable, str(ROOT / "run_vae.py"), "--config", str(tmp_path / "t"),
                        "train.epochs=1", "train.batch_size=8", "--latent_dim", "8"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "done: best val_neg_elbo" in r.stdout and (tmp_path / "best" / "cli.pt").is_file()
    assert load_checkpoint(tmp_path / "best" / "cli.pt")["config"]["model"]["latent_dim"] == 8


def test_grad_clip_caps_every_update_and_logs_the_norm(cfg, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg["train"].update(grad_clip=0.5, log_every=1)
    real_clip, seen = torch.nn.utils.clip_grad_norm_, []

    def recording_clip(params, max_norm, *args, **kwargs):
        params = list(params)
        before = real_clip(params, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        seen.append((float(before), float(after), max_norm))
        return before
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    summary = train(cfg)
    assert seen and all(m == 0.5 for _, _, m in seen)
    assert all(before > 0.5 for before, _, _ in seen)  # the summed loss's gradients are far above 0.5
    assert all(after == pytest.approx(0.5, rel=1e-3) for _, after, _ in seen)
    logged = EventAccumulator(summary["run_dir"]).Reload().Scalars("train/grad_norm")
    assert [e.value for e in logged] == pytest.approx([b for b, _, _ in seen], rel=1e-5)


def test_lr_warmup_shows_in_the_logged_lr_and_resumes_in_place(tmp_path, image_folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    # 36 images, 20% held out, batch 8: 3 steps per epoch; warm-up over 2 epochs = 6 steps
    keys = {"epochs": 3, "lr": 0.01, "lr_warmup": 2, "log_every": 1}
    full = train(tiny_config(tmp_path, image_folder, run={"name": "full"}, train=keys))
    lrs = [e.value for e in EventAccumulator(full["run_dir"]).Reload().Scalars("train/lr")]
    # get_last_lr() after step s is the lr of step s + 1
    assert lrs == pytest.approx([0.01 * min(1.0, (s + 1) / 6) for s in range(1, 10)])
    part = tiny_config(tmp_path, image_folder, run={"name": "part"}, train=keys)
    train(part, max_epochs=1)
    train(part, resume=True)
    assert_same_weights(weights(tmp_path / "logs/full/last.pt"), weights(tmp_path / "logs/part/last.pt"))


def test_checkpoints_carry_the_prior_fitted_to_their_own_weights(tmp_path, image_folder):
    cfg = tiny_config(tmp_path, image_folder, model={"conditional": True}, train={"epochs": 2})
    summary = train(cfg)
    last = load_checkpoint(tmp_path / "logs/tiny/last.pt")
    best = load_checkpoint(summary["best_checkpoint"])
    assert last["prior_epoch"] == 2 and best["prior_epoch"] == best["epoch"]
    model = run_vae.model_from_checkpoint(last)
    saved = model.prior_mean.clone(), model.prior_scale_tril.clone()
    assert not torch.equal(saved[1][0], torch.eye(8))  # no longer N(0, I)
    data, train_idx, _ = run_vae.load_data(cfg)
    run_vae.fit_prior(model, data.subset(train_idx), "cpu")  # refit from the saved weights: the same prior
    assert torch.allclose(model.prior_mean, saved[0], atol=1e-5)
    assert torch.allclose(model.prior_scale_tril, saved[1], atol=1e-5)
    # test mode says which prior it sampled from
    assert run_vae.test({**cfg, "test": {**cfg["test"], "checkpoint": str(tmp_path / "logs/tiny/last.pt"),
                                          "out_dir": str(tmp_path / "t")}})["prior"] == "fitted at epoch 2"


def test_a_mixture_prior_is_fitted_saved_and_sampled_in_test_mode(tmp_path, image_folder):
    cfg = tiny_config(tmp_path, image_folder, model={"conditional": True, "prior_components": 3},
                      train={"epochs": 1, "ema": 0.9})
    summary = train(cfg)
    last = load_checkpoint(f"{summary['run_dir']}/last.pt")  # the EMA's averaged buffers keep the fit too
    for name in ("prior_mix_weight", "prior_mix_mean", "prior_mix_scale_tril"):
        assert torch.equal(last["raw_model"][name], last["model"][name]), name
    model = run_vae.model_from_checkpoint(load_checkpoint(summary["best_checkpoint"]))
    weight = model.prior_mix_weight
    assert torch.allclose(weight.sum(1), torch.ones(3)) and not torch.allclose(weight, torch.full((3, 3), 1 / 3))
    saved = model.prior_state()
    data, train_idx, _ = run_vae.load_data(cfg)
    run_vae.fit_prior(model, data.subset(train_idx), "cpu")  # seeded EM: a refit gives the same mixture
    for name, value in saved.items():
        assert torch.allclose(getattr(model, name), value, atol=1e-4), name
    out = run_vae.test({**cfg, "test": {**cfg["test"], "out_dir": str(tmp_path / "t")}})
    assert out["prior"] == "fitted at epoch 1, 3 Gaussians per class" and (tmp_path / "t" / "samples.png").is_file()
    # the same weights with one Gaussian per class draw other samples from the same noise
    grid = run_vae.sample_grid(model, data.classes, 2, 0)[0]
    single = run_vae.model_from_checkpoint(load_checkpoint(summary["best_checkpoint"]))
    single.prior_components = 1
    assert not torch.allclose(grid, run_vae.sample_grid(single, data.classes, 2, 0)[0])
    import ui  # the gallery works in one Gaussian per class: a mixture checkpoint draws there, and says so
    noise, label = ui.prior_noise(2, model.latent_dim, 0), ui.one_hot(model, 1, 2)
    assert torch.equal(ui.decode_noise(model, noise, label), ui.decode_noise(single, noise, label))
    _, meta = ui.load_model(summary["best_checkpoint"], 0.0)
    assert meta["prior"].endswith("3 Gaussians per class; the gallery draws from each class's single Gaussian")


def test_a_resume_with_another_number_of_gaussians_is_refused_and_points_to_test_mode(tmp_path, image_folder):
    cfg = tiny_config(tmp_path, image_folder, model={"conditional": True}, train={"epochs": 2})
    train(cfg, max_epochs=1)
    other = {**cfg, "model": {**cfg["model"], "prior_components": 3}}
    with pytest.raises(ConfigError, match=r"prior_components=1.*run.mode=test test.checkpoint=.*last.pt "
                                          r"test.prior_components=3"):
        train(other, resume=True)
    with pytest.raises(ConfigError) as refused:  # another model change gets no such pointer
        train({**cfg, "model": {**cfg["model"], "latent_dim": 4}}, resume=True)
    assert "test.prior_components" not in str(refused.value)


def test_test_mode_samples_a_finished_run_from_a_mixture_fitted_to_its_weights(tmp_path, image_folder, monkeypatch):
    cfg = tiny_config(tmp_path, image_folder, model={"conditional": True}, train={"epochs": 1})
    summary = train(cfg)
    builds = []
    def counted(*args, **kwargs):
        builds.append(1)
        return model_from_checkpoint(*args, **kwargs)
    model_from_checkpoint = run_vae.model_from_checkpoint
    monkeypatch.setattr(run_vae, "model_from_checkpoint", counted)
    def test_mode(components, out):
        return run_vae.test({**cfg, "test": {**cfg["test"], "prior_components": components,
                                             "out_dir": str(tmp_path / out), "samples_per_class": 2}})
    assert test_mode(0, "own")["prior"] == "fitted at epoch 1"
    assert test_mode(1, "own1")["prior"] == "fitted at epoch 1"  # its own size: its own fit, as with 0
    assert (tmp_path / "own1/samples.png").read_bytes() == (tmp_path / "own/samples.png").read_bytes()
    builds.clear()
    mixed = test_mode(3, "mixed")
    assert len(builds) == 1  # the checkpoint goes straight into the model of the asked size
    assert mixed["prior"] == "refitted to epoch 1's weights by test mode, 3 Gaussians per class"
    ckpt = load_checkpoint(summary["best_checkpoint"])
    data, train_idx, _ = run_vae.load_data(cfg)
    by_hand = run_vae.build_model(cfg | {"model": {**cfg["model"], "prior_components": 3}}, len(data.classes))
    by_hand.load_state_dict(run_vae.with_prior_buffers(by_hand, ckpt["model"]))  # the mixture's: until fit_prior
    run_vae.fit_prior(by_hand.eval(), data.subset(train_idx), "cpu")
    images, nrow, labels = run_vae.sample_grid(by_hand, data.classes, 2, cfg["run"]["seed"])
    run_vae.make_grid_image(images, nrow, labels).save(tmp_path / "by_hand.png")
    assert (tmp_path / "mixed/samples.png").read_bytes() == (tmp_path / "by_hand.png").read_bytes()
    assert (tmp_path / "mixed/samples.png").read_bytes() != (tmp_path / "own/samples.png").read_bytes()
    assert load_checkpoint(summary["best_checkpoint"])["config"]["model"]["prior_components"] == 1  # untouched
    standard = tiny_config(tmp_path, image_folder, run={"name": "std"}, model={"prior": "standard"},
                           train={"epochs": 1})
    train(standard)
    with pytest.raises(ConfigError, match="refits a fitted prior only"):
        run_vae.test({**standard, "test": {**standard["test"], "prior_components": 3, "out_dir": str(tmp_path / "s")}})


def test_without_fid_the_prior_is_fitted_once_at_the_end_and_best_gets_its_own(tmp_path, image_folder, monkeypatch):
    cfg = tiny_config(tmp_path, image_folder, model={"conditional": True}, train={"epochs": 3})
    fits, scripted_elbo = [], iter([30.0, 20.0, 25.0])  # epoch 2 is the best, 3 the last
    fit_prior, evaluate_elbo = run_vae.fit_prior, run_vae.evaluate_elbo

    def counting_fit(model, data, *a, **kw):
        fits.append(len(data))
        return fit_prior(model, data, *a, **kw)

    def scripted(*a, **kw):
        metrics, kl_dims = evaluate_elbo(*a, **kw)
        return {**metrics, "val_neg_elbo": next(scripted_elbo)}, kl_dims
    monkeypatch.setattr(run_vae, "fit_prior", counting_fit)
    monkeypatch.setattr(run_vae, "evaluate_elbo", scripted)
    summary = train(cfg)
    assert len(fits) == 2  # the last epoch's weights, then best.pt's: not one fit per epoch
    best, last = load_checkpoint(summary["best_checkpoint"]), load_checkpoint(tmp_path / "logs/tiny/last.pt")
    assert (best["epoch"], best["prior_epoch"], last["prior_epoch"]) == (2, 2, 3)
    assert run_vae.prior_description(best) == "fitted at epoch 2"
    model = run_vae.model_from_checkpoint(best)
    saved = model.prior_mean.clone(), model.prior_scale_tril.clone()
    data, train_idx, _ = run_vae.load_data(cfg)
    fit_prior(model, data.subset(train_idx), "cpu")  # best.pt's prior is the fit of best.pt's weights
    assert torch.allclose(model.prior_mean, saved[0], atol=1e-5)
    assert torch.allclose(model.prior_scale_tril, saved[1], atol=1e-5)
    assert not torch.allclose(saved[0], run_vae.model_from_checkpoint(last).prior_mean, atol=1e-3)
    assert run_vae.prior_description({**best, "epoch": 3}) == "fitted at epoch 2 (weights of epoch 3)"


def test_standard_prior_and_checkpoints_from_before_the_fit_sample_from_n01(tmp_path, image_folder):
    cfg = tiny_config(tmp_path, image_folder, model={"prior": "standard"})
    train(cfg)
    ckpt = load_checkpoint(tmp_path / "logs/tiny/last.pt")
    assert ckpt["prior_epoch"] == 0 and torch.equal(ckpt["model"]["prior_mean"], torch.zeros(1, 8))
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.startswith("prior_")}  # an older file
    model = run_vae.model_from_checkpoint(ckpt)
    eps = torch.randn(3, 8)
    assert torch.equal(model.prior_z(eps), eps)
    with pytest.raises(ConfigError, match="model.prior must be one of fitted, standard"):
        tiny_config(tmp_path, image_folder, model={"prior": "learned"})


def test_resume_accepts_a_checkpoint_saved_before_a_config_key_existed(tmp_path, image_folder):
    cfg = tiny_config(tmp_path, image_folder, train={"epochs": 2})
    train(cfg, max_epochs=1)
    last = tmp_path / "logs/tiny/last.pt"
    ckpt = load_checkpoint(last)
    del ckpt["config"]["model"]["prior"]  # as written by the version before the fitted prior
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.startswith("prior_")}
    torch.save(ckpt, last)
    assert train(cfg, resume=True)["epoch"] == 2
    changed = tiny_config(tmp_path, image_folder, train={"epochs": 2}, model={"latent_dim": 4})
    with pytest.raises(ConfigError, match="model.latent_dim=8, not 4"):
        train(changed, resume=True)
