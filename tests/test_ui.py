"""ui.py with Streamlit's AppTest, which runs the script in this process, against checkpoints of tiny training
runs. tests/test_ui_browser.py opens the same app in headless Chromium."""
import contextlib
import copy
import hashlib
import io
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

import run_vae
import ui
from conftest import ROOT, make_image_folder, tiny_config


def train_ui_runs(tmp):
    """Three 1-step runs on generated discs: an unconditional VAE and a CVAE at 16 px, a CVAE at 64 px.
    <tmp>/best/<run>.pt and <tmp>/logs/<run>/last.pt, newest last."""
    images = make_image_folder(tmp / "images")
    for name, conditional, size in (("tiny_vae", False, 16), ("tiny_cvae", True, 16), ("cvae64", True, 64)):
        run_vae.train(tiny_config(tmp, images, run={"name": name}, model={"conditional": conditional},
                                  data={"image_size": size}, train={"epochs": 1, "batch_size": 32}))
    return tmp


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return train_ui_runs(tmp_path_factory.mktemp("ui_runs"))


def start_app(monkeypatch, runs, *args, query=None, best=None, logs=None):
    # `streamlit run ui.py -- ARGS` makes sys.argv [ui.py, ARGS]; AppTest runs the script in this process
    monkeypatch.setattr(sys, "argv", ["ui.py", "--best-dir", str(best or runs / "best"), "--logs-dir",
                                      str(logs or runs / "logs"), "--cache-dir", str(runs / "ui_cache"), *args])
    at = AppTest.from_file(str(ROOT / "ui.py"), default_timeout=60)
    for key, value in (query or {}).items():
        at.query_params[key] = value
    return at.run()


def open_tab(at, name):
    at.session_state["tab"] = name
    return at.run()


def tick(at, *rows):
    at.session_state["checkpoint_table"] = {"selection": {"rows": list(rows)}}
    return at.run()


def assert_no_problems(at):
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def texts(elements):
    return " ".join(e.value for e in elements)


def opened(path):
    model, meta = ui.load_model(str(path), ui.modification_time(path))
    return ui.Opened(str(path), path.stem, model, meta)


