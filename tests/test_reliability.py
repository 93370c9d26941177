"""Interruptions, bad values, odd images, disk errors and foreign checkpoints: each a clear message,
nothing saved lost, and a run that can always be continued or restarted as the message says."""
import errno
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import run_vae
from run_vae import CheckpointError, ConfigError, DataError, TrainingDiverged, load_checkpoint, train
from conftest import make_image_folder, tiny_config
from test_training import assert_same_weights, interrupted_during_step, weights


def one_step_epochs(tmp_path, image_folder, **sections):
    """Batches as large as the training split: every step is an epoch's last step."""
    return tiny_config(tmp_path, image_folder, train={"batch_size": 64, "epochs": 4, **sections.pop("train", {})},
                       **sections)


def test_a_stop_on_an_epochs_last_step_resumes_and_matches_an_uninterrupted_run(tmp_path, image_folder):
    full = one_step_epochs(tmp_path, image_folder, run={"name": "full"})
    part = one_step_epochs(tmp_path, image_folder, run={"name": "part"})
    train(full)
    with pytest.raises(run_vae.StopRequested), interrupted_during_step(1):
        train(part)
    saved = load_checkpoint(tmp_path / "logs/part/last.pt")
    assert saved["epoch"] == 2 and saved["batch_in_epoch"] == 0  # the epoch was finished, then saved
    summary = train(part, resume=True)
    assert summary["epoch"] == 4
    assert_same_weights(weights(tmp_path / "logs/full/last.pt"), weights(tmp_path / "logs/part/last.pt"))
    full_metrics = load_checkpoint(tmp_path / "logs/full/last.pt")["metrics"]
    assert load_checkpoint(tmp_path / "logs/part/last.pt")["metrics"]["loss"] == pytest.approx(full_metrics["loss"])


def test_a_resumed_epoch_reports_the_same_average_loss_as_an_uninterrupted_one(tmp_path, image_folder):
    full = tiny_config(tmp_path, image_folder, run={"name": "full"})
    part = tiny_config(tmp_path, image_folder, run={"name": "part"})
    train(full)
    with pytest.raises(run_vae.StopRequested), interrupted_during_step(4):  # mid epoch 2
        train(part)
    train(part, resume=True)
    a, b = (load_checkpoint(tmp_path / f"logs/{n}/last.pt")["metrics"] for n in ("full", "part"))
    assert b["loss"] == pytest.approx(a["loss"]) and b["kl"] == pytest.approx(a["kl"])


def scripted_validation(monkeypatch, bad_from_call):
    """evaluate_elbo as usual, but infinite from its `bad_from_call`-th call on (a diverged decoder)."""
    real, calls = run_vae.evaluate_elbo, {"n": 0}

    def validation(*args, **kwargs):
        metrics, kl = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= bad_from_call:
            metrics = {**metrics, "val_neg_elbo": float("inf"), "val_bits_per_dim": float("inf")}
        return metrics, kl
    monkeypatch.setattr(run_vae, "evaluate_elbo", validation)


def test_non_finite_validation_stops_the_run_and_last_pt_keeps_the_finite_epoch(tmp_path, image_folder,
                                                                                monkeypatch, capsys):
    cfg = tiny_config(tmp_path, image_folder, train={"epochs": 3})
    scripted_validation(monkeypatch, bad_from_call=2)
    with pytest.raises(TrainingDiverged, match=r"non-finite val_neg_elbo.*holds epoch 1.*--resume train.lr="):
        train(cfg)
    last = load_checkpoint(tmp_path / "logs/tiny/last.pt")
    assert last["epoch"] == 1 and all(np.isfinite(v) for v in last["metrics"].values())
    assert load_checkpoint(tmp_path / "best/tiny.pt")["epoch"] == 1


