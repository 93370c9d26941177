"""Soft-IntroVAE (loss.soft_intro): its exp-ELBO against a hand computation, which half of the VAE each of
its two updates trains, a 16x16 run, exact resume and the best checkpoint in test mode."""
import math

import numpy as np
import pytest
import torch

import run_vae
from run_vae import load_checkpoint, train
from conftest import tiny_config
from test_training import assert_same_weights, interrupted_during_step

INTRO = {"soft_intro": True, "adv_start": 1.0}


def test_exp_elbo_and_its_gradient_match_a_hand_computation():
    recon = torch.tensor([30.0, 60.0], requires_grad=True)
    kl = torch.tensor([2.0, 5.0], requires_grad=True)
    value = run_vae.soft_intro_exp_elbo(recon, kl, beta_neg=10.0, dims=768)
    terms = [math.exp(-2 * (30 + 10 * 2) / 768), math.exp(-2 * (60 + 10 * 5) / 768)]
    assert value.item() == pytest.approx(sum(terms) / 2, rel=1e-6)
    value.backward()
    # d/dkl of exp(-2 (r + b kl) / D) / n = -2 b / D * exp(...) / n: the encoder lowers it by raising the KL
    assert kl.grad.tolist() == pytest.approx([-2 * 10 / 768 * t / 2 for t in terms], rel=1e-5)
    assert recon.grad.tolist() == pytest.approx([-2 / 768 * t / 2 for t in terms], rel=1e-5)


def test_each_update_trains_its_own_half_of_the_vae():
    torch.manual_seed(0)
    cfg = run_vae.load_config(None, {"data": {"image_size": 16}, "model": {"latent_dim": 8}, "loss": INTRO})
    model, intro = run_vae.build_model(cfg, 0), run_vae.SoftIntro(cfg, steps_per_epoch=4)
    encoder, decoder = run_vae.encoder_and_decoder_parameters(model)
    assert {id(p) for p in encoder} | {id(p) for p in decoder} == {id(p) for p in model.parameters()}
    assert not {id(p) for p in encoder} & {id(p) for p in decoder}
    x, noise = torch.rand(4, 3, 16, 16), torch.randn(4, 8)
    with run_vae.frozen(decoder):
        loss, recon, kl, z, logs = intro.encoder_loss(model, x, None, 0.5, noise)
    loss.backward()
    assert all(p.grad is None for p in decoder) and all(p.grad is not None for p in encoder)
    assert loss.item() > recon.item() + 0.5 * kl.item()  # plus the exp-ELBO terms of the decoded images
    assert 0 < logs["intro_exp_elbo_fake"].item() < 1 and 0 < logs["intro_exp_elbo_rec"].item() < 1
    model.zero_grad(set_to_none=True)
    with run_vae.frozen(encoder):
        decoder_loss = intro.decoder_loss(model, x, None, z.detach(), 0.5, noise)
    decoder_loss.backward()
    assert all(p.grad is None for p in encoder) and all(p.grad is not None for p in decoder)
    assert all(p.requires_grad for p in model.parameters())  # frozen() gives them back
    # loss.intro_gamma_r adds the re-decoded images' errors, from the same draws otherwise
    cfg["loss"]["intro_gamma_r"] = 0.5
    with_rerecon = run_vae.SoftIntro(cfg, steps_per_epoch=4)
    torch.manual_seed(1)
    without = intro.decoder_loss(model, x, None, z.detach(), 0.5, noise)
    torch.manual_seed(1)
    assert with_rerecon.decoder_loss(model, x, None, z.detach(), 0.5, noise) > without + 1.0
    assert intro.on(4) and not intro.on(3)  # loss.adv_start is in epochs


def test_soft_intro_is_not_combined_with_the_other_terms():
    with pytest.raises(run_vae.ConfigError, match="loss.soft_intro"):
        run_vae.load_config(None, {"loss": {"soft_intro": True, "adversarial": 0.5}})
    with pytest.raises(run_vae.ConfigError, match="loss.intro_beta_neg must be greater than 0"):
        run_vae.load_config(None, ["loss.intro_beta_neg=0"])


def test_a_16px_run_lowers_its_losses_and_best_pt_loads_in_test_mode(tmp_path, image_folder):
    cfg = tiny_config(tmp_path, image_folder, train={"epochs": 4, "batch_size": 2, "log_every": 1}, loss=INTRO)
    summary = train(cfg)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(summary["run_dir"]).Reload()

    def thirds(tag):
        values = [e.value for e in sorted(acc.Scalars(tag), key=lambda e: e.step)]
        n = len(values) // 3
        return np.mean(values[:n]), np.mean(values[-n:]), min(e.step for e in acc.Scalars(tag))

    first, last, _ = thirds("train/loss")
    assert last < 0.6 * first
    first, last, start = thirds("train/intro_exp_elbo_fake")  # the encoder learns to score prior samples low
    assert start >= 14 and last < 0.5 * first  # epoch 1 (14 steps of 2) trains the plain VAE
    best = load_checkpoint(summary["best_checkpoint"])
    metrics = run_vae.test({**cfg, "test": {**cfg["test"], "checkpoint": summary["best_checkpoint"],
                                            "out_dir": str(tmp_path / "test")}})
    assert metrics["epoch"] == best["epoch"] and (tmp_path / "test/samples.png").is_file()


def test_resume_mid_epoch_equals_an_uninterrupted_run(tmp_path, image_folder):
    loss = {"soft_intro": True, "adv_start": 0.5}
    full = tiny_config(tmp_path, image_folder, run={"name": "full"}, train={"epochs": 3}, loss=loss)
    part = tiny_config(tmp_path, image_folder, run={"name": "part"}, train={"epochs": 3}, loss=loss)
    train(full)
    with pytest.raises(run_vae.StopRequested), interrupted_during_step(4):  # mid epoch 2, the game running
        train(part)
    train(part, resume=True)
    a, b = (load_checkpoint(tmp_path / f"logs/{n}/last.pt") for n in ("full", "part"))
    assert_same_weights(a["model"], b["model"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()


def test_step_cost_counts_the_extra_passes():
    plain = run_vae.sharp_step_cost(None, image_size=16, batch_size=2, steps=1)
    intro = run_vae.sharp_step_cost({"soft_intro": True}, image_size=16, batch_size=2, steps=1)
    # encoder step: 3 encoder and 3 decoder passes forward, the decoder's: 2 and 2 (plain: 1 and 1)
    assert 3.5 * plain["gflop_per_image"] < intro["gflop_per_image"] < 6 * plain["gflop_per_image"]