def expected_samples(path, n, seed, temperature, class_index=None, numbers=True, zoom="auto"):
    """The sheet the Samples tab must show, made from the model directly: same noise as VAE.sample."""
    model = run_vae.model_from_checkpoint(run_vae.load_checkpoint(path))
    classes = run_vae.load_checkpoint(path)["classes"]
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(16 * -(-n // 16), model.latent_dim, generator=g)[:n] * temperature
    rows = []
    for k in (range(len(classes)) if model.num_classes and class_index is None else [class_index]):
        y = torch.full((n,), k) if model.num_classes else None
        with torch.no_grad():
            rows.append((classes[k] if model.num_classes and class_index is None else None,
                         model.decode(model.prior_z(eps, y), y)))
    return np.asarray(ui.tile_sheet(rows, ui.tile_px(zoom, model.image_size), numbers=numbers))

# ----------------------------------------------------------------------------------------------------
# the checkpoint table


def test_table_lists_every_checkpoint_and_opens_the_newest(runs, monkeypatch):
    at = start_app(monkeypatch, runs)
    assert_no_problems(at)
    table = at.dataframe(key="checkpoint_table").value
    assert list(table["path"]) == [str(runs / p) for p in (
        "logs/cvae64/last.pt", "best/cvae64.pt", "logs/tiny_cvae/last.pt", "best/tiny_cvae.pt",
        "logs/tiny_vae/last.pt", "best/tiny_vae.pt")]
    assert list(table["run"][:3]) == ["cvae64", "cvae64", "tiny_cvae"] and list(table["kind"][:2]) == ["last", "best"]
    assert set(table["epoch"]) == {1}
    # every numeric metric of the checkpoints, whole names, no picker label to cut off
    for column in ("val −ELBO", "val bits/dim", "active units", "val MSE", "train loss"):
        assert table[column].notna().all(), column
    assert table["best val −ELBO"].isna().sum() == 3  # only last.pt carries it: shown empty for best models
    assert list(table["model"][[0, 2, 4]]) == ["CVAE (3 classes), 64 px, z 8", "CVAE (3 classes), 16 px, z 8",
                                              "VAE, 16 px, z 8"]
    assert table["prior"][0] == "fitted at epoch 1" and table["saved"].notna().all()
    assert at.session_state["chosen"] == [str(runs / "logs/cvae64/last.pt")]  # the newest is open
    sidebar = texts(at.sidebar.markdown)
    assert "CVAE over 3 classes" in sidebar and all(c in sidebar for c in ("Golden", "Golden-Red", "Red"))
    assert "| val −ELBO | " in sidebar and "| active units | " in sidebar
    assert "latent_dim: 8" in at.sidebar.code[0].value  # the training config
    assert len(at.image) == 1 and at.image[0].value[0].endswith(".png")  # only the open tab is drawn
    assert "samples from the prior (fitted at epoch 1)" in texts(at.caption)
    # three classes, six samples each, the same noise down each column, drawn 2x: 64 px -> 128 px
    assert np.array_equal(at.session_state["samples_grid"],
                          expected_samples(runs / "logs/cvae64/last.pt", 6, 0, 1.0))


def test_ticking_rows_opens_models_and_the_table_follows_the_files(runs, monkeypatch, tmp_path):
    best = tmp_path / "best"
    best.mkdir()
    shutil.copy(runs / "best/tiny_vae.pt", best / "a.pt")
    shutil.copy(runs / "best/tiny_vae.pt", best / "b.pt")  # same run, kind and epoch: told apart by file
    at = start_app(monkeypatch, runs, best=best, logs=tmp_path / "logs")
    at = tick(at, 0, 1)
    assert_no_problems(at)
    legend = texts(at.markdown)
    assert "1. **tiny_vae · best · ep 1 · b.pt**" in legend and "2. **tiny_vae · best · ep 1 · a.pt**" in legend
    tick(at)  # nothing ticked: say what to do, not a blank page
    assert "Tick a checkpoint in the table" in at.info[0].value and not at.exception
    # a run saves over a.pt: the table and the page show the new file, not what was read before
    shutil.copy(runs / "logs/tiny_cvae/last.pt", best / "a.pt")
    os.utime(best / "a.pt", ns=(time.time_ns(), time.time_ns() + 10**9))
    table = at.run().dataframe(key="checkpoint_table").value
    assert table["path"][0] == str(best / "a.pt") and table["run"][0] == "tiny_cvae"  # now the newest
    at = tick(at, 0)
    assert table["model"][0].startswith("CVAE") and "CVAE over 3 classes" in texts(at.sidebar.markdown)


def test_a_checkpoint_is_read_once_per_modification_time(runs, monkeypatch, tmp_path):
    (tmp_path / "best").mkdir()
    copy = tmp_path / "best" / "copy.pt"
    shutil.copy(runs / "best/tiny_cvae.pt", copy)
    reads, real_load = [], run_vae.load_checkpoint

    def counted_load(path, *args, **kwargs):
        reads.append(path)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(run_vae, "load_checkpoint", counted_load)  # ui.py imports it from run_vae on every run
    at = start_app(monkeypatch, runs, best=tmp_path / "best", logs=tmp_path / "logs")
    assert len(reads) == 2  # once for the table's summary, once for the model
    for seed in (1, 2):
        at.number_input(key="seed").set_value(seed).run()
    assert len(reads) == 2
    os.utime(copy, ns=(time.time_ns(), time.time_ns() + 10**9))  # as if a run saved a new best model
    at.run()
    assert_no_problems(at)
    assert len(reads) == 4

# ----------------------------------------------------------------------------------------------------
# messages


@pytest.mark.parametrize("content, message", [
    ("folder", "is a folder, not a checkpoint file. It holds a.pt"),
    (None, "does not exist"),
    ("image", "is an image, not a checkpoint"),
    ("text", "is not a PyTorch checkpoint"),
    ("truncated", "is a damaged checkpoint (cut short"),
    ("plain_dict", "is not a run_vae.py checkpoint"),
    ("code", "refused"),  # run_vae says why: objects that are not plain data
])
def test_a_bad_path_gets_a_message_that_fits_and_the_app_keeps_working(runs, monkeypatch, tmp_path, content,
                                                                       message):
    bad, ran = tmp_path / "bad.pt", tmp_path / "code_ran"
    if content == "folder":
        bad.mkdir()
        (bad / "a.pt").touch()
    elif content == "image":
        bad = tmp_path / "bad.png"
        Image.new("RGB", (4, 4)).save(bad)
    elif content == "text":
        bad.write_text("definitely not a checkpoint")
    elif content == "truncated":  # a copy cut short, as by a full disk
        good = (runs / "best/tiny_vae.pt").read_bytes()
        bad.write_bytes(good[:len(good) // 2])
    elif content == "plain_dict":
        torch.save({"weights": torch.zeros(2)}, bad)
    elif content == "code":  # loading this with weights_only=False would create `ran`
        torch.save(RunsCode(ran), bad)
    at = start_app(monkeypatch, runs, "--checkpoint", str(bad))
    assert not at.exception
    assert len(at.error) == 1 and message in at.error[0].value, at.error
    assert not ran.exists()
    assert "problem" in at.dataframe(key="checkpoint_table").value.columns  # the table says why too
    tick(at, 1)  # a good one
    assert_no_problems(at)
    assert len(at.image) == 1


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_typed_paths_understand_home_and_quotes(runs, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copy(runs / "best/tiny_cvae.pt", tmp_path / "mine.pt")
    at = start_app(monkeypatch, runs)
    at.text_input(key="typed_path").set_value("").run()  # nothing typed: nothing changes, no blank page
    assert_no_problems(at)
    assert len(at.image) == 1
    at.text_input(key="typed_path").set_value(f"  '{tmp_path / 'nope.pt'}' ").run()
    assert "does not exist" in at.error[0].value and not at.exception
    at.text_input(key="typed_path").set_value('"~/mine.pt"').run()
    assert_no_problems(at)
    assert at.session_state["chosen"] == [str(tmp_path / "mine.pt")]
    assert at.dataframe(key="checkpoint_table").value["path"].iloc[-1] == str(tmp_path / "mine.pt")
    assert "mine.pt" in texts(at.sidebar.caption)


def test_data_folder_messages_and_the_uis_own_cache(runs, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(runs / "images", tmp_path / "my images")
    at = open_tab(start_app(monkeypatch, runs), "Reconstructions")
    assert_no_problems(at)
    assert any("7 random of the 7 validation images" in c.value for c in at.caption)  # training's 20% split of 36
    run_cache = sorted((runs / "cache").iterdir())
    for typed, message in ((str(runs / "nowhere"), "does not exist"),
                           (str(runs / "images/Red/001.png"), "is a file, not a folder"),
                           ("", "Type the path of a data folder")):
        at.text_input(key="data_folder").set_value(typed).run()
        assert not at.exception and message in at.warning[0].value, at.warning
    at.text_input(key="data_folder").set_value('"~/my images"').run()  # quoted, with ~ and a space
    assert_no_problems(at)
    assert any("12 random of the 36 images" in c.value for c in at.caption)  # another folder: no split known
    assert sorted((runs / "cache").iterdir()) == run_cache  # the run's cache is left alone ...
    assert any(p.name.startswith("images_my images_64_") for p in (runs / "ui_cache").iterdir())  # ... ours is used
    assert f"cached in `{runs / 'ui_cache'}`" in texts(at.caption)


def test_no_checkpoint_says_how_to_train(tmp_path, monkeypatch):
    at = start_app(monkeypatch, tmp_path)
    assert_no_problems(at)
    assert "python run_vae.py --config config/train_demo.yaml" in at.info[0].value
    at.text_input(key="typed_path").set_value(str(tmp_path)).run()
    assert not at.exception and "is a folder, not a checkpoint file. It holds no .pt file" in at.error[0].value


def test_unknown_arguments_are_a_warning_with_the_usage(runs, monkeypatch):
    at = start_app(monkeypatch, runs, "--chekpoint", "x.pt")
    assert not at.exception and len(at.image) == 1
    warning = at.warning[0].value
    assert "--chekpoint" in warning and "Usage: `streamlit run ui.py -- [--checkpoint" in warning
    assert "usage:" not in warning.lower().replace("usage: `", "")


def test_an_out_of_range_seed_is_said_not_ignored(runs, monkeypatch):
    at = start_app(monkeypatch, runs, "--checkpoint", str(runs / "best/tiny_vae.pt"))
    at.number_input(key="seed").set_value(-5).run()
    assert "Seed -5 is out of range" in at.warning[0].value and "Showing seed 0" in at.warning[0].value
    shown = at.session_state["samples_grid"]
    at.number_input(key="seed").set_value(0).run()
    assert not at.warning and np.array_equal(at.session_state["samples_grid"], shown)
    at.number_input(key="seed").set_value(2**40).run()
    assert f"Showing seed {ui.MAX_SEED:,}" in at.warning[0].value

# ----------------------------------------------------------------------------------------------------
# samples, compared models, export


def test_class_seed_and_temperature_decide_the_pixels(runs, monkeypatch):
    path = runs / "best/tiny_cvae.pt"
    at = start_app(monkeypatch, runs, "--checkpoint", str(path))
    at.selectbox(key="sample_class").set_value("Red").run()
    assert_no_problems(at)
    assert np.array_equal(at.session_state["samples_grid"], expected_samples(path, 32, 0, 1.0, class_index=2))
    at.number_input(key="seed").set_value(3)
    at.slider(key="num_samples").set_value(5)
    at.slider(key="temperature").set_value(0.5).run()
    red = at.session_state["samples_grid"]
    assert np.array_equal(red, expected_samples(path, 5, 3, 0.5, class_index=2))
    assert "seed 3, temperature 0.5, class Red" in texts(at.caption)
    # a new session opened from the page address shows the same view
    again = start_app(monkeypatch, runs, query={"model": str(path), "sample_class": "Red", "seed": "3",
                                                "num_samples": "5", "temperature": "0.5"})
    assert np.array_equal(again.session_state["samples_grid"], red)


def test_temperature_zero_gives_the_decoded_mean_everywhere(runs, monkeypatch):
    at = start_app(monkeypatch, runs, "--checkpoint", str(runs / "best/tiny_vae.pt"))
    assert "sample_class" not in [s.key for s in at.selectbox]  # unconditional: no class picker
    at.slider(key="num_samples").set_value(4)
    at.slider(key="temperature").set_value(0.0).run()
    model, _ = ui.load_model(str(runs / "best/tiny_vae.pt"), ui.modification_time(runs / "best/tiny_vae.pt"))
    images = ui.prior_samples(model, 4, 0, 0.0)[0]
    assert all(torch.equal(im, images[0]) for im in images)  # every sample decodes the prior's mean
    assert np.array_equal(at.session_state["samples_grid"], np.asarray(ui.tile_sheet([(None, images)], 128,
                                                                                     numbers=True)))


def test_images_are_drawn_large_in_wrapped_labelled_rows():
    images = torch.rand(10, 3, 16, 16)
    sheet = np.asarray(ui.tile_sheet([("Golden", images), ("Red", images.flip(0))], 64, width=400, numbers=True))
    gutter = 12 + ui.font(15).getbbox("Golden")[2]
    # (400 - gutter) fits 5 tiles of 64 + 4 px: two stretches of 5, each a numbers band and two rows
    assert sheet.shape == (2 * (18 + 2 * 68) - 4, gutter + 5 * 68 - 4, 3)
    top = 18 + 68  # stretch 0, row "Red", column 0 holds Red's first image: the last of `images`
    expected = np.kron((images[-1].permute(1, 2, 0).numpy() * 255).round(), np.ones((4, 4, 1)))
    assert np.array_equal(sheet[top:top + 64, gutter:gutter + 64], expected.astype(np.uint8))  # 4x, no smoothing
    assert (sheet[18:18 + 64, :gutter] < 100).any() and (sheet[top:top + 64, :gutter] < 100).any()  # labels
    assert (sheet[:18, gutter:] < 200).any()  # column numbers to pick a sample by
    assert ui.tile_px("auto", 64) == 128 and ui.tile_px("auto", 16) == 128 and ui.tile_px(3, 64) == 192
    assert ui.tile_sheet([(None, images)], 16, per_line=3).size == (3 * 20 - 4, 4 * 20 - 4)


def test_look_closer_and_explore_the_latent_space_around_a_sample(runs, monkeypatch):
    path = runs / "best/tiny_cvae.pt"
    at = start_app(monkeypatch, runs, "--checkpoint", str(path))
    at.selectbox(key="enlarge").set_value("Golden-Red #4").run()
    assert_no_problems(at)
    assert len(at.image) == 2 and "drawn 24x" in at.image[0].captions[0]  # 16 px -> 384 px
    at.button(key="explore").click().run()
    assert at.session_state["tab"] == "Latent space" and at.session_state["latent_index"] == 4
    assert_no_problems(at)
    at.run()
    # the start of the latent view is that very sample: row 1 (Golden-Red), column 4 of the grid
    model, _ = ui.load_model(str(path), ui.modification_time(path))
    sample = ui.prior_samples(model, 6, 0, 1.0, 1)[0][4]
    start = at.session_state["latent_pair"]
    assert np.array_equal(start[:256, :256], np.asarray(ui.enlarged(sample, 256)))
    assert np.array_equal(start[:256, :256], start[:256, 260:])  # all axes at 0: nothing moved yet
    at.slider(key="axis_0").set_value(2.0).run()
    moved = at.session_state["latent_pair"]
    assert np.array_equal(moved[:, :256], start[:, :256]) and not np.array_equal(moved[:, 260:], start[:, 260:])
    at.button(key="reset_axes").click().run()
    assert at.slider(key="axis_0").value == 0.0 and np.array_equal(at.session_state["latent_pair"], start)
    assert len(at.session_state["latent_walk_strip"]) and "Axis 1 at −3" in texts(at.caption)


def test_principal_axes_of_the_fitted_prior(runs):
    model = run_vae.model_from_checkpoint(run_vae.load_checkpoint(runs / "best/tiny_cvae.pt"))
    axes, std, share = ui.principal_axes(model, 2)
    cov = model.prior_scale_tril[2] @ model.prior_scale_tril[2].T
    assert torch.allclose(axes @ axes.T, torch.eye(8), atol=1e-4)  # orthonormal
    assert (std[:-1] >= std[1:]).all() and torch.isclose(share.sum(), torch.tensor(1.0))
    assert torch.allclose(axes[0] @ cov @ axes[0], std[0] ** 2, rtol=1e-3)  # variance along the first axis
    z = torch.randn(8)
    assert torch.allclose(model.prior_z(ui.noise_of(model, z, 2)[None], torch.tensor([2]))[0], z, atol=1e-4)


def test_compare_models_side_by_side_with_their_metrics(runs, monkeypatch, tmp_path):
    best = tmp_path / "best"
    best.mkdir()
    for name in ("tiny_cvae", "tiny_vae"):
        shutil.copy(runs / f"best/{name}.pt", best / f"{name}.pt")
    shutil.copy(runs / "best/tiny_cvae.pt", best / "twin.pt")
    at = start_app(monkeypatch, runs, best=best, logs=tmp_path / "logs")
    paths = list(at.dataframe(key="checkpoint_table").value["path"])
    at = tick(at, paths.index(str(best / "tiny_cvae.pt")), paths.index(str(best / "twin.pt")),
              paths.index(str(best / "tiny_vae.pt")))
    assert_no_problems(at)
    # one sheet: the models of each class in adjacent rows, so a column is the same noise in every model
    rows = at.session_state["compare_rows"]
    assert [label for label, _ in rows] == ["1 · Golden", "2 · Golden", "1 · Golden-Red", "2 · Golden-Red",
                                            "1 · Red", "2 · Red", "3 · any class"]
    assert all(torch.equal(rows[i][1], rows[i + 1][1]) for i in (0, 2, 4))  # the twin draws the same samples
    assert not torch.equal(rows[0][1], rows[2][1])  # another class
    legend = texts(at.markdown)
    assert "1. **tiny_cvae · best · ep 1 · tiny_cvae.pt**" in legend and "2. **tiny_cvae · best · ep 1 · twin.pt**" \
        in legend and "3. **tiny_vae · best · ep 1**" in legend
    table = at.dataframe[1].value
    assert list(table.columns) == ["metric", "1: tiny_cvae · best · ep 1 · tiny_cvae.pt",
                                   "2: tiny_cvae · best · ep 1 · twin.pt", "3: tiny_vae · best · ep 1", "2 − 1",
                                   "3 − 1", "best"]
    elbo = table[table["metric"] == "val −ELBO"].iloc[0]
    assert elbo["2 − 1"] == 0 and np.isclose(elbo["3 − 1"], elbo.iloc[3] - elbo.iloc[1])
    assert elbo["best"] == ("3" if elbo.iloc[3] < elbo.iloc[1] else "tie")
    at.selectbox(key="sample_class").set_value("Red").run()  # the VAE has no classes: it still samples
    assert [label for label, _ in at.session_state["compare_rows"]] == ["1 · Red", "2 · Red", "3 · any class"]
    assert not at.exception
    recon = open_tab(at, "Reconstructions").session_state["recon_grid"]
    assert (recon.shape[0] + 4) % (4 * 132) == 0  # each stretch has 4 rows: real, and one per model


def test_zip_of_the_samples_with_a_manifest(runs):
    path = runs / "best/tiny_cvae.pt"
    settings = {"n": 3, "seed": 7, "temperature": 0.8, "class": ui.EVERY_CLASS}
    archive = zipfile.ZipFile(io.BytesIO(ui.samples_archive([opened(path)], settings)))
    manifest = json.loads(archive.read("manifest.json"))
    assert manifest["models"][0]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert manifest["seed"] == 7 and manifest["temperature"] == 0.8 and manifest["class"] == ui.EVERY_CLASS
    assert manifest["models"][0]["prior"] == "fitted at epoch 1" and manifest["models"][0]["epoch"] == 1
    assert "seed=7" in manifest["view"] and "tab=Samples" in manifest["view"]
    files = [s["file"] for s in manifest["models"][0]["samples"]]
    assert sorted(files) == sorted(n for n in archive.namelist() if n.endswith(".png")) and len(files) == 9
    model, _ = ui.load_model(str(path), ui.modification_time(path))
    red = ui.prior_samples(model, 3, 7, 0.8)[2]
    saved = np.asarray(Image.open(io.BytesIO(archive.read("Red_002.png"))))
    assert saved.shape == (16, 16, 3) and np.array_equal(saved, np.asarray(ui.to_pil(red[2])))

# ----------------------------------------------------------------------------------------------------
# your pictures, interpolation


def picture_bytes(colour, size=40, fmt="PNG"):
    image = Image.new("RGB", (size, size), "white")
    image.paste(colour, (8, 8, size - 8, size - 8))
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def test_your_pictures_are_reconstructed_and_interpolated(runs, monkeypatch):
    at = open_tab(start_app(monkeypatch, runs, "--checkpoint", str(runs / "best/tiny_cvae.pt")), "Your pictures")
    assert "Drop a picture above" in at.info[0].value
    at.file_uploader(key="uploader").set_value([("red.png", picture_bytes((170, 20, 30)), "image/png"),
                                                ("notes.png", b"not an image", "image/png")]).run()
    assert not at.exception and "`notes.png` is not a picture we can read" in at.warning[0].value
    at.selectbox(key="upload_class").set_value("Red").run()
    grid = at.session_state["pictures_grid"]
    gutter = 12 + max(ui.font(15).getbbox(label)[2] for label in ("your picture", "reconstruction"))
    expected = ui.enlarged(ui.to_float(ui.read_picture(picture_bytes((170, 20, 30)), 16)), 128)
    assert np.array_equal(grid[:128, gutter:gutter + 128], np.asarray(expected))  # the picture, 16 px drawn 8x
    assert grid.shape[0] == 2 * 132 - 4 and "as class Red" in texts(at.caption)
    # an interpolation from the picture to a prior sample; the picture is still there after switching tabs
    at = open_tab(at, "Interpolation")
    at.radio(key="a_from").set_value("Your picture").run()
    assert_no_problems(at)
    strip = at.session_state["interp_strip"]
    assert np.array_equal(strip[:128, :128], np.asarray(expected))  # the real picture stands at the A end
    assert "From your picture `red.png`" in texts(at.caption)


def test_interpolation_controls_and_file_names(runs, monkeypatch):
    at = open_tab(start_app(monkeypatch, runs, "--checkpoint", str(runs / "best/tiny_cvae.pt")), "Interpolation")
    assert at.radio(key="interp_mode").options == ["Two points", "Two classes, same noise"]
    assert at.checkbox(key="interp_slerp").value
    at.radio(key="b_from").set_value("A data image").run()
    assert_no_problems(at)
    thumbnails = at.dataframe(key="b_image_pick").value
    assert thumbnails["image"][0].startswith("data:image/png;base64,") and len(thumbnails) == 36
    at.session_state["b_image_pick"] = {"selection": {"rows": [5]}}
    at.run()
    assert f"`{thumbnails['file'][5]}`" in texts(at.caption)
    at.text_input(key="b_image_filter").set_value("golden-RED/00").run()  # any case
    assert list(at.dataframe(key="b_image_pick").value["file"]) == [
        f"Golden-Red/{i:03d}{'.png' if i % 2 else '.jpg'}" for i in range(10)]
    at.radio(key="interp_mode").set_value("Two classes, same noise").run()
    assert_no_problems(at)
    assert "interp_slerp" not in [c.key for c in at.checkbox]  # no path to bend when only the class moves
    assert len(at.session_state["interp_strip"]) and len(at.image) == 2  # the strip and its GIF
    # downloads say what they hold: another class, number of steps, temperature or path is another name
    m = opened(runs / "best/tiny_cvae.pt")

    def name(b_class="Red", steps=8, temperature=1.0, spherical=False):
        a, b = ui.Point(None, 0, None, "", "seed0-Golden"), ui.Point(None, 2, None, "", b_class)
        return ui.interpolation_name(m, a, b, steps, temperature, spherical)

    names = {name(), name(b_class="Golden-Red"), name(steps=9), name(temperature=0.7), name(spherical=True)}
    assert len(names) == 5 and name() == "tiny_cvae_ep1_interp_seed0-Golden_to_Red_8steps_t1"


def test_gif_goes_there_and_back(runs):
    frames = list(torch.rand(5, 3, 16, 16))
    gif = Image.open(io.BytesIO(ui.gif_bytes(frames, 64)))
    assert gif.size == (64, 64) and gif.n_frames == 8  # 5 there, 3 back
    gif.seek(4)
    last = np.asarray(gif.convert("RGB")).astype(int)
    assert np.abs(last - np.asarray(ui.enlarged(frames[4], 64)).astype(int)).mean() < 12  # GIF's 256 colours


def test_blending_classes_matches_decoding_class_indices(runs):
    model = run_vae.model_from_checkpoint(run_vae.load_checkpoint(runs / "best/tiny_cvae.pt"))
    z, y = torch.randn(3, model.latent_dim), torch.tensor([0, 2, 1])
    with torch.no_grad():
        assert torch.allclose(ui.decode(model, z, torch.eye(3)[y]), model.decode(z, y))
    # noise goes through the checkpoint's fitted prior, as in VAE.sample: a seed means the same image in every view
    assert not torch.equal(model.prior_scale_tril[0], torch.eye(model.latent_dim))
    eps = ui.prior_noise(1, model.latent_dim, seed=3)
    with torch.no_grad():
        sampled = model.sample(1, torch.tensor([2]), generator=torch.Generator().manual_seed(3))
        assert torch.allclose(ui.decode_noise(model, eps, torch.eye(3)[[2]]), sampled, atol=1e-6)
    assert torch.equal(ui.grid_noise(5, 8, 1), ui.grid_noise(40, 8, 1)[:5])  # sample i does not depend on n
    a, b = torch.randn(8), torch.randn(8)
    for spherical in (True, False):
        path = ui.interpolate(a, b, 5, spherical)
        assert path.shape == (5, 8) and torch.allclose(path[0], a) and torch.allclose(path[-1], b, atol=1e-6)


def test_a_noisy_decoder_shows_the_same_pictures_for_the_same_request():
    torch.manual_seed(0)
    model = run_vae.VAE(16, 8, 3, noise=True).eval()
    for m in model.decoder:
        if isinstance(m, run_vae.NoiseInjection):
            m.weight.data.fill_(1.0)
    grids = [ui.prior_samples(model, 4, seed=2, temperature=1.0) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*grids))
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    labels = torch.tensor([0, 1])
    assert torch.equal(ui.reconstruct(model, images, labels), ui.reconstruct(model, images, labels))
    # ... and sample i the same whatever the number of samples, as without noise: the detail of an image must not
    # depend on the batch it is decoded in (the second noise layer's draws follow the first layer's, per batch)
    few, many = ui.prior_samples(model, 2, 2, 1.0), ui.prior_samples(model, 20, 2, 1.0)
    assert all(torch.allclose(a, b[:2], atol=1e-6) for a, b in zip(few, many))
    assert torch.allclose(ui.reconstruct(model, images[:1], labels[:1]), ui.reconstruct(model, images, labels)[:1],
                          atol=1e-6)
    quiet = copy.deepcopy(model)  # the gallery's noise is shared by the batch, yet still there
    for m in quiet.decoder:
        if isinstance(m, run_vae.NoiseInjection):
            m.weight.data.zero_()
    assert not torch.allclose(ui.reconstruct(quiet, images, labels), ui.reconstruct(model, images, labels))


def test_64_image_grid_at_64px_is_one_numbered_sheet():  # its speed: bench/bench_ui.py
    model = run_vae.VAE(64, 128, 0).eval().to(memory_format=torch.channels_last)  # as ui.load_model leaves it
    rows = ui.prior_samples(model, 64, 0, 1.0)
    sheet = Image.open(io.BytesIO(ui.png_bytes(ui.tile_sheet([(None, rows[0])], ui.tile_px("auto", 64),
                                                               numbers=True))))
    assert len(rows) == 1 and rows[0].shape == (64, 3, 64, 64)
    assert sheet.width >= 8 * 64 and sheet.height >= 8 * 64  # 64 tiles of at least the model's size


def test_bench_ui_prints_the_gallery_against_the_decoder(capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_ui
    assert bench_ui.main(["--n", "4", "--image_size", "16", "--repeats", "1", "model.noise=true"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("4 samples at 16 px: decoder alone") and float(line.rsplit(" ", 1)[1]) > 0
    assert bench_ui.main(["model.upsample=cubic"]) == 2
    assert "model.upsample" in capsys.readouterr().err

# ----------------------------------------------------------------------------------------------------
# a real browser: `streamlit run ui.py` in headless Chromium, driven by selenium through chromedriver

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
try:
    import selenium  # noqa: F401
except ImportError:
    selenium = None
NO_BROWSER = ("Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver; "
              ".ci/run installs them)" if not (CHROMIUM and CHROMEDRIVER) else
              "selenium is not installed (pip install -r requirements.txt)" if selenium is None else "")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def streamlit_server(runs, log):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "ui.py", "--server.headless", "true",
         "--browser.gatherUsageStats", "false", "--server.address", "127.0.0.1", "--server.port", str(port),
         "--server.fileWatcherType", "none", "--", "--best-dir", str(runs / "best"), "--logs-dir",
         str(runs / "logs"), "--cache-dir", str(runs / "ui_cache")],
        cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if server.poll() is not None:
                pytest.fail(f"streamlit exited with code {server.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            time.sleep(0.2)
        else:
            pytest.fail(f"streamlit did not answer on {url} within 60s:\n{log.read_text()[-3000:]}")
        yield url
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def chromium(profile):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with both paths given, selenium looks nothing up online
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-quic", f"--user-data-dir={profile}",
                 "--window-size=1400,1400", "--force-device-scale-factor=1",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


# the page, read inside the browser: the pictures in the open tab, whether the script still runs, any error box
PAGE_STATE = """
const pictures = [...document.querySelectorAll('[data-testid="stImage"] img')];
return {pictures: pictures.length, loaded: pictures.filter(i => i.complete && i.naturalWidth > 0).length,
        running: !!document.querySelector('[data-testid="stStatusWidget"]'),
        errors: document.querySelectorAll('[data-testid="stException"], [data-testid="stAlertContentError"]').length,
        text: document.body.innerText};"""


def wait_for_page(driver, pictures, timeout=60):
    """Until the script has finished and `pictures` images are shown and loaded."""
    deadline, state = time.monotonic() + timeout, {}
    time.sleep(0.5)
    while time.monotonic() < deadline:
        state = driver.execute_script(PAGE_STATE)
        if state["pictures"] >= pictures and state["loaded"] == state["pictures"] and not state["running"]:
            return state
        time.sleep(0.25)
    pytest.fail(f"the page did not settle within {timeout}s: {dict(state, text=state.get('text', '')[:2000])}")


def shown_picture(driver, index=0):
    """(screenshot pixels of the index-th picture of the page, its natural size): what the user sees of it."""
    picture = driver.find_elements("css selector", '[data-testid="stImage"] img')[index]
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", picture)
    time.sleep(0.3)
    box = driver.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.x, r.y, r.width, "
                                "r.height, arguments[0].naturalWidth, arguments[0].naturalHeight]", picture)
    x, y, w, h = (round(v) for v in box[:4])
    shot = np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB"))
    return shot[y:y + h, x:x + w], (box[4], box[5])


@pytest.mark.skipif(bool(NO_BROWSER), reason=NO_BROWSER)
def test_browser_shows_large_grids_compares_models_and_takes_an_upload(runs, tmp_path):
    log = tmp_path / "streamlit.log"
    with streamlit_server(runs, log) as url:
        driver = chromium(tmp_path / "profile")
        try:
            from selenium.webdriver.support.wait import WebDriverWait
            # a 64-px model opened from the address: its grid is on screen pixel for pixel, each sample 2x
            checkpoint = runs / "best/cvae64.pt"
            driver.get(f"{url}/?model={urllib.parse.quote(str(checkpoint))}")
            state = wait_for_page(driver, 1)
            assert state["errors"] == 0 and "VAE explorer" in state["text"] and "cvae64" in state["text"]
            seen, natural = shown_picture(driver)
            driver.save_screenshot(str(tmp_path / "samples.png"))
            expected = expected_samples(checkpoint, 6, 0, 1.0)
            assert natural == (expected.shape[1], expected.shape[0]) and seen.shape == expected.shape
            inner = (slice(12, -12), slice(12, -12))  # the picture's rounded corners aside
            assert np.abs(seen[inner].astype(int) - expected[inner]).max() <= 2  # another process rounds floats
            # two models ticked (through the address): their samples in adjacent rows, and their metrics
            second = runs / "best/tiny_vae.pt"
            driver.get(f"{url}/?model={urllib.parse.quote(str(checkpoint))}&model={urllib.parse.quote(str(second))}")
            state = wait_for_page(driver, 1)
            assert state["errors"] == 0 and state["pictures"] == 1
            assert "cvae64 · best · ep 1" in state["text"] and "tiny_vae · best · ep 1" in state["text"]
            assert len(driver.find_elements("css selector", '[data-testid="stDataFrame"]')) == 2  # and the metrics
            seen, natural = shown_picture(driver)
            driver.save_screenshot(str(tmp_path / "compare.png"))
            assert seen.shape[:2] == natural[::-1] and (natural[1] + 4) % (18 + 4 * 132) == 0  # 3 classes + the VAE
            # a picture dropped on the page is reconstructed
            picture = tmp_path / "my apple.png"
            picture.write_bytes(picture_bytes((170, 20, 30), size=80))
            driver.get(f"{url}/?model={urllib.parse.quote(str(checkpoint))}&tab=Your+pictures")
            WebDriverWait(driver, 60).until(lambda d: d.find_elements("css selector", 'input[type="file"]'))
            driver.find_element("css selector", 'input[type="file"]').send_keys(str(picture))
            state = wait_for_page(driver, 1)
            driver.save_screenshot(str(tmp_path / "upload.png"))
            assert state["errors"] == 0 and "`my apple.png`" not in state["text"] and "my apple.png" in state["text"]
            seen, natural = shown_picture(driver)
            assert natural[1] == 2 * 128 + 4 and seen.shape[0] == natural[1]  # picture above reconstruction
            # nothing leaves the machine: no usage statistics, fonts or icons from the internet
            events = [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]
            urls = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
            urls += [e["params"]["url"] for e in events if e["method"] == "Network.webSocketCreated"]
            local = ("data", "blob", "chrome", "chrome-untrusted", "about")  # the browser's own pages, no traffic
            outside = [u for u in urls if urllib.parse.urlsplit(u).scheme not in local
                       and urllib.parse.urlsplit(u).hostname != "127.0.0.1"]
            assert urls and not outside, outside
        finally:
            driver.quit()
        print(f"screenshots in {tmp_path}")
