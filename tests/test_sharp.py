"""The perceptual and adversarial building blocks: values, gradients, config checks, and that a few
optimisation steps on 16x16 images lower each term.

    .venv/bin/python -m pytest -q tests/test_sharp.py
"""
import importlib.util

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import run_vae
from run_vae import load_checkpoint, train
from conftest import tiny_config
from test_training import assert_same_weights, interrupted_during_step

HAS_STLPIPS = importlib.util.find_spec("stlpips_pytorch") is not None
HAS_MSSSIM = importlib.util.find_spec("pytorch_msssim") is not None
needs_stlpips = pytest.mark.skipif(not HAS_STLPIPS, reason="stlpips-pytorch (the LPIPS weights) is not installed")
needs_msssim = pytest.mark.skipif(not HAS_MSSSIM, reason="pytorch-msssim is not installed")


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


@pytest.mark.parametrize("net", [pytest.param("alex", marks=needs_stlpips), pytest.param("msssim", marks=needs_msssim)])
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
    ({"r1": -1.0}, "loss.r1"), ({"perceptual_jitter": -1}, "loss.perceptual_jitter"),
    ({"adversarial": 0.5, "disc_conditional": True}, "model.conditional"),
    ({"disc_classify": -1.0}, "loss.disc_classify"),
    ({"adversarial": 0.5, "disc_classify": 1.0}, "model.conditional=true"),
    ({"adversarial": 0.0, "disc_classify": 1.0}, "loss.adversarial > 0"),
    ({"disc_classify_aug": "hue,flip"}, "loss.disc_classify_aug"),
    ({"adversarial": 0.5, "disc_classify_aug": "hue"}, "no head: set loss.disc_classify > 0")])
def test_bad_loss_config_is_a_config_error(bad, match):
    with pytest.raises(run_vae.ConfigError, match=match):
        run_vae.load_config(None, {"loss": bad})


def test_loss_terms_are_off_by_default():
    loss = run_vae.DEFAULTS["loss"]
    assert loss["perceptual"] == 0 and loss["adversarial"] == 0


def test_adaptive_weight_matches_a_hand_computation():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2, bias=False)  # out = W z
    z, target, v = torch.randn(5, 3), torch.randn(5, 2), torch.randn(5, 2)
    out = layer(z)
    rec = (out - target).pow(2).sum()
    g = -(v * out).mean()
    W = layer.weight.detach()
    rec_grad = 2 * (z @ W.T - target).T @ z  # d/dW sum (Wz - t)^2
    g_grad = -(v.T @ z) / v.numel()          # d/dW -mean(v . Wz)
    expected = rec_grad.norm() / (g_grad.norm() + 1e-4)
    weight = run_vae.adaptive_adversarial_weight(rec, g, layer.weight, max_weight=1e4)
    assert torch.allclose(weight, expected, rtol=1e-5) and not weight.requires_grad
    assert run_vae.adaptive_adversarial_weight(rec, g, layer.weight, max_weight=0.5) == 0.5  # clamped
    nan_rec = rec * float("nan")
    assert run_vae.adaptive_adversarial_weight(nan_rec, g, layer.weight) == 0  # never a NaN into the loss


def test_hinge_losses_on_known_logits():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    # real: relu(1 - r) = 0, 0.5, 2 (mean 5/6); fake: relu(1 + f) = 0, 1, 2.5 (mean 7/6)
    assert run_vae.hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 7 / 6))
    assert run_vae.hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0  # confident: no loss
    assert run_vae.hinge_g_loss(fake).item() == pytest.approx(1 / 6)


def test_r1_penalty_is_the_squared_gradient_norm():
    w = torch.randn(3, 4, 4)
    real = torch.rand(2, 3, 4, 4, requires_grad=True)
    logits = (real * w).sum((1, 2, 3))  # d logit / d real = w for every image
    assert run_vae.r1_penalty(logits, real).item() == pytest.approx(w.pow(2).sum().item(), rel=1e-5)
    logits = (real * w).sum((1, 2, 3))
    assert run_vae.r1_penalty(logits, real, grad_scale=1024.0).item() == pytest.approx(w.pow(2).sum().item(), rel=1e-5)


@pytest.mark.parametrize("side", [1, 2, 8])
def test_r1_penalty_does_not_grow_with_the_patch_map(side):
    # patch (i, j) of a linear discriminator has the logit <w_ij, image>: the image's logit is their mean,
    # whose gradient is the mean of the w_ij, whatever the map's size, so gamma keeps its meaning
    w = torch.randn(side, side, 3, 4, 4)
    real = torch.rand(2, 3, 4, 4, requires_grad=True)
    logits = torch.einsum("bchw,ijchw->bij", real, w)[:, None]
    expected = w.mean((0, 1)).pow(2).sum().item()
    assert run_vae.r1_penalty(logits, real).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("policy", ["color", "hue", "translation", "cutout", "color,hue,translation,cutout"])
def test_diff_augment_keeps_shape_and_range_and_passes_gradients(policy):
    torch.manual_seed(0)
    x = disc_images(8, 16).requires_grad_(True)
    y = run_vae.diff_augment(x, policy)
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
    assert not torch.allclose(y, x)  # it did something
    (y * torch.rand_like(y)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert run_vae.diff_augment(x, "") is x


def test_rotate_hue_turns_the_chroma_and_keeps_the_luma():
    luma = torch.tensor([0.299, 0.587, 0.114])[:, None, None]
    x = 0.4 + 0.2 * torch.rand(6, 3, 8, 8)  # muted colours: no turn leaves [0,1], so nothing is clamped
    angles = (torch.rand(6) * 2 - 1) * torch.pi
    turned = run_vae.rotate_hue(x, angles)
    assert torch.allclose((turned * luma).sum(1), (x * luma).sum(1), atol=1e-5)
    assert torch.allclose(run_vae.rotate_hue(turned, -angles), x, atol=1e-5)  # turning back restores it
    assert torch.allclose(run_vae.rotate_hue(x, torch.zeros(6)), x, atol=1e-6)
    assert not torch.allclose(turned, x, atol=1e-2)
    grey = torch.full((6, 3, 8, 8), 0.3)
    assert torch.allclose(run_vae.rotate_hue(grey, angles), grey, atol=1e-6)  # grey has no hue to turn
    pink = torch.tensor([0.6, 0.4, 0.4])[None, :, None, None]
    y = (pink * luma).sum(1, keepdim=True)
    opposite = run_vae.rotate_hue(pink, torch.tensor([torch.pi]))  # half a turn: the colour opposite grey
    assert torch.allclose(opposite, 2 * y - pink, atol=1e-5)


def test_diff_augment_translation_shifts_whole_images_with_zero_fill():
    torch.manual_seed(1)
    x = torch.rand(6, 3, 16, 16) * 0.9 + 0.1  # no zeros of its own
    y = run_vae.diff_augment(x, "translation")
    for xi, yi in zip(x, y):
        shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                  if torch.equal(yi, F.pad(xi, (2, 2, 2, 2))[:, 2 + dy:18 + dy, 2 + dx:18 + dx])]
        assert len(shifts) == 1


