"""tune_vae.py: sweep configs are checked before Ray starts; a real 3-trial sweep on tiny images survives a failed
trial and Ctrl-C, resumes without rerunning finished trials, and ends with a ranked table and a best config."""
import csv
import math
import os
import re
import signal
from pathlib import Path

import pytest
import torch
import yaml

import run_vae
import tune_vae
from conftest import ROOT, make_image_folder, tiny_features
from run_vae import ConfigError

# before anything imports ray: a local Ray on loopback only, no usage stats
tune_vae.configure_ray_environment(local=True)
from ray.tune import Callback  # noqa: E402

GOOD = {"train.lr": 1.0e-3, "model.latent_dim": 8}
DIVERGES = {"train.lr": 1.0e+6, "model.latent_dim": 8}  # NaN loss in the first steps -> TrainingDiverged


def write_sweep(tmp_path, data_root, tune=None, search_space=None, **sections):
    """A sweep of tiny 16x16 runs (FID off) whose outputs all land in tmp_path."""
    spec = {
        "tune": {"name": "tiny", "storage_path": str(tmp_path / "tune"), "num_samples": 3,
                 "max_concurrent_trials": 1, "cpus_per_trial": 1, "seed": 0,
                 "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
                 **(tune or {})},
        "search_space": search_space or {"train.lr": {"choice": [1.0e-3, 2.0e-3, 1.0e+6]},
                                         "model.latent_dim": {"choice": [4, 8]}},
        "run": {"log_dir": str(tmp_path / "logs"), "best_dir": str(tmp_path / "best")},
        "data": {"root": str(data_root), "image_size": 16, "val_fraction": 0.2, "cache_dir": str(tmp_path / "cache")},
        "model": {"latent_dim": 8},
        "train": {"epochs": 2, "batch_size": 8, "log_every": 2, "precision": "fp32"},
        "fid": {"enabled": False},
    }
    for section, values in sections.items():
        spec.setdefault(section, {}).update(values)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# ----------------------------------------------------------------------------------------------------
# sweep config (no Ray)


@pytest.mark.parametrize("name, metric", [("apples", "fid"), ("impressionism", "fid"), ("demo", "val_neg_elbo")])
def test_shipped_sweep_configs_load(name, metric):
    sweep = tune_vae.load_sweep(ROOT / "config" / f"tune_{name}.yaml")
    assert sweep["tune"]["name"] == name and sweep["tune"]["metric"] == metric
    assert {"train.lr", "model.latent_dim", "train.beta", "train.beta_warmup", "train.beta_cycle",
            "train.batch_size"} <= set(sweep["search_space"])
    assert sweep["search_space"]["model.latent_dim"] == {"choice": [64, 128, 256]}
    assert "loguniform" in sweep["search_space"]["train.lr"]
    assert Path(sweep["experiment_dir"]) == ROOT / "logs" / "tune" / name
    assert Path(sweep["best_config"]) == ROOT / "config" / f"best_{name}.yaml"


def test_tune_overrides_change_the_sweep_and_others_the_base_config(tmp_path, image_folder):
    path = write_sweep(tmp_path, image_folder)
    sweep = tune_vae.load_sweep(path, ["tune.num_samples=5", "tune.scheduler.grace_period=2", "train.epochs=4",
                                       "model.conditional=true", "tune.cpus_per_trial=2"])
    assert sweep["tune"]["num_samples"] == 5 and sweep["tune"]["scheduler"]["grace_period"] == 2
    assert sweep["tune"]["cpus_per_trial"] == 2.0
    assert sweep["base"]["train"]["epochs"] == 4 and sweep["base"]["model"]["conditional"] is True
    assert sweep["base"]["train"]["batch_size"] == 8  # from the sweep YAML's own training sections
    assert sweep["tune"]["storage_path"] == str(tmp_path / "tune")


