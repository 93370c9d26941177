"""bench/bench_discriminator.py on a tiny trained CVAE: the discriminator alone against its reconstructions."""
import json
import sys

from conftest import ROOT, make_image_folder, tiny_config

sys.path.insert(0, str(ROOT / "bench"))
import bench_discriminator  # noqa: E402
import run_vae  # noqa: E402


def test_the_discriminator_learns_the_reconstructions_of_a_one_epoch_model(tmp_path, capsys):
    images = make_image_folder(tmp_path / "images", per_class=16)
    cfg = tiny_config(tmp_path, images, train={"epochs": 1}, model={"conditional": True})
    checkpoint = run_vae.train(cfg)["best_checkpoint"]
    code = bench_discriminator.main(["--checkpoint", checkpoint, "--data", str(images), "--cache_dir",
                                     str(tmp_path / "cache"), "--steps", "150", "--every", "75",
                                     "--images", "36", "--held_out", "12", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = result["report"]
    assert [r["step"] for r in report] == [0, 75, 150]
    assert result["settings"]["diffaug"] == run_vae.DEFAULTS["loss"]["diffaug"]
    # a one-epoch model's reconstructions are grey blurs: the held-out loss falls and beats chance
    assert report[-1]["loss"] < report[0]["loss"] - 0.05 and report[-1]["accuracy"] > 0.6


def test_images_of_other_classes_are_a_clear_error(tmp_path, capsys):
    images = make_image_folder(tmp_path / "images", per_class=8)
    cfg = tiny_config(tmp_path, images, train={"epochs": 1}, model={"conditional": True})
    checkpoint = run_vae.train(cfg)["best_checkpoint"]
    other = make_image_folder(tmp_path / "other", per_class=8, classes={"Pear": (0, 200, 0), "Plum": (90, 0, 90)})
    code = bench_discriminator.main(["--checkpoint", checkpoint, "--data", str(other), "--cache_dir",
                                     str(tmp_path / "cache"), "--steps", "2"])
    assert code == 2
    assert "point --data at the images the model was trained on" in capsys.readouterr().err