def tiny_cli_args(tmp_path, image_folder):
    """The command-line overrides of a tiny run (16x16, latent 8, FID off) whose run folder is logs/vae."""
    return [f"data.root={image_folder}", "data.image_size=16", f"run.log_dir={tmp_path}/logs",
            f"run.best_dir={tmp_path}/best", f"data.cache_dir={tmp_path}/cache", "fid.enabled=false",
            "model.latent_dim=8", "train.batch_size=8"]


def test_the_cli_never_reports_success_for_a_run_that_diverged_in_epoch_one(tmp_path, image_folder,
                                                                            monkeypatch, capsys):
    scripted_validation(monkeypatch, bad_from_call=1)
    args = tiny_cli_args(tmp_path, image_folder) + ["train.epochs=2"]
    assert run_vae.main(args) == 2
    err = capsys.readouterr().err
    assert "nothing was saved" in err and "done:" not in err and not (tmp_path / "best/vae.pt").exists()
    monkeypatch.undo()
    assert run_vae.main(args + ["train.lr=1e-3"]) == 0  # the advice works as printed: same folder, lower lr
    assert load_checkpoint(tmp_path / "best/vae.pt")["epoch"] >= 1


def test_metrics_json_is_valid_json_even_with_non_finite_values(tmp_path, image_folder, monkeypatch):
    cfg = tiny_config(tmp_path, image_folder)
    train(cfg)
    scripted_validation(monkeypatch, bad_from_call=1)
    run_vae.test({**cfg, "test": {**cfg["test"], "out_dir": str(tmp_path / "out")}})

    def refuse(name):
        raise ValueError(name)
    metrics = json.loads((tmp_path / "out/metrics.json").read_text(), parse_constant=refuse)
    assert metrics["val_neg_elbo"] is None and metrics["val_mse"] > 0


def test_a_run_folder_without_a_checkpoint_is_reused_and_resume_says_so(tmp_path, image_folder):
    cfg = tiny_config(tmp_path, image_folder)
    run_dir = tmp_path / "logs/tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "events.out.tfevents.123.old").write_bytes(b"stale")  # a start killed in epoch 1
    with pytest.raises(ConfigError, match="holds no checkpoint.*without --resume"):
        train(cfg, resume=True)
    assert train(cfg)["epoch"] == 2
    assert not (run_dir / "events.out.tfevents.123.old").exists()


HOLD_RUN_FOLDER = """
import sys, time
sys.path.insert(0, sys.argv[2])
import run_vae
lock = run_vae.take_run_lock(sys.argv[1])
open(sys.argv[1] + "/events.out.tfevents.1.first", "w").write("the first run's curves")
print("holding", flush=True)
time.sleep(120)
"""