@pytest.mark.parametrize("change, message", [
    (lambda s: s["tune"].update(num_sample=3), "unknown key 'tune.num_sample'. Did you mean 'num_samples'?"),
    (lambda s: s["tune"]["scheduler"].update(grace=1), "unknown key 'tune.scheduler.grace'"),
    (lambda s: s["tune"]["scheduler"].update(grace_period=9), "grace_period must be between 1 and train.epochs"),
    (lambda s: s["tune"].update(metric="fid"), "run_vae keeps the best checkpoint by val_neg_elbo"),
    (lambda s: s["tune"].update(mode="max"), "tune.mode must be min"),
    (lambda s: s["tune"].update(num_samples="many"), "tune.num_samples must be int"),
    (lambda s: s["search_space"].update({"train.lrr": {"loguniform": [1e-4, 1e-2]}}),
     "unknown key 'train.lrr'. Did you mean 'train.lr'?"),
    (lambda s: s["search_space"].update({"train.lr": {"logunif": [1e-4, 1e-2]}}),
     "unknown distribution 'logunif'. Did you mean 'loguniform'?"),
    (lambda s: s["search_space"].update({"train.beta": {"loguniform": [0, 1.0]}}), "loguniform needs low > 0"),
    (lambda s: s["search_space"].update({"train.lr": {"loguniform": [0, 1e-2]}}), "train.lr must be greater than 0"),
    (lambda s: s["search_space"].update({"train.lr": {"uniform": [1e-2, 1e-3]}}), "needs low < high"),
    (lambda s: s["search_space"].update({"model.latent_dim": {"uniform": [4, 64]}}),
     "is int (like 128); uniform is for float keys. Use int or choice"),
    (lambda s: s["search_space"].update({"model.latent_dim": {"choice": [0, 8]}}), "model.latent_dim must be at least 1"),
    (lambda s: s["search_space"].update({"train.epochs": {"choice": [1, 2]}}), "'train.epochs' cannot be searched"),
    (lambda s: s["search_space"].update({"train.lr": 1e-3}), "must be one distribution"),
    (lambda s: s["tune"].update(points_to_evaluate=[{"train.lr": 5.0, "model.latent_dim": 8}]), "outside its search space"),
    (lambda s: s["tune"].update(points_to_evaluate=[{"train.lr": 1e-3}]), "missing model.latent_dim"),
    (lambda s: s.update(serach_space={}), "unknown section 'serach_space'. Did you mean 'search_space'?"),
    (lambda s: s["train"].update(epoch=2), "unknown key 'train.epoch'. Did you mean 'epochs'?"),
])
def test_sweep_config_errors_say_what_to_fix(tmp_path, image_folder, change, message):
    path = write_sweep(tmp_path, image_folder)
    spec = yaml.safe_load(path.read_text())
    change(spec)
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=re.escape(message)):
        tune_vae.load_sweep(path)


def test_resume_uses_the_saved_sweep_and_names_what_changed(tmp_path, image_folder, capsys):
    sweep = tune_vae.load_sweep(write_sweep(tmp_path, image_folder))
    tune_vae.save_sweep(sweep)
    changed = tune_vae.load_sweep(write_sweep(tmp_path, image_folder, tune={"num_samples": 9}, train={"lr": 0.5}))
    restored = tune_vae.load_stored_sweep(changed)
    assert restored["tune"] == sweep["tune"] and restored["base"] == sweep["base"]
    assert "ignoring changes to tune.num_samples, train.lr" in capsys.readouterr().err


def test_searcher_proposals_repeat_with_the_seed(tmp_path, image_folder):
    sweep = tune_vae.load_sweep(write_sweep(tmp_path, image_folder, search_space={
        "train.lr": {"loguniform": [1e-4, 1e-2]}, "model.latent_dim": {"int": [4, 16]}, "train.beta": {"uniform": [0.5, 2]}}))

    def proposals(seed):
        sweep["tune"]["seed"] = seed
        searcher = tune_vae.make_searcher(sweep)
        searcher.set_search_properties("best_val_neg_elbo", "min", tune_vae.param_space(sweep))
        return [searcher.suggest(f"t{i}") for i in range(4)]

    first = proposals(0)
    assert first == proposals(0) and first != proposals(1)
    for p in first:
        assert 1e-4 <= p["train.lr"] <= 1e-2 and 4 <= p["model.latent_dim"] <= 16 and 0.5 <= p["train.beta"] <= 2


# ----------------------------------------------------------------------------------------------------
# a real sweep


