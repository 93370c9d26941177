"""The perceptual and adversarial building blocks: values, gradients, config checks, and that a few
optimisation steps on 16x16 images lower each term.

    .venv/bin/python -m pytest -q tests/test_sharp.py
"""
import importlib.util

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import run_vae

HAS_STLPIPS = importlib.util.find_spec("stlpips_pytorch") is not None
HAS_MSSSIM = importlib.util.find_spec("pytorch_msssim") is not None
needs_stlpips = pytest.mark.skipif(not HAS_STLPIPS, reason="stlpips-pytorch (the LPIPS weights) is not installed")
needs_msssim = pytest.mark.skipif(not HAS_MSSSIM, reason="pytorch-msssim is not installed")
NETS = [pytest.param("alex", marks=needs_stlpips), pytest.param("vgg", marks=needs_stlpips),
        pytest.param("msssim", marks=needs_msssim)]


def disc_images(n=4, size=16, seed=0):
    """Coloured discs on a coloured background: edges for a perceptual metric to see."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = []
    for _ in range(n):
        cx, cy, r = (torch.rand(3, generator=g) * torch.tensor([0.4, 0.4, 0.2]) + torch.tensor([0.3, 0.3, 0.2])) * size
        inside = ((xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2).float()
        fg, bg = torch.rand(3, 1, 1, generator=g), torch.rand(3, 1, 1, generator=g)
        images.append(inside * fg + (1 - inside) * bg)
    return torch.stack(images)


def blur(x, k):
    return F.avg_pool2d(F.pad(x, (k // 2,) * 4, mode="reflect"), k, 1)


@pytest.mark.parametrize("net, size", [pytest.param("alex", 16, marks=needs_stlpips),
                                       pytest.param("alex", 64, marks=needs_stlpips),
                                       pytest.param("vgg", 16, marks=needs_stlpips),
                                       pytest.param("msssim", 16, marks=needs_msssim),
                                       pytest.param("msssim", 64, marks=needs_msssim)])
def test_perceptual_distance_is_zero_for_identical_images_and_grows_with_blur(net, size):
    dist = run_vae.build_perceptual(net, size)
    x = disc_images(size=size)
    same = dist(x.clone(), x)
    assert same.shape == (4,) and torch.all(same.abs() < 1e-6)
    mild, strong = dist(blur(x, 3), x), dist(blur(x, 7), x)
    assert torch.all(mild > 0) and torch.all(strong > mild)
    noisy = dist((x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1), x)
    assert torch.all(noisy > 0)


@pytest.mark.parametrize("net", NETS)
def test_perceptual_gradient_is_finite_and_nonzero_only_for_different_images(net):
    dist = run_vae.build_perceptual(net, 16)
    x = disc_images()
    grads = []
    for x_hat in (x.clone(), blur(x, 3)):
        x_hat.requires_grad_(True)
        dist(x_hat, x).sum().backward()
        assert torch.isfinite(x_hat.grad).all()
        grads.append(x_hat.grad.abs().max())
    assert grads[1] > 1e-2 and grads[0] < 1e-3 * grads[1]  # a minimum at x_hat = x (MS-SSIM's only up to rounding)
    assert not any(p.requires_grad for p in dist.parameters())  # frozen: nothing of it is trained


@needs_stlpips
@pytest.mark.parametrize("net, params", [("alex", 2_473_734), ("vgg", 14_724_806)])
def test_shipped_lpips_weights_load_offline_into_our_module(net, params, monkeypatch):
    monkeypatch.setattr("socket.socket.connect", lambda *a: (_ for _ in ()).throw(OSError("network is off")))
    path = run_vae.find_stlpips_weights(net)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert sum(v.numel() for v in state.values()) == params
    dist = run_vae.PerceptualLoss(net)  # strict load: every shipped tensor has its place, nothing is left random
    assert torch.equal(dist.lin0.model[1].weight, state["lin0.model.1.weight"])
    assert torch.all(state["lin4.model.1.weight"] >= 0)  # learned per-channel weights, not uniform
    dist.train()
    assert not dist.training  # stays in eval mode inside a model switched to training


def test_missing_lpips_package_is_a_config_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(run_vae.ConfigError, match="stlpips-pytorch"):
        run_vae.find_stlpips_weights("alex")


@needs_msssim
@pytest.mark.parametrize("size, multiscale, window", [(16, False, 7), (32, False, 7), (64, True, 3),
                                                       (128, True, 7), (256, True, 11)])
def test_structural_loss_picks_scales_and_window_by_image_size(size, multiscale, window):
    loss = run_vae.StructuralLoss(size)
    assert (loss.multiscale, loss.window) == (multiscale, window)
    x = disc_images(2, size)
    assert torch.all(loss(blur(x, 3), x) > 0)


@pytest.mark.parametrize("net", [pytest.param("alex", marks=needs_stlpips), pytest.param("msssim", marks=needs_msssim)])
def test_a_few_steps_on_the_perceptual_term_lower_it(net):
    torch.manual_seed(0)
    target = disc_images(2, 16)
    decoder = nn.Sequential(nn.ConvTranspose2d(8, 3, 4, 2, 1), nn.Sigmoid())  # like the VAE's last layer
    z = torch.randn(2, 8, 8, 8)
    dist = run_vae.build_perceptual(net, 16)
    opt = torch.optim.Adam(decoder.parameters(), lr=0.05)
    losses = []
    for _ in range(6):
        loss = dist(decoder(z), target).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0]


@pytest.mark.parametrize("bad, match", [
    ({"perceptual": -0.1}, "loss.perceptual"), ({"perceptual_net": "inception"}, "loss.perceptual_net"),
    ({"adversarial": -1.0}, "loss.adversarial"), ({"adv_start": -1.0}, "loss.adv_start"),
    ({"adv_weight_max": 0.0}, "loss.adv_weight_max"), ({"disc_lr": 0.0}, "loss.disc_lr"),
    ({"disc_channels": 1}, "loss.disc_channels"), ({"diffaug": "color,flip"}, "loss.diffaug"),
    ({"r1": -1.0}, "loss.r1")])
def test_bad_loss_config_is_a_config_error(bad, match):
    with pytest.raises(run_vae.ConfigError, match=match):
        run_vae.load_config(None, {"loss": bad})


def test_loss_terms_are_off_by_default():
    loss = run_vae.DEFAULTS["loss"]
    assert loss["perceptual"] == 0 and loss["adversarial"] == 0