def test_a_second_run_of_the_same_name_is_refused_while_the_first_runs(tmp_path, image_folder, capsys):
    """Two runs of one name started together would overwrite each other's last.pt without a word."""
    import subprocess, sys
    from conftest import ROOT
    cfg = tiny_config(tmp_path, image_folder)
    run_dir = tmp_path / "logs/tiny"
    first = subprocess.Popen([sys.executable, "-c", HOLD_RUN_FOLDER, str(run_dir), str(ROOT)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "holding"
        with pytest.raises(ConfigError, match=f"another training process \\(pid {first.pid} on .*run.name=<new name>"):
            train(cfg)
        with pytest.raises(ConfigError, match="another training process"):
            train(cfg, resume=True)
        # nothing of the first run was touched
        assert (run_dir / "events.out.tfevents.1.first").read_text() == "the first run's curves"
        assert not (run_dir / "last.pt").exists()
    finally:
        first.kill()  # gone without a word, as after kill -9: the system drops its lock
        first.wait()
    assert train(cfg)["epoch"] == 2
    assert "reusing it" in capsys.readouterr().out  # the folder held the dead run's files, not a checkpoint
    assert run_vae.take_run_lock(run_dir) is not None  # released when the run ended


def test_the_run_lock_is_released_after_a_stop_and_a_failure(tmp_path, image_folder, monkeypatch):
    from test_training import interrupted_during_step
    cfg = tiny_config(tmp_path, image_folder)
    with pytest.raises(run_vae.StopRequested), interrupted_during_step(2):
        train(cfg)
    run_vae.take_run_lock(tmp_path / "logs/tiny").close()  # free again
    monkeypatch.setattr(run_vae, "train_epoch", lambda run, stop: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train(cfg, resume=True)
    monkeypatch.undo()
    assert train(cfg, resume=True)["epoch"] == 2


def test_a_held_run_lock_names_its_holder(tmp_path):
    held = run_vae.take_run_lock(tmp_path)
    with pytest.raises(ConfigError, match=f"another training process \\(pid {os.getpid()} on "):
        run_vae.take_run_lock(tmp_path)
    held.close()
    run_vae.take_run_lock(tmp_path).close()


def test_resume_with_a_lower_lr_continues_at_that_rate(tmp_path, image_folder):
    cfg = tiny_config(tmp_path, image_folder, train={"epochs": 2})
    train(cfg, max_epochs=1)
    lower = tiny_config(tmp_path, image_folder, train={"epochs": 2, "lr": 1e-4})
    seen = []
    real = run_vae.train_step

    def recording(run, *args):
        seen.append(run.optimizer.param_groups[0]["lr"])
        return real(run, *args)
    run_vae.train_step = recording
    try:
        train(lower, resume=True)
    finally:
        run_vae.train_step = real
    assert seen and all(lr == pytest.approx(1e-4) for lr in seen)


def test_resume_refuses_a_changed_batch_size_and_names_it(tmp_path, image_folder):
    cfg = tiny_config(tmp_path, image_folder, train={"epochs": 2})
    train(cfg, max_epochs=1)
    with pytest.raises(ConfigError, match=r"train.batch_size=8, not 4.*batch order"):
        train(tiny_config(tmp_path, image_folder, train={"epochs": 2, "batch_size": 4}), resume=True)


def test_16_bit_pngs_are_scaled_to_8_bits_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)  # PIL writes a 16-bit greyscale PNG (mode I;16)
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    decoded = run_vae.decode_image(path, 32).float()
    expected = torch.from_numpy(ramp / 257.0).float()
    assert (decoded[0] - expected).abs().max() < 3 and decoded.mean() == pytest.approx(127.5, abs=3)
    assert torch.equal(decoded[0], decoded[2])


def test_float_images_in_unit_range_are_scaled(tmp_path):
    im = Image.fromarray(np.full((16, 16), 0.5, np.float32), mode="F")
    assert np.asarray(run_vae.to_8bit(im)).mean() == pytest.approx(128, abs=1)


@pytest.mark.parametrize("override, key", [
    ("train.lr=-1", "train.lr must be greater than 0"),
    ("train.ema=1.5", r"train.ema must be in \[0.0, 1.0\)"),
    ("train.beta=-1", "train.beta must be at least 0"),
    ("train.sample_every=0", "train.sample_every must be at least 1"),
    ("test.temperature=0", "test.temperature must be greater than 0"),
    ("train.epochs=[1", "override 'train.epochs=\\[1'"),
])
def test_out_of_range_values_are_refused_before_anything_is_written(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        run_vae.load_config(None, [f"run.log_dir={tmp_path}/logs", override])
    assert not (tmp_path / "logs").exists()


def test_the_cli_prints_a_message_for_a_bad_value_not_a_traceback(tmp_path, capsys):
    assert run_vae.main([f"run.log_dir={tmp_path}", "train.sample_every=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: train.sample_every") and "Traceback" not in err


@pytest.mark.parametrize("key, folder", [("best_dir", "best"), ("log_dir", "logs")])
def test_an_unwritable_output_folder_fails_before_training(tmp_path, image_folder, key, folder):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = tiny_config(tmp_path, image_folder, run={key: str(blocker / folder)})
    with pytest.raises(ConfigError, match=rf"cannot write to .*a_file/{folder}.*run.log_dir"):
        train(cfg)
    assert not (tmp_path / "logs/tiny/last.pt").exists()


def test_a_file_system_without_locks_trains_unguarded_with_a_note(tmp_path, image_folder, monkeypatch, capsys):
    import fcntl

    def no_locks(f, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert train(tiny_config(tmp_path, image_folder))["epoch"] == 2
    assert "cannot be locked (No locks available)" in capsys.readouterr().out


def test_a_failed_best_save_still_writes_last_pt_and_names_the_path(tmp_path, image_folder, monkeypatch):
    cfg = tiny_config(tmp_path, image_folder)
    real = run_vae.atomic_save

    def disk_full_for_best(obj, path):
        if str(path).endswith("best/tiny.pt"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(obj, path)
    monkeypatch.setattr(run_vae, "atomic_save", disk_full_for_best)
    with pytest.raises(ConfigError, match=r"best checkpoint .*tiny.pt \(No space left on device\).*Epoch 1 is saved"):
        train(cfg)
    last = load_checkpoint(tmp_path / "logs/tiny/last.pt")
    assert last["epoch"] == 1 and last["best"]["epoch"] is None  # no claim of a best file that was not written


def test_atomic_save_reports_the_write_error_not_its_cleanups(tmp_path, monkeypatch):
    def disk_full(obj, f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def cleanup_fails(self, missing_ok=False):
        raise PermissionError(errno.EACCES, "cleanup failed too")
    monkeypatch.setattr(torch, "save", disk_full)
    monkeypatch.setattr(type(tmp_path), "unlink", cleanup_fails)
    with pytest.raises(OSError) as info:
        run_vae.atomic_save({"x": 1}, tmp_path / "file.pt")
    assert info.value.errno == errno.ENOSPC


class FillingDisk(io.FileIO):
    """A file on a disk with ROOM bytes left: the write that would pass them fails as on a full disk, and
    closing the file still works (torch.save then reports the failure from its zip writer)."""
    ROOM = 4096

    def __init__(self, path, mode):
        super().__init__(path, mode.replace("b", ""))

    def write(self, data):
        if self.tell() + len(memoryview(data).cast("B")) > self.ROOM:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def test_a_disk_that_fills_mid_write_is_reported_as_full_and_the_old_file_kept(tmp_path, monkeypatch):
    path = tmp_path / "file.pt"
    run_vae.atomic_save({"version": 1}, path)
    monkeypatch.setattr(run_vae, "open", FillingDisk, raising=False)
    with pytest.raises(OSError) as info:
        run_vae.atomic_save({"version": 2, "weights": torch.zeros(100_000)}, path)
    assert info.value.errno == errno.ENOSPC
    assert torch.load(path, weights_only=True) == {"version": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["file.pt"]  # no half-written temp file left behind


def filling_disk_for(prefix, room_for=0):
    """An open() that puts files whose name starts with `prefix` on a FillingDisk once `room_for` of them
    have been written in full."""
    written = []

    def opener(path, mode="r", *args, **kwargs):
        if Path(path).name.startswith(prefix) and "w" in mode:
            written.append(path)
            if len(written) > room_for:
                return FillingDisk(path, mode)
        return open(path, mode, *args, **kwargs)
    return opener


def test_training_on_a_disk_that_fills_says_so_and_keeps_the_last_epoch(tmp_path, image_folder, monkeypatch):
    monkeypatch.setattr(run_vae, "open", filling_disk_for(".last.pt.tmp", room_for=1), raising=False)
    with pytest.raises(ConfigError, match=r"could not write .*last.pt \(No space left on device\).*Free disk space"):
        train(tiny_config(tmp_path, image_folder))
    assert load_checkpoint(tmp_path / "logs/tiny/last.pt")["epoch"] == 1


def test_a_data_cache_that_cannot_be_written_only_costs_the_next_run_a_decode(tmp_path, image_folder, monkeypatch):
    monkeypatch.setattr(run_vae, "open", filling_disk_for(".images_"), raising=False)
    with pytest.warns(UserWarning, match=r"could not write the data cache .*No space left on device.*data.cache_dir"):
        data = run_vae.load_image_folder(image_folder, 16, tmp_path / "cache")
    assert len(data) == 36 and not list((tmp_path / "cache").iterdir())


def test_a_memory_mapped_cache_on_a_full_disk_is_a_data_error(tmp_path, image_folder, monkeypatch):
    monkeypatch.setattr(run_vae, "open", filling_disk_for(".memmap_"), raising=False)
    with pytest.raises(DataError, match=r"memory-mapped image cache .*\(No space left on device\): free disk space"
                                        r".* room for 0\.4 MiB"):  # 36 images of 3 x 64 x 64 bytes
        run_vae.load_image_folder(image_folder, 64, tmp_path / "cache", max_bytes=0)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, a device on which every write fails")
def test_the_cli_reports_a_full_disk_in_test_mode_as_a_message(tmp_path, image_folder, capsys):
    args = tiny_cli_args(tmp_path, image_folder) + ["train.epochs=1"]
    assert run_vae.main(args) == 0
    (tmp_path / "out").mkdir()
    (tmp_path / "out/samples.png").symlink_to("/dev/full")  # the disk is full by the time samples are written
    assert run_vae.main(args + ["run.mode=test", f"test.out_dir={tmp_path}/out"]) == 2
    err = capsys.readouterr().err
    assert "error: No space left on device" in err and "Free disk space" in err
    assert load_checkpoint(tmp_path / "best/vae.pt")["epoch"] == 1


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, a device on which every write fails")
def test_the_cli_reports_a_full_disk_when_a_resumed_run_starts_and_keeps_its_checkpoint(tmp_path, image_folder,
                                                                                       capsys):
    args = tiny_cli_args(tmp_path, image_folder)
    assert run_vae.main(args + ["train.epochs=1"]) == 0
    config_file = tmp_path / "logs/vae/config.yaml"
    config_file.unlink()
    config_file.symlink_to("/dev/full")  # the disk fills before the resumed run has written anything
    assert run_vae.main(args + ["train.epochs=2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "error: No space left on device" in err and "--resume" in err
    assert load_checkpoint(tmp_path / "logs/vae/last.pt")["epoch"] == 1


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this should never run",))


def test_a_checkpoint_that_would_run_code_is_refused_without_advice_to_disable_safety(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": run_vae.Checkpointing.FORMAT, "payload": RunsCode()}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "would run code" in message and "weights_only" not in message and "damaged" not in message


def test_a_tagged_checkpoint_without_classes_is_a_clear_error(tmp_path):
    path = tmp_path / "partial.pt"
    torch.save({"format": run_vae.Checkpointing.FORMAT, "model": {}, "config": {}, "epoch": 1}, path)
    with pytest.raises(CheckpointError, match="incomplete.*classes"):
        load_checkpoint(path)


def test_a_folder_given_as_checkpoint_and_a_file_given_as_data_root(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path)
    (tmp_path / "x.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="is a file"):
        run_vae.list_image_folder(tmp_path / "x.jpg")


def test_config_is_optional_on_the_command_line(tmp_path, monkeypatch):
    images = make_image_folder(tmp_path / "my_images", per_class=6)
    monkeypatch.chdir(tmp_path)
    code = run_vae.main([f"data.root={images}", "data.image_size=16", "model.latent_dim=8", "train.epochs=1",
                         "fid.enabled=false"])
    assert code == 0 and (tmp_path / "best_models/vae.pt").is_file()


def test_flags_and_overrides_mix_in_any_order():
    args = run_vae.parse_args(["data.root=x", "--conditional", "run.name=y", "--resume"])
    assert args.resume and args.overrides == ["model.conditional=True", "data.root=x", "run.name=y"]


def test_the_suite_removes_a_passing_tests_temp_folder_and_keeps_a_failing_ones(tmp_path):
    # the suite's runs write checkpoints into tmp_path; pytest.ini must not let them pile up on the disk
    repo = Path(__file__).resolve().parent.parent
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "test_probe.py").write_text(
        "def test_passes(tmp_path):\n    (tmp_path / 'big.bin').write_bytes(bytes(1000))\n\n"
        "def test_fails(tmp_path):\n    (tmp_path / 'big.bin').write_bytes(bytes(1000))\n    assert False\n")
    base = tmp_path / "base"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-c", str(repo / "pytest.ini"), "-p",
                           "no:cacheprovider", f"--basetemp={base}", str(probe / "test_probe.py")],
                          capture_output=True, text=True, cwd=probe, timeout=120)
    assert "1 failed, 1 passed" in done.stdout, done.stdout + done.stderr
    assert not (base / "test_passes0").exists()
    assert (base / "test_fails0" / "big.bin").is_file()


@pytest.mark.parametrize("loss", [{}, {"adversarial": 0.5, "adv_start": 1.0, "adv_prior": True,
                                       "adv_prior_from": "fitted"}])
def test_weights_gone_non_finite_after_an_epochs_last_step_stop_the_run_with_the_message(tmp_path, image_folder,
                                                                                      monkeypatch, loss):
    # The loss checks miss weights that a last update with a finite loss turned non-finite; epoch 2's
    # validation finds them. Neither its TensorBoard histogram nor, where the adversarial term draws from the
    # fitted prior (refitted after every epoch), a fit of non-finite codes may get in before the message.
    cfg = tiny_config(tmp_path, image_folder, train={"epochs": 3}, model={"conditional": True}, loss=loss)
    real_metrics = run_vae.epoch_metrics

    def metrics_of_weights_gone_non_finite_in_epoch_two(run):
        if run.epoch == 2:
            with torch.no_grad():
                run.model.fc_mu.weight.fill_(float("nan"))
        return real_metrics(run)
    monkeypatch.setattr(run_vae, "epoch_metrics", metrics_of_weights_gone_non_finite_in_epoch_two)
    with pytest.raises(TrainingDiverged, match="holds epoch 1, the last state with finite metrics"):
        train(cfg)
    assert load_checkpoint(tmp_path / "logs/tiny/last.pt")["epoch"] == 1


@pytest.mark.parametrize("poisoned", ["fc_mu.weight", "encoder.3.running_var"])  # a weight; a BatchNorm statistic
def test_a_stop_after_the_weights_went_non_finite_keeps_the_finite_last_pt(tmp_path, image_folder, monkeypatch,
                                                                          poisoned):
    # A Ctrl-C lands between two loss checks (every train.log_every steps) after an update turned the weights
    # non-finite (an fp16 overflow can fill BatchNorm's running statistics alone, the loss staying finite): the
    # finite last.pt of epoch 1 must stay, and the message must say why the stop did not save.
    cfg = tiny_config(tmp_path, image_folder, train={"epochs": 3, "log_every": 100})
    train(cfg, max_epochs=1)
    epoch1 = weights(tmp_path / "logs/tiny/last.pt")
    real_step = run_vae.train_step

    def step_gone_non_finite_then_interrupted(run, *args):
        out = real_step(run, *args)
        if run.epoch == 1 and run.batch_in_epoch == 1:
            run.model.state_dict()[poisoned].fill_(float("nan"))
            os.kill(os.getpid(), signal.SIGINT)
        return out
    monkeypatch.setattr(run_vae, "train_step", step_gone_non_finite_then_interrupted)
    with pytest.raises(TrainingDiverged, match=r"the VAE became non-finite before the stop at epoch 2.*holds epoch 1"):
        train(cfg, resume=True)
    saved = load_checkpoint(tmp_path / "logs/tiny/last.pt")
    assert saved["epoch"] == 1 and saved["batch_in_epoch"] == 0
    assert_same_weights(epoch1, saved["model"])
    monkeypatch.undo()
    assert train(cfg, resume=True)["epoch"] == 3  # the advice works: continue from the finite epoch


def test_a_run_that_diverges_after_resuming_a_stop_in_its_first_epoch_says_to_resume_that_stop(
        tmp_path, image_folder, monkeypatch):
    # last.pt then holds part of epoch 1: "nothing was saved, run again" would be refused (the folder holds a
    # checkpoint) and would throw that part away
    cfg = tiny_config(tmp_path, image_folder)  # a loss check every 2 steps
    with pytest.raises(run_vae.StopRequested), interrupted_during_step(1):
        train(cfg)
    real_step = run_vae.train_step

    def diverging_step(run, *args):
        with torch.no_grad():
            run.model.fc_mu.weight.fill_(float("nan"))
        return real_step(run, *args)
    monkeypatch.setattr(run_vae, "train_step", diverging_step)
    with pytest.raises(TrainingDiverged, match=r"loss became nan.*holds epoch 1 up to step 2.*--resume train.lr="):
        train(cfg, resume=True)
    monkeypatch.undo()
    lower = run_vae.load_config(None, {**cfg, "train": {**cfg["train"], "lr": 5e-4}})
    assert train(lower, resume=True)["epoch"] == 2  # the advice works as printed


# with EMA on, last.pt's "model" is the EMA copy (the sampling weights) and "raw_model" the trained ones
@pytest.mark.parametrize("part, prefix", [("raw_model", ""), ("ema", "ema."), ("disc", "discriminator.")])
def test_a_last_pt_with_non_finite_weights_is_refused_on_resume_with_what_to_do(tmp_path, image_folder, part, prefix):
    # Written by an older version, or copied in: a resume would train on NaN, and where the next epoch draws
    # the adversarial prior samples from the fitted prior, fail inside its Cholesky factorisation.
    cfg = tiny_config(tmp_path, image_folder, model={"conditional": True}, train={"epochs": 3, "ema": 0.9},
                      loss={"adversarial": 0.5, "adv_start": 1.0, "adv_prior": True})
    train(cfg, max_epochs=1)
    path = tmp_path / "logs/tiny/last.pt"
    ckpt = load_checkpoint(path)
    state = ckpt["sharp"]["disc"] if part == "disc" else ckpt[part]
    name = next(k for k, v in state.items() if v.is_floating_point())  # the others stay finite
    state[name].fill_(float("nan"))
    torch.save(ckpt, path)
    switched = run_vae.load_config(None, {**cfg, "loss": {**cfg["loss"], "adv_prior_from": "fitted"}})
    with pytest.raises(CheckpointError) as refused:
        train(switched, resume=True)
    assert f"non-finite weights ({prefix}{name})" in str(refused.value)
    assert "run.name=<new name>) at a lower train.lr" in str(refused.value)


def test_a_discriminator_gone_non_finite_on_an_epochs_last_step_is_not_saved(tmp_path, image_folder, monkeypatch):
    # validation runs the VAE alone: a discriminator broken by the epoch's last update would reach last.pt,
    # which a resume then refuses
    cfg = tiny_config(tmp_path, image_folder, train={"epochs": 3}, loss={"adversarial": 0.5, "adv_start": 0.0})
    real_metrics = run_vae.epoch_metrics

    def metrics_after_the_discriminator_broke_in_epoch_two(run):
        if run.epoch == 2:
            next(iter(run.sharp.disc.parameters())).data.fill_(float("nan"))
        return real_metrics(run)
    monkeypatch.setattr(run_vae, "epoch_metrics", metrics_after_the_discriminator_broke_in_epoch_two)
    with pytest.raises(TrainingDiverged, match="epoch 2 ended with non-finite weights of the discriminator.*holds epoch 1"):
        train(cfg)
    assert load_checkpoint(tmp_path / "logs/tiny/last.pt")["epoch"] == 1