@pytest.fixture(scope="module")
def local_ray():
    import ray
    started = tune_vae.start_ray(num_cpus=2, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def test_best_trial_stopped_early_gets_the_prior_of_its_own_weights(tmp_path, image_folder):
    sweep = tune_vae.load_sweep(write_sweep(tmp_path, image_folder))
    trial_dir = Path(sweep["experiment_dir"]) / "trial_x"
    cfg = tune_vae.trial_config(sweep["base"], GOOD, trial_dir, "x")
    run_vae.train(cfg, max_epochs=1)  # as if ASHA stopped it after epoch 1 of 2: FID off, so no fit yet
    assert run_vae.load_checkpoint(run_vae.Checkpointing(cfg).best)["prior_epoch"] == 0
    row = {"status": "terminated", "val_neg_elbo": 400.0, "trial": "x", "path": str(trial_dir), "epochs": 1, **GOOD}
    copied = run_vae.load_checkpoint(tune_vae.save_best([row], sweep)["checkpoint"])
    assert copied["epoch"] == 1 and copied["prior_epoch"] == 1
    assert not torch.equal(copied["model"]["prior_scale_tril"][0], torch.eye(8))


def test_local_ray_listens_on_loopback_and_skips_the_cloud_metadata_probe(local_ray):
    assert local_ray.util.get_node_ip_address() == "127.0.0.1"
    assert os.environ["HOME"] == os.path.expanduser("~") and "tune_vae_ray_home" not in os.environ["HOME"]
    # the dashboard process (the one that would ask 169.254.169.254) must see an empty cluster config in its HOME
    session = local_ray._private.worker._global_node.get_session_dir_path()
    homes = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if any(b"dashboard/dashboard.py" in a for a in cmdline) and any(session.encode() in a for a in cmdline):
                env = dict(v.split(b"=", 1) for v in (proc / "environ").read_bytes().split(b"\0") if b"=" in v)
                homes.append(env[b"HOME"].decode())
        except (OSError, ValueError):
            continue
    assert homes, "no dashboard process of this Ray session found"
    for home in homes:
        assert (Path(home) / "ray_bootstrap_config.yaml").read_text().strip() == "{}"


class PressCtrlCOnce(Callback):
    """Ctrl-C right after the first trial finishes. Tune saves callbacks with the sweep and runs a restored copy
    after --resume, so "once" is kept in a file rather than in the object."""

    def __init__(self, flag):
        self.flag = flag

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not self.flag.exists():
            self.flag.touch()
            os.kill(os.getpid(), signal.SIGINT)


def read_progress(trial_dir):
    """The epochs a trial reported, in order."""
    if not (trial_dir / "progress.csv").is_file():
        return []
    with open(trial_dir / "progress.csv") as f:
        return [float(row["epoch"]) for row in csv.DictReader(f)]


def test_sweep_survives_ctrl_c_and_a_failed_trial_then_ranks_trials_and_writes_the_best(local_ray, tmp_path):
    data = make_image_folder(tmp_path / "images")
    # the same three trials every time: two that train and, in between, one whose loss becomes NaN
    sweep_yaml = write_sweep(tmp_path, data, tune={"points_to_evaluate": [
        GOOD, DIVERGES, {"train.lr": 2.0e-3, "model.latent_dim": 4}]})
    argv = ["--config", str(sweep_yaml)]
    experiment = tmp_path / "tune" / "tiny"

    pressed = tmp_path / "ctrl_c_pressed"
    assert tune_vae.main(argv, callbacks=[PressCtrlCOnce(pressed)]) == 130  # Ctrl-C: interrupted, resumable
    assert pressed.exists()
    assert not (tmp_path / "best_tiny.yaml").exists()
    finished = {d: (d / "progress.csv").read_text() for d in experiment.glob("trial_*") if read_progress(d) == [1, 2]}
    assert len(finished) >= 1
    run_files = {d: sorted(p.name for p in (d / d.name.removeprefix("trial_")).iterdir()) for d in finished}

    assert tune_vae.main(argv) == 2  # the sweep exists: refuse to start it over
    assert tune_vae.main(argv + ["--resume"]) == 0

    for d, progress in finished.items():  # not rerun: no new epochs, no second TensorBoard file
        assert (d / "progress.csv").read_text() == progress
        assert sorted(p.name for p in (d / d.name.removeprefix("trial_")).iterdir()) == run_files[d]
    trial_dirs = sorted(experiment.glob("trial_*"))
    assert len(trial_dirs) == 3
    for d in trial_dirs:  # an interrupted trial continued from its checkpoint: no epoch twice
        epochs = read_progress(d)
        assert epochs == sorted(set(epochs))

    with open(experiment / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["rank"]) for r in rows] == [1, 2, 3]
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 1 and float(failed[0]["train.lr"]) == 1e6 and "TrainingDiverged" in failed[0]["error"]
    trained = [r for r in rows if r["status"] != "failed"]
    values = [float(r["val_neg_elbo"]) for r in trained]
    assert rows[-1]["status"] == "failed" and values == sorted(values) and all(v < 1e4 for v in values)
    best = rows[0]

    best_yaml = tmp_path / "best_tiny.yaml"
    cfg = run_vae.load_config(best_yaml)
    assert cfg["train"]["lr"] == float(best["train.lr"]) and cfg["model"]["latent_dim"] == int(best["model.latent_dim"])
    assert cfg["run"]["name"] == "best_tiny" and cfg["run"]["log_dir"] == str(tmp_path / "logs")
    assert cfg["train"]["epochs"] == 2 and cfg["fid"]["enabled"] is False and cfg["data"]["image_size"] == 16
    copied = run_vae.load_checkpoint(tmp_path / "best" / "tune_tiny.pt")
    assert copied["config"]["run"]["name"] == best["trial"] and copied["config"]["train"]["lr"] == cfg["train"]["lr"]
    assert copied["metrics"]["val_neg_elbo"] == pytest.approx(float(best["val_neg_elbo"]))

    # the best config trains as it is with run_vae.py
    assert run_vae.main(["--config", str(best_yaml), "train.epochs=1"]) == 0
    assert (tmp_path / "best" / "best_tiny.pt").is_file() and (tmp_path / "best" / "tune_tiny.pt").is_file()


