"""bench/bench_train.py end to end on tiny images: every measured run starts, the --json line has the figures."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, make_image_folder

sys.path.insert(0, str(ROOT / "bench"))
import bench_train  # noqa: E402

TINY = ["--image_size", "16", "--batch_size", "8", "--latent_dim", "8", "--rounds", "1", "--matmul_n", "128"]


def test_bench_json_has_the_figures_and_leaves_no_work_folder(tmp_path):
    images = make_image_folder(tmp_path / "images")
    (tmp_path / "tmp").mkdir()
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_train.py"), "--data", str(images),
                          "--baseline_workers", "0", "--epochs", "2", "--json", *TINY],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})
    assert out.returncode == 0, out.stderr[-3000:]
    assert not list((tmp_path / "tmp").glob("bench_train_*"))  # its runs, checkpoints and cache: removed at exit
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("images_per_s", "ceiling_fraction", "bf16_speedup", "vs_baseline", "second_start_s",
                "peak_rss_mib", "gflop_per_image", "loss_bf16_vs_fp32"):
        assert isinstance(figures[key], float) and figures[key] > 0, key
    assert figures["images"] == 36 and figures["auto_precision"] in ("fp32", "bf16")
    # with FID off the prior is fitted once a run (after the last of its 2 epochs), timed apart from the loop
    assert figures["prior_fits_per_run"] == 1 and figures["run_end_s"] > 0
    assert "end to end" in out.stderr  # the human-readable table goes to stderr under --json


def test_generated_and_subset_folders_are_loadable_image_folders(tmp_path):
    gen = bench_train.generated_folder(tmp_path / "gen", per_class=2)
    sub = bench_train.subset_folder(gen, tmp_path / "sub", per_class=1)
    classes, files = bench_train.run_vae.list_image_folder(sub)
    assert classes == ["Golden", "Golden-Red", "Red"] and len(files) == 3
    assert all(f.endswith(".jpg") for f, _ in files)


def test_loss_curve_comparison():
    a = [10.0, 8.0, 6.0, 5.0, 4.0, 4.0]
    assert bench_train.max_rel_diff(a, a, 2) == 0.0
    assert abs(bench_train.max_rel_diff([x * 1.01 for x in a], a, 2) - 0.01) < 1e-9


def test_data_paths_and_ddp_figures(tmp_path):
    images = make_image_folder(tmp_path / "images")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_train.py"), "--data", str(images),
                          "--data_paths", "--ddp", "2", "--threads", "1", "--epochs", "1", "--json", *TINY],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"})
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    paths, ddp = figures["data_paths"], figures["ddp"]
    for key in ("images_per_s_device", "host_vs_device", "memmap_vs_device", "memmap_vs_device_steps"):
        assert isinstance(paths[key], float) and paths[key] > 0, key
    assert paths["memmap_mib"] == 36 * 3 * 16 * 16 / 2 ** 20
    for key in ("step_images_per_s_2x", "allreduce_s_per_step_2x", "bn_sync_s_per_step_2x", "step_s_2x"):
        assert isinstance(ddp[key], float) and ddp[key] > 0, key
    assert ddp["allreduce_s_per_step_2x"] < ddp["step_s_2x"]
    assert "gradient all-reduce running" in out.stderr and "of the device path" in out.stderr


def test_overlapping_all_reduces_count_once():
    assert bench_train.union_length([(0.0, 1.0), (0.5, 2.0), (3.0, 3.5)]) == 2.5
    assert bench_train.union_length([(1.0, 2.0), (0.0, 3.0)]) == 3.0 and bench_train.union_length([]) == 0.0


def test_recipe_costs_count_the_extra_networks():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_train.py"), "--recipes", "--json",
                          "--image_size", "16", "--batch_size", "2", "--threads", "1", "--rounds", "1"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    fig = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(fig) == {"plain", "perceptual", "adversarial", "both", "soft_intro", "plain, resize decoder",
                        "adversarial, resize decoder", "adv_prior", "adv_prior, antialiased disc",
                        "adv_prior, res blocks", "adv_prior, res, bilinear", "adv_prior, res, noise",
                        "adv_prior, res, noise, channels 96", "adv_prior, res, noise, channels 128",
                        "soft_intro, res blocks", "adversarial, resize, projection + class head",
                        "adversarial, resize, projection + class head on hue-turned images"}
    assert fig["plain"]["flops_vs_plain"] == 1.0
    assert fig["both"]["gflop_per_image"] > fig["perceptual"]["gflop_per_image"] > fig["plain"]["gflop_per_image"]
    assert fig["adversarial"]["gflop_per_image"] > fig["plain"]["gflop_per_image"]
    # a 3x3 conv at the doubled resolution costs more than a 4x4 stride-2 transposed conv at the input's
    resize, adversarial_resize = fig["plain, resize decoder"], fig["adversarial, resize decoder"]
    assert adversarial_resize["gflop_per_image"] > resize["gflop_per_image"] > fig["plain"]["gflop_per_image"]
    # prior samples: one more decoder and discriminator pass; anti-aliasing: the discriminator's first convs at
    # full resolution; residual blocks: convs at the top two resolutions, in both decoder passes
    prior = fig["adv_prior"]["gflop_per_image"]
    assert prior > fig["adversarial"]["gflop_per_image"]
    assert fig["adv_prior, antialiased disc"]["gflop_per_image"] > prior
    assert fig["adv_prior, res blocks"]["gflop_per_image"] > prior
    # a bilinear doubling is a resize doubling: 3x3 convs at the doubled resolution, more than transposed convs
    assert fig["adv_prior, res, bilinear"]["gflop_per_image"] > fig["adv_prior, res blocks"]["gflop_per_image"]
    # decoder noise is one multiply-add per feature value: its FLOPs are the decoder's without it, to 1 %
    assert fig["adv_prior, res, noise"]["gflop_per_image"] == pytest.approx(
        fig["adv_prior, res blocks"]["gflop_per_image"], rel=0.01)
    # model.channels widens every VAE conv, whose FLOPs grow with the width's square; the discriminator, the
    # first and last convs and the linear layers do not, so 2x the width costs more than 2x, less than 4x
    noise64 = fig["adv_prior, res, noise"]["gflop_per_image"]
    noise96, noise128 = (fig[f"adv_prior, res, noise, channels {c}"]["gflop_per_image"] for c in (96, 128))
    assert noise64 < noise96 < noise128 and 2 * noise64 < noise128 < 4 * noise64
    # Soft-IntroVAE runs each decoder three times a step: its residual blocks cost more than adv_prior's
    intro_res, intro = fig["soft_intro, res blocks"]["gflop_per_image"], fig["soft_intro"]["gflop_per_image"]
    assert intro_res - intro > fig["adv_prior, res blocks"]["gflop_per_image"] - prior
    assert fig["soft_intro"]["flops_vs_plain"] > 3.5  # three encoder and decoder passes more, and a fifth
    # the class head's recipe costs more than the plain resize one (its prior samples' decoder and discriminator
    # passes; test_sharp's step-cost test tells them from the conditional model's own extra inputs)
    head = fig["adversarial, resize, projection + class head"]
    assert head["gflop_per_image"] > adversarial_resize["gflop_per_image"]
    # hue-turned inputs give the head its own trunk pass on the real images
    hue = fig["adversarial, resize, projection + class head on hue-turned images"]
    assert hue["gflop_per_image"] > head["gflop_per_image"]