def test_diff_augment_cutout_zeroes_at_most_a_quarter():
    torch.manual_seed(2)
    x = torch.rand(16, 3, 16, 16) * 0.9 + 0.1
    zeroed = (run_vae.diff_augment(x, "cutout") == 0).all(1).float().mean((1, 2))
    assert torch.all(zeroed <= 0.25) and torch.all(zeroed > 0)  # the square may hang over the edge


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("size, grid", [(16, 8), (32, 8), (64, 8), (128, 16)])
def test_discriminator_gives_a_logit_map_and_is_spectrally_normalised(size, grid, antialias):
    torch.manual_seed(0)
    disc = run_vae.PatchDiscriminator(size, channels=8, antialias=antialias)
    for _ in range(20):  # power iterations converge in training mode
        logits = disc(torch.rand(2, 3, size, size))
    assert logits.shape == (2, 1, grid, grid)
    conv = disc.net[0]
    sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
    assert sigma.item() == pytest.approx(1.0, abs=0.05)


def nyquist_share(disc, size=32):
    """Share of the energy of d logits / d image at the frequency of period 2 along either axis, over a few
    random images: the pattern a discriminator's gradient asks the decoder to draw."""
    x = torch.rand(8, 3, size, size, requires_grad=True)
    disc(x).sum().backward()
    power = torch.fft.fft2(x.grad).abs().pow(2).sum((0, 1))
    return ((power[size // 2, :].sum() + power[:, size // 2].sum()) / power.sum()).item()


def test_antialiased_discriminator_sends_the_decoder_a_gradient_without_a_period_2_pattern():
    torch.manual_seed(0)
    strided, antialiased = (run_vae.PatchDiscriminator(32, channels=8, antialias=a) for a in (False, True))
    assert all(isinstance(m, torch.nn.Conv2d) and m.stride == (1, 1) or not isinstance(m, torch.nn.Conv2d)
               for m in antialiased.net)
    assert sum(isinstance(m, run_vae.BlurPool) for m in antialiased.net) == 2
    assert nyquist_share(antialiased) < 0.25 * nyquist_share(strided)  # 0.04-0.16 over seeds 0-5


@pytest.mark.parametrize("classes, prefix", [({"num_classes": 3}, "class_embedding."),
                                             ({"head_classes": 3}, "class_head.")])
def test_a_discriminator_that_knows_the_classes_keeps_the_plain_keys_and_adds_its_own(classes, prefix):
    # the unconditional discriminator's keys are unchanged, so its earlier last.pt files still resume
    plain, extended = run_vae.PatchDiscriminator(32, 8), run_vae.PatchDiscriminator(32, 8, **classes)
    added = set(extended.state_dict()) - set(plain.state_dict())
    assert added == {k for k in extended.state_dict() if k.startswith(prefix)} != set()


def test_a_conditional_discriminator_adds_a_label_projection():
    torch.manual_seed(0)
    plain, projected = run_vae.PatchDiscriminator(32, 8), run_vae.PatchDiscriminator(32, 8, num_classes=3)
    x = torch.rand(2, 3, 32, 32)
    a, b = projected(x, torch.tensor([0, 0])), projected(x, torch.tensor([1, 2]))
    assert a.shape == b.shape == plain(x).shape
    assert not torch.allclose(a, b)  # the same images claiming other classes score differently
    # the label shifts each patch's logit by a projection of the patch's features, not by a constant
    assert (a - b).flatten(1).std(1).min() > 0


def red_and_blue_discs(n=8):
    """(images, labels): n red discs labelled 0, then n blue ones labelled 1."""
    shapes = disc_images(n)
    red = shapes * torch.tensor([1.0, 0.2, 0.2])[:, None, None]
    blue = shapes * torch.tensor([0.2, 0.2, 1.0])[:, None, None]
    return torch.cat([red, blue]), torch.tensor([0] * n + [1] * n)


@pytest.mark.parametrize("conditional", [False, True])
def test_only_a_conditional_discriminator_learns_to_reject_images_of_the_wrong_class(tmp_path, conditional):
    # Real: red discs labelled 0, blue discs labelled 1. Fake: the very same images with the classes
    # swapped, which an unconditional critic cannot tell from real (its hinge loss stays near 1).
    torch.manual_seed(0)
    cfg = run_vae.load_config(None, {"data": {"image_size": 16, "root": str(tmp_path)},
                                     "model": {"conditional": True},
                                     "loss": {"adversarial": 0.5, "adv_start": 0.0, "diffaug": "", "disc_channels": 8,
                                              "disc_lr": 1e-2, "disc_conditional": conditional}})
    sharp = run_vae.SharpTerms(cfg, "cpu", steps_per_epoch=10, num_classes=2)
    real, y = red_and_blue_discs()
    wrong_class = real.roll(len(real) // 2, 0)  # each shape in the other class's colour
    losses = [sharp.discriminator_step(real, wrong_class, step, y=y)["disc_loss"].item() for step in range(60)]
    final = np.mean(losses[-5:])
    if conditional:
        assert final < 0.5
    else:
        assert final > 0.9


def test_a_class_head_names_classes_from_the_pooled_features_of_the_shared_trunk():
    torch.manual_seed(0)
    plain, headed = run_vae.PatchDiscriminator(32, 8), run_vae.PatchDiscriminator(32, 8, head_classes=3)
    headed.eval()  # spectral norm's power iteration frozen: every call sees the same weights
    x = torch.rand(2, 3, 32, 32)
    by_hand = headed.class_head(headed.net[:-1](2 * x - 1).mean((2, 3)))
    logits, class_logits = headed(x, with_classes=True)
    assert class_logits.shape == (2, 3) and torch.allclose(class_logits, by_hand, atol=1e-6)
    assert torch.allclose(headed.class_logits(x), by_hand, atol=1e-6) and torch.allclose(logits, headed(x))
    with pytest.raises(ValueError, match="no class head"):
        plain.class_logits(x)  # no head, no class logits: not silently zeros


def classify_config(tmp_path, **loss):
    return sharp_config(tmp_path, model={"conditional": True},
                        **{"adversarial": 0.5, "disc_lr": 1e-2, "disc_classify": 2.0, **loss})


def test_the_class_head_learns_the_labels_of_real_images_only(tmp_path):
    torch.manual_seed(0)
    sharp = run_vae.SharpTerms(classify_config(tmp_path), "cpu", steps_per_epoch=10, num_classes=2)
    real, y = red_and_blue_discs()
    # fakes drawn in the other class's colour: were the head trained on them under their labels, it
    # could not name the real images' classes
    fakes = real.roll(len(real) // 2, 0)
    logs = [sharp.discriminator_step(real, fakes, step, y=y) for step in range(40)]
    assert logs[-1]["disc_class_loss"].item() < 0.3 * logs[0]["disc_class_loss"].item()  # 0.13-0.23 over seeds 0-4
    assert logs[-1]["disc_class_acc"].item() == 1.0
    with torch.no_grad():
        assert torch.equal(sharp.disc.class_logits(real).argmax(1), y)
        assert torch.equal(sharp.disc.class_logits(fakes).argmax(1), 1 - y)  # it names what it sees


def opposite_hue_discs(n=8):
    """(images, labels): n pink discs on grey labelled 0, then the same discs in the opposite hue (cyan, the
    same luma) labelled 1: only their hue tells the classes apart."""
    size = 16
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    g = torch.Generator().manual_seed(0)
    centres = 4 + 8 * torch.rand(n, 2, generator=g)
    inside = ((xx - centres[:, 0, None, None]) ** 2 + (yy - centres[:, 1, None, None]) ** 2 < 16).float()[:, None]
    pink = inside * torch.tensor([0.75, 0.3, 0.3])[:, None, None] + (1 - inside) * 0.5
    cyan = run_vae.rotate_hue(pink, torch.full((n,), torch.pi))
    return torch.cat([pink, cyan]), torch.tensor([0] * n + [1] * n)


@pytest.mark.parametrize("head_aug", ["", "hue"])
def test_a_class_head_on_hue_turned_images_cannot_name_classes_by_colour_alone(tmp_path, head_aug):
    torch.manual_seed(0)
    sharp = run_vae.SharpTerms(classify_config(tmp_path, disc_classify_aug=head_aug), "cpu", steps_per_epoch=10,
                               num_classes=2)
    real, y = opposite_hue_discs()
    logs = [sharp.discriminator_step(real, real, step, y=y) for step in range(40)]
    late_loss = sum(log["disc_class_loss"].item() for log in logs[-10:]) / 10
    if head_aug:
        assert late_loss > 0.65  # at chance (ln 2 = 0.69): 0.69-0.70 over seeds 0-3
    else:
        assert late_loss < 0.5 and logs[-1]["disc_class_acc"].item() == 1.0  # 0.39-0.41 over seeds 0-3


@pytest.mark.parametrize("adv_prior", [False, True])
def test_the_head_augmentation_reaches_the_class_head_only(tmp_path, adv_prior):
    # with loss.diffaug off, the patch logits must be those of the plain images, the class logits those of
    # hue-turned ones drawn from the global RNG: both players, with and without prior samples in the hinge
    torch.manual_seed(0)
    sharp = run_vae.SharpTerms(classify_config(tmp_path, disc_classify_aug="hue", adv_prior=adv_prior), "cpu",
                               steps_per_epoch=10, num_classes=2)
    sharp.disc.eval()  # spectral norm's power iteration frozen, so the values by hand are exact
    real, y = red_and_blue_discs(2)
    x_hat, x_prior = blur(real, 5), torch.rand(4, 3, 16, 16)
    fakes = torch.cat([x_hat, x_prior]) if adv_prior else x_hat
    with torch.no_grad():
        torch.manual_seed(1)
        g_class = F.cross_entropy(sharp.disc.class_logits(run_vae.diff_augment(x_prior, "hue")), y)
        g_hinge = run_vae.hinge_g_loss(sharp.disc(fakes))
        torch.manual_seed(2)
        d_class = F.cross_entropy(sharp.disc.class_logits(run_vae.diff_augment(real, "hue")), y)
        d_real = sharp.disc(real).mean()
        # the draws do turn the hue: the head's verdicts on the plain images differ
        assert abs(F.cross_entropy(sharp.disc.class_logits(x_prior), y) - g_class) > 1e-4
        assert abs(F.cross_entropy(sharp.disc.class_logits(real), y) - d_class) > 1e-4
    last_layer = torch.ones(1, requires_grad=True)
    torch.manual_seed(1)
    _, logs = sharp.generator_terms(real, x_hat, last_layer.sum(), last_layer, step=0,
                                    x_prior=x_prior * last_layer, y=y)
    assert logs["adv_class_loss"].item() == pytest.approx(g_class.item(), rel=1e-5)
    assert logs["adv_g_loss"].item() == pytest.approx((g_hinge + 2.0 * g_class).item(), rel=1e-5)
    torch.manual_seed(2)
    logs = sharp.discriminator_step(real, x_hat, step=0, x_prior=x_prior, y=y)
    assert logs["disc_class_loss"].item() == pytest.approx(d_class.item(), rel=1e-5)
    assert logs["disc_real"].item() == pytest.approx(d_real.item(), rel=1e-5)


@pytest.mark.parametrize("option", [{"disc_classify": 1.0}, {"disc_conditional": True, "disc_classify": 0.0}])
def test_a_label_aware_discriminator_built_without_the_classes_is_refused(tmp_path, option):
    # a caller that forgets num_classes would otherwise get a discriminator that ignores the labels
    key = next(k for k, v in option.items() if v)
    with pytest.raises(run_vae.ConfigError, match=f"loss.{key} needs the data's classes"):
        run_vae.SharpTerms(classify_config(tmp_path, **option), "cpu", steps_per_epoch=10)
    sharp = run_vae.SharpTerms(classify_config(tmp_path, **option), "cpu", steps_per_epoch=10, num_classes=3)
    embedding, head = sharp.disc.class_embedding, sharp.disc.class_head
    assert (embedding.num_embeddings if embedding else 0) == (3 if option.get("disc_conditional") else 0)
    assert (head.out_features if head else 0) == (3 if option["disc_classify"] else 0)


def test_the_generator_class_term_is_the_heads_cross_entropy_on_prior_samples_only(tmp_path):
    torch.manual_seed(0)
    sharp = run_vae.SharpTerms(classify_config(tmp_path), "cpu", steps_per_epoch=10, num_classes=2)
    sharp.disc.eval()  # spectral norm's power iteration frozen, so the values by hand are exact
    assert sharp.wants_prior_samples(0)  # the class term needs prior samples even without adv_prior
    real, y = red_and_blue_discs(2)
    w = torch.tensor([1.0, 0.5], requires_grad=True)  # stands in for the decoder's last layer
    x_hat = blur(real, 5) * w[0]  # the reconstructions depend on w[0], the prior samples on both
    x_prior = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * w.prod()
    rec = 1e-2 * (x_hat - real).pow(2).sum()
    hinge = run_vae.hinge_g_loss(sharp.disc(x_hat))  # without adv_prior the hinge judges reconstructions
    class_loss = F.cross_entropy(sharp.disc.class_logits(x_prior), y)
    g_loss = hinge + 2.0 * class_loss  # λ = 2
    rec_grad, = torch.autograd.grad(rec, w, retain_graph=True)
    g_grad, = torch.autograd.grad(g_loss, w, retain_graph=True)
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    extra, logs = sharp.generator_terms(real, x_hat, rec, w, step=0, x_prior=x_prior, y=y)
    assert logs["adv_class_loss"].item() == pytest.approx(class_loss.item(), rel=1e-6)
    assert logs["adv_g_loss"].item() == pytest.approx(g_loss.item(), rel=1e-6)
    assert logs["adv_weight"].item() == pytest.approx(weight.item(), rel=1e-5)
    assert extra.item() == pytest.approx(0.5 * weight.item() * g_loss.item(), rel=1e-5)
    extra.backward()
    assert all(p.grad is None for p in sharp.disc.parameters())  # the head is trained by discriminator_step only
    with torch.no_grad():
        fake_by_hand, with_prior = sharp.disc(x_hat).mean(), sharp.disc(torch.cat([x_hat, x_prior])).mean()
    logs = sharp.discriminator_step(real, x_hat, step=0, x_prior=x_prior, y=y)
    assert logs["disc_fake"].item() == pytest.approx(fake_by_hand.item(), rel=1e-6)  # and so does the critic
    assert abs(logs["disc_fake"] - with_prior) > 1e-3
    with pytest.raises(ValueError, match="prior_samples=True"):
        sharp.generator_terms(real, x_hat, rec, w, step=0, y=y)


@pytest.mark.parametrize("classify", [0.0, 1.0])
def test_the_class_term_teaches_the_decoder_to_draw_what_the_label_says(tmp_path, classify):
    # The head first learns red = 0, blue = 1 on real discs. Then the decoder is trained by the
    # generator terms alone (a tiny pixel term only gives the adaptive weight its scale): with the class
    # term its prior samples for label 0 turn redder than those for label 1; without it, not.
    torch.manual_seed(0)
    sharp = run_vae.SharpTerms(classify_config(tmp_path, disc_classify=1.0), "cpu", steps_per_epoch=10,
                               num_classes=2)
    real, y = red_and_blue_discs(4)
    for step in range(40):
        sharp.discriminator_step(real, real, step, y=y)
    sharp.classify_weight = classify  # the same trained head either way; only the decoder's term differs
    model = run_vae.VAE(16, latent_dim=8, num_classes=2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    last_layer = model.decoder[-2].weight
    for step in range(25):
        x_hat, x_prior, _, _ = model(real, y, prior_samples=True)
        rec = 1e-3 * run_vae.squared_error(real, x_hat).mean()
        extra, _ = sharp.generator_terms(real, x_hat, rec, last_layer, step, x_prior, y)
        opt.zero_grad()
        (rec + extra).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        z = torch.randn(64, 8)
        samples = [model.decode(z, torch.full((64,), c)) for c in (0, 1)]  # per label, the same z
    redness = [(images[:, 0] - images[:, 2]).mean().item() for images in samples]
    if classify:
        assert redness[0] - redness[1] > 0.6  # 1.1-1.6 over seeds 0-4
    else:
        assert abs(redness[0] - redness[1]) < 0.3  # 0.07-0.15 over seeds 0-4


def test_blur_pool_halves_the_size_and_keeps_a_flat_image_flat():
    x = torch.full((1, 4, 8, 8), 0.3)
    y = run_vae.BlurPool(4, padding=1)(x)
    assert y.shape == (1, 4, 4, 4) and torch.allclose(y, torch.full_like(y, 0.3))
    assert run_vae.BlurPool(4, padding=1)(x.bfloat16()).dtype == torch.bfloat16
    # the LPIPS trunk's padding of 2, which its shipped weights were trained with, keeps one more row
    assert run_vae.BlurPool(4)(x).shape == (1, 4, 5, 5)


def test_random_roll_shifts_every_tensor_alike_and_wraps_round():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    y = x.flip(0)
    shifts = set()
    torch.manual_seed(0)
    for _ in range(20):
        a, b = run_vae.random_roll((x, y), 4)
        hits = [(dy, dx) for dy in range(4) for dx in range(4)
                if torch.equal(a, torch.roll(x, (dy, dx), dims=(-2, -1)))]
        assert len(hits) == 1 and torch.equal(b, torch.roll(y, hits[0], dims=(-2, -1)))  # one shift for both
        shifts.add(hits[0])
    assert len(shifts) > 5  # a new shift each call, drawn from 0..3 on each axis
    assert all(torch.equal(t, u) for t, u in zip(run_vae.random_roll((x, y), 1), (x, y)))


@needs_stlpips
def test_jittered_perceptual_term_is_the_distance_of_the_rolled_pair(tmp_path):
    sharp = run_vae.SharpTerms(sharp_config(tmp_path, perceptual=1.0, perceptual_jitter=8), "cpu", steps_per_epoch=10)
    size = 16
    x = disc_images(size=size)
    x_hat = blur(x, 3)
    torch.manual_seed(3)
    extra, logs = sharp.generator_terms(x, x_hat, torch.tensor(1.0), None, step=0)
    torch.manual_seed(3)
    rolled = run_vae.random_roll((x_hat, x), 8)
    assert logs["perceptual"].item() == pytest.approx(sharp.perceptual(*rolled).mean().item(), rel=1e-6)
    unrolled = sharp.perceptual(x_hat, x).mean().item()
    assert extra.item() == pytest.approx(logs["perceptual"].item()) and extra.item() != pytest.approx(unrolled)
    same, _ = sharp.generator_terms(x, x.clone(), torch.tensor(1.0), None, step=0)
    assert abs(same.item()) < 1e-4  # identical images stay at distance 0 under any shift


def sharp_config(tmp_path, model=None, **loss):
    values = {"adv_start": 0.0, "diffaug": "", "disc_channels": 8, "disc_lr": 1e-3}
    values.update(loss)
    return run_vae.load_config(None, {"data": {"image_size": 16, "root": str(tmp_path)}, "model": model or {},
                                      "loss": values})


def test_sharp_terms_are_nothing_when_off(tmp_path):
    sharp = run_vae.SharpTerms(run_vae.load_config(None, {"data": {"image_size": 16}}), "cpu", steps_per_epoch=10)
    x = disc_images()
    extra, logs = sharp.generator_terms(x, x, torch.tensor(1.0), None, step=100)
    assert not sharp.enabled and extra.item() == 0 and logs == {}
    assert sharp.discriminator_step(x, x, step=100) == {} and sharp.state_dict() == {}


def test_discriminator_steps_lower_its_loss_and_wait_for_adv_start(tmp_path):
    torch.manual_seed(0)
    cfg = sharp_config(tmp_path, adversarial=0.1, adv_start=0.5, disc_lr=1e-2)
    sharp = run_vae.SharpTerms(cfg, "cpu", steps_per_epoch=10)
    real, fake = disc_images(8), torch.rand(8, 3, 16, 16)
    before = copy_params(sharp.disc)
    assert sharp.discriminator_step(real, fake, step=4) == {}  # adv_start 0.5 epochs = step 5
    assert all(torch.equal(a, b) for a, b in zip(before, copy_params(sharp.disc)))
    losses = [sharp.discriminator_step(real, fake, step=5 + i)["disc_loss"].item() for i in range(15)]
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("antialias", [False, True])
def test_the_default_discriminator_learns_to_spot_a_mild_blur(antialias):
    # The blur of a trained VAE's reconstructions is subtle; with colour and cutout augmentation and a small
    # lr the discriminator never got past chance on apples, so the adversarial term did nothing. The
    # anti-aliased one blurs inside, after a full-resolution conv: it must still see the difference.
    torch.manual_seed(0)
    cfg = run_vae.load_config(None, {"data": {"image_size": 32}, "loss": {"adversarial": 0.5, "adv_start": 0.0,
                                                                          "disc_antialias": antialias}})
    sharp = run_vae.SharpTerms(cfg, "cpu", steps_per_epoch=10)
    real = disc_images(96, size=32, seed=1)
    fake = blur(real, 3)
    for step in range(200):
        batch = torch.randint(0, 64, (4,))  # the default batch size
        sharp.discriminator_step(real[batch], fake[batch], step)
    with torch.no_grad():  # held-out images, no augmentation
        real_logits, fake_logits = sharp.disc(real[64:]).mean((1, 2, 3)), sharp.disc(fake[64:]).mean((1, 2, 3))
    assert (real_logits - fake_logits).mean() > 0.05
    assert run_vae.hinge_d_loss(real_logits, fake_logits) < 0.98


def copy_params(module):
    return [p.detach().clone() for p in module.parameters()]


def test_generator_steps_lower_the_adversarial_term(tmp_path):
    torch.manual_seed(0)
    sharp = run_vae.SharpTerms(sharp_config(tmp_path, adversarial=0.5), "cpu", steps_per_epoch=10)
    decoder = nn.Sequential(nn.ConvTranspose2d(8, 3, 4, 2, 1), nn.Sigmoid())  # like the VAE's last layer
    opt = torch.optim.Adam(decoder.parameters(), lr=0.05)
    z, x = torch.randn(4, 8, 8, 8), disc_images(4)
    values = []
    for step in range(6):  # the discriminator is held fixed: the decoder must learn to raise its logits
        x_hat = decoder(z)
        recon = F.mse_loss(x_hat, x, reduction="none").flatten(1).sum(1).mean()
        extra, logs = sharp.generator_terms(x, x_hat, recon, decoder[0].weight, step)
        assert torch.isfinite(extra) and extra.requires_grad and logs["adv_weight"] > 0
        opt.zero_grad()
        (extra / logs["adv_weight"]).backward()  # the term alone, at a fixed scale
        opt.step()
        values.append(logs["adv_g_loss"].item())
    assert values[-1] < values[0]
    assert all(p.grad is None for p in sharp.disc.parameters())  # only discriminator_step trains it


@pytest.mark.parametrize("device, dtype", [
    ("cpu", torch.bfloat16),
    pytest.param("cuda", torch.float16, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))])
@pytest.mark.parametrize("classify", [0.0, 1.0, "hue"])  # "hue": a class head on hue-turned images
def test_terms_run_under_autocast_with_the_vae(tmp_path, device, dtype, classify):
    torch.manual_seed(0)
    cfg = sharp_config(tmp_path, model={"conditional": True}, adversarial=0.5, r1=1.0, perceptual=0.1,
                       diffaug="color,hue,translation,cutout", perceptual_net="msssim" if not HAS_STLPIPS else "alex",
                       disc_classify=1.0 if classify else 0.0,
                       disc_classify_aug=classify if isinstance(classify, str) else "")
    sharp = run_vae.SharpTerms(cfg, device, steps_per_epoch=10, amp_dtype=dtype, num_classes=2)
    model = run_vae.VAE(16, 8, num_classes=2).to(device)
    x, y = disc_images(4).to(device), torch.tensor([0, 1, 0, 1], device=device)
    with torch.autocast(device, dtype=dtype):
        x_hat, x_prior, mu, logvar = run_vae.step_forward(model, x, y, sharp, step=0)
        recon, kl, _ = run_vae.vae_loss(x, x_hat, mu, logvar)
        extra, logs = sharp.generator_terms(x, x_hat, recon, model.decoder[-2].weight, 0, x_prior, y)
        loss = recon + kl + extra
    loss.backward()
    logs.update(sharp.discriminator_step(x, x_hat, 0, x_prior, y))
    class_logs = {"adv_class_loss", "disc_class_loss", "disc_class_acc"} if classify else set()
    assert set(logs) == {"perceptual", "adv_g_loss", "adv_weight", "disc_loss", "disc_r1", "disc_real",
                         "disc_fake"} | class_logs
    assert all(torch.isfinite(v) for v in logs.values())
    assert torch.isfinite(model.decoder[-2].weight.grad).all()


def test_state_dict_round_trip_resumes_the_discriminator_exactly(tmp_path):
    import io
    cfg = sharp_config(tmp_path, adversarial=0.5, r1=0.5, diffaug="color,translation")
    torch.manual_seed(0)
    a = run_vae.SharpTerms(cfg, "cpu", steps_per_epoch=10)
    real, fake = disc_images(4), blur(disc_images(4), 5)
    for step in range(3):
        a.discriminator_step(real, fake, step)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(1)  # different initial weights
    b = run_vae.SharpTerms(cfg, "cpu", steps_per_epoch=10)
    b.load_state_dict(torch.load(buffer, weights_only=True))  # plain tensors and numbers: loads safely
    state_a, state_b = a.disc_opt.state_dict()["state"], b.disc_opt.state_dict()["state"]
    assert all(torch.equal(state_a[k]["exp_avg_sq"], state_b[k]["exp_avg_sq"]) for k in state_a)
    for step in range(3, 5):  # the same random augmentations, then the same updates
        torch.manual_seed(step)
        log_a = a.discriminator_step(real, fake, step)
        torch.manual_seed(step)
        log_b = b.discriminator_step(real, fake, step)
        assert log_a["disc_loss"].item() == log_b["disc_loss"].item()
    assert torch.equal(a.disc(real), b.disc(real))
    off = run_vae.SharpTerms(run_vae.load_config(None, {"data": {"image_size": 16}}), "cpu", steps_per_epoch=10)
    with pytest.raises(run_vae.CheckpointError, match="loss.adversarial"):
        off.load_state_dict(a.state_dict())


def test_step_cost_counts_the_extra_networks():
    plain = run_vae.sharp_step_cost(None, image_size=16, batch_size=2, steps=1)
    adversarial = run_vae.sharp_step_cost({"adversarial": 0.5, "disc_channels": 16}, image_size=16, batch_size=2, steps=1)
    with_prior = run_vae.sharp_step_cost({"adversarial": 0.5, "disc_channels": 16, "adv_prior": True},
                                         image_size=16, batch_size=2, steps=1)
    assert plain["seconds_per_image"] > 0 and adversarial["gflop_per_image"] > plain["gflop_per_image"] > 0
    assert with_prior["gflop_per_image"] > adversarial["gflop_per_image"]  # one more decoder and disc pass
    conditional = {"adversarial": 0.5, "disc_channels": 16, "disc_conditional": True}
    projection = run_vae.sharp_step_cost(conditional, image_size=16, batch_size=2, steps=1,
                                         model={"conditional": True})
    head = run_vae.sharp_step_cost({**conditional, "disc_classify": 1.0}, image_size=16, batch_size=2, steps=1,
                                   model={"conditional": True})
    assert head["gflop_per_image"] > projection["gflop_per_image"] > 0  # the prior samples' decoder and disc pass
    hue = run_vae.sharp_step_cost({**conditional, "disc_classify": 1.0, "disc_classify_aug": "hue"}, image_size=16,
                                  batch_size=2, steps=1, model={"conditional": True})
    assert hue["gflop_per_image"] > head["gflop_per_image"]  # the head's own trunk pass on the real images


def test_forward_with_prior_samples_decodes_standard_normal_z_beside_the_posterior():
    torch.manual_seed(0)
    model = run_vae.VAE(16, latent_dim=8, num_classes=3).eval()  # eval: BatchNorm does not mix the two halves
    x, y = disc_images(5), torch.tensor([0, 1, 2, 0, 1])
    torch.manual_seed(1)
    x_hat, mu, logvar = model(x, y)
    eps = torch.randn(5, 8)  # the draw after the posterior's noise: the prior samples' z
    torch.manual_seed(1)
    x_hat2, x_prior, mu2, logvar2 = model(x, y, prior_samples=True)
    assert torch.allclose(x_hat2, x_hat, atol=1e-6) and torch.equal(mu2, mu) and torch.equal(logvar2, logvar)
    assert torch.allclose(x_prior, model.decode(eps, y), atol=1e-6)
    assert not torch.allclose(x_prior, model.decode(eps, torch.tensor([1, 2, 0, 1, 2])), atol=1e-3)  # labels count


def record_decoded_codes(model):
    """A list that collects every z the model's decoder is handed from now on."""
    seen, decode = [], model.decode
    model.decode = lambda z, y=None: seen.append(z.detach().clone()) or decode(z, y)
    return seen


def decoded_codes(model, *args, **kwargs):
    """The z rows the model's forward pass hands its decoder."""
    seen = record_decoded_codes(model)
    model(*args, **kwargs)
    return seen[-1]


@pytest.mark.parametrize("components", [1, 2])
def test_forward_draws_its_prior_samples_from_the_fitted_prior_when_asked(components):
    torch.manual_seed(0)
    model = run_vae.VAE(16, latent_dim=8, num_classes=3, prior_components=components).eval()
    means = torch.arange(3 * components, dtype=torch.float32).view(3, components, 1).expand(3, components, 8) * 10
    tiny = torch.eye(8).repeat(3, 1, 1) * 1e-3
    model.set_prior(means[:, 0] + 5, tiny)
    if components > 1:
        model.prior_mix_mean.copy_(means)
        model.prior_mix_scale_tril.copy_(tiny[:, None].expand(3, components, 8, 8))
    x, y = disc_images(6), torch.tensor([0, 1, 2, 0, 1, 2])
    standard = decoded_codes(model, x, y, prior_samples=True)[6:]
    assert standard.abs().max() < 6 and standard.std() > 0.5  # N(0, I), whatever the buffers hold
    fitted = decoded_codes(model, x, y, prior_samples=True, from_fitted_prior=True)[6:]
    if components == 1:  # each row at its class's Gaussian
        assert torch.allclose(fitted, means[y, 0] + 5, atol=0.01)
    else:  # each row at one of its class's components
        nearest = (fitted[:, None] - means[y]).abs().amax(-1).min(1).values
        assert torch.all(nearest < 0.01)


def test_prior_samples_from_the_fitted_prior_need_a_fitted_prior_and_a_term_that_draws_them():
    with pytest.raises(run_vae.ConfigError, match="set model.prior=fitted, or loss.adv_prior_from=standard"):
        run_vae.load_config(None, {"model": {"prior": "standard"}, "loss": {"adv_prior_from": "fitted"}})
    with pytest.raises(run_vae.ConfigError, match="loss.adv_prior_from must be one of standard, fitted"):
        run_vae.load_config(None, {"loss": {"adv_prior_from": "mixture"}})
    for loss in ({}, {"adversarial": 0.5}, {"adv_prior": True}):
        with pytest.raises(run_vae.ConfigError, match="none are drawn: set loss.adversarial > 0 with"):
            run_vae.load_config(None, {"loss": {"adv_prior_from": "fitted", **loss}})
    for loss in ({"adv_prior": True}, {"disc_classify": 1.0}):
        run_vae.load_config(None, {"model": {"conditional": True},
                                   "loss": {"adv_prior_from": "fitted", "adversarial": 0.5, **loss}})


@pytest.mark.parametrize("source", ["standard", "fitted"])
def test_the_training_step_decodes_prior_samples_from_the_source_the_config_names(tmp_path, source):
    model = run_vae.VAE(16, latent_dim=8, num_classes=3).eval()
    model.set_prior(torch.full((3, 8), 50.0), torch.eye(8).repeat(3, 1, 1) * 1e-3)
    sharp = run_vae.SharpTerms(sharp_config(tmp_path, model={"conditional": True}, adversarial=0.5, adv_prior=True,
                                            adv_prior_from=source), "cpu", steps_per_epoch=10, num_classes=3)
    seen = record_decoded_codes(model)
    run_vae.step_forward(model, disc_images(4), torch.tensor([0, 1, 2, 0]), sharp, step=0)
    prior_codes = seen[0][4:]
    assert torch.allclose(prior_codes, torch.full_like(prior_codes, 50.0), atol=0.01) == (source == "fitted")


def test_prior_samples_join_the_fakes_of_both_players(tmp_path):
    torch.manual_seed(0)
    sharp = run_vae.SharpTerms(sharp_config(tmp_path, adversarial=0.5, adv_prior=True), "cpu", steps_per_epoch=10)
    x, x_hat, x_prior = disc_images(4), blur(disc_images(4), 5), torch.rand(4, 3, 16, 16)
    assert sharp.wants_prior_samples(0)
    recon = torch.tensor(1.0, requires_grad=True)
    last_layer = torch.ones(1, requires_grad=True)  # any leaf: the weight is not what this test checks
    with torch.no_grad():
        by_hand = run_vae.hinge_g_loss(sharp.disc(torch.cat([x_hat, x_prior])))
        fake_by_hand = sharp.disc(torch.cat([x_hat, x_prior])).mean()
    _, logs = sharp.generator_terms(x, x_hat, recon * last_layer.sum(), last_layer,
                                    step=0, x_prior=x_prior * last_layer)
    assert logs["adv_g_loss"].item() == pytest.approx(by_hand.item(), rel=1e-5)
    logs = sharp.discriminator_step(x, x_hat, step=0, x_prior=x_prior)
    assert logs["disc_fake"].item() == pytest.approx(fake_by_hand.item(), rel=1e-5)
    off = run_vae.SharpTerms(sharp_config(tmp_path, adversarial=0.5, adv_start=1.0, adv_prior=True), "cpu", 10)
    assert not off.wants_prior_samples(9) and off.wants_prior_samples(10)  # not before adv_start


# ----------------------------------------------------------------------------------------------------
# the terms inside run_vae.train()

def first_and_last_third(run_dir, tag):
    """Means of a logged training scalar over the first and the last third of the run's steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    values = [e.value for e in sorted(EventAccumulator(str(run_dir)).Reload().Scalars(tag), key=lambda e: e.step)]
    third = len(values) // 3
    return float(np.mean(values[:third])), float(np.mean(values[-third:]))


@pytest.mark.skipif(not HAS_STLPIPS, reason="stlpips-pytorch is not installed (pip install -r requirements.txt)")
@pytest.mark.parametrize("jitter", [0, 4])
def test_a_16px_run_with_the_perceptual_term_lowers_it(tmp_path, image_folder, jitter):
    cfg = tiny_config(tmp_path, image_folder, train={"epochs": 3, "batch_size": 2, "log_every": 1},
                      loss={"perceptual": 0.05, "perceptual_jitter": jitter})
    summary = train(cfg)
    first, last = first_and_last_third(summary["run_dir"], "train/perceptual")
    assert last < 0.8 * first


@pytest.mark.parametrize("adv_prior, model, antialias, classify", [
    (False, {}, False, 0.0), (True, {}, True, 0.0),
    (True, {"upsample": "bilinear", "final_conv": True, "res_blocks": 1, "noise": True}, False, 0.0),
    (True, {"conditional": True}, False, 0.0), (False, {"conditional": True, "encoder_label": False}, False, 1.0)])
def test_a_16px_adversarial_run_trains_both_players_and_best_pt_has_no_discriminator(tmp_path, image_folder,
                                                                                      adv_prior, model, antialias,
                                                                                      classify):
    conditional = model.get("conditional", False)  # then the discriminator is told the labels too
    cfg = tiny_config(tmp_path, image_folder, train={"epochs": 2, "log_every": 1}, model={"latent_dim": 8, **model},
                      loss={"adversarial": 0.5, "adv_start": 1.0, "adv_prior": adv_prior, "disc_antialias": antialias,
                            "disc_conditional": conditional, "disc_classify": classify})
    summary = train(cfg)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(summary["run_dir"]).Reload()
    disc = acc.Scalars("train/disc_loss")
    assert disc and min(e.step for e in disc) > 3  # epoch 1 (3 steps) trains the VAE alone
    assert all(np.isfinite(e.value) for e in disc + acc.Scalars("train/adv_weight"))
    last = load_checkpoint(tmp_path / "logs/tiny/last.pt")
    assert set(last["sharp"]) == {"disc", "disc_opt", "disc_scaler"}
    assert any(k.startswith("class_embedding.") for k in last["sharp"]["disc"]) == conditional
    assert any(k.startswith("class_head.") for k in last["sharp"]["disc"]) == (classify > 0)
    if classify:
        class_losses = acc.Scalars("train/disc_class_loss") + acc.Scalars("train/adv_class_loss")
        assert class_losses and all(np.isfinite(e.value) for e in class_losses)
    best = load_checkpoint(summary["best_checkpoint"])
    assert "sharp" not in best and not any(k.startswith("disc") for k in best["model"])
    metrics = run_vae.test({**cfg, "test": {**cfg["test"], "checkpoint": summary["best_checkpoint"],
                                            "out_dir": str(tmp_path / "test")}})
    assert metrics["epoch"] == best["epoch"] and (tmp_path / "test/samples.png").is_file()


@pytest.mark.parametrize("adv_prior, conditional, classify", [(False, False, 0.0), (True, False, 0.0),
                                                               (True, True, 0.0), (False, True, 1.0),
                                                               (False, True, "hue"), ("fitted", True, 0.0)])
def test_resume_with_the_discriminator_equals_an_uninterrupted_run(tmp_path, image_folder, adv_prior, conditional,
                                                                   classify):
    # classify "hue": a class head whose inputs are hue-turned, random draws the resume must replay;
    # adv_prior "fitted": prior samples from the prior refitted after each epoch, which last.pt must carry
    loss = {"adversarial": 0.5, "adv_start": 0.5, "r1": 0.1, "adv_prior": bool(adv_prior),
            "adv_prior_from": "fitted" if adv_prior == "fitted" else "standard", "disc_conditional": conditional,
            "disc_classify": 1.0 if classify else 0.0,
            "disc_classify_aug": classify if isinstance(classify, str) else ""}
    model = {"latent_dim": 8, "conditional": conditional}
    full = tiny_config(tmp_path, image_folder, run={"name": "full"}, train={"epochs": 3}, model=model, loss=loss)
    part = tiny_config(tmp_path, image_folder, run={"name": "part"}, train={"epochs": 3}, model=model, loss=loss)
    train(full)
    with pytest.raises(run_vae.StopRequested), interrupted_during_step(4):  # mid epoch 2, disc running
        train(part)
    train(part, resume=True)
    a, b = (load_checkpoint(tmp_path / f"logs/{n}/last.pt") for n in ("full", "part"))
    assert_same_weights(a["model"], b["model"])
    assert_same_weights(a["sharp"]["disc"], b["sharp"]["disc"])


@pytest.mark.parametrize("source, fitted_after", [("standard", [4]), ("fitted", [2, 3, 4])])
def test_a_run_drawing_adversarial_samples_from_the_fitted_prior_refits_it_every_epoch(tmp_path, image_folder,
                                                                                      monkeypatch, source,
                                                                                      fitted_after):
    # FID is off, so the prior is otherwise fitted once, at the end. 3 steps an epoch: the discriminator starts
    # at step round(2.5 * 3) = 8, the second of epoch 3, so the first fit it needs comes after epoch 2
    cfg = tiny_config(tmp_path, image_folder, train={"epochs": 4}, model={"latent_dim": 8, "conditional": True},
                      loss={"adversarial": 0.5, "adv_start": 2.5, "adv_prior": True, "adv_prior_from": source})
    epochs, fit = [], run_vae.fit_run_prior
    monkeypatch.setattr(run_vae, "fit_run_prior", lambda run: epochs.append(run.epoch) or fit(run))
    summary = train(cfg)
    assert epochs == fitted_after and summary["timings"]["prior_fits"] == len(fitted_after)


@pytest.mark.parametrize("then, stop, fitted_after", [
    ({}, "epoch", [2, 3]),  # last.pt carries the fit after epoch 1, which epoch 2 draws from
    ({"adv_prior_from": "standard"}, "epoch", [1, 2, 3]),  # no fit was needed before: fitted on resume
    ({"adv_start": 2.5}, "epoch", [1, 2, 3]),  # the first fit was due after epoch 2: fitted on resume
    ({"adv_prior_from": "standard"}, "step", [1, 2, 3])])  # Ctrl-C mid epoch 2: fitted to those weights
def test_a_resume_that_now_draws_from_the_fitted_prior_fits_it_first(tmp_path, image_folder, monkeypatch, then,
                                                                     stop, fitted_after):
    def config(**loss):  # with EMA, whose copy of the prior the fit sets too
        return tiny_config(tmp_path, image_folder, train={"epochs": 3, "ema": 0.9},
                           model={"latent_dim": 8, "conditional": True},
                           loss={"adversarial": 0.5, "adv_start": 0.5, "adv_prior": True, "adv_prior_from": "fitted",
                                 **loss})
    if stop == "epoch":
        train(config(**then), max_epochs=1)
    else:
        with pytest.raises(run_vae.StopRequested), interrupted_during_step(4):  # 3 steps an epoch
            train(config(**then))
    fits, fit = [], run_vae.fit_run_prior  # (epoch, step) of each fit
    monkeypatch.setattr(run_vae, "fit_run_prior", lambda run: fits.append((run.epoch, run.step)) or fit(run))
    decoded, decode = [], run_vae.VAE.decode
    def record_prior_mean(model, *args, **kwargs):  # the prior the first resumed step draws from
        decoded.append(model.prior_mean.abs().sum().item())
        return decode(model, *args, **kwargs)
    monkeypatch.setattr(run_vae.VAE, "decode", record_prior_mean)
    train(config(), resume=True)
    assert [epoch for epoch, _ in fits] == fitted_after
    assert fits[0][1] == (5 if stop == "step" else 3 * fits[0][0])  # before the first step it runs
    assert decoded[0] > 0  # N(0, I) has zero means


def test_a_changed_disc_lr_takes_effect_on_resume(tmp_path, image_folder, monkeypatch, capsys):
    # the discriminator's Adam state in last.pt carries the rate it was saved with; the config must win, as
    # train.lr does, or the advice after a divergence (a lower loss.disc_lr) would do nothing
    def config(disc_lr):
        return tiny_config(tmp_path, image_folder, train={"epochs": 2},
                           loss={"adversarial": 0.5, "adv_start": 0.0, "disc_lr": disc_lr})
    train(config(1e-3), max_epochs=1)
    rates, step = [], run_vae.train_step
    monkeypatch.setattr(run_vae, "train_step",
                        lambda run, *a: rates.append([g["lr"] for g in run.sharp.disc_opt.param_groups]) or step(run, *a))
    train(config(2.5e-4), resume=True)
    assert rates and all(r == [2.5e-4] for r in rates)
    assert "loss.disc_lr changed from 0.001 to 0.00025" in capsys.readouterr().out


def test_resume_refuses_to_drop_the_discriminator(tmp_path, image_folder):
    cfg = tiny_config(tmp_path, image_folder, train={"epochs": 2}, loss={"adversarial": 0.5, "adv_start": 0.0})
    train(cfg, max_epochs=1)
    plain = tiny_config(tmp_path, image_folder, train={"epochs": 2})
    with pytest.raises(run_vae.ConfigError, match="discriminator"):
        train(plain, resume=True)


@pytest.mark.parametrize("then, now, message", [
    ({"disc_conditional": False}, {"disc_conditional": True}, "loss.disc_conditional=false"),
    ({"disc_conditional": True}, {"disc_conditional": False}, "loss.disc_conditional=true"),
    ({"disc_classify": 0.0}, {"disc_classify": 1.0}, "no class head"),
    ({"disc_classify": 1.0}, {"disc_classify": 0.0}, "a class head")])
def test_resume_refuses_to_switch_what_the_discriminator_knows_of_the_labels(tmp_path, image_folder, then, now,
                                                                             message):
    def config(loss):
        return tiny_config(tmp_path, image_folder, model={"latent_dim": 8, "conditional": True}, train={"epochs": 2},
                           loss={"adversarial": 0.5, "adv_start": 0.0, **loss})
    train(config(then), max_epochs=1)
    last = (tmp_path / "logs/tiny/last.pt").read_bytes()
    with pytest.raises(run_vae.CheckpointError, match=message):
        train(config(now), resume=True)
    assert (tmp_path / "logs/tiny/last.pt").read_bytes() == last  # nothing saved is lost