def test_fid_sweep_reports_the_metric_every_epoch_and_ranks_by_fid(local_ray, tmp_path):
    data = make_image_folder(tmp_path / "images", per_class=8)
    sweep = tune_vae.load_sweep(write_sweep(
        tmp_path, data, tune={"num_samples": 2, "points_to_evaluate": [GOOD, {"train.lr": 2.0e-3, "model.latent_dim": 4}],
                              "scheduler": {"type": "asha", "grace_period": 2, "reduction_factor": 2}},
        train={"epochs": 3}, fid={"enabled": True, "every": 2, "num_samples": 16, "batch_size": 16}))
    assert sweep["tune"]["metric"] == "fid"
    results, interrupted = tune_vae.run_sweep(sweep, fid_features=tiny_features())
    assert not interrupted and not results.errors
    for result in results:  # FID at epochs 2 and 3 (the last); best_fid in every report, inf before the first
        history = result.metrics_dataframe
        assert list(history["epoch"]) == [1, 2, 3]
        assert history["best_fid"].iloc[0] == float("inf") and history["best_fid"].iloc[1:].map(math.isfinite).all()
        assert history["best_fid"].iloc[2] == min(history["fid"].iloc[1:])
    rows, best = tune_vae.summarize(results, sweep)
    assert [r["fid"] for r in rows] == sorted(r["fid"] for r in rows) and "fid" in rows[0]
    copied = run_vae.load_checkpoint(best["checkpoint"])  # the trial's best checkpoint, chosen by FID
    assert copied["metrics"]["fid"] == pytest.approx(best["value"])


def test_the_loss_terms_can_be_swept():
    sweep = tune_vae.load_sweep(ROOT / "config" / "tune_apples_sharp.yaml")
    assert set(sweep["search_space"]) == {"loss.perceptual", "loss.adversarial", "loss.adv_start"}
    assert sweep["search_space"]["loss.adversarial"] == {"choice": [0.0, 0.25, 0.5, 1.0]}
    with pytest.raises(run_vae.ConfigError, match="loss.perceptual must be at least 0"):
        tune_vae.check_search_space({"loss.perceptual": {"choice": [-1.0]}}, sweep["base"], "t")
